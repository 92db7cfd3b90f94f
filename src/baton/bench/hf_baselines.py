"""External baselines on the same weights, dtype and requests: HF transformers.

- `hf_generate_static`: `model.generate` on static batches of the same size as
  the engine's (requests taken in arrival order, like the engine's `static`
  policy forms its batches), left padding, greedy. A batch generates until its
  longest request's output length (max_new_tokens = min_new_tokens = the batch's
  longest output_len, EOS disabled); each request is credited with ONLY its own
  output_len tokens, and its finish time is the moment its own last token was
  produced. So the work and the token counts are the same as every other system
  (the extra tokens a batch computes for its shorter members are its idle
  computation, exactly as in run-to-completion batching).
- `hf_continuous_batching`: transformers' continuous batching manager (the
  machinery behind `model.generate_batch`), with each request's own
  max_new_tokens and EOS disabled, at most `batch_size` requests per batch.
  `generate_batch` itself takes one max_new_tokens for all requests, so the
  manager is driven directly with per-request lengths. Any failure (e.g. an
  attention backend that does not run on CPU) is recorded, not raised.

Per-token times come from a StoppingCriteria (called once per generated token
step) for `generate`, and from the manager's recorded timestamps for continuous
batching. All requests arrive at t=0 (offline).
"""
from __future__ import annotations

import gc
import time
import traceback
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .metrics import RequestRecord, run_metrics
from .workloads import BenchRequest, as_token_ids


def load_hf_model(model_path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    p = Path(model_path)
    if p.is_dir():
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
    else:
        # transformers 5 keeps GGUF weights packed and computes through dequantizing
        # kernels unless told to dequantize: ask for dense weights in `dtype`, the
        # same weights and GEMMs baton runs.
        kwargs = {}
        try:
            from transformers.utils.quantization_config import GgufConfig

            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:
            pass
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype, **kwargs)
    return model.eval()


def same_weights(hf_model, baton_model) -> Optional[bool]:
    """Spot check that the HF model holds the same weights as baton's (layer 0's down projection)."""
    try:
        a = hf_model.model.layers[0].mlp.down_proj.weight
        b = baton_model.layers[0].mlp.down.dense_weight()
        return bool(a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))
    except (AttributeError, IndexError):
        return None


def _pad_id(model) -> int:
    for v in (getattr(model.generation_config, "pad_token_id", None), getattr(model.config, "pad_token_id", None)):
        if isinstance(v, int):
            return v
    eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, int):
        return eos
    if isinstance(eos, list) and eos:
        return eos[0]
    return 0


class _StepClock:
    """StoppingCriteria that records the time each new token step finished; never stops."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.monotonic())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _gen_config(model, max_new: int):
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False, num_beams=1,
                            eos_token_id=None, pad_token_id=_pad_id(model), use_cache=True)


@torch.inference_mode()
def hf_generate_static(model, requests: Sequence[BenchRequest], batch_size: int, tokenizer=None,
                       progress: bool = True, warmup: bool = True) -> dict:
    from transformers import StoppingCriteriaList

    prompts = [as_token_ids(r, tokenizer) for r in requests]
    pad = _pad_id(model)
    if warmup:
        ids = torch.tensor([prompts[0][:8]])
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=_gen_config(model, 2))
    records: list[RequestRecord] = [RequestRecord(prompt_len=r.prompt_len, expected_output_len=r.output_len)
                                    for r in requests]
    bar = tqdm(total=len(requests), desc="hf generate", unit="req", disable=not progress, leave=False)
    computed_rows = useful = 0
    t0 = time.monotonic()
    for start in range(0, len(requests), batch_size):
        idx = list(range(start, min(start + batch_size, len(requests))))
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        max_new = max(requests[i].output_len for i in idx)
        clock = _StepClock()
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=_gen_config(model, max_new),
                             stopping_criteria=StoppingCriteriaList([clock]))
        produced = out.shape[1] - width
        computed_rows += len(idx) * (width + max(produced - 1, 0))
        useful += sum(len(prompts[i]) + requests[i].output_len - 1 for i in idx)
        for i in idx:
            r, rec = requests[i], records[i]
            own = min(r.output_len, produced, len(clock.times))
            rec.output_len = own
            rec.success = own == r.output_len
            if not rec.success:
                rec.error = f"generated {produced} tokens, wanted {r.output_len}"
            if own:
                rec.ttft = clock.times[0] - t0
                rec.latency = clock.times[own - 1] - t0
                rec.itl = [b - a for a, b in zip(clock.times[: own - 1], clock.times[1:own])]
            bar.update(1)
    bar.close()
    records_ok = [r for r in records if r.success]
    duration = max((r.latency for r in records_ok), default=time.monotonic() - t0)
    m = run_metrics(records, duration)
    return {"system": "hf-generate", "batch_size": batch_size, "total_time_s": duration,
            "idle_share": 1 - useful / computed_rows if computed_rows else 0.0,
            "output_len_policy": "batch generates to its longest output; each request credited with its own "
                                 "output_len tokens, finish time = its own last token", **m}


@torch.inference_mode()
def hf_continuous_batching(model, requests: Sequence[BenchRequest], batch_size: int, tokenizer=None,
                           progress: bool = True, timeout_s: float = 1800.0) -> dict:
    """transformers continuous batching (the manager behind generate_batch)."""
    from transformers import GenerationConfig
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:  # older transformers
        ContinuousBatchingConfig = None

    prompts = [as_token_ids(r, tokenizer) for r in requests]
    gen = GenerationConfig(do_sample=False, max_new_tokens=max(r.output_len for r in requests),
                           eos_token_id=-1, pad_token_id=_pad_id(model))
    kwargs = {}
    if ContinuousBatchingConfig is not None:
        # Size the paged KV cache for this workload: left alone, transformers sizes it
        # from 60-90% of free device memory, which on a CPU means most of the RAM.
        page = 256
        per_req = sorted((-(-(len(p) + r.output_len) // page) for p, r in zip(prompts, requests)), reverse=True)
        num_blocks = sum(per_req[:batch_size]) + batch_size + 2
        kwargs["continuous_batching_config"] = ContinuousBatchingConfig(
            max_requests_per_batch=batch_size, page_size=page, num_blocks=num_blocks,
            max_batch_tokens=max(512, max(len(p) for p in prompts) + batch_size))
    records = [RequestRecord(prompt_len=r.prompt_len, expected_output_len=r.output_len) for r in requests]
    manager = model.init_continuous_batching(generation_config=gen, **kwargs)
    try:
        manager.start()
        # warm-up: one short request, waited for, so setup is not timed
        wid = manager.add_request(prompts[0][:8], request_id="warmup", max_new_tokens=2, eos_token_id=-1)
        _wait_for(manager, {wid}, timeout_s=300)
        bar = tqdm(total=len(requests), desc="hf continuous batching", unit="req", disable=not progress,
                   leave=False)
        t0 = time.perf_counter()
        t0_mono = time.monotonic()
        ids = {}
        for i, (p, r) in enumerate(zip(prompts, requests)):
            rid = manager.add_request(p, request_id=f"bench-{i}", max_new_tokens=r.output_len,
                                      record_timestamps=True, eos_token_id=-1)
            ids[rid] = i
        results = _wait_for(manager, set(ids), timeout_s=timeout_s, bar=bar)
        wall = time.monotonic() - t0_mono
        bar.close()
    finally:
        try:
            manager.stop(block=True, timeout=30)
        finally:
            if hasattr(manager, "destroy"):
                manager.destroy()
    for rid, out in results.items():
        i = ids[rid]
        rec, r = records[i], requests[i]
        rec.output_len = len(out.generated_tokens)
        rec.success = out.error is None and rec.output_len == r.output_len
        rec.error = out.error or ("" if rec.success else f"generated {rec.output_len} tokens, wanted {r.output_len}")
        ts = list(out.timestamps or [])
        if ts:
            rec.ttft = ts[0] - t0
            rec.latency = ts[-1] - t0
            rec.itl = [b - a for a, b in zip(ts, ts[1:])]
        elif out.lifespan and out.lifespan[1] > 0:
            rec.latency = out.lifespan[1] - t0
            rec.ttft = rec.latency
    for rid, i in ids.items():
        if rid not in results:
            records[i].error = "no result (timed out)"
    ok = [r for r in records if r.success]
    duration = max((r.latency for r in ok), default=wall)
    m = run_metrics(records, duration)
    errors = sorted({r.error for r in records if r.error})
    return {"system": "hf-continuous-batching", "batch_size": batch_size, "total_time_s": duration,
            "errors": errors[:5], **m}


def _wait_for(manager, want: set, timeout_s: float, bar=None) -> dict:
    results = {}
    deadline = time.monotonic() + timeout_s
    while len(results) < len(want):
        if time.monotonic() > deadline:
            break
        res = manager.get_result(timeout=1)
        if res is None:
            if hasattr(manager, "is_running") and not manager.is_running():
                raise RuntimeError("transformers' continuous batching thread stopped unexpectedly")
            continue
        if res.request_id in want and res.is_finished():
            results[res.request_id] = res
            if bar is not None:
                bar.update(1)
    return results


def run_hf_baselines(model_path: str, dtype: torch.dtype, requests: Sequence[BenchRequest], batch_size: int,
                     tokenizer=None, progress: bool = True,
                     which: Sequence[str] = ("generate", "cb", "cb-same-kernels"),
                     baton_model=None) -> dict:
    """The baselines in `which` (generate, cb, cb-same-kernels: cb with baton's
    prepacked linears, run last); each one's failure is recorded as {'error': ...}
    instead of raised."""
    out: dict = {}
    try:
        model = load_hf_model(model_path, dtype)
    except Exception as e:  # noqa: BLE001 - a baseline that cannot load is a result, not a crash
        err = f"{type(e).__name__}: {e}"
        return {"generate": {"system": "hf-generate", "error": err},
                "continuous_batching": {"system": "hf-continuous-batching", "error": err}}
    info = {"hf_dtype": str(model.dtype).replace("torch.", ""),
            "hf_attn_implementation": getattr(model.config, "_attn_implementation", None),
            "same_weights_as_baton": same_weights(model, baton_model) if baton_model is not None else None}
    def run(key: str, system: str, fn) -> None:
        try:
            out[key] = fn(model, requests, batch_size, tokenizer, progress)
            out[key]["system"] = system
        except Exception as e:  # noqa: BLE001
            out[key] = {"system": system, "error": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc(limit=5)}
        gc.collect()

    if "generate" in which:
        run("generate", "hf-generate", hf_generate_static)
    if "cb" in which:
        run("continuous_batching", "hf-continuous-batching", hf_continuous_batching)
    if "cb-same-kernels" in which:
        # The same manager with its linear layers on baton's prepacked GEMM: what is
        # left of the gap is scheduling and model code, not the GEMM kernel.
        from ..platform.cpu import prepack_foreign_linears

        prepack_foreign_linears(model)
        run("continuous_batching_same_kernels", "hf-continuous-batching, baton's GEMMs", hf_continuous_batching)
    for r in out.values():
        r.update(info)
    del model
    gc.collect()
    return out
