"""The generic HF transformers backend (models/transformers_backend.py): unmodified HF
models of architectures with no native baton file, driven through baton's vector-shaped
caches by their attention interface.

Tiny random models of three such architectures, chosen to differ where a port would:
- granite: GQA, Llama-like but with embedding / residual / attention multipliers and
  logits divided by `logits_scaling` in the CausalLM head (the family's own post-processing).
- starcoder2: GQA, LayerNorm with biases, a 16-token sliding window on every layer
  (prompts here reach 70 tokens, so the window is live in prefill and decode).
- gpt_neox: multi-head (no GQA), fused QKV, partial rotary (half of head_dim), parallel
  residual, LayerNorm.
"""
from __future__ import annotations

import pytest
import torch

from baton.models.loader import ModelLoadError, load_model
from baton.models.transformers_backend import TransformersModel
from testutil import baton_logits, load_cached, make_engine, run_alone, run_arrivals, run_greedy, save_random_model, workload
from testutil import engine_device as device_under_test

POLICIES = ["static", "orca", "baton", "baton-pd"]
ARCHS = ["granite", "starcoder2", "gpt_neox"]
TF = "transformers"


def make_tiny_hf_model(path, arch: str, seed: int = 0) -> str:
    """config.json + model.safetensors of a random `arch` model (vocab 256, hidden 64,
    2 layers), init scale raised so greedy choices are not near-ties."""
    import transformers

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=512, initializer_range=0.15,
                  tie_word_embeddings=False, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    if arch == "granite":
        cfg = transformers.GraniteConfig(**common, num_key_value_heads=2, rms_norm_eps=1e-5,
                                         embedding_multiplier=4.0, residual_multiplier=0.5,
                                         attention_multiplier=0.2, logits_scaling=2.0)
        cls = transformers.GraniteForCausalLM
    elif arch == "starcoder2":
        cfg = transformers.Starcoder2Config(**common, num_key_value_heads=2, sliding_window=16, norm_epsilon=1e-5)
        cls = transformers.Starcoder2ForCausalLM
    elif arch == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(**common, rotary_pct=0.5, use_parallel_residual=True)
        cls = transformers.GPTNeoXForCausalLM
    else:
        raise ValueError(arch)
    return save_random_model(path, cls, cfg, seed)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    paths: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in paths:
            paths[arch] = make_tiny_hf_model(tmp_path_factory.mktemp(f"tiny_{arch}"), arch)
        return paths[arch]
    return get


@pytest.fixture(scope="module")
def hf_models():
    import transformers

    cache: dict[str, torch.nn.Module] = {}

    def get(path: str):
        if path not in cache:
            cache[path] = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return cache[path]
    return get


def hf_logits(hf, ids: list[int], next_ids: list[int]):
    dev = next(hf.parameters()).device
    with torch.no_grad():
        logits = hf(torch.tensor([ids + next_ids], device=dev)).logits[0].float().cpu()
    return logits[len(ids) - 1:]


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    dev = next(hf.parameters()).device
    with torch.no_grad():
        ids = torch.tensor([prompt], device=dev)
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def logits_of(model, ids, next_ids):
    return baton_logits(model, ids, len(next_ids), next_ids).cpu()


# ---------------------------------------------------------------- loading

@pytest.mark.parametrize("arch", ARCHS)
def test_auto_picks_transformers_backend(arch, tiny):
    import transformers

    path = tiny(arch)
    model, _ = load_cached(path, "float32")  # model_impl="auto"
    cfg = model.cfg
    assert isinstance(model, TransformersModel)
    assert cfg.architecture == arch and cfg.extra["impl"] == TF
    assert model.dtype == torch.float32 and model.device.type == torch.device(device_under_test()).type
    hf_cfg = transformers.AutoConfig.from_pretrained(path)
    assert (cfg.vocab_size, cfg.num_layers, cfg.num_heads) == (256, 2, 4)
    assert cfg.num_kv_heads == getattr(hf_cfg, "num_key_value_heads", 4) and cfg.head_dim == 16
    assert cfg.sliding_windows == ([16, 16] if arch == "starcoder2" else [])
    if arch == "granite":  # the family's attention_multiplier is the scores' scale
        assert cfg.extra["scales"] == [0.2, 0.2]
    with pytest.raises(ModelLoadError, match=repr(arch)):
        load_model(path, "float32", model_impl="native")


def test_native_model_through_transformers(tiny_llama):
    model, _ = load_cached(tiny_llama, "float32", TF)
    native, _ = load_cached(tiny_llama, "float32")
    cfg, ncfg = model.cfg, native.cfg
    assert isinstance(model, TransformersModel) and not isinstance(native, TransformersModel)
    for k in ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings",
              "sliding_windows", "eos_token_ids", "architecture"):
        assert getattr(cfg, k) == getattr(ncfg, k), k


# ---------------------------------------------------------------- parity with HF

@pytest.mark.parametrize("arch", ARCHS)
def test_logit_parity_with_hf(arch, tiny, hf_models):
    path = tiny(arch)
    model, _ = load_cached(path, "float32")
    cfg = model.cfg
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (37,), generator=g).tolist()
    nxt = torch.randint(0, cfg.vocab_size, (9,), generator=g).tolist()
    ref = hf_logits(hf_models(path), ids, nxt)
    diff = (logits_of(model, ids, nxt) - ref).abs().max().item()
    print(f"{arch} (transformers backend): max abs logit difference vs HF = {diff:.2e} "
          f"(logits up to {ref.abs().max().item():.1f})")
    assert diff < 1e-4


def test_llama_logits_transformers_vs_native(tiny_llama):
    model, _ = load_cached(tiny_llama, "float32", TF)
    native, _ = load_cached(tiny_llama, "float32")
    ids, nxt = list(range(3, 90, 3)), [5, 17, 200, 31]
    diff = (logits_of(model, ids, nxt) - logits_of(native, ids, nxt)).abs().max().item()
    print(f"llama: max abs logit difference, transformers backend vs native = {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_parity_with_hf_generate(arch, tiny, hf_models):
    # Three prompts of different lengths decoded together (baton-pd: prompts prefilled
    # next to the decode batch in flat forwards), each against HF generate alone.
    path = tiny(arch)
    prompts = [list(range(7, 47)), [3, 1, 4, 1, 5], list(range(200, 140, -3))]
    n = 12
    engine = make_engine(path, policy="baton-pd", model_impl=TF, max_num_seqs=3, max_prefill_tokens=24)
    got = run_greedy(engine, prompts, n)
    hf = hf_models(path)
    for i, p in enumerate(prompts):
        assert got[i] == hf_greedy(hf, p, n), f"{arch}: request {i} differs from HF generate"


# ---------------------------------------------------------------- re-batching invariance

@pytest.fixture(scope="module")
def alone(tiny):
    refs: dict[str, list] = {}

    def get(arch: str) -> list:
        if arch not in refs:
            refs[arch] = [run_alone(tiny(arch), p, sp, model_impl=TF) for p, sp, _ in workload(0, n=8)]
        return refs[arch]
    return get


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("arch", ARCHS)
def test_rebatching_invariance(arch, policy, tiny, alone):
    path = tiny(arch)
    engine = make_engine(path, policy=policy, model_impl=TF, max_num_seqs=3, max_prefill_tokens=24)
    forwards = []  # segments per forward
    execute = engine.runner.execute

    def spy(plan):
        forwards.append(len(plan.segments))
        return execute(plan)

    engine.runner.execute = spy
    reqs = workload(0, n=8)
    got = run_arrivals(engine, reqs)
    assert sorted(got) == list(range(len(reqs))), "a request was lost"
    for i, ref in enumerate(alone(arch)):
        assert got[i] == ref, f"{arch}: request {i} differs under {policy}"
    assert engine.budget.query_bytes == 0 and not engine.requests
    if policy == "baton-pd":  # the flat multi-segment forward really ran
        assert max(forwards) >= 2, forwards


def test_llama_greedy_tokens_transformers_vs_native(tiny_llama):
    reqs = [r for r in workload(1, n=8) if r[1].temperature == 0.0]
    runs = []
    for impl in ("native", TF):
        engine = make_engine(tiny_llama, policy="baton-pd", model_impl=impl, max_num_seqs=3, max_prefill_tokens=24)
        runs.append(run_arrivals(engine, reqs))
    assert runs[0] == runs[1]


# ---------------------------------------------------------------- the default GGUF through transformers

def test_default_gguf_through_transformers(default_model_path):
    """transformers dequantizes the GGUF itself (gguf_file=); the backend runs it. Parity
    with the same HF model under its stock sdpa attention, logits and greedy tokens."""
    from baton import SamplingParams

    model, tok = load_cached(default_model_path, "float32", TF)
    assert isinstance(model, TransformersModel) and model.cfg.architecture == "llama"
    assert (model.cfg.num_layers, model.cfg.num_kv_heads, model.cfg.head_dim) == (30, 3, 64)
    ids = tok.encode("The quick brown fox jumps over the lazy dog. Then it")
    nxt = tok.encode(" ran into the woods")
    got = logits_of(model, ids, nxt)
    engine = make_engine(default_model_path, policy="baton-pd", model_impl=TF, max_num_seqs=2)
    engine.add_request("0", ids, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    engine.add_request("1", nxt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    toks = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                toks[out.request_id] = out.outputs[0].token_ids
    hf = model.hf
    hf.set_attn_implementation("sdpa")
    try:
        ref = hf_logits(hf, ids, nxt)
        ref_toks = {"0": hf_greedy(hf, ids, 8), "1": hf_greedy(hf, nxt, 8)}
    finally:
        hf.set_attn_implementation("baton")
    diff = (got - ref).abs().max().item()
    print(f"SmolLM2-135M GGUF (transformers backend): max abs logit difference vs HF sdpa = {diff:.2e}")
    assert diff < 1e-3
    assert toks == ref_toks
