"""Tool calling helpers (baton.server.tools): pure functions plus the real tokenizer.

No server and no model weights' forward pass: templates render with SmolLM2's HF
tokenizer, grammars compile and run in llguidance, driven by random logits.
"""
from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from baton.server import tools as T
from baton.server.tools import ToolCallStreamer, ToolError, ToolPlan

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city (says \"}\" sometimes)",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 1, "maxLength": 8},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add-numbers",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 999},
                "b": {"$ref": "#/$defs/small"},
                "exact": {"type": "boolean"},
            },
            "required": ["a", "b", "exact"],
            "additionalProperties": False,
            "$defs": {"small": {"type": "integer", "minimum": -9, "maximum": 9}},
        },
    },
}
NOARGS = {"type": "function", "function": {"name": "now"}}
TOOLS = [WEATHER, ADD, NOARGS]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters") for t in TOOLS}


def plan(tool_choice=None, parallel=None, tools=TOOLS) -> ToolPlan:
    return T.validate_tools(tools, tool_choice, parallel)


@pytest.fixture(scope="module")
def tok():
    from baton.models.loader import default_model_path
    from baton.tokenizer import load_tokenizer

    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def chatml_tools() -> str:
    return T.load_chat_template("chatml-tools")


# ------------------------------------------------------------------ templates


def test_load_chat_template(tmp_path, chatml_tools):
    assert "<tool_call>" in chatml_tools
    assert T.load_chat_template("{{ messages }}") == "{{ messages }}"
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert T.load_chat_template(str(f)) == f.read_text()
    with pytest.raises(ValueError, match="does-not-exist"):
        T.load_chat_template(str(tmp_path / "does-not-exist.jinja"))


def test_template_takes_tools(tok, chatml_tools):
    own = tok.hf.chat_template
    assert not T.template_takes_tools(own)
    assert not T.template_takes_tool_calls(own)
    assert T.template_takes_tools(chatml_tools)
    assert T.template_takes_tool_calls(chatml_tools)
    assert T.template_takes_tool_calls("{% for c in m['tool_calls'] %}{% endfor %}")
    # A tag plain jinja does not know still gets an answer.
    assert T.template_takes_tools("{% generation %}{{ tools }}{% endgeneration %}")


def render(tok, template, messages, **kw):
    return tok.hf.apply_chat_template(messages, chat_template=template, tokenize=False,
                                      **kw)


def test_render_without_tools_matches_smollm2(tok, chatml_tools):
    for msgs in ([{"role": "user", "content": "hi"}],
                 [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"},
                  {"role": "user", "content": "bye"}]):
        assert render(tok, chatml_tools, msgs, add_generation_prompt=True) == \
            render(tok, None, msgs, add_generation_prompt=True)


def test_render_tools_calls_and_responses(tok, chatml_tools):
    messages = [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris and Lyon? Also 2+3."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function",
             "function": {"name": "get_weather",
                          "arguments": '{"city": "Paris", "unit": "celsius"}'}},
            {"id": "call_b", "type": "function",
             "function": {"name": "get_weather",
                          "arguments": '{"city": "Lyon", "unit": "fahrenheit"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny, 21"},
        {"role": "tool", "tool_call_id": "call_b", "content": "rainy, 55"},
        {"role": "assistant", "content": "Let me add.", "tool_calls": [
            {"id": "call_c", "type": "function",
             "function": {"name": "add-numbers",
                          "arguments": '{"a": 2, "b": 3, "exact": true}'}}]},
        {"role": "tool", "tool_call_id": "call_c", "content": "5"},
    ]
    converted = T.messages_for_template(messages)
    assert converted[2]["tool_calls"][0]["function"]["arguments"] == \
        {"city": "Paris", "unit": "celsius"}
    assert converted[3]["name"] == "get_weather" and converted[6]["name"] == "add-numbers"
    assert converted[2]["content"] == ""
    text = render(tok, chatml_tools, converted, tools=TOOLS, add_generation_prompt=True)

    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nYou are a weather bot.\n\n# Tools")
    for tool in TOOLS:
        assert json.dumps(tool, ensure_ascii=False) in system
    assert "<tool_call></tool_call> XML tags" in system
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris", "unit": "celsius"}}\n</tool_call>\n<tool_call>\n'
            '{"name": "get_weather", "arguments": {"city": "Lyon", "unit": '
            '"fahrenheit"}}\n</tool_call><|im_end|>\n') in text
    assert ("<|im_start|>user\n<tool_response>\nsunny, 21\n</tool_response>\n"
            "<tool_response>\nrainy, 55\n</tool_response><|im_end|>\n") in text
    assert ('<|im_start|>assistant\nLet me add.\n<tool_call>\n{"name": "add-numbers", '
            '"arguments": {"a": 2, "b": 3, "exact": true}}\n</tool_call><|im_end|>\n'
            "<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n") in text
    assert text.endswith("<|im_start|>assistant\n")
    for s in ("weather bot", "Paris", "Lyon", "celsius", "fahrenheit", "sunny, 21",
              "rainy, 55", "Let me add.", "add-numbers", "now", "2+3"):
        assert s in text

    # Arguments left as a JSON string render as is; the default system prompt is
    # SmolLM2's.
    raw = render(tok, chatml_tools, messages[1:3], tools=[WEATHER])
    assert raw.startswith("<|im_start|>system\nYou are a helpful AI assistant named "
                          "SmolLM, trained by Hugging Face\n\n# Tools")
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' \
        in raw

    # continue_final_message: the text stops right after the final message's content.
    cont = render(tok, chatml_tools, converted[:5] + [
        {"role": "assistant", "content": "Paris is"}], tools=TOOLS,
        continue_final_message=True)
    assert cont.endswith("<|im_start|>assistant\nParis is")


def test_messages_for_template_errors_and_legacy():
    with pytest.raises(ToolError) as e:
        T.messages_for_template([{"role": "assistant", "content": None, "tool_calls": [
            {"id": "x", "type": "function",
             "function": {"name": "f", "arguments": "{not json"}}]}])
    assert e.value.param == "messages"
    out = T.messages_for_template([
        {"role": "assistant", "content": None,
         "function_call": {"name": "f", "arguments": '{"q": 1}'}},
        {"role": "function", "name": "f", "content": "ok"}])
    assert out[0]["tool_calls"][0]["function"] == {"name": "f", "arguments": {"q": 1}}
    assert out[1]["role"] == "tool"
    assert out[1]["tool_call_id"] == out[0]["tool_calls"][0]["id"]


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("tools, choice, parallel, param", [
    (None, "required", None, "tool_choice"),
    ([], "required", None, "tool_choice"),
    (None, {"type": "function", "function": {"name": "get_weather"}}, None, "tool_choice"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, None, "tool_choice"),
    (TOOLS, {"type": "function"}, None, "tool_choice"),
    (TOOLS, "sometimes", None, "tool_choice"),
    (TOOLS, 3, None, "tool_choice"),
    ([WEATHER, WEATHER], None, None, "tools"),
    ([{"type": "function", "function": {"name": "bad name!"}}], None, None, "tools"),
    ([{"type": "function", "function": {"name": "x" * 65}}], None, None, "tools"),
    ([{"type": "function", "function": {"description": "no name"}}], None, None, "tools"),
    ([{"type": "retrieval", "function": {"name": "f"}}], None, None, "tools"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None, None,
     "tools"),
    ("notalist", None, None, "tools"),
    (TOOLS, "auto", "yes", "parallel_tool_calls"),
])
def test_validate_tools_errors(tools, choice, parallel, param):
    with pytest.raises(ToolError) as e:
        T.validate_tools(tools, choice, parallel)
    assert e.value.param == param
    assert e.value.message


def test_validate_tools_plans():
    p = plan()
    assert (p.mode, p.named, p.parallel, p.tools) == ("auto", None, True, TOOLS)
    assert p.names == ["get_weather", "add-numbers", "now"]
    p = plan("none")
    assert p.mode == "none" and p.tools is None and p.names == []
    assert T.validate_tools(None, None, None).mode == "none"
    assert T.validate_tools(None, "auto", None).mode == "none"
    p = plan("required", parallel=False)
    assert (p.mode, p.parallel) == ("required", False)
    p = plan({"type": "function", "function": {"name": "now"}})
    assert (p.mode, p.named, p.names) == ("named", "now", ["now"])
    # The deprecated functions / function_call map onto tools / tool_choice.
    p = T.validate_tools(None, None, None, functions=[WEATHER["function"]],
                         function_call={"name": "get_weather"})
    assert (p.mode, p.named, p.legacy, p.parallel) == ("named", "get_weather", True, False)
    with pytest.raises(ToolError) as e:
        T.validate_tools(TOOLS, None, None, functions=[WEATHER["function"]])
    assert e.value.param == "functions"
    with pytest.raises(ToolError) as e:
        T.validate_tools(None, None, None, functions=[WEATHER["function"]],
                         function_call={"name": "other"})
    assert e.value.param == "function_call"


# ------------------------------------------------------------------ grammar


@pytest.fixture(scope="module")
def lltok(tok):
    import llguidance.hf

    return llguidance.hf.from_tokenizer(tok.hf)


def drive(lltok, grammar: str, seed: int, max_tokens: int = 400) -> str:
    import llguidance
    import llguidance.torch as lt
    import torch

    m = llguidance.LLMatcher(lltok, grammar)
    assert not m.is_error(), m.get_error()
    gen = torch.Generator().manual_seed(seed)
    mask = lt.allocate_token_bitmask(1, lltok.vocab_size)
    tokens = []
    eos = lltok.eos_token
    for _ in range(max_tokens):
        if m.is_stopped():
            break
        lt.fill_next_token_bitmask(m, mask)
        logits = torch.randn(1, lltok.vocab_size, generator=gen)
        lt.apply_token_bitmask_inplace(logits, mask)
        t = int(logits.argmax())
        if t == eos:
            break
        assert m.consume_token(t), m.get_error()
        tokens.append(t)
    assert m.is_accepting(), (seed, lltok.decode_str(tokens))
    return lltok.decode_str(tokens)


def check_calls(text: str, p: ToolPlan, names, min_calls=1, max_calls=None):
    content, calls = T.parse_tool_calls(text, p)
    assert content is None, text
    assert min_calls <= len(calls) and (max_calls is None or len(calls) <= max_calls), text
    for c in calls:
        assert re.fullmatch(r"call_[0-9a-f]{24}", c["id"])
        assert c["type"] == "function"
        name = c["function"]["name"]
        assert name in names
        args = json.loads(c["function"]["arguments"])
        schema = SCHEMAS[name] or {"type": "object", "properties": {},
                                   "additionalProperties": False}
        jsonschema.validate(args, schema)
    return calls


def test_grammar_none_for_auto_and_none():
    assert T.tool_call_grammar(plan()) is None
    assert T.tool_call_grammar(plan("none")) is None


@pytest.mark.parametrize("choice, parallel", [
    ("required", True), ("required", False),
    ({"type": "function", "function": {"name": "add-numbers"}}, True),
])
def test_grammar_compiles_and_forces_calls(lltok, choice, parallel):
    import llguidance

    p = plan(choice, parallel)
    lark = T.tool_call_grammar(p)
    g = llguidance.LLMatcher.grammar_from_lark(lark)
    assert llguidance.LLMatcher.validate_grammar(g, lltok) == ""
    names = p.names
    single = p.mode == "named" or not parallel
    seen, most = set(), 0
    for seed in range(6 if p.mode == "required" else 3):
        text = drive(lltok, g, seed)
        assert text.startswith("<tool_call>\n{") and text.endswith("}\n</tool_call>")
        calls = check_calls(text, p, names, 1, 1 if single else None)
        assert len(calls) == text.count("<tool_call>")
        seen.update(c["function"]["name"] for c in calls)
        most = max(most, len(calls))
    if p.mode == "named":
        assert seen == {"add-numbers"}
    else:
        assert len(seen) > 1
    assert (most > 1) == (not single)


def test_grammar_odd_schemas_compile(lltok):
    import llguidance

    odd = [
        {"type": "function", "function": {"name": "empty", "parameters": {}}},
        {"type": "function", "function": {"name": "fmt", "parameters": {
            "type": "object", "title": "T", "description": "a } { \" %json",
            "properties": {"when": {"type": "string", "format": "no-such-format"},
                           "tags": {"type": "array", "items": {"type": "string"}}}}}},
    ]
    for choice in ("required", {"type": "function", "function": {"name": "fmt"}}):
        g = llguidance.LLMatcher.grammar_from_lark(T.tool_call_grammar(plan(choice,
                                                                            tools=odd)))
        assert llguidance.LLMatcher.validate_grammar(g, lltok) == ""


def test_grammar_rejects_wrong_calls(lltok):
    import llguidance

    g = llguidance.LLMatcher.grammar_from_lark(
        T.tool_call_grammar(plan({"type": "function", "function": {"name": "get_weather"}})))

    def accepts(text):
        m = llguidance.LLMatcher(lltok, g)
        return m.consume_tokens(lltok.tokenize_str(text)) and m.is_accepting()

    good = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
            '"unit": "celsius"}}\n</tool_call>')
    assert accepts(good)
    assert not accepts(good.replace("get_weather", "now"))
    assert not accepts(good.replace('"celsius"', '"kelvin"'))
    assert not accepts(good + "\n" + good)  # named: one call


# ------------------------------------------------------------------ parsing


def call_text(name, args, raw=None):
    body = raw if raw is not None else json.dumps({"name": name, "arguments": args})
    return f"<tool_call>\n{body}\n</tool_call>"


def simple(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in calls]


def test_parse_plain_text():
    p = plan()
    assert T.parse_tool_calls("Just text, <tool no call.", p) == \
        ("Just text, <tool no call.", [])
    assert T.parse_tool_calls("   \n", p) == (None, [])
    # mode none: nothing is parsed
    text = call_text("now", {})
    assert T.parse_tool_calls(text, plan("none")) == (text, [])


def test_parse_one_and_two_calls():
    p = plan()
    content, calls = T.parse_tool_calls(call_text("now", {}), p)
    assert content is None and simple(calls) == [("now", {})]
    assert calls[0]["type"] == "function"
    assert re.fullmatch(r"call_[0-9a-f]{24}", calls[0]["id"])
    text = ("Let me check both.\n" + call_text("get_weather", {"city": "Paris"}) + "\n"
            + call_text("add-numbers", {"a": 1, "b": 2}))
    content, calls = T.parse_tool_calls(text, p)
    assert content == "Let me check both."
    assert simple(calls) == [("get_weather", {"city": "Paris"}),
                             ("add-numbers", {"a": 1, "b": 2})]
    assert calls[0]["function"]["arguments"] == '{"city": "Paris"}'
    assert calls[0]["id"] != calls[1]["id"]
    # parallel_tool_calls=false: only the first call is returned
    _, calls = T.parse_tool_calls(text, plan("auto", parallel=False))
    assert simple(calls) == [("get_weather", {"city": "Paris"})]
    # text after the calls; unterminated final block whose JSON is complete
    content, calls = T.parse_tool_calls(
        call_text("now", {}) + "\nDone.\n" + call_text("now", {})[:-len("\n</tool_call>")],
        p)
    assert content == "Done." and len(calls) == 2


def test_parse_broken_and_unknown_stay_content():
    p = plan()
    broken = call_text(None, None, raw='{"name": "now", "arguments": {')
    unknown = call_text("rm_rf", {})
    for bad in (broken, unknown, "<tool_call>\n{\"name\": \"now\"",
                call_text(None, None, raw='["now"]'),
                call_text(None, None, raw='{"name": "now", "arguments": 3}')):
        text = "Hi " + bad + " there"
        assert T.parse_tool_calls(text, p) == (text, [])
    content, calls = T.parse_tool_calls(
        "A\n" + unknown + "\n" + call_text("now", {}) + "\n" + broken, p)
    assert content == "A\n" + unknown + "\n" + broken
    assert simple(calls) == [("now", {})]
    # named mode accepts only the named function
    content, calls = T.parse_tool_calls(
        call_text("now", {}), plan({"type": "function", "function": {"name": "add-numbers"}}))
    assert calls == [] and content == call_text("now", {})


# ------------------------------------------------------------------ streaming


def accumulate(deltas, finish_reason):
    """The official openai client's accumulation of chunks with these deltas."""
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    state = ChatCompletionStreamState()
    chunks = [{"role": "assistant"}] + deltas
    for i, d in enumerate(chunks):
        last = i == len(chunks) - 1
        state.handle_chunk(ChatCompletionChunk.model_validate({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0,
            "model": "m", "choices": [{"index": 0, "delta": d,
                                       "finish_reason": finish_reason if last else None}]}))
    if not deltas:  # a finish chunk of its own
        state.handle_chunk(ChatCompletionChunk.model_validate({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0,
            "model": "m", "choices": [{"index": 0, "delta": {},
                                       "finish_reason": finish_reason}]}))
    msg = state.get_final_completion().choices[0].message
    calls = [{"id": c.id, "type": c.type,
              "function": {"name": c.function.name, "arguments": c.function.arguments}}
             for c in (msg.tool_calls or [])]
    return msg.content or None, calls


def stream(text, chunks, p, seed="s"):
    """Feed chunks; returns the streamer, all deltas, and the deltas feed() gave."""
    s = ToolCallStreamer(p, id_seed=seed)
    fed = []
    for piece in chunks:
        fed += s.feed(piece)
    deltas = fed + s.finish()
    assert s.finish() == []
    return s, deltas, fed


TEXT_2CALLS = ("I'll check <the> weather first.  \n"
               + call_text("get_weather", {"city": "Paris", "unit": "celsius"}) + "\n"
               + call_text("add-numbers", {"a": 2, "b": -3, "exact": True}) + "\n")
STREAM_TEXTS = [
    TEXT_2CALLS,
    call_text("now", {}) + call_text("now", {}),
    "<tool_call" + " text \n" + call_text("now", {}) + "\nok <tool_c",
    "Hi\n" + call_text("rm", {}) + "\n" + call_text("now", {}) + "\n\nAfter.\n"
    + call_text("now", {}) + "  tail " + call_text(None, None, raw="{oops")
    + "\n" + call_text("now", {})[:-3],
    "plain text with a < sign and <tool_cal, no calls  \n",
    "   ",
    "",
]


def check_stream(text, chunks, p):
    s, deltas, fed = stream(text, chunks, p)
    expected = T.parse_tool_calls(text, p, id_seed="s")
    got = accumulate(deltas, "tool_calls" if s.saw_tool_calls else "stop")
    assert got == expected, (chunks, deltas)
    assert s.saw_tool_calls == bool(expected[1])
    # Content is never taken back: what feed() handed out so far is a prefix of the
    # final content (so no piece of a real tag was ever sent as content).
    sent = "".join(d.get("content", "") for d in fed)
    assert (expected[0] or "").startswith(sent), (chunks, fed)
    return deltas


OPEN = "<tool_call>"


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_streamer_every_split(text):
    p = plan()
    check_stream(text, [text], p)
    check_stream(text, list(text), p)  # one character at a time
    for i in range(len(text) + 1):
        check_stream(text, [text[:i], text[i:]], p)


@pytest.mark.parametrize("parallel", [True, False])
def test_streamer_random_chunks(parallel):
    p = plan("auto", parallel)
    rng = random.Random(0)
    for text in STREAM_TEXTS:
        for _ in range(60):
            cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1,
                                                               rng.randint(1, 12))))
            chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
            check_stream(text, chunks, p)


def test_streamer_no_tag_fragment_in_content():
    p = plan()
    for i in range(len(TEXT_2CALLS) + 1):
        _, deltas, _ = stream(TEXT_2CALLS, [TEXT_2CALLS[:i], TEXT_2CALLS[i:]], p)
        content = [d["content"] for d in deltas if "content" in d]
        assert "".join(content) == "I'll check <the> weather first."
        assert not any("<tool" in c or "tool_call" in c for c in content)
        for c in content:  # and no partial prefix of it at a delta's end
            assert not any(c.endswith("<tool_call>"[:k]) for k in range(1, 11))
    _, deltas, _ = stream(TEXT_2CALLS, list(TEXT_2CALLS), p)
    calls = [d for d in deltas if "tool_calls" in d]
    assert calls[0]["tool_calls"][0] == {
        "index": 0, "id": T.parse_tool_calls(TEXT_2CALLS, p, id_seed="s")[1][0]["id"],
        "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    assert calls[1]["tool_calls"][0]["index"] == 0
    assert calls[3]["tool_calls"][0]["index"] == 1


def test_streamer_mode_none_passes_through():
    s = ToolCallStreamer(plan("none"))
    text = call_text("now", {})
    assert s.feed(text) == [{"content": text}] and s.finish() == []
    assert not s.saw_tool_calls


def test_streamer_unterminated_block_at_finish():
    p = plan()
    s = ToolCallStreamer(p)
    d = s.feed("Sure. <tool_call>\n" + json.dumps({"name": "now", "arguments": {}}))
    assert d == [{"content": "Sure."}]
    rest = s.finish()
    assert s.saw_tool_calls and rest[0]["tool_calls"][0]["function"]["name"] == "now"
    s = ToolCallStreamer(p)
    s.feed("Sure. <tool_call>\n{\"name\": \"now\", ")
    assert s.finish() == [{"content": " <tool_call>\n{\"name\": \"now\", "}]
    assert not s.saw_tool_calls
