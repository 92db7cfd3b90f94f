"""A query's state as it moves through the engine: one record per request.

Who writes what: the scheduler owns where the query is (status while queued or
running, row, kv, num_cached, num_preemptions); the output processor owns what
it produced and how it ended (output_ids, first_token_time, finish_reason,
error, finish_time, and the FINISHED status)."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import InitVar, dataclass, field
from typing import Optional

import torch

from .sampling import SamplingParams

_arrival_counter = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"      # queued, no KV yet
    PREFILLED = "prefilled"  # KV ready in the prefilled pool (baton-pd)
    RUNNING = "running"      # owns a row of the running batch
    PARKED = "parked"        # preempted, KV taken out intact
    FINISHED = "finished"


@dataclass(eq=False)  # identity: `seq in queue` must not compare fields
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: Optional[str] = None  # stop, length, abort, or error (then `error` says why)
    error: Optional[str] = None
    num_cached: int = 0  # tokens whose K/V are in the cache (a row or a pool entry)
    row: Optional[int] = None
    kv: object = None  # the policy's per-query KV (pool entry, parked row, Orca reservation)
    first_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    num_preemptions: int = 0
    order: int = field(default_factory=lambda: next(_arrival_counter))
    generator: Optional[torch.Generator] = None
    index: int = 0  # which of the request's n choices this is
    # n > 1 under a policy that shares prompts: the other choices, which take a copy
    # of this query's prompt KV (and a first token from its logits) after its prefill
    followers: list = field(default_factory=list)
    matcher: object = None  # structured output: the grammar state of this query's text
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    device: InitVar[object] = None  # where the logits are: the generator must live there

    def __post_init__(self, device):
        if not self.params.greedy:
            self.generator = torch.Generator(device=device or "cpu")
            # choice i of a seeded request draws from seed + i: reproducible, and the
            # n choices differ
            seed = self.params.seed + self.index if self.params.seed is not None else torch.seed()
            self.generator.manual_seed(seed - 2**64 if seed >= 2**64 else seed)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_len(self) -> int:
        """Longest this query can get: what a reservation must cover."""
        return len(self.prompt_ids) + self.params.max_tokens

    def uncached_tokens(self) -> list[int]:
        """Tokens to feed next: the rest of the prompt (and, after a recompute
        preemption, the outputs), or the last sampled token during decode."""
        return (self.prompt_ids + self.output_ids)[self.num_cached:]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def sort_key(self):
        return (self.params.priority, self.order)


@dataclass(eq=False)
class Request:
    """One request: its n choices (one Sequence each, sharing the prompt) and
    what belongs to the prompt itself."""
    request_id: str
    prompt_ids: list[int]
    seqs: list[Sequence]
    prompt_logprobs: Optional[list] = None  # filled while the prompt is prefilled, when asked for

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
