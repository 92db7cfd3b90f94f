"""Helpers shared by the tests: tiny random models built on the fly, cached loads."""
from __future__ import annotations

import functools
import os
import random

import torch


def make_tiny_model(path, arch: str = "llama", seed: int = 0, **overrides) -> str:
    """Write an HF model directory (config.json + model.safetensors) with random
    weights. The init scale is raised so logits are peaked and greedy choices are
    not near-ties (which would make token equality a test of float noise)."""
    import transformers

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, initializer_range=0.15, tie_word_embeddings=False, eos_token_id=None,
                  bos_token_id=None, pad_token_id=None)
    common.update(overrides)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    else:
        raise ValueError(arch)
    return save_random_model(path, cls, cfg, seed)


def save_random_model(path, cls, cfg, seed: int = 0) -> str:
    """An HF model of class `cls` with config `cfg`, random weights (seeded), saved to `path`."""
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    model.save_pretrained(str(path))
    return str(path)


def engine_device() -> str:
    """The engine's device in tests (pytest --device, default cpu)."""
    return os.environ.get("BATON_TEST_DEVICE", "cpu")


@functools.lru_cache(maxsize=None)
def load_cached(path: str, dtype: str = "float32", model_impl: str = "auto", native_kernels: bool = True):
    """native_kernels=False: the eager reference path (no C++ kernels)."""
    from baton.models.loader import load_model
    from baton.tokenizer import load_tokenizer

    model, cfg = load_model(path, dtype, engine_device(), model_impl=model_impl, native_kernels=native_kernels)
    return model, load_tokenizer(path, cfg.eos_token_ids)


def make_engine(path: str, dtype: str = "float32", **kwargs):
    """An engine over a cached model, so tests share weights."""
    from baton.engine import EngineConfig, LLMEngine

    model, tok = load_cached(path, dtype, kwargs.get("model_impl", "auto"))
    kwargs.setdefault("kv_cache_bytes", 1 << 30)
    kwargs.setdefault("device", engine_device())
    return LLMEngine(EngineConfig(model=path, dtype=dtype, **kwargs), model=model, tokenizer=tok)


def baton_logits(model, ids: list[int], n_decode: int, next_ids: list[int]):
    """Through the model runner: prefill `ids` into a one-row cache, then feed
    `next_ids` one at a time; logits at every step, [1 + len(next_ids), vocab]."""
    from baton.cache import KVBudget, KVSpec, ShapedKV
    from baton.runner import ModelRunner
    from baton.scheduler.plan import Plan, Segment

    runner = ModelRunner(model)
    cache = ShapedKV(KVSpec.of(model.cfg, model.dtype, model.device), KVBudget(1 << 30), rows=1,
                     width=len(ids) + n_decode)
    owner = object()
    out = [runner.execute(Plan([Segment(cache, [0], [ids], [True], [owner])])).logits[0]]
    for i, t in enumerate(next_ids):
        out.append(runner.execute(Plan([Segment(cache, [len(ids) + i], [[t]], [True], [owner])])).logits[0])
    return torch.stack(out).float().cpu()


# ---------------------------------------------------------------- re-batching invariance

def workload(seed: int, n: int = 14, vocab: int = 256):
    """Requests (prompt, params, arrival step) that join and leave a 3-row batch:
    short, medium and long prompts, greedy and seeded sampling."""
    from baton import SamplingParams

    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        plen = rng.choice([rng.randint(1, 6), rng.randint(7, 30), rng.randint(31, 70)])
        params = SamplingParams(max_tokens=rng.randint(1, 24), temperature=0.0, ignore_eos=True)
        if i % 4 == 3:  # seeded sampling must not depend on the batch either
            params = SamplingParams(max_tokens=rng.randint(1, 24), temperature=0.9, top_k=50, seed=1000 + i,
                                    ignore_eos=True)
        reqs.append(([rng.randrange(vocab) for _ in range(plen)], params, rng.randint(0, 25)))
    return reqs


def run_alone(path, prompt, params, **engine_kwargs):
    engine = make_engine(path, policy="baton-pd", max_num_seqs=1, **engine_kwargs)
    engine.add_request("alone", prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                return out.outputs[0].token_ids


def run_arrivals(engine, reqs, outputs: bool = False):
    """Add each request at its arrival step; returns {index: token ids} (or, with
    outputs, {index: CompletionOutput} of the first choice)."""
    got, pending, step = {}, list(range(len(reqs))), 0
    while pending or engine.has_unfinished_requests():
        for i in [i for i in pending if reqs[i][2] <= step]:
            engine.add_request(str(i), reqs[i][0], reqs[i][1])
            pending.remove(i)
        for out in engine.step():
            assert out.request_id not in got, "a request finished twice"
            if out.finished:
                assert out.error is None, out.error
                got[out.request_id] = out.outputs[0] if outputs else out.outputs[0].token_ids
        step += 1
        assert step < 5000
    return {int(k): v for k, v in got.items()}




def run_greedy(engine, prompts, max_tokens: int) -> dict[int, list[int]]:
    """All prompts at once, greedy, to completion: {index: token ids}."""
    from baton import SamplingParams

    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    got = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[int(out.request_id)] = out.outputs[0].token_ids
    return got
