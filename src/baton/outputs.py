"""The one owner of what a request returns: detokenization, stop conditions
(EOS, stop token ids, stop strings with hold-back, max_tokens), logprobs and the
RequestOutput records. Text that could be the start of a stop string is held
back until it is known not to be one, so the concatenation of a request's
`new_text` deltas always equals its final text."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from .sequence import Sequence, Status
from .tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str]
    logprobs: Optional[list] = None  # per token: (token_id, logprob, [(id, logprob), ...])


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    new_text: str = ""
    new_token_ids: list[int] = field(default_factory=list)
    metrics: Optional[dict] = None
    error: Optional[str] = None  # set when the request failed (finish_reason "error")


class RequestState:
    """Output-side state of one request: its detokenizer, the text emitted so far
    and its logprobs."""

    def __init__(self, seq: Sequence, tokenizer: Optional[Tokenizer]):
        self.seq = seq
        self.detok = IncrementalDetokenizer(tokenizer, seq.prompt_ids) if tokenizer else None
        self.emitted = 0        # characters of detok.text handed out as deltas
        self.checked = 0        # text before this offset holds no stop string
        self.logprobs: Optional[list] = [] if seq.params.logprobs is not None else None
        stops = seq.params.stop or []
        self.stops = list(stops)
        self.longest_stop = max(map(len, self.stops), default=0)

    @property
    def text(self) -> str:
        """The text emitted so far (what the deltas add up to)."""
        if not self.detok:
            return ""
        text = self.detok.text
        return text if self.emitted == len(text) else text[: self.emitted]

    def _held(self, text: str) -> int:
        """Characters at the end of `text` that could start a stop string."""
        for n in range(min(self.longest_stop - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def find_stop(self) -> Optional[int]:
        """Where the first stop string starts in the new text, if one has appeared."""
        if not self.stops or not self.detok:
            return None
        text = self.detok.text
        start = max(0, self.checked - self.longest_stop + 1)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        self.checked = len(text)
        return min(hits) if hits else None

    def emit(self, final: bool) -> str:
        """The next delta: everything new when final, else all but the held tail."""
        if not self.detok:
            return ""
        text = self.detok.text
        end = len(text) if final else max(self.emitted, len(text) - self._held(text))
        delta = text[self.emitted:end]
        self.emitted = end
        return delta


class OutputProcessor:
    def __init__(self, tokenizer: Optional[Tokenizer], eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.states: dict[str, RequestState] = {}

    def add(self, seq: Sequence) -> None:
        self.states[seq.request_id] = RequestState(seq, self.tokenizer)

    def append(self, seq: Sequence, tok, now: float) -> tuple[str, Optional[str]]:
        """Add a sampled token to its query: returns (text delta, finish reason or None)."""
        st = self.states[seq.request_id]
        p = seq.params
        seq.output_ids.append(tok.token_id)
        if seq.first_token_time is None:
            seq.first_token_time = now
        if st.logprobs is not None:
            st.logprobs.append((tok.token_id, tok.logprob, tok.top_logprobs))
        is_eos = tok.token_id in self.eos_ids and not p.ignore_eos
        if st.detok is not None and not is_eos:
            st.detok.add(tok.token_id)
        reason = None
        cut = st.find_stop()
        if cut is not None:
            st.detok.text = st.detok.text[:cut]  # the stop string is not returned
            reason = "stop"
        elif is_eos or tok.token_id in p.stop_token_ids:
            reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens:
            reason = "length"
        return st.emit(final=reason is not None), reason

    def flush(self, seq: Sequence) -> str:
        """What was held back, for a request ending outside append (abort, error)."""
        st = self.states.get(seq.request_id)
        return st.emit(final=True) if st else ""

    def finish(self, seq: Sequence, reason: str, error: Optional[str] = None) -> None:
        seq.finish_reason, seq.error = reason, error if error is not None else seq.error
        seq.status = Status.FINISHED
        seq.finish_time = time.monotonic()

    def output(self, seq: Sequence, delta: str, new_ids: list[int]) -> RequestOutput:
        st = self.states.get(seq.request_id)
        finished = seq.is_finished
        out = RequestOutput(
            seq.request_id, seq.prompt_ids,
            [CompletionOutput(0, st.text if st else "", list(seq.output_ids), seq.finish_reason,
                              st.logprobs if st else None)],
            finished, delta, new_ids, error=seq.error)
        if finished:
            out.metrics = {"arrival_time": seq.arrival_time, "first_token_time": seq.first_token_time,
                           "finish_time": seq.finish_time, "num_preemptions": seq.num_preemptions}
            self.states.pop(seq.request_id, None)
        return out
