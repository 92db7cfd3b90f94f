"""The one owner of what a request returns: detokenization, stop conditions
(EOS, stop token ids, stop strings with hold-back, min_tokens, max_tokens, a
finished grammar), logprobs, prompt logprobs and the RequestOutput records. Text
that could be the start of a stop string is held back until it is known not to
be one, so the concatenation of a choice's `new_text` deltas always equals its
final text."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .sequence import Sequence, Status
from .tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class CompletionOutput:
    """One of a request's n choices: all it produced so far, and this step's part."""
    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str]
    logprobs: Optional[list] = None  # per token: (token_id, logprob, [(id, logprob), ...])
    new_text: str = ""
    new_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]  # every choice, by index
    finished: bool  # all choices finished
    metrics: Optional[dict] = None
    error: Optional[str] = None  # set when the request failed (finish_reason "error")
    # per prompt token: None for the first, else (token_id, logprob, [(id, logprob), ...]);
    # complete once the prompt is prefilled (None when not asked for)
    prompt_logprobs: Optional[list] = None
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache

    @property
    def new_token_ids(self) -> list[int]:
        """This step's new tokens, all choices together (one choice: its tokens)."""
        if len(self.outputs) == 1:
            return self.outputs[0].new_token_ids
        return [t for o in self.outputs for t in o.new_token_ids]

    @property
    def new_text(self) -> str:
        """This step's text of a one-choice request (see outputs[i].new_text for n > 1)."""
        return "".join(o.new_text for o in self.outputs)


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
        self.include_stop = seq.params.include_stop_str_in_output
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
        """Where the text ends if a stop string has appeared in the new text: the
        stop string's start, or its end with include_stop_str_in_output."""
        if not self.stops or not self.detok:
            return None
        text = self.detok.text
        start = max(0, self.checked - self.longest_stop + 1)
        hits = [(i, i + len(s) if self.include_stop else i) for s in self.stops for i in [text.find(s, start)]
                if i >= 0]
        self.checked = len(text)
        return min(hits)[1] if hits else None

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
        self.states[id(seq)] = RequestState(seq, self.tokenizer)

    def append(self, seq: Sequence, tok, now: float, grammar_done: bool = False) -> tuple[str, Optional[str]]:
        """Add a sampled token to its query: returns (text delta, finish reason or None).
        grammar_done: the query's structured output is complete (nothing may follow)."""
        st = self.states[id(seq)]
        p = seq.params
        seq.output_ids.append(tok.token_id)
        if seq.first_token_time is None:
            seq.first_token_time = now
        if st.logprobs is not None:
            st.logprobs.append((tok.token_id, tok.logprob, tok.top_logprobs))
        # Before min_tokens, neither EOS nor a stop ends the query (the sampler does
        # not draw EOS or stop ids then; a stop string is not looked for).
        may_stop = len(seq.output_ids) > p.min_tokens
        is_eos = tok.token_id in self.eos_ids and not p.ignore_eos and may_stop
        if st.detok is not None and not is_eos:
            st.detok.add(tok.token_id)
        reason = None
        cut = st.find_stop() if may_stop else None
        if not may_stop and st.detok is not None:
            st.checked = len(st.detok.text)  # a stop string before min_tokens does not count later
        if cut is not None:
            st.detok.text = st.detok.text[:cut]
            reason = "stop"
        elif is_eos or (may_stop and tok.token_id in p.stop_token_ids) or grammar_done:
            reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens:
            reason = "length"
        return st.emit(final=reason is not None), reason

    def add_prompt_logprobs(self, request, start: int, logits) -> None:
        """prompt_logprobs: the logprob of each prompt token given the ones before
        it (and the top-N), from the logits [k, vocab] of the positions start..
        start+k-1 a prefill chunk fed; positions already done (a recomputed
        prefill) are skipped."""
        if request.prompt_logprobs is None:
            return
        have = len(request.prompt_logprobs)  # entries for prompt[0..have-1]
        first = have - 1 - start  # logits row predicting prompt[have]
        if first < 0 or first >= logits.shape[0]:
            return
        lp = logits[first:].float().log_softmax(-1)
        targets = torch.tensor(request.prompt_ids[have: have + lp.shape[0]], device=lp.device)
        chosen = lp.gather(1, targets.view(-1, 1)).squeeze(1).tolist()
        n = request.seqs[0].params.prompt_logprobs
        if n:
            vals, ids = torch.topk(lp, n)
            tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
        else:
            tops = [[] for _ in chosen]
        request.prompt_logprobs.extend(zip(targets.tolist(), chosen, tops))

    def flush(self, seq: Sequence) -> str:
        """What was held back, for a request ending outside append (abort, error)."""
        st = self.states.get(id(seq))
        return st.emit(final=True) if st else ""

    def finish(self, seq: Sequence, reason: str, error: Optional[str] = None) -> None:
        seq.finish_reason, seq.error = reason, error if error is not None else seq.error
        seq.status = Status.FINISHED
        seq.finish_time = time.monotonic()

    def choice(self, seq: Sequence, delta: str, new_ids: list[int]) -> CompletionOutput:
        st = self.states.get(id(seq))
        out = CompletionOutput(seq.index, st.text if st else "", list(seq.output_ids), seq.finish_reason,
                               st.logprobs if st else None, delta, new_ids)
        if seq.is_finished:
            self.states.pop(id(seq), None)
        return out

    def output(self, request, choices: list[CompletionOutput]) -> RequestOutput:
        """The request's record: `choices` are this step's, the rest unchanged."""
        by_index = {c.index: c for c in choices}
        for seq in request.seqs:
            if seq.index not in by_index:
                by_index[seq.index] = self.choice(seq, "", [])
        outputs = [by_index[i] for i in sorted(by_index)]
        finished = request.is_finished
        errors = [s.error for s in request.seqs if s.error]
        out = RequestOutput(request.request_id, request.prompt_ids, outputs, finished, error=errors[0] if errors
                            else None, prompt_logprobs=request.prompt_logprobs,
                            num_cached_tokens=request.seqs[0].cached_tokens)
        if finished:
            seqs = request.seqs
            firsts = [s.first_token_time for s in seqs if s.first_token_time is not None]
            out.metrics = {"arrival_time": seqs[0].arrival_time, "first_token_time": min(firsts) if firsts else None,
                           "finish_time": max(s.finish_time or 0 for s in seqs),
                           "num_preemptions": sum(s.num_preemptions for s in seqs)}
        return out
