"""The OpenAI API as applications use it, through the official openai client:
structured output, tool calling, n > 1 and batched prompts, sampling
parameters, chat options, no-op fields and the token endpoints."""
from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from .conftest import MODEL, assert_error, serve

CHAT = [{"role": "user", "content": "Describe a person as JSON."}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0},
                   "role": {"enum": ["admin", "user"]}},
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 20}},
                   "required": ["tz"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def tool_server(make_engine):
    with serve(make_engine(max_num_seqs=8), chat_template="chatml-tools") as srv:
        yield srv


@pytest.fixture(scope="module")
def tool_client(tool_server):
    with openai.OpenAI(base_url=tool_server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


# ------------------------------------------------------------ structured output

def test_chat_json_schema_valid(client):
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    c = r.choices[0]
    assert c.finish_reason == "stop", c
    jsonschema.validate(json.loads(c.message.content), PERSON)


def test_completions_json_object_and_forms(client):
    r = client.completions.create(model=MODEL, prompt="A JSON object about cats:", max_tokens=40, temperature=0,
                                  extra_body={"response_format": {"type": "json_object"}})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].text), dict)
    else:  # cut by max_tokens: still a prefix of an object
        assert r.choices[0].text.lstrip().startswith("{")
    # vLLM's choice (both spellings) and regex, llama.cpp's json_schema and GBNF grammar
    for extra in ({"guided_choice": ["yes", "no"]}, {"structured_outputs": {"choice": ["yes", "no"]}}):
        r = client.completions.create(model=MODEL, prompt="Is Paris in France?", max_tokens=10, temperature=0,
                                      extra_body=extra)
        assert r.choices[0].text in ("yes", "no") and r.choices[0].finish_reason == "stop"
    for extra in ({"guided_regex": "[0-9]{3}-[a-z]{2}"}, {"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}}):
        r = client.completions.create(model=MODEL, prompt="Code:", max_tokens=12, temperature=0, extra_body=extra)
        assert re.fullmatch("[0-9]{3}-[a-z]{2}", r.choices[0].text), r.choices[0].text
    r = client.completions.create(model=MODEL, prompt="Person:", max_tokens=60, temperature=0,
                                  extra_body={"json_schema": PERSON})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)
    for extra in ({"grammar": 'root ::= "ab" [0-9] [0-9]'}, {"guided_grammar": 'root ::= "ab" [0-9] [0-9]'}):
        r = client.completions.create(model=MODEL, prompt="x", max_tokens=10, temperature=0, extra_body=extra)
        assert re.fullmatch("ab[0-9][0-9]", r.choices[0].text), r.choices[0].text


def test_constrained_length_and_sampling(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    # sampled (not greedy) rows obey the grammar too, streamed
    text = ""
    for ch in client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=80, temperature=1.0, seed=3, stream=True,
            response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}):
        if ch.choices:
            text += ch.choices[0].delta.content or ""
            last = ch.choices[0].finish_reason
    if last == "stop":
        jsonschema.validate(json.loads(text), PERSON)


# ------------------------------------------------------------ tools

def test_tool_choice_required_and_named(tool_client):
    msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
    for parallel in (False, True):
        r = tool_client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER, TIME],
                                                tool_choice="required", max_tokens=80, temperature=0,
                                                parallel_tool_calls=parallel)
        c = r.choices[0]
        # parallel: the grammar allows more calls after the first, and a small greedy model may go on
        # until max_tokens; every complete call is valid either way
        assert c.finish_reason == "tool_calls" if not parallel else c.finish_reason in ("tool_calls", "length"), c
        assert c.message.tool_calls and (parallel or len(c.message.tool_calls) == 1)
        for call in c.message.tool_calls:
            schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]["parameters"]
            jsonschema.validate(json.loads(call.function.arguments), schema)
    r = tool_client.chat.completions.create(
        model=MODEL, messages=msgs, tools=[WEATHER, TIME], max_tokens=80, temperature=0, parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_time"
    jsonschema.validate(json.loads(calls[0].function.arguments), TIME["function"]["parameters"])


def test_tool_call_streaming_deltas(tool_client):
    msgs = [{"role": "user", "content": "Weather in Oslo, please."}]
    kw = dict(model=MODEL, messages=msgs, tools=[WEATHER], tool_choice="required", max_tokens=80, temperature=0)
    whole = tool_client.chat.completions.create(**kw).choices[0].message.tool_calls
    calls: dict = {}
    finish = None
    for ch in tool_client.chat.completions.create(stream=True, **kw):
        if not ch.choices:
            continue
        for d in ch.choices[0].delta.tool_calls or []:
            slot = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            slot["id"] = slot["id"] or d.id
            if d.function and d.function.name:
                slot["name"] += d.function.name
            if d.function and d.function.arguments:
                slot["arguments"] += d.function.arguments
        finish = ch.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in whole]
    assert all(c["id"] for c in calls.values())


def test_tool_history_rendered(tool_server, tool_client):
    history = [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Rome", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 31 degrees"},
    ]
    r = httpx.post(tool_server.url + "/tokenize", json={"messages": history, "tools": [WEATHER],
                                                        "add_generation_prompt": True})
    assert r.status_code == 200, r.text
    text = httpx.post(tool_server.url + "/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]
    for needle in ("get_weather", '"Rome"', "sunny, 31 degrees", "<tool_call>", "<tool_response>"):
        assert needle in text, (needle, text)
    out = tool_client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=8,
                                              temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_langchain_structured_output_and_tools(tool_server):
    pytest.importorskip("langchain_openai")
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    llm = ChatOpenAI(base_url=tool_server.url + "/v1", api_key="unused", model=MODEL, temperature=0,
                     max_tokens=60, max_retries=0)
    p = llm.with_structured_output(Person, method="json_schema").invoke("Invent a person.")
    assert isinstance(p, Person)

    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return "sunny"

    msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Paris?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    assert isinstance(msg.tool_calls[0]["args"].get("city"), str)


# ------------------------------------------------------------ n > 1, batched prompts

def test_n_choices_and_seed(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=11, n=3)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seed: reproducible choices
    assert len({c.text for c in a.choices}) > 1  # own sampling streams
    counted = client.completions.create(logprobs=0, **kw)
    assert counted.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in counted.choices)
    assert counted.usage.prompt_tokens == len(client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=1, echo=True, logprobs=0).choices[0].logprobs.tokens) - 1


def test_n_greedy_equals_alone_and_streamed(client):
    alone = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0)
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0, n=2)
    assert [c.message.content for c in r.choices] == [alone.choices[0].message.content] * 2
    assert r.usage.prompt_tokens == alone.usage.prompt_tokens
    assert r.usage.completion_tokens == 2 * alone.usage.completion_tokens
    texts, finishes = {}, {}
    for ch in client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0, n=2,
                                             stream=True, stream_options={"include_usage": True}):
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            finishes[c.index] = c.finish_reason or finishes.get(c.index)
        if ch.usage:
            usage = ch.usage
    assert texts == {0: alone.choices[0].message.content, 1: alone.choices[0].message.content}
    assert set(finishes.values()) == {alone.choices[0].finish_reason}
    assert usage.completion_tokens == r.usage.completion_tokens


def test_batched_prompts(client):
    prompts = ["The sky is", "Two plus two is"]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0) for p in prompts]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [a.choices[0].text for a in alone for _ in range(2)]
    assert r.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert r.usage.completion_tokens == 2 * sum(a.usage.completion_tokens for a in alone)
    ids = client.completions.create(model=MODEL, prompt=[[1, 2, 3], [4, 5]], max_tokens=2, temperature=0)
    assert len(ids.choices) == 2


# ------------------------------------------------------------ sampling parameters

def test_sampling_parameters_take_effect(client, engine):
    base = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    first = engine.tokenizer.encode(base.choices[0].text)[0]
    banned = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12,
                                       temperature=0, logit_bias={str(first): -100})
    assert engine.tokenizer.encode(banned.choices[0].text)[:1] != [first]
    plain = client.completions.create(model=MODEL, prompt="the the the the the", max_tokens=16,
                                      temperature=0).choices[0].text
    for kw in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"extra_body": {"repetition_penalty": 1.8}}):
        r = client.completions.create(model=MODEL, prompt="the the the the the", max_tokens=16, temperature=0, **kw)
        # greedy, so any difference is the penalty's (its exact effect: a reference in tests/test_sampling.py)
        assert r.choices[0].text != plain, kw
    word = base.choices[0].text.split()[0]
    nobad = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12,
                                      temperature=0, extra_body={"bad_words": [word]})
    assert word not in nobad.choices[0].text.split(), (word, nobad.choices[0].text)
    # min_tokens: an answer that would stop at once goes on
    short = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say OK."}],
                                           max_tokens=40, temperature=0)
    assert short.usage.completion_tokens < 30
    longer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say OK."}],
                                            max_tokens=40, temperature=0, extra_body={"min_tokens": 30})
    assert longer.usage.completion_tokens >= 30


def test_stop_string_included_and_echo(client):
    kw = dict(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 6"])
    cut = client.completions.create(**kw).choices[0]
    kept = client.completions.create(extra_body={"include_stop_str_in_output": True}, **kw).choices[0]
    assert cut.finish_reason == kept.finish_reason == "stop"
    assert kept.text == cut.text + " 6"
    echo = client.completions.create(echo=True, logprobs=1, **kw).choices[0]
    assert echo.text == "1, 2, 3, 4," + cut.text
    assert echo.logprobs.token_logprobs[0] is None and len(echo.logprobs.tokens) > 5
    r = httpx.post(str(client.base_url) + "completions", json={**kw, "prompt_logprobs": 2})
    pl = r.json()["choices"][0]["prompt_logprobs"]
    assert pl[0] is None and len(pl) == r.json()["usage"]["prompt_tokens"]
    assert all(len(e) >= 1 and all(v["logprob"] <= 0 for v in e.values()) for e in pl[1:])


# ------------------------------------------------------------ chat options

def test_continue_final_message_and_templates(client, engine):
    msgs = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "My favourite colour is"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0,
                                       extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert r.choices[0].message.content  # continues the assistant's text, not empty
    tpl = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{{ greeting }}assistant:"
    a = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0,
                                       extra_body={"chat_template": tpl, "chat_template_kwargs": {"greeting": "Hi! "}})
    ids = engine.tokenizer.hf.encode(f"user: {CHAT[0]['content']}\nHi! assistant:", add_special_tokens=False)
    b = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    assert a.choices[0].message.content == b.choices[0].text
    assert a.usage.prompt_tokens == len(ids)


# ------------------------------------------------------------ nothing silently ignored

def test_noop_fields_leave_output_unchanged_and_unknown_is_400(server):
    from baton.server.protocol import NOOP_FIELDS

    values = {"user": "u1", "store": False, "metadata": {"k": "v"}, "service_tier": "auto",
              "safety_identifier": "s", "prompt_cache_key": "p"}
    assert set(values) == set(NOOP_FIELDS)
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 8, "temperature": 0}
    want = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()["choices"]
    for name, value in values.items():
        got = httpx.post(server.url + "/v1/chat/completions", json={**body, name: value}, timeout=60)
        assert got.status_code == 200, (name, got.text)
        assert got.json()["choices"] == want, name
    r = httpx.post(server.url + "/v1/chat/completions", json={**body, "guided_decoding_backend_x": "y"})
    err = assert_error(r, 400, param="guided_decoding_backend_x")
    assert "unknown field" in err["message"]


# ------------------------------------------------------------ endpoints

def test_token_endpoints_version_models(server, engine):
    r = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert r["tokens"] == engine.tokenizer.encode("Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == engine.max_model_len
    assert httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "Hello world"
    assert_error(httpx.post(server.url + "/detokenize", json={"tokens": [10 ** 9]}), 400, param="tokens")
    assert_error(httpx.post(server.url + "/tokenize", json={}), 400)
    chat = httpx.post(server.url + "/tokenize", json={"messages": CHAT}).json()
    assert chat["tokens"] == engine.tokenizer.apply_chat_template(CHAT)
    assert httpx.get(server.url + "/version").json()["version"]
    assert httpx.get(server.url + f"/v1/models/{MODEL}").json()["id"] == MODEL


def test_allowed_origins_flag():
    from baton.server.cli import parse_origins

    assert parse_origins('["https://a.example", "*"]') == ["https://a.example", "*"]
    assert parse_origins("https://a.example, https://b.example") == ["https://a.example", "https://b.example"]
    assert parse_origins(None) is None
    with pytest.raises(ValueError, match="allowed-origins"):
        parse_origins('["a", 1]')


def test_cors_off_by_default_and_on_when_asked(server, make_engine):
    pre = {"Origin": "http://example.com", "Access-Control-Request-Method": "POST"}
    r = httpx.options(server.url + "/v1/chat/completions", headers=pre)
    assert "access-control-allow-origin" not in r.headers
    with serve(make_engine(max_num_seqs=2), allowed_origins=["http://example.com"]) as srv:
        r = httpx.options(srv.url + "/v1/chat/completions", headers=pre)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://example.com"
        r = httpx.get(srv.url + "/v1/models", headers={"Origin": "http://example.com"})
        assert r.headers["access-control-allow-origin"] == "http://example.com"
