"""Shared fixtures for the server tests.

One float32 engine on the default model for the whole session (loading takes
~15 s; float32 so batched greedy results equal solo ones exactly). Tests that
need another engine configuration build one around the same weights with
`make_engine`. Every server is uvicorn on 127.0.0.1 with a free port, stopped
by the test (ServerThread is a context manager).
"""
from __future__ import annotations

import contextlib
import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from baton.engine import EngineConfig, LLMEngine
from baton.server.app import ServerThread, create_app

MODEL = "smollm2"  # served model name used by the tests


class SSEReader:
    """A streaming completion read chunk by chunk over its own connection."""

    def __init__(self, url: str, body: dict, path: str = "/v1/completions"):
        self.http = httpx.Client(timeout=120)
        self.cm = self.http.stream("POST", url + path, json=body)
        self.resp = self.cm.__enter__()
        assert self.resp.status_code == 200, self.resp.read()
        self.lines = self.resp.iter_lines()
        self.chunks: list[dict] = []
        self.done = False
        self.closed = False

    def read(self, n: int = 1) -> list[dict]:
        got = []
        while len(got) < n:
            line = next(self.lines)
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                self.done = True
                break
            c = json.loads(line[6:])
            assert "error" not in c, c
            got.append(c)
            self.chunks.append(c)
        return got

    def read_all(self) -> list[dict]:
        got = []
        while not self.done:
            got += self.read(1)
        return got

    @property
    def finish_reason(self):
        reasons = [c["choices"][0]["finish_reason"] for c in self.chunks if c["choices"]]
        return reasons[-1] if reasons else None

    @property
    def text(self) -> str:
        return "".join(c["choices"][0]["text"] for c in self.chunks if c["choices"])

    def close(self):
        """Disconnect (the response is not fully read, so the connection is dropped)."""
        if self.closed:
            return
        self.closed = True
        self.cm.__exit__(None, None, None)
        self.http.close()


@pytest.fixture(scope="session")
def engine():
    # The eager reference path: these tests check the answers' text ("Paris"), and
    # the int8-activation kernels' greedy answer on the Q4_1 model differs by host
    # (Paris on a Zen 3 host, a French word list on a Zen 4 one); the kernels are
    # tested against this path in tests/platform/test_native_kernels.py.
    from baton.models.loader import default_model_path, load_model
    from baton.tokenizer import load_tokenizer

    path = default_model_path()
    model, _ = load_model(path, "float32", native_kernels=False)
    return LLMEngine(EngineConfig(model=path, dtype="float32", max_num_seqs=32), model=model,
                     tokenizer=load_tokenizer(path, model.cfg.eos_token_ids))


@pytest.fixture(scope="session")
def make_engine(engine):
    """Another engine (own scheduler and KV) sharing the session engine's weights."""
    def make(**cfg):
        cfg.setdefault("dtype", "float32")
        return LLMEngine(EngineConfig(**cfg), model=engine.model, tokenizer=engine.tokenizer)
    return make


@contextlib.contextmanager
def serve(engine, **kw):
    kw.setdefault("served_model_name", MODEL)
    app = create_app(engine, **kw)
    with ServerThread(app) as srv:
        srv.app = app
        yield srv
    assert not engine.has_unfinished_requests(), "server stopped with requests left in the engine"


def metrics(url: str) -> dict:
    """/metrics as {(sample name, sorted label items): value}, parsed by prometheus_client."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(url: str, name: str, **labels) -> float:
    return metrics(url).get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(cond, timeout: float = 60.0, interval: float = 0.05, what: str = "condition"):
    """Poll until cond() is truthy (bounded; not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def assert_error(resp: httpx.Response, status: int, param=None, code=None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, engine):
    """A tiny random Llama (HF safetensors) with the default model's tokenizer:
    loads in a blink, for subprocess tests of `baton serve`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=engine.cfg.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    engine.tokenizer.hf.save_pretrained(d)
    return str(d)


# One server (and openai client) per test module, around the shared engine.
@pytest.fixture(scope="module")
def server(engine):
    with serve(engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c
