"""Tool calling for the OpenAI-compatible server (Hermes / Qwen2.5 call syntax).

A model calls tools by writing one or more blocks, optionally after some free text:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Everything here is a pure function (or a small state machine) over plain dicts and
strings, so the server can use it without this module knowing about requests:

- load_chat_template / template_takes_tools / template_takes_tool_calls: choose and
  inspect a chat template (BUILTIN_TEMPLATES has a tool-capable ChatML one);
- validate_tools: check a request's tools / tool_choice / parallel_tool_calls (and the
  deprecated functions / function_call) and turn them into a ToolPlan;
- tool_call_grammar: for tool_choice "required" or a named function, a Lark grammar
  (llguidance's dialect) that forces the output to be tool-call blocks;
- parse_tool_calls: split a finished output into content and tool calls;
- ToolCallStreamer: the same split, incrementally, as chat.completion.chunk deltas;
- messages_for_template: OpenAI messages -> what HF chat templates expect.

Content rule (shared by parse_tool_calls and ToolCallStreamer): the text outside valid
call blocks is split into segments by those blocks; whitespace touching a valid block
is dropped, empty segments are dropped, and the rest are joined with "\\n". A block
whose JSON does not parse, or that names an unknown function, stays in the content
verbatim. A block left open at the end of the output counts if its JSON is a valid call.
"""
from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

TEMPLATE_DIR = Path(__file__).parent / "templates"
BUILTIN_TEMPLATES: dict[str, Path] = {
    "chatml-tools": TEMPLATE_DIR / "chatml_tools.jinja",
}

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"

_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_MODES = ("none", "auto", "required", "named")


# --------------------------------------------------------------------------- templates


def load_chat_template(name_or_path_or_text: str) -> str:
    """The text of a chat template given as a builtin name, a file path, or jinja text."""
    if not isinstance(name_or_path_or_text, str) or not name_or_path_or_text.strip():
        raise ValueError("chat template must be a non-empty string: a builtin name "
                         f"({', '.join(sorted(BUILTIN_TEMPLATES))}), a file path, "
                         "or jinja text")
    value = name_or_path_or_text
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value].read_text(encoding="utf-8")
    if "{%" in value or "{{" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(
            f"chat template {value!r} is neither a builtin template "
            f"({', '.join(sorted(BUILTIN_TEMPLATES))}), an existing file, "
            "nor jinja text (no '{%' or '{{')")
    text = path.read_text(encoding="utf-8")
    # A tokenizer_config.json-style file or a JSON string holding the template.
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError:
            return text
        if isinstance(data, str):
            return data
        if isinstance(data, dict) and isinstance(data.get("chat_template"), str):
            return data["chat_template"]
        raise ValueError(f"chat template file {value!r} is JSON without a "
                         "'chat_template' string")
    return text


def _parse_template(template: str):
    import jinja2

    # HF renders with loopcontrols; its {% generation %} tag is unknown to plain
    # jinja, so callers fall back to a textual check when parsing fails.
    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    return env.parse(template)


def template_takes_tools(template: str) -> bool:
    """Whether the template refers to the `tools` variable."""
    try:
        from jinja2 import meta

        return "tools" in meta.find_undeclared_variables(_parse_template(template))
    except Exception:
        return re.search(r"\btools\b", template) is not None


def template_takes_tool_calls(template: str) -> bool:
    """Whether the template reads a message's `tool_calls` (attribute or item)."""
    try:
        from jinja2 import nodes

        ast = _parse_template(template)
        for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
            if isinstance(node, nodes.Getattr) and node.attr == "tool_calls":
                return True
            if (isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const)
                    and node.arg.value == "tool_calls"):
                return True
        return False
    except Exception:
        return re.search(r"""\.tool_calls\b|\[\s*['"]tool_calls['"]\s*\]""",
                         template) is not None


# --------------------------------------------------------------------------- requests


class ToolError(Exception):
    """A bad tool-related request field; the server answers 400 naming `param`."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass
class ToolPlan:
    """What a request asks of tool calling.

    tools: the tool list to render into the prompt (None in mode "none");
    mode: "none" (no tools rendered, nothing parsed), "auto", "required", "named";
    named: the forced function's name in mode "named";
    parallel: whether more than one call may be returned;
    legacy: the request used the deprecated functions / function_call fields (the
      server may answer with message.function_call instead of tool_calls).
    """

    tools: Optional[list[dict]] = None
    mode: str = "none"
    named: Optional[str] = None
    parallel: bool = True
    legacy: bool = False
    schemas: dict[str, dict] = field(default_factory=dict)  # name -> parameters

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def names(self) -> list[str]:
        """The function names a call may use (just the named one in mode "named")."""
        if self.mode == "none":
            return []
        if self.mode == "named":
            return [self.named]
        return list(self.schemas)


def _check_tool(i: int, tool: Any) -> tuple[str, dict]:
    where = f"tools[{i}]"
    if not isinstance(tool, dict):
        raise ToolError("tools", f"{where} must be an object, got {type(tool).__name__}")
    ttype = tool.get("type", "function")
    if ttype != "function":
        raise ToolError("tools", f"{where}.type {ttype!r} is not supported; only "
                                 "'function' tools are")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise ToolError("tools", f"{where}.function must be an object")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ToolError("tools", f"{where}.function.name {name!r} is invalid: it must "
                                 "match ^[a-zA-Z0-9_-]{1,64}$")
    desc = fn.get("description")
    if desc is not None and not isinstance(desc, str):
        raise ToolError("tools", f"{where}.function.description must be a string")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise ToolError("tools", f"{where}.function.parameters must be a JSON Schema "
                                 "object")
    strict = fn.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ToolError("tools", f"{where}.function.strict must be a boolean")
    return name, params


def _legacy_to_tools(functions: Any, function_call: Any) -> tuple[list, Any]:
    if functions is None:
        raise ToolError("function_call", "function_call requires functions")
    if not isinstance(functions, list):
        raise ToolError("functions", "functions must be an array")
    tools = []
    for i, fn in enumerate(functions):
        if not isinstance(fn, dict):
            raise ToolError("functions", f"functions[{i}] must be an object")
        tools.append({"type": "function", "function": fn})
    if function_call is None or function_call in ("none", "auto"):
        choice = function_call
    elif isinstance(function_call, dict) and isinstance(function_call.get("name"), str):
        choice = {"type": "function", "function": {"name": function_call["name"]}}
    else:
        raise ToolError("function_call", "function_call must be 'none', 'auto' or "
                                         "{\"name\": ...}")
    return tools, choice


def validate_tools(tools: Any, tool_choice: Any, parallel_tool_calls: Any,
                   functions: Any = None, function_call: Any = None) -> ToolPlan:
    """Check the tool fields of a chat request; raise ToolError naming the bad one."""
    legacy = functions is not None or function_call is not None
    if legacy:
        if tools is not None or tool_choice is not None:
            raise ToolError("functions", "functions / function_call (deprecated) "
                                         "cannot be combined with tools / tool_choice")
        tools, tool_choice = _legacy_to_tools(functions, function_call)
        if parallel_tool_calls is None:
            parallel_tool_calls = False

    def err(param: str, msg: str) -> ToolError:
        if legacy:
            param = {"tools": "functions", "tool_choice": "function_call"}.get(param,
                                                                              param)
        return ToolError(param, msg)

    if parallel_tool_calls is None:
        parallel = True
    elif isinstance(parallel_tool_calls, bool):
        parallel = parallel_tool_calls
    else:
        raise err("parallel_tool_calls", "parallel_tool_calls must be a boolean")

    if tools is not None and not isinstance(tools, list):
        raise err("tools", "tools must be an array of tool objects")
    schemas: dict[str, dict] = {}
    for i, tool in enumerate(tools or []):
        try:
            name, params = _check_tool(i, tool)
        except ToolError as e:
            raise err("tools", e.message) from None
        if name in schemas:
            raise err("tools", f"duplicate function name {name!r} in tools")
        schemas[name] = params
    has_tools = bool(schemas)

    named = None
    if tool_choice is None:
        mode = "auto" if has_tools else "none"
    elif isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise err("tool_choice", f"tool_choice {tool_choice!r} is invalid: use "
                                     "'none', 'auto', 'required' or "
                                     "{\"type\": \"function\", \"function\": "
                                     "{\"name\": ...}}")
        mode = tool_choice
        if mode == "required" and not has_tools:
            raise err("tool_choice", "tool_choice 'required' needs tools")
        if mode == "auto" and not has_tools:
            mode = "none"
    elif isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        if tool_choice.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str):
            raise err("tool_choice", "a named tool_choice must be {\"type\": "
                                     "\"function\", \"function\": {\"name\": ...}}")
        named = fn["name"]
        if not has_tools:
            raise err("tool_choice", f"tool_choice names function {named!r} but no "
                                     "tools were given")
        if named not in schemas:
            raise err("tool_choice", f"tool_choice names function {named!r}, which "
                                     "is not among the tools")
        mode = "named"
    else:
        raise err("tool_choice", "tool_choice must be a string or an object")

    if mode == "none":
        return ToolPlan(tools=None, mode="none", parallel=parallel, legacy=legacy)
    return ToolPlan(tools=list(tools), mode=mode, named=named,
                    parallel=parallel and mode != "named", legacy=legacy,
                    schemas=schemas)


# --------------------------------------------------------------------------- grammar

# Compact JSON spaced the way the template (tojson) renders calls; keywords
# llguidance does not implement are ignored rather than failing the request.
_JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ",
                "key_separator": ": ", "lenient": True}


def _call_schema(name: str, params: Optional[dict]) -> dict:
    if params is None:
        # OpenAI: omitting parameters defines a function with an empty parameter list.
        args: dict = {"type": "object", "properties": {}, "additionalProperties": False}
    elif not params:
        args = {"type": "object"}
    else:
        args = dict(params)
    schema: dict = {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": args},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    # References like "#/$defs/X" resolve against the root: hoist the definitions.
    for key in ("$defs", "definitions"):
        if key in args:
            schema[key] = args.pop(key)
    schema["x-guidance"] = dict(_JSON_FORMAT)
    return schema


def tool_call_grammar(plan: ToolPlan) -> Optional[str]:
    """A Lark grammar (llguidance) forcing tool-call blocks, for required / named."""
    if plan.mode not in ("required", "named"):
        return None
    names = plan.names
    lines = []
    if plan.mode == "required" and plan.parallel:
        lines.append('start: call ("\\n" call)*')
    else:
        lines.append("start: call")
    alts = " | ".join(f"fn_{i}" for i in range(len(names)))
    lines.append(f'call: "<tool_call>\\n" ({alts}) "\\n</tool_call>"')
    for i, name in enumerate(names):
        schema = _call_schema(name, plan.schemas.get(name))
        lines.append(f"fn_{i}: %json {json.dumps(schema, ensure_ascii=True)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- parsing


def _make_id(seed: Optional[str], index: int) -> str:
    if seed is None:
        return "call_" + uuid.uuid4().hex[:24]
    return "call_" + hashlib.sha256(f"{seed}:{index}".encode()).hexdigest()[:24]


def _parse_block(inner: str, plan: ToolPlan) -> Optional[tuple[str, str]]:
    """(name, arguments JSON string) for a valid block body, else None."""
    try:
        obj = json.loads(inner)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or name not in plan.names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None
    return name, json.dumps(args, ensure_ascii=False)


def _call_dict(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": arguments}}


def parse_tool_calls(text: str, plan: ToolPlan, id_seed: Optional[str] = None
                     ) -> tuple[Optional[str], list[dict]]:
    """Split finished output into (content or None, tool calls in OpenAI form).

    With id_seed, call ids are derived from it (as ToolCallStreamer(id_seed=...) does),
    otherwise random.
    """
    if not plan.active:
        return (text if text and text.strip() else None), []
    segments: list[str] = []
    calls: list[dict] = []
    cur = ""
    pos = 0
    n_valid = 0
    while True:
        i = text.find(OPEN_TAG, pos)
        if i < 0:
            cur += text[pos:]
            break
        j = text.find(CLOSE_TAG, i + len(OPEN_TAG))
        if j < 0:
            inner, end = text[i + len(OPEN_TAG):], len(text)
        else:
            inner, end = text[i + len(OPEN_TAG):j], j + len(CLOSE_TAG)
        parsed = _parse_block(inner, plan)
        if parsed is None:
            cur += text[pos:end]
        else:
            segments.append(cur + text[pos:i])
            cur = ""
            if plan.parallel or n_valid == 0:
                calls.append(_call_dict(_make_id(id_seed, n_valid), *parsed))
            n_valid += 1
        pos = end
        if end >= len(text):
            break
    segments.append(cur)
    pieces = []
    last = len(segments) - 1
    for k, seg in enumerate(segments):
        if k > 0:
            seg = seg.lstrip()
        if k < last:
            seg = seg.rstrip()
        if seg:
            pieces.append(seg)
    content = "\n".join(pieces)
    return (content if content.strip() else None), calls


def _partial_tag_len(text: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of OPEN_TAG."""
    for k in range(min(len(text), len(OPEN_TAG) - 1), 0, -1):
        if text.endswith(OPEN_TAG[:k]):
            return k
    return 0


class ToolCallStreamer:
    """Turns streamed output text into chat.completion.chunk delta dicts.

    feed(delta_text) -> list of deltas; finish() -> the remaining deltas. Content that
    might be the start of a "<tool_call>" tag (and whitespace before it) is held back
    until known. A call is emitted when its block closes (or at finish), as a delta
    with id, type, name and empty arguments, then one with the whole arguments string.
    Accumulated the way the openai client does, the deltas equal
    parse_tool_calls(full text) (same ids given the same id_seed).
    """

    def __init__(self, plan: ToolPlan, id_seed: Optional[str] = None):
        self.plan = plan
        self.id_seed = id_seed if id_seed is not None else uuid.uuid4().hex
        self.saw_tool_calls = False
        self._pending = ""          # text state: not yet emitted
        self._in_block = False
        self._block = ""            # block state: text after the open tag
        self._ws_before_block = ""  # whitespace held before the open tag
        self._after_call = False    # current segment follows a valid call
        self._seg_started = False   # current segment has emitted content
        self._content_emitted = False
        self._n_valid = 0
        self._n_emitted = 0
        self._finished = False

    # ---- helpers
    def _emit_text(self, s: str, out: list) -> None:
        if not s:
            return
        if not self._seg_started:
            if self._after_call:
                s = s.lstrip()
                if not s:
                    return
                if self._content_emitted:
                    s = "\n" + s
            self._seg_started = True
        self._content_emitted = True
        if out and "content" in out[-1]:
            out[-1]["content"] += s
        else:
            out.append({"content": s})

    def _close_block(self, inner: str, closed: bool, out: list) -> None:
        parsed = _parse_block(inner, self.plan)
        if parsed is None:
            raw = OPEN_TAG + inner + (CLOSE_TAG if closed else "")
            self._emit_text(self._ws_before_block + raw, out)
        else:
            if self.plan.parallel or self._n_valid == 0:
                name, arguments = parsed
                index = self._n_emitted
                call_id = _make_id(self.id_seed, self._n_valid)
                out.append({"tool_calls": [{
                    "index": index, "id": call_id, "type": "function",
                    "function": {"name": name, "arguments": ""}}]})
                out.append({"tool_calls": [{
                    "index": index, "function": {"arguments": arguments}}]})
                self._n_emitted += 1
                self.saw_tool_calls = True
            self._n_valid += 1
            self._after_call = True
            self._seg_started = False
        self._ws_before_block = ""

    def _process(self, out: list) -> None:
        while True:
            if self._in_block:
                j = self._block.find(CLOSE_TAG)
                if j < 0:
                    return
                inner = self._block[:j]
                rest = self._block[j + len(CLOSE_TAG):]
                self._in_block = False
                self._block = ""
                self._close_block(inner, True, out)
                self._pending = rest
                continue
            i = self._pending.find(OPEN_TAG)
            if i >= 0:
                before = self._pending[:i]
                text = before.rstrip()
                self._emit_text(text, out)
                self._ws_before_block = before[len(text):]
                self._block = self._pending[i + len(OPEN_TAG):]
                self._pending = ""
                self._in_block = True
                continue
            hold = len(self._pending) - _partial_tag_len(self._pending)
            while hold > 0 and self._pending[hold - 1].isspace():
                hold -= 1
            self._emit_text(self._pending[:hold], out)
            self._pending = self._pending[hold:]
            return

    # ---- API
    def feed(self, delta_text: str) -> list[dict]:
        if not delta_text:
            return []
        if not self.plan.active:
            return [{"content": delta_text}]
        out: list = []
        if self._in_block:
            self._block += delta_text
        else:
            self._pending += delta_text
        self._process(out)
        return out

    def finish(self) -> list[dict]:
        if self._finished or not self.plan.active:
            self._finished = True
            return []
        self._finished = True
        out: list = []
        if self._in_block:
            self._in_block = False
            inner, self._block = self._block, ""
            self._close_block(inner, False, out)
        else:
            rest, self._pending = self._pending, ""
            if self._seg_started or rest.strip():
                self._emit_text(rest, out)
        return out


# --------------------------------------------------------------------------- messages


def messages_for_template(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages (plain dicts) -> the form HF chat templates expect.

    Assistant tool_calls keep id/type and get function.arguments parsed from its JSON
    string; tool messages keep tool_call_id and get `name` from the assistant call
    with that id when missing. The deprecated forms (assistant function_call, role
    "function") become tool_calls / role "tool". A None content becomes "".
    """
    out: list[dict] = []
    names_by_id: dict[str, str] = {}
    last_legacy_id: Optional[str] = None
    n_legacy = 0
    for mi, msg in enumerate(messages):
        m = dict(msg)
        role = m.get("role")
        if m.get("content") is None:
            m["content"] = ""
        if role == "assistant":
            calls = m.get("tool_calls")
            fc = m.pop("function_call", None)
            if not calls and isinstance(fc, dict):
                call_id = f"call_fn_{n_legacy}"
                n_legacy += 1
                last_legacy_id = call_id
                calls = [{"id": call_id, "type": "function", "function": fc}]
            if calls:
                if not isinstance(calls, list):
                    raise ToolError("messages", f"messages[{mi}].tool_calls must be "
                                                "an array")
                new_calls = []
                for ci, call in enumerate(calls):
                    where = f"messages[{mi}].tool_calls[{ci}]"
                    fn = call.get("function") if isinstance(call, dict) else None
                    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                        raise ToolError("messages", f"{where}.function.name is missing")
                    args = fn.get("arguments")
                    if args is None or args == "":
                        args = {}
                    elif isinstance(args, str):
                        try:
                            args = json.loads(args)
                        except ValueError:
                            raise ToolError("messages", f"{where}.function.arguments "
                                                        "is not valid JSON") from None
                    new_call = dict(call)
                    new_call.setdefault("type", "function")
                    new_call["function"] = {**fn, "arguments": args}
                    if isinstance(call.get("id"), str):
                        names_by_id[call["id"]] = fn["name"]
                    new_calls.append(new_call)
                m["tool_calls"] = new_calls
            elif "tool_calls" in m:
                del m["tool_calls"]  # null / empty: a plain assistant message
        elif role == "function":
            m["role"] = "tool"
            if last_legacy_id is not None and "tool_call_id" not in m:
                m["tool_call_id"] = last_legacy_id
        if m.get("role") == "tool":
            tcid = m.get("tool_call_id")
            if not m.get("name") and isinstance(tcid, str) and tcid in names_by_id:
                m["name"] = names_by_id[tcid]
        out.append(m)
    return out
