"""Text <-> token ids, chat templates and incremental detokenization.

Backed by HF transformers' tokenizers: from an HF model directory, or built from
the vocabulary, merges and chat template stored in a GGUF file's metadata.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional, Sequence


class Tokenizer:
    def __init__(self, hf_tokenizer, eos_token_ids: Sequence[int] = ()):
        self.hf = hf_tokenizer
        eos = set(eos_token_ids)
        if hf_tokenizer.eos_token_id is not None:
            eos.add(hf_tokenizer.eos_token_id)
        self.eos_token_ids = sorted(eos)
        # The Rust tokenizer's own decode gives the same text as transformers' wrapper
        # when no clean-up pass applies, at a third of the cost (it runs twice per
        # generated token in the incremental detokenizer).
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        self._fast_decode = backend.decode if backend is not None and \
            not getattr(hf_tokenizer, "clean_up_tokenization_spaces", False) else None

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters of text one token can stand for: the longest
        vocabulary entry as the tokenizer spells it (a byte-level piece has one
        character per byte, so it is never shorter than the text it decodes to).
        A prompt longer than max_model_len * this cannot fit the context, which is
        known without tokenizing it."""
        return max(map(len, self.hf.get_vocab()), default=1)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=True)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self._fast_decode is not None:
            return self._fast_decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str:
        return self.hf.convert_ids_to_tokens(int(token_id))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if not self.hf.chat_template:
            raise ValueError("this model has no chat template; use completions with a plain prompt")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        # The template already carries any BOS it wants: do not add special tokens twice.
        return self.hf.encode(text, add_special_tokens=False)


def load_tokenizer(model_path: str, eos_token_ids: Sequence[int] = ()) -> Optional[Tokenizer]:
    """None for an HF directory without tokenizer files (prompts must then be token ids)."""
    from transformers import AutoTokenizer

    p = Path(model_path)
    if p.is_dir():
        if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return None
        hf = AutoTokenizer.from_pretrained(str(p))
    else:
        hf = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    return Tokenizer(hf, eos_token_ids)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a short window of recent tokens (prefix..read offsets, as vLLM does) so
    each step costs O(1), and holds back output while it ends in an incomplete
    UTF-8 sequence (decoded as U+FFFD), so no delta ever carries a broken character.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Optional[Sequence[int]] = None):
        self.tok = tokenizer
        # A few prompt tokens give the first output tokens their leading-space context.
        self.all_ids: list[int] = list(prompt_ids[-4:]) if prompt_ids else []
        self.prefix_offset = 0
        self.read_offset = len(self.all_ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        self.all_ids.append(int(token_id))
        prefix = self.tok.decode(self.all_ids[self.prefix_offset:self.read_offset])
        full = self.tok.decode(self.all_ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # nothing new, or an incomplete UTF-8 character: wait for more
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.all_ids)
        self.text += delta
        return delta
