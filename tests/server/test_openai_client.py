"""A real uvicorn server driven by the official openai client (sync and async,
streaming and not, completions and chat)."""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from .conftest import MODEL, serve

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def aclient(server):
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def collect_completion_stream(stream):
    text, finish, usage, n_chunks = "", None, None, 0
    for chunk in stream:
        if chunk.choices:
            n_chunks += 1
            assert finish is None, "a chunk after the finish_reason"
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    return text, finish, usage, n_chunks


def collect_chat_stream(stream):
    text, finish, usage, roles = "", None, None, []
    for chunk in stream:
        if chunk.choices:
            d = chunk.choices[0].delta
            if d.role:
                roles.append(d.role)
            text += d.content or ""
            if chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    return text, finish, usage, roles


def test_health_and_models(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_sync(client, engine):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=24)
    choice = r.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.usage.prompt_tokens == len(engine.tokenizer.apply_chat_template(CHAT))
    assert 1 <= r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    # the same request streamed: same text, finish reason and usage
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=24, stream=True,
                                            stream_options={"include_usage": True})
    text, finish, usage, roles = collect_chat_stream(stream)
    assert roles == ["assistant"]
    assert text == choice.message.content
    assert finish == "stop"
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == \
        (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens)


def test_completions_sync(client, engine):
    prompt = "The three primary colors are"
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12,
                                  extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.finish_reason == "length"
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode(prompt))
    assert c.text.strip()

    text, finish, usage, n_chunks = collect_completion_stream(client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert (text, finish) == (c.text, "length")
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == \
        (r.usage.prompt_tokens, 12, r.usage.prompt_tokens + 12)
    assert 2 <= n_chunks <= 12  # one chunk per token or detokenized piece

    # prompt as token ids: same result
    r2 = client.completions.create(model=MODEL, prompt=engine.tokenizer.encode(prompt), temperature=0,
                                   max_tokens=12, extra_body={"ignore_eos": True})
    assert r2.choices[0].text == c.text


def test_without_usage_option_no_usage_chunk(client):
    chunks = list(client.completions.create(model=MODEL, prompt="Hello", temperature=0, max_tokens=4, stream=True))
    assert all(ch.usage is None for ch in chunks)
    assert all(ch.choices for ch in chunks)


def test_async_client(server):
    async def main():
        async with aclient(server) as c:
            chat = await c.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=24)
            text = ""
            async for chunk in await c.chat.completions.create(model=MODEL, messages=CHAT, temperature=0,
                                                               max_tokens=24, stream=True):
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
            comp = await c.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=10)
            ctext, cfinish = "", None
            async for chunk in await c.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0,
                                                          max_tokens=10, stream=True):
                if chunk.choices:
                    ctext += chunk.choices[0].text
                    cfinish = chunk.choices[0].finish_reason or cfinish
            return chat, text, comp, ctext, cfinish

    chat, text, comp, ctext, cfinish = asyncio.run(main())
    assert "Paris" in chat.choices[0].message.content
    assert text == chat.choices[0].message.content
    assert ctext == comp.choices[0].text
    assert cfinish == comp.choices[0].finish_reason
    assert "5" in comp.choices[0].text


def test_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="The sky is", temperature=0, max_tokens=6, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    for tok, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert v <= 0
        assert 1 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(v)  # greedy picks the most likely token
        assert tok in top

    r = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=8, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(e.token for e in content).startswith(r.choices[0].message.content)
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 2
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)

    # streamed logprobs: one entry per token, the same values
    entries = []
    for chunk in client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=8,
                                                logprobs=True, top_logprobs=2, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            entries += chunk.choices[0].logprobs.content
    assert [(e.token, round(e.logprob, 4)) for e in entries] == [(e.token, round(e.logprob, 4)) for e in content]


def test_stop_strings(client):
    base = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3, 4, 5,", temperature=0, max_tokens=16,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert " 8" in base, base
    stop = " 8"
    r = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3, 4, 5,", temperature=0, max_tokens=16,
                                  stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[:base.index(stop)]
    text, finish, _, _ = collect_completion_stream(client.completions.create(
        model=MODEL, prompt="Count: 1, 2, 3, 4, 5,", temperature=0, max_tokens=16, stop=stop, stream=True))
    assert (text, finish) == (r.choices[0].text, "stop")


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=MODEL, prompt="My favourite animal is", temperature=0.9, top_p=0.95, max_tokens=10, seed=1234,
              extra_body={"top_k": 50, "min_p": 0.01, "ignore_eos": True})
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b


def test_max_completion_tokens_and_default_max_tokens(client, make_engine):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_completion_tokens=3)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"

    # No max_tokens: up to the remaining context, capped by default_max_tokens.
    small = make_engine(max_model_len=40, max_num_seqs=2)
    with serve(small, default_max_tokens=256) as srv:
        with openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0) as c:
            prompt = "Once upon a time"
            n_prompt = len(small.tokenizer.encode(prompt))
            r = c.completions.create(model=MODEL, prompt=prompt, temperature=0, extra_body={"ignore_eos": True})
            assert r.usage.completion_tokens == 40 - n_prompt
            assert r.choices[0].finish_reason == "length"
    with serve(small, default_max_tokens=5) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi", "ignore_eos": True}, timeout=60).json()
        assert r["usage"]["completion_tokens"] == 5


def test_32_concurrent_streams_match_solo(server, client):
    """32 concurrent streaming clients, different prompts and lengths: each gets
    exactly what the same request gets when served alone (greedy, float32)."""
    n = 32
    subjects = ["cats", "the ocean", "mountains", "bread", "trains", "music", "winter", "robots"]
    reqs = []
    for i in range(n):
        max_tokens = 8 + (i * 5) % 9  # 8..16 (short: solo references run at batch 1)
        if i % 4 == 0:
            reqs.append(("chat", [{"role": "user", "content": f"Write one sentence about {subjects[i % 8]}."}],
                         max_tokens))
        else:
            reqs.append(("completion", f"{i + 1}. A short note about {subjects[i % 8]}:", max_tokens))

    # served alone, one after the other
    solo = []
    for kind, prompt, mt in reqs:
        if kind == "chat":
            r = client.chat.completions.create(model=MODEL, messages=prompt, temperature=0, max_tokens=mt)
            solo.append((r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens))
        else:
            r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=mt)
            solo.append((r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens))

    async def one(c, kind, prompt, mt):
        text, finish, usage = "", None, None
        if kind == "chat":
            stream = await c.chat.completions.create(model=MODEL, messages=prompt, temperature=0, max_tokens=mt,
                                                     stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
                usage = chunk.usage or usage
        else:
            stream = await c.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=mt,
                                                stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].text
                    finish = chunk.choices[0].finish_reason or finish
                usage = chunk.usage or usage
        return text, finish, usage.completion_tokens

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300) as c:
            return await asyncio.gather(*(one(c, *r) for r in reqs))

    together = asyncio.run(main())
    for i, (a, b) in enumerate(zip(together, solo)):
        assert a == b, f"request {i} ({reqs[i]}): concurrent {a!r} != solo {b!r}"
    assert len({t for t, _, _ in together}) > n // 2  # distinct results, not one answer copied around
