"""The model runner: the one caller of the model. It turns a policy's plan into
input tensors on the model's device, shape buckets and attention contexts, runs
the forward, and times it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .attention import SegmentedAttention, ShapedAttention
from .scheduler.plan import Plan, Segment


def shape_bucket(n: int) -> int:
    """n rounded up to one of a bounded set of sizes (steps of 8 up to 128, 16 up
    to 512, 32 up to 2048, then 128: at most 15 tokens or ~6% more). oneDNN's GEMMs
    keep state per distinct shape that is never given back: 300 random token counts
    grew RSS by 130 MiB a round and kept growing, the same count drawn from 40 sizes
    stayed flat. Forwards with prompt tokens are padded to these token counts (and
    bf16 attention to width buckets), so RSS levels off under any mix of lengths."""
    step = 8 if n <= 128 else 16 if n <= 512 else 32 if n <= 2048 else 128
    return -(-n // step) * step


@dataclass
class StepOutput:
    logits: Optional[torch.Tensor]  # [N, vocab]: one row per plan.sampled(), in order
    computed: int                   # token-rows the forward computed (padding included)
    # prompt_logprobs: (query, first position, logits [k, vocab]) for the prompt
    # positions a row fed this step, each predicting the prompt's next token
    prompt_logits: list = field(default_factory=list)


def prompt_positions(owner, start: int, count: int) -> int:
    """How many of the positions start..start+count-1 a query asking for prompt
    logprobs needs logits at: those whose next token is still a prompt token."""
    if getattr(getattr(owner, "params", None), "prompt_logprobs", None) is None:
        return 0
    return max(0, min(start + count, owner.prompt_len - 1) - start)


def segment_inputs(seg: Segment) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and positions, [B, T]; shorter rows are padded to the longest."""
    B, counts = len(seg.starts), [len(t) for t in seg.tokens]
    T = max(max(counts), 1)
    if T == 1 and all(c == 1 for c in counts):  # decode: one token per row, built at once
        return torch.tensor(seg.tokens, dtype=torch.long), torch.tensor(seg.starts, dtype=torch.long).view(B, 1)
    ids = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        if counts[b]:
            ids[b, :counts[b]] = torch.tensor(seg.tokens[b])
        pos[b] = torch.arange(seg.starts[b], seg.starts[b] + T)
    return ids, pos


class ModelRunner:
    def __init__(self, model):
        self.model = model
        self.device = model.device
        # Decode attention by the platform's fused kernel when the model runs those kernels.
        self.fused = getattr(getattr(model, "kernel_options", None), "native", False)
        self.seconds = 0.0  # wall time in forwards (the engine reports the rest as overhead)

    def execute(self, plan: Plan) -> StepOutput:
        """Vector-shaped forward over the plan's segments (the running batch, prompts
        being prefilled into the pool, Orca's requests). Within a segment rows feed
        different numbers of tokens (1 for a decode, a prompt or chunk for a join,
        0 for an idle seat), padded to the longest; padded tokens write no KV."""
        segments = plan.segments
        inputs = [segment_inputs(seg) for seg in segments]
        ctxs = [ShapedAttention(seg.cache, seg.starts, [len(t) for t in seg.tokens], self.fused) for seg in segments]
        batch_idx, time_idx, flat_idx, off = [], [], [], 0
        extra = []  # prompt logprobs: (owner, start, [(b, t, flat)]), gathered after the sampled rows
        for seg, (ids, _) in zip(segments, inputs):
            B, T = ids.shape
            for b, toks in enumerate(seg.tokens):
                if seg.sample[b] and toks:
                    batch_idx.append(b)
                    time_idx.append(len(toks) - 1)
                    flat_idx.append(off + b * T + len(toks) - 1)
                k = prompt_positions(seg.owners[b], seg.starts[b], len(toks))
                if k:
                    extra.append((seg.owners[b], seg.starts[b], [(b, t, off + b * T + t) for t in range(k)]))
            off += B * T
        n_sampled = len(flat_idx)
        for _, _, where in extra:
            batch_idx += [b for b, _, _ in where]
            time_idx += [t for _, t, _ in where]
            flat_idx += [f for _, _, f in where]
        if len(segments) == 1 and inputs[0][0].shape[1] == 1:  # one decode batch: as many shapes as batch sizes
            (ids, pos), ctx = inputs[0], ctxs[0]
            computed = off
        else:  # flat: one row of all segments' tokens
            # Decode-only flats (Orca's) take as few shapes as batch sizes; with prompt
            # tokens the count takes many values and is padded to a bounded set.
            prompt_tokens = any(i.shape[1] > 1 for i, _ in inputs)
            computed = shape_bucket(off) if prompt_tokens and plan.pad else off
            parts = [(c, *i.shape) for c, (i, _) in zip(ctxs, inputs)]
            flat_ids, flat_pos = [i.reshape(1, -1) for i, _ in inputs], [p.reshape(1, -1) for _, p in inputs]
            if computed > off:
                parts.append((None, 1, computed - off))
                flat_ids.append(torch.zeros(1, computed - off, dtype=torch.long))
                flat_pos.append(torch.zeros(1, computed - off, dtype=torch.long))
            ids, pos = torch.cat(flat_ids, dim=1), torch.cat(flat_pos, dim=1)
            ctx = SegmentedAttention(parts)
            batch_idx, time_idx = [0] * len(flat_idx), flat_idx
        device = self.device
        index = (torch.tensor(batch_idx, dtype=torch.long).to(device),
                 torch.tensor(time_idx, dtype=torch.long).to(device))
        t0 = time.perf_counter()
        try:
            # Runs even when no row wants logits: a prefill chunk still writes its KV.
            logits = self.model(ids.to(device), pos.to(device), ctx, index)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # so the time is the forward's, not its launch
        finally:
            self.seconds += time.perf_counter() - t0
        prompt_logits, at = [], n_sampled
        for owner, start, where in extra:
            prompt_logits.append((owner, start, logits[at: at + len(where)]))
            at += len(where)
        return StepOutput(logits[:n_sampled] if n_sampled else None, computed, prompt_logits)
