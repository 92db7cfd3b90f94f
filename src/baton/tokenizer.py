"""Text <-> token ids, chat templates and incremental detokenization.

Backed by HF transformers' tokenizers: from an HF model directory, or built from
the vocabulary, merges and chat template stored in a GGUF file's metadata.
"""
from __future__ import annotations

import functools
import os
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

    @property
    def chat_template(self) -> Optional[str]:
        return self.hf.chat_template if isinstance(self.hf.chat_template, str) else None

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, *, tools=None,
                    chat_template: Optional[str] = None, continue_final_message: bool = False,
                    template_kwargs: Optional[dict] = None) -> str:
        """The prompt text the chat template makes of `messages` (and `tools`);
        `chat_template` replaces the model's own."""
        template = chat_template or self.chat_template
        if not template:
            raise ValueError("this model has no chat template; use completions with a plain prompt")
        return self.hf.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                           add_generation_prompt=add_generation_prompt,
                                           continue_final_message=continue_final_message, **(template_kwargs or {}))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt, **kwargs)
        # The template already carries any BOS it wants: do not add special tokens twice.
        return self.hf.encode(text, add_special_tokens=False)


def load_tokenizer(model_path: str, eos_token_ids: Sequence[int] = ()) -> Optional[Tokenizer]:
    """None for an HF directory without tokenizer files (prompts must then be token ids)."""
    p = Path(model_path)
    if p.is_dir():
        from transformers import AutoTokenizer

        if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return None
        hf = AutoTokenizer.from_pretrained(str(p))
    else:
        hf = gguf_hf_tokenizer(p)
    return Tokenizer(hf, eos_token_ids)


# Files beside a GGUF that AutoTokenizer.from_pretrained(dir, gguf_file=...) would
# also read (a tokenizer.json even replaces the GGUF's vocabulary): with any of
# them there, it is called as it is, so the result is what it gives.
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                       "chat_template.jinja", "chat_template.json", "additional_chat_templates", "tekken.json",
                       "tiktoken.model", "vocab.json", "merges.txt", "vocab.txt")
# transformers' model types whose GGUF tokenizer is built here: the class
# AutoTokenizer picks for them (TOKENIZER_MAPPING_NAMES) is constructed directly.
_DIRECT_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2"}


def gguf_hf_tokenizer(p: Path):
    """The HF tokenizer AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    builds, from the metadata the model load already parsed (models/gguf.py).

    AutoTokenizer reads the file twice with transformers' own readers (a config
    through gguf.GGUFReader, 7-11 s for a 49k vocabulary on a 2-core host, then the
    vocabulary). Here the same steps run on our parse: transformers' tables give
    the tokenizer inputs (get_gguf_tokenizer's), its convert_gguf_tokenizer builds
    the backend, and the class AutoTokenizer would choose is constructed with the
    same keyword arguments (tests/models/test_gguf.py checks they agree). Any case
    this does not cover goes to AutoTokenizer itself."""
    names = set(os.listdir(p.parent)) if p.parent.is_dir() else set()
    if not names.intersection(_HF_TOKENIZER_FILES) and not any(n.startswith("tokenizer.model") for n in names):
        try:
            from .models.gguf import GGUFError, take_header

            header = take_header(p)
        except GGUFError as e:
            raise ValueError(str(e)) from e
        hf = _tokenizer_from_metadata(header.metadata, p)
        if hf is not None:
            return hf
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def _tokenizer_from_metadata(metadata: dict, p: Path):
    """None where AutoTokenizer's choice of class is not the plain one (left to it)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            _SPECIAL_TOKENS, GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)
        from transformers.models.auto.tokenization_auto import (
            TOKENIZER_MAPPING_NAMES, TokenizersBackend, tokenizer_class_from_name)
    except ImportError:  # another transformers layout: its own path
        return None
    architecture = metadata.get("general.architecture")
    # load_gguf_checkpoint's model type: "llama" becomes "mistral" when general.name is exactly that.
    if architecture == "llama" and metadata.get("general.name") == "mistral":
        return None
    model_type = _DIRECT_MODEL_TYPES.get(architecture)
    if model_type is None or "tokenizer.ggml.tokens" not in metadata:
        return None
    class_name = TOKENIZER_MAPPING_NAMES.get(model_type)
    cls = TokenizersBackend if class_name in (None, "TokenizersBackend") else tokenizer_class_from_name(class_name)
    if cls is None or class_name == "MistralCommonBackend":
        return None

    # get_gguf_tokenizer(), on our metadata.
    grouped = {group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items()
                       if f"tokenizer.{key}" in metadata}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    tokenizer_type = tokenizer_dict.get("tokenizer_type")
    if tokenizer_type == "llama":
        tokenizer_config.setdefault("add_bos_token", True)
    elif tokenizer_type == "gemma4":
        tokenizer_config["add_bos_token"] = False
    for name, key in _SPECIAL_TOKENS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None

    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    # What from_pretrained hands the class's __init__ for a local GGUF with no
    # tokenizer files beside it (each of the class's vocabulary files, unresolved:
    # None, but tokenizer_file, which convert_to_native_format drops); its gguf_file
    # branch then adds tokenizer_config and extra, as here.
    kwargs = {name: None for name in getattr(cls, "vocab_files_names", {}) if name != "tokenizer_file"}
    kwargs.update(name_or_path=str(p.parent), is_local=True, local_files_only=False, added_tokens_decoder={})
    kwargs.update(tokenizer_config)
    kwargs.update(extra)
    return cls(tokenizer_object=backend, **kwargs)


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
