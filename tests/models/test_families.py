"""Native families beyond Llama (Qwen3, Gemma 2, Gemma 3 text, Phi-3 / Phi-3.5 with
LongRoPE) and sliding-window attention (Mistral, Qwen2, Gemma, Qwen3): on tiny
random configs, float32 logits and greedy tokens equal HF transformers', results
do not depend on the batch under any policy, and llama.cpp-style GGUFs of the
same weights load to the same logits."""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from baton.models.loader import load_model
from baton.runner import ModelRunner
from baton.scheduler.plan import Plan, Segment
from testutil import baton_logits, make_engine, run_alone, run_arrivals, run_greedy, workload

POLICIES = ["static", "orca", "baton", "baton-pd"]
WINDOW = 16

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.15,
              eos_token_id=None, bos_token_id=None, pad_token_id=None)

PHI3_LONGROPE = dict(
    max_position_embeddings=128, original_max_position_embeddings=32,
    rope_scaling={"type": "longrope",
                  "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
                  "long_factor": [1.5, 2.2, 3.0, 4.5, 6.0, 9.0, 13.0, 18.0]})

# name -> (transformers config class name, model class name, overrides of COMMON)
SPECS = {
    # head_dim != hidden / heads, tied embeddings
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=True)),
    # attention_bias: HF's Qwen3 puts it on o_proj too
    "qwen3_bias": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, attention_bias=True)),
    # the window on the layers from max_window_layers on
    "qwen3_window": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_hidden_layers=3, use_sliding_window=True,
                                                             sliding_window=WINDOW, max_window_layers=1)),
    # every other layer sliding; soft-caps low enough to bite; scale != head_dim ** -0.5
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW, attn_logit_softcapping=3.0,
        final_logit_softcapping=8.0, num_hidden_layers=3)),
    # layers 0, 2 sliding (local base), 1, 3 global (own base, linear scaling)
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, query_pre_attn_scalar=20, sliding_window=WINDOW, num_hidden_layers=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}})),
    # Phi-4-mini-like partial rotary (12 of 16 dims)
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(partial_rotary_factor=0.75)),
    # Phi-3.5-like LongRoPE; the original context (32) is crossed by the tests
    "phi3_longrope": ("Phi3Config", "Phi3ForCausalLM", PHI3_LONGROPE),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
    "qwen2_window": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_hidden_layers=3, use_sliding_window=True,
                                                             sliding_window=WINDOW, max_window_layers=1)),
}
GREEDY = [n for n in SPECS if n != "qwen3_bias"]
WINDOWED = ["qwen3_window", "gemma2", "gemma3_text", "mistral", "qwen2_window"]
# Mistral runs the same windowed Llama code as qwen2_window (every layer windowed vs some).
INVARIANCE = ["qwen3", "gemma2", "gemma3_text", "phi3_longrope", "qwen2_window"]


def build_hf(name: str, seed: int = 0, **more):
    """A random tiny HF model (eager attention), float32, with random norm weights
    (HF initialises them to 1, or 0 for Gemma's 1 + w, which would hide a wrong
    norm offset or a missed norm)."""
    import transformers

    cfg_cls, model_cls, overrides = SPECS[name]
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **overrides, **more})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (model dir, HF model); built on first use."""
    made = {}

    def get(name: str):
        if name not in made:
            hf = build_hf(name)
            path = tmp_path_factory.mktemp(name)
            hf.save_pretrained(str(path))
            made[name] = (str(path), hf)
        return made[name]

    return get


def hf_logits(hf, ids: list[int], next_ids: list[int]) -> torch.Tensor:
    """Full-sequence logits at the last prompt position and each fed token."""
    with torch.no_grad():
        return hf(torch.tensor([ids + next_ids])).logits[0, len(ids) - 1:].float()


def hf_incremental_logits(hf, ids: list[int], next_ids: list[int]) -> torch.Tensor:
    """HF's cached generation path: the prompt in one forward, then one token each."""
    from transformers import DynamicCache

    cache = DynamicCache(config=hf.config)
    with torch.no_grad():
        out = [hf(torch.tensor([ids]), cache=cache, use_cache=True).logits[0, -1]]
        for t in next_ids:
            out.append(hf(torch.tensor([[t]]), cache=cache, use_cache=True).logits[0, -1])
    return torch.stack(out).float()


def chunked_logits(model, ids: list[int], chunk: int) -> torch.Tensor:
    """Prefill `ids` in chunks (each continuing the cache at its start): logits at
    the last token of every chunk."""
    from baton.cache import KVBudget, KVSpec, ShapedKV

    runner = ModelRunner(model)
    cache = ShapedKV(KVSpec.of(model.cfg, model.dtype, model.device), KVBudget(1 << 30), rows=1, width=len(ids))
    owner, out = object(), []
    for s in range(0, len(ids), chunk):
        out.append(runner.execute(Plan([Segment(cache, [s], [ids[s:s + chunk]], [True], [owner])])).logits[0])
    return torch.stack(out).float()


def prompt(seed: int, n: int, vocab: int = 256) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def without_windows(model):
    for block in model.layers:
        block.attn.spec = dataclasses.replace(block.attn.spec, window=None)
    return model


# ---------------------------------------------------------------- configs

def test_configs_read_as_hf_does(tiny):
    from baton.models.registry import native_family

    for name, windows in [("qwen3", []), ("qwen3_window", [None, WINDOW, WINDOW]),
                          ("gemma2", [WINDOW, None, WINDOW]), ("gemma3_text", [WINDOW, None] * 2),
                          ("mistral", [WINDOW] * 2), ("qwen2_window", [None, WINDOW, WINDOW]), ("phi3", [])]:
        _, hf = tiny(name)
        d = hf.config.to_dict()
        cfg = native_family(d["model_type"]).config_from_hf(d)
        assert cfg.sliding_windows == windows, name
        assert cfg.head_dim == (getattr(hf.config, "head_dim", None) or 16), name
    assert native_family("phi3").config_from_hf(tiny("phi3")[1].config.to_dict()).extra["rotary_dim"] == 12
    _, hf = tiny("phi3_longrope")
    cfg = native_family("phi3").config_from_hf(hf.config.to_dict())
    lr = cfg.extra["longrope"]
    assert lr["original_max_position_embeddings"] == 32
    assert lr["attention_factor"] == pytest.approx((1 + torch.log(torch.tensor(4.0)).item() / torch.log(
        torch.tensor(32.0)).item()) ** 0.5)


# ---------------------------------------------------------------- logits

@pytest.mark.parametrize("name", list(SPECS))
def test_logit_parity_with_hf(name, tiny):
    path, hf = tiny(name)
    model, cfg = load_model(path, "float32")
    assert type(model).__module__.startswith("baton.models."), "not the native family"
    # Prompt + fed tokens (50) are longer than every window (16); within Phi-3's
    # original context (32) for the LongRoPE config, where HF's full-sequence rotary
    # is the short one (past it, see the incremental test below).
    n_prompt, n_next = (20, 8) if name == "phi3_longrope" else (40, 10)
    ids, nxt = prompt(1, n_prompt), prompt(2, n_next)
    diff = (baton_logits(model, ids, len(nxt), nxt) - hf_logits(hf, ids, nxt)).abs().max().item()
    print(f"{name}: max abs logit difference vs HF = {diff:.2e}")
    # float32 rounding only (logits of magnitude ~10).
    assert diff < 1e-4


def test_phi3_longrope_past_original_context_matches_hf_cached_forward(tiny):
    """Prompt within the original context (32), then decoding to position 45: HF's
    model forward with a cache switches to the long factors at the first position
    >= 32, token by token, as baton does. (HF's generate instead recomputes the
    whole cache with the long factors at the crossing; see phi3.py.)"""
    path, hf = tiny("phi3_longrope")
    model, _ = load_model(path, "float32")
    ids, nxt = prompt(3, 20), prompt(4, 26)
    ref = hf_incremental_logits(hf, ids, nxt)
    diff = (baton_logits(model, ids, len(nxt), nxt) - ref).abs().max().item()
    print(f"phi3_longrope past the original context: max abs logit difference vs HF (cached) = {diff:.2e}")
    assert diff < 1e-4
    # The long factors really are used from position 32 on: with only the short ones
    # the last logits would differ.
    model.rotary.long_inv_freq = model.rotary.inv_freq.clone()
    assert (baton_logits(model, ids, len(nxt), nxt)[-1] - ref[-1]).abs().max().item() > 1e-2


@pytest.mark.parametrize("name", WINDOWED)
def test_sliding_window_is_applied(name, tiny):
    """Prompt (40) + decode (10) longer than the window: HF parity with a chunked
    prefill too, and without the window the logits are far off (the test can fail)."""
    path, hf = tiny(name)
    model, _ = load_model(path, "float32")
    ids = prompt(5, 50)
    with torch.no_grad():
        full = hf(torch.tensor([ids])).logits[0].float()
    chunk = 12  # chunks start inside and past the window
    ends = [min(s + chunk, len(ids)) - 1 for s in range(0, len(ids), chunk)]
    diff = (chunked_logits(model, ids, chunk) - full[ends]).abs().max().item()
    print(f"{name}: chunked prefill, window {WINDOW}: max abs logit difference vs HF = {diff:.2e}")
    assert diff < 1e-4
    ablated = without_windows(load_model(path, "float32")[0])
    nxt = ids[40:]
    off = (baton_logits(ablated, ids[:40], len(nxt), nxt) - hf_logits(hf, ids[:40], nxt)).abs().max().item()
    print(f"{name}: window ignored: max abs logit difference vs HF = {off:.2e}")
    assert off > 1e-2


def test_gemma3_multimodal_checkpoint_loads_its_language_model(tmp_path):
    """A "gemma3" (image-text) directory: baton runs its text_config model from the
    language_model.* weights; text-only logits equal HF's."""
    import transformers

    text = {**COMMON, **SPECS["gemma3_text"][2]}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_index=255, boi_token_index=253, eoi_token_index=254)
    cfg._attn_implementation = cfg.text_config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(cfg).float().eval()
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if "norm" in pname and "language_model" in pname:
                p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(str(tmp_path))
    model, mcfg = load_model(str(tmp_path), "float32")
    assert mcfg.architecture == "gemma3_text" and mcfg.sliding_windows == [WINDOW, None] * 2
    ids, nxt = prompt(1, 40, 250), prompt(2, 10, 250)  # no image tokens
    diff = (baton_logits(model, ids, len(nxt), nxt) - hf_logits(hf, ids, nxt)).abs().max().item()
    print(f"gemma3 (image-text checkpoint, text only): max abs logit difference vs HF = {diff:.2e}")
    assert diff < 1e-4


# ---------------------------------------------------------------- greedy tokens

@pytest.mark.parametrize("name", GREEDY)
def test_greedy_matches_hf_generate(name, tiny):
    path, hf = tiny(name)
    engine = make_engine(path, policy="baton-pd", max_num_seqs=2)
    # The second prompt + its tokens is longer than the window (16).
    prompts, n = [prompt(6, 5), prompt(7, 30)], 20
    if name == "phi3_longrope":
        # Within the original context (32): once a sequence is longer, HF's generate
        # drops its cache and recomputes every key with the long factors, where baton
        # (like HF's model forward with a cache) keeps the earlier keys (see phi3.py).
        prompts, n = [prompt(6, 5), prompt(7, 20)], 12
    got = run_greedy(engine, prompts, n)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ids = torch.tensor([p])
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=0, eos_token_id=None)[0, len(p):].tolist()
        assert list(got[i]) == ref, (name, i)


# ---------------------------------------------------------------- re-batching invariance

@pytest.mark.parametrize("name", INVARIANCE)
def test_rebatching_invariance(name, tiny):
    path, _ = tiny(name)
    reqs = workload(0, n=8)
    t0 = time.perf_counter()
    reference = [run_alone(path, p, sp) for p, sp, _ in reqs]
    for policy in POLICIES:
        engine = make_engine(path, policy=policy, max_num_seqs=3, max_prefill_tokens=24)
        got = run_arrivals(engine, reqs)
        assert sorted(got) == list(range(len(reqs))), f"a request was lost under {policy}"
        for i, ref in enumerate(reference):
            assert got[i] == ref, f"{name}: request {i} differs under {policy}"
        assert engine.budget.query_bytes == 0 and not engine.requests
    print(f"{name}: invariance under {', '.join(POLICIES)} ({time.perf_counter() - t0:.1f} s)")


# ---------------------------------------------------------------- GGUF

def write_gguf(hf, arch: str, path) -> str:
    """What llama.cpp's convert_hf_to_gguf.py writes for these architectures (float32
    tensors): its metadata keys, its tensor names (gguf's own TensorNameMap), Gemma's
    norms stored as 1 + w, Phi-3's LongRoPE factors as tensors."""
    import math

    import gguf

    c = hf.config
    n_layers = c.num_hidden_layers
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    rope = c.rope_parameters
    if arch == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
        w.add_sliding_window(c.sliding_window)
    elif arch == "gemma3":
        glob = rope["full_attention"]
        w.add_rope_freq_base(glob["rope_theta"])
        if glob.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(glob["factor"])
        w.add_sliding_window(c.sliding_window)
    elif arch == "qwen3":
        w.add_rope_freq_base(rope["rope_theta"])
    elif arch == "phi3":
        orig = c.original_max_position_embeddings
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
        w.add_rope_freq_base(rope["rope_theta"])
        w.add_sliding_window(c.sliding_window or 0)
        if rope.get("rope_type") == "longrope":
            scale = c.max_position_embeddings / orig
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)))
            w.add_tensor("rope_factors_long.weight", torch.tensor(rope["long_factor"]).numpy())
            w.add_tensor("rope_factors_short.weight", torch.tensor(rope["short_factor"]).numpy())
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), n_layers)
    for hf_name, t in hf.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        t = t.float()
        if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            t = t + 1
        w.add_tensor(name, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


GGUF_CASES = {
    "qwen3": ("qwen3", {}),
    # llama.cpp hard-codes the scale (head_dim ** -0.5 below 27B) and Gemma 2's pattern
    "gemma2": ("gemma2", dict(query_pre_attn_scalar=16)),
    # ... and Gemma 3's: every 6th layer global, local base 10000
    "gemma3_text": ("gemma3", dict(query_pre_attn_scalar=16, num_hidden_layers=6, layer_types=None,
                                   rope_parameters={"sliding_attention": {"rope_type": "default",
                                                                          "rope_theta": 10000.0},
                                                    "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                       "rope_theta": 1_000_000.0}})),
    "phi3": ("phi3", {}),
    "phi3_longrope": ("phi3", {}),
}


@pytest.mark.parametrize("name", list(GGUF_CASES))
def test_gguf_matches_hf(name, tmp_path):
    arch, more = GGUF_CASES[name]
    hf = build_hf(name, seed=3, **more)
    path = write_gguf(hf, arch, tmp_path / f"{name}.gguf")
    model, cfg = load_model(path, "float32")
    assert type(model).__module__.startswith("baton.models.")
    ids, nxt = prompt(8, 30), prompt(9, 12)  # crosses windows and Phi-3's original context
    ref = hf_incremental_logits(hf, ids, nxt)
    diff = (baton_logits(model, ids, len(nxt), nxt) - ref).abs().max().item()
    print(f"{name}: GGUF ({arch}) max abs logit difference vs HF = {diff:.2e}")
    assert diff < 1e-4
