"""The grammar engine (baton.structured): compile errors name their field, matchers
driven by greedy choice over random logits produce text that matches, masks agree
with accept(), and apply_bitmask / fill_async agree with plain references."""
from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest
import torch

from baton.structured import (GrammarEngine, StructuredOutput, StructuredOutputError, apply_bitmask)

VOCAB = 49152  # SmolLM2-135M's logits width


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # These tests run thousands of tiny CPU tensor ops; on a busy 2-core machine torch's
    # intra-op thread pool makes each one wait for a core (50x slower seen).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    from baton.models.loader import default_model_path
    from baton.tokenizer import load_tokenizer
    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def eng(tok):
    e = GrammarEngine(tok.hf, VOCAB, tok.eos_token_ids)
    yield e
    e.close()


def allowed_ids(row: torch.Tensor) -> set[int]:
    bits = (row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return set(bits.flatten().nonzero().flatten().tolist())


def drive(eng, tok, spec, seed=0, bias=None, max_steps=1500):
    """Greedy decoding over random logits under the grammar: returns (text, matcher)."""
    torch.manual_seed(seed)
    m = eng.matcher(spec)
    ids = []
    for _ in range(max_steps):
        logits = torch.randn(1, VOCAB)
        if bias is not None:
            logits += bias
        mask = eng.fill_bitmasks([m])
        apply_bitmask(logits, mask)
        t = int(logits.argmax())
        assert t in allowed_ids(mask[0])
        if t in tok.eos_token_ids:
            assert m.accepting  # EOS only when the grammar is complete
            return tok.hf.decode(ids), m
        m.accept(t)  # a token the mask allowed is always accepted
        ids.append(t)
    raise AssertionError(f"no EOS after {max_steps} tokens: {tok.hf.decode(ids)[:200]!r}")


# -- compile errors ------------------------------------------------------------------

@pytest.mark.parametrize("kind,value,param,words", [
    ("json", {"type": "nonsense"}, "response_format", "invalid JSON Schema"),
    ("json", {"type": "object", "properties": {"a": {"type": 5}}}, "guided_json", "invalid JSON Schema"),
    ("json", {"type": "array", "uniqueItems": True}, "structured_outputs", "unsupported JSON Schema"),
    ("json", "{not json", "json_schema", "invalid JSON Schema"),
    ("regex", "((", "guided_regex", "invalid regex"),
    ("regex", 5, "structured_outputs", "regex must be a string"),
    ("choice", [], "guided_choice", "non-empty list of strings"),
    ("choice", ["a", 1], "structured_outputs", "list of strings"),
    ("choice", "yes", "structured_outputs", "non-empty list of strings"),
    ("grammar", 'root ::= "a', "guided_grammar", "invalid GBNF grammar"),
    ("grammar", 'root ::= foo', "grammar", "invalid GBNF grammar"),
    ("grammar", 'rot ::= "a"', "grammar", "invalid GBNF grammar"),
    ("lark", "start: foo", "structured_outputs", "invalid Lark grammar"),
    ("nope", "x", "structured_outputs", "unknown structured output kind"),
])
def test_compile_errors_name_the_param(eng, kind, value, param, words):
    spec = StructuredOutput(kind, value, param)
    for _ in range(2):  # the second time comes from the cache of bad specs
        with pytest.raises(StructuredOutputError) as ei:
            eng.compile(spec)
        assert isinstance(ei.value, ValueError)
        assert ei.value.param == param
        assert param in str(ei.value) and words in str(ei.value), str(ei.value)
    with pytest.raises(StructuredOutputError):
        eng.matcher(spec)


def test_cached_error_names_each_specs_own_param(eng):
    a = StructuredOutput("regex", "(((", "guided_regex")
    b = StructuredOutput("regex", "(((", "structured_outputs")
    with pytest.raises(StructuredOutputError):
        eng.compile(a)
    with pytest.raises(StructuredOutputError) as ei:
        eng.compile(b)
    assert ei.value.param == "structured_outputs"
    assert str(ei.value).startswith("structured_outputs: invalid regex")


# -- generation under a grammar ------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "items": {"type": "array", "maxItems": 2, "items": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99},
                           "label": {"type": "string", "maxLength": 8}},
            "required": ["id", "label"], "additionalProperties": False}},
    },
    "required": ["name", "age", "color", "ok", "tags", "items"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema(eng, tok, seed):
    text, m = drive(eng, tok, StructuredOutput("json", SCHEMA), seed)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert m.done


def test_json_object(eng, tok):
    # Uniform random logits would wander in JSON strings for thousands of tokens;
    # a bias toward tokens with a closing character makes the random walk end soon.
    bias = torch.zeros(VOCAB)
    for i in range(VOCAB):
        piece = tok.hf.decode([i])
        if any(c in piece for c in '"}]'):
            bias[i] = 3.0
    for seed in range(3):
        text, m = drive(eng, tok, StructuredOutput("json", None, "response_format"), seed, bias=bias)
        assert isinstance(json.loads(text), dict), text
        assert m.done


def test_json_whitespace_is_bounded(eng, tok):
    ok = StructuredOutput("json", None)
    for text in ['{"a": 1}', '{"a":1}', '{\n  "a": 1\n}', '{ "a" :  [1, 2] }']:
        mm = eng.matcher(ok)
        for t in tok.hf.encode(text):
            mm.accept(t)
        assert mm.done, text
    mm = eng.matcher(ok)
    with pytest.raises(StructuredOutputError, match="not allowed"):
        for t in tok.hf.encode('{"a":' + "\n" * 5):
            mm.accept(t)


def test_regex(eng, tok):
    for seed in range(3):
        text, m = drive(eng, tok, StructuredOutput("regex", r"[0-9]{3}-[a-z]{2}"), seed)
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text), text
        assert m.done


def test_choice(eng, tok):
    seen = set()
    for seed in range(6):
        text, m = drive(eng, tok, StructuredOutput("choice", ["yes", "no", "maybe"]), seed)
        assert text in ("yes", "no", "maybe")
        assert m.done
        seen.add(text)
    assert len(seen) >= 2


def test_gbnf(eng, tok):
    g = 'root ::= "a" digits "b"\ndigits ::= [0-9]+'
    for seed in range(3):
        text, m = drive(eng, tok, StructuredOutput("grammar", g), seed)
        assert re.fullmatch(r"a[0-9]+b", text), text
        assert m.done


TOOL_SCHEMA = {"type": "object", "properties": {
    "name": {"const": "get_weather"},
    "arguments": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                   "unit": {"enum": ["c", "f"]}},
                  "required": ["city", "unit"], "additionalProperties": False}},
    "required": ["name", "arguments"], "additionalProperties": False}


def test_lark_tool_call(eng, tok):
    lark = 'start: "<tool_call>\\n" %json' + json.dumps(TOOL_SCHEMA) + ' "\\n</tool_call>"'
    for seed in range(2):
        text, m = drive(eng, tok, StructuredOutput("lark", lark), seed)
        mt = re.fullmatch(r"<tool_call>\n(.*)\n</tool_call>", text, re.S)
        assert mt, text
        call = json.loads(mt.group(1))
        jsonschema.validate(call, TOOL_SCHEMA)
        assert m.done


def test_lark_json_whitespace_is_bounded(eng, tok):
    lark = 'start: "X" %json {"type": "object"} "Y"'
    for text, ok in [('X{"a": 1}Y', True), ('X{\n  "a": [1, 2]\n}Y', True), ('X{"a":' + " " * 40 + '1}Y', False)]:
        m = eng.matcher(StructuredOutput("lark", lark))
        try:
            for t in tok.hf.encode(text):
                m.accept(t)
            assert ok and m.done, text
        except StructuredOutputError:
            assert not ok, text
    # a schema's own x-guidance whitespace wins
    own = 'start: %json {"type": "object", "x-guidance": {"whitespace_flexible": false}}'
    m = eng.matcher(StructuredOutput("lark", own))
    with pytest.raises(StructuredOutputError):
        for t in tok.hf.encode('{"a": 1}'):
            m.accept(t)


def test_number_may_continue_but_eos_allowed(eng, tok):
    m = eng.matcher(StructuredOutput("json", {"type": "integer"}))
    m.accept(tok.hf.encode("4")[0])
    allowed = allowed_ids(eng.fill_bitmasks([m])[0])
    assert m.accepting and not m.done
    assert tok.eos_token_ids[0] in allowed and tok.hf.encode("2")[0] in allowed
    m.accept(tok.eos_token_ids[0])
    assert m.done


def test_done_mask_is_eos_only(eng, tok):
    m = eng.matcher(StructuredOutput("choice", ["maybe"]))
    for t in tok.hf.encode("maybe"):
        m.accept(t)
    assert m.done
    assert allowed_ids(eng.fill_bitmasks([m])[0]) == set(tok.eos_token_ids)
    with pytest.raises(StructuredOutputError):
        m.accept(tok.hf.encode("x")[0])


def test_bad_token_raises(eng, tok):
    m = eng.matcher(StructuredOutput("regex", "[0-9]+", "guided_regex"))
    with pytest.raises(StructuredOutputError) as ei:
        m.accept(tok.hf.encode("a")[0])
    assert ei.value.param == "guided_regex"
    m = eng.matcher(StructuredOutput("regex", "[0-9]+"))
    with pytest.raises(StructuredOutputError):
        m.accept(tok.eos_token_ids[0])  # EOS before the grammar is complete


def test_matchers_are_independent(eng, tok):
    spec = StructuredOutput("choice", ["yes", "no"])
    a, b = eng.matcher(spec), eng.matcher(spec)
    for t in tok.hf.encode("yes"):
        a.accept(t)
    assert a.done and not b.done
    for t in tok.hf.encode("no"):
        b.accept(t)
    assert b.done


def test_wider_model_vocab(tok):
    """A logits width past the tokenizer: the extra ids are never allowed."""
    e = GrammarEngine(tok.hf, VOCAB + 70, tok.eos_token_ids)
    try:
        mask = e.fill_bitmasks([e.matcher(StructuredOutput("regex", "[a-z ]+"))])
        assert mask.shape == (1, (VOCAB + 70 + 31) // 32)
        assert max(allowed_ids(mask[0])) < VOCAB
    finally:
        e.close()


# -- masks ---------------------------------------------------------------------------

def reference_apply(logits, bitmask, rows=None):
    out = logits.clone()
    rows = range(bitmask.shape[0]) if rows is None else rows.tolist()
    for i, r in enumerate(rows):
        for j in range(out.shape[-1]):
            w = j // 32
            ok = w < bitmask.shape[1] and (int(bitmask[i, w]) >> (j % 32)) & 1
            if not ok:
                out[r, j] = float("-inf")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab,words", [(100, 4), (77, 3), (130, 4), (64, 2)])
def test_apply_bitmask_matches_reference(dtype, vocab, words):
    g = torch.Generator().manual_seed(vocab * 7 + words)
    logits = torch.randn(6, vocab, generator=g).to(dtype)
    bitmask = torch.randint(-2**31, 2**31 - 1, (6, words), generator=g, dtype=torch.int64).to(torch.int32)
    got = logits.clone()
    apply_bitmask(got, bitmask)
    assert torch.equal(got, reference_apply(logits, bitmask))
    rows = torch.tensor([4, 0, 2])
    got = logits.clone()
    apply_bitmask(got, bitmask[:3], rows)
    want = reference_apply(logits, bitmask[:3], rows)
    assert torch.equal(got, want)
    assert torch.equal(got[[1, 3, 5]], logits[[1, 3, 5]])  # rows not named are untouched


def test_apply_bitmask_1d_and_empty():
    logits = torch.zeros(40)
    mask = torch.tensor([1 << 5, 1], dtype=torch.int32)
    apply_bitmask(logits, mask)
    assert torch.isfinite(logits).nonzero().flatten().tolist() == [5, 32]
    logits = torch.zeros(3, 40)
    apply_bitmask(logits, torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, dtype=torch.long))
    assert torch.isfinite(logits).all()


def test_fill_async_equals_fill_bitmasks(eng, tok):
    specs = [StructuredOutput("json", SCHEMA), StructuredOutput("json", None), StructuredOutput("regex", "[0-9]+"),
             StructuredOutput("choice", ["yes", "no", "maybe"])]
    ms = [eng.matcher(s) for s in specs for _ in range(4)]
    for i, m in enumerate(ms[:8]):
        text = '{"name": "' if i < 4 else '{"'
        for t in tok.hf.encode(text):
            m.accept(t)
    sync = eng.fill_bitmasks(ms)
    fut = eng.fill_async(ms)
    got = fut.result(timeout=30)
    assert got.dtype == torch.int32 and got.shape == (16, (VOCAB + 31) // 32)
    assert torch.equal(got, sync)
    # each row is that matcher's own mask
    for i in (0, 4, 8, 12):
        assert torch.equal(sync[i], eng.fill_bitmasks([ms[i]])[0])
    assert eng.fill_bitmasks([]).shape == (0, (VOCAB + 31) // 32)


def test_compile_cache(eng):
    schema = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "string"}}}
    t0 = time.perf_counter()
    a = eng.compile(StructuredOutput("json", schema, "response_format"))
    t1 = time.perf_counter()
    b = eng.compile(StructuredOutput("json", json.loads(json.dumps(schema)), "guided_json"))
    t2 = time.perf_counter()
    assert a is b
    assert t2 - t1 < max(1e-3, (t1 - t0) / 5)
    # property order is content: a reordered schema is another grammar
    c = eng.compile(StructuredOutput("json", {"type": "object", "properties": {"y": {"type": "string"},
                                                                               "x": {"type": "integer"}}}))
    assert c is not a


def test_compile_cache_is_lru(tok):
    e = GrammarEngine(tok.hf, VOCAB, tok.eos_token_ids, cache_size=2)
    try:
        a = e.compile(StructuredOutput("regex", "a+"))
        e.compile(StructuredOutput("regex", "b+"))
        assert e.compile(StructuredOutput("regex", "a+")) is a  # a is now the most recent
        e.compile(StructuredOutput("regex", "c+"))  # evicts b+
        assert e.compile(StructuredOutput("regex", "a+")) is a
        assert len(e._cache) == 2
    finally:
        e.close()
