"""Offline API in the familiar vLLM shape: LLM(...).generate / .chat."""
from __future__ import annotations

import itertools
from typing import Optional, Sequence as Seq, Union

from tqdm.auto import tqdm

from .engine import EngineConfig, LLMEngine, RequestOutput
from .sampling import SamplingParams

Prompt = Union[str, Seq[int]]


class LLM:
    def __init__(self, model: Optional[str] = None, policy: str = "baton-pd", dtype: str = "auto",
                 max_num_seqs: int = 32, device: str = "cpu", quantization: Optional[str] = None, **kwargs):
        """quantization: None, "int8" or "int4", as vLLM's `quantization=`: weight-only
        group-wise quantization of the linear layers at load time (llama.cpp's
        Q8_0 / Q4_1 layouts, groups of 32)."""
        self._attach(LLMEngine(EngineConfig(model=model, policy=policy, dtype=dtype, device=device,
                                            max_num_seqs=max_num_seqs, quantization=quantization, **kwargs)))

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> "LLM":
        """Wrap an engine built elsewhere (e.g. one sharing loaded weights)."""
        llm = cls.__new__(cls)
        llm._attach(engine)
        return llm

    def _attach(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: Union[Prompt, list[Prompt]],
                 params: Union[SamplingParams, list[SamplingParams], None] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One result per prompt, in input order. Bad input raises ValueError before
        any prompt is queued, so a bad batch leaves the engine untouched."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(params, list):
            if len(params) != len(prompts):
                raise ValueError(f"params: got {len(params)} SamplingParams for {len(prompts)} prompts")
        else:
            params = [params or SamplingParams()] * len(prompts)
        for i, p in enumerate(prompts):
            try:
                self.engine.encode_prompt(p)
            except ValueError as e:
                raise ValueError(f"prompts[{i}]: {e}") from None
        return self._run(prompts, params, use_tqdm)

    def chat(self, messages: Union[list[dict], list[list[dict]]],
             params: Union[SamplingParams, list[SamplingParams], None] = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c) for c in conversations]
        return self.generate(prompts, params, use_tqdm)

    def _run(self, prompts, params, use_tqdm) -> list[RequestOutput]:
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                rid = f"offline-{next(self._ids)}"
                self.engine.add_request(rid, prompt, p)
                ids.append(rid)
        except ValueError:
            for rid in ids:
                self.engine.abort(rid)
            raise
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm or len(ids) < 2, unit="req")
        pending = set(ids)
        while pending:
            for out in self.engine.step():
                if out.finished and out.request_id in pending:
                    results[out.request_id] = out
                    pending.discard(out.request_id)
                    bar.update(1)
        bar.close()
        return [results[rid] for rid in ids]
