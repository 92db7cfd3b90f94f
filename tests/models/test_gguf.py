"""Our GGUF parser, dequantization and tokenizer build against the references they
replace: gguf.GGUFReader (metadata, tensor bytes), gguf.quants.dequantize (weights),
the previous loader's formulas (fused weights, int4 parts) and
AutoTokenizer.from_pretrained(gguf_file=...) (the tokenizer)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from baton.models import gguf as G
from baton.models.loader import ModelLoadError, load_model

# ---------------------------------------------------------------- helpers


def _reference_tensor(f: G.GGUFFile, name: str) -> torch.Tensor:
    """What the loader used to get: gguf.quants.dequantize, as float32."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    arr = dequantize(f.raw(name), GGMLQuantizationType(f.info(name).ggml_type))
    return torch.from_numpy(np.array(arr, dtype=np.float32).reshape(f.shape(name)))


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _q4_1_parts(f, name):
    """(q [N, K] 0..15, d, m [N, K/32]) of a Q4_1 matrix, straight from ggml's block layout."""
    if f.info(name).ggml_type != G.Q4_1 or len(f.shape(name)) != 2:
        return None
    N, K = f.shape(name)
    blocks = f.raw(name).reshape(N, K // 32, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:]
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(N, K), d, m


def _reference_model(path: str, dtype: torch.dtype):
    """(state dict, int4 parts) as the previous loader built them: every tensor
    dequantized by gguf, fixed up, cast, concatenated; Q4_1 parts from the raw
    blocks, fixed up, concatenated, then packed as Int4Linear did."""
    from baton.models.loader import GGUFMeta, hf_to_gguf_names
    from baton.models.registry import gguf_family

    f = G.GGUFFile(path, remember=False)
    family = gguf_family(f.architecture)
    cfg = family.config_from_gguf(GGUFMeta(f, f.architecture), f.architecture)
    fix = family.gguf_fixup or (lambda cfg, name, arr: arr)
    to_gguf = hf_to_gguf_names(f, family)
    state, int4 = {}, {}
    for ours, theirs in family.hf_weight_map(cfg).items():
        pieces = [fix(cfg, hf, _reference_tensor(f, to_gguf[hf])).to(dtype) for hf in theirs]
        state[ours] = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        parts = [_q4_1_parts(f, to_gguf[hf]) for hf in theirs]
        if ours.endswith(".weight") and all(p is not None for p in parts):
            q, d, m = (torch.cat([torch.from_numpy(np.ascontiguousarray(fix(cfg, hf, p[j])))
                                  for hf, p in zip(theirs, parts)]) for j in range(3))
            packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 8)
            sz = torch.stack([d.t(), (m + 8 * d).t()], dim=-1).to(torch.bfloat16).contiguous()
            int4[ours[: -len(".weight")]] = (packed, sz)
    f.close()
    return state, int4


def _check_model_matches_reference(path: str, dtype: str):
    """Every weight equals the reference bit for bit: a dense one as it is, one kept
    only as quantized blocks (baton's float32 kernels) once dequantized."""
    from baton.platform.cpu import Int4Linear, NativeQuantLinear

    model, cfg = load_model(path, dtype)
    ref_state, ref_int4 = _reference_model(path, model.dtype)
    state = model.state_dict()
    blocks = {n + ".weight": m.kernel.quant for n, m in model.named_modules()
              if isinstance(getattr(m, "kernel", None), NativeQuantLinear)}
    for name, ref in ref_state.items():
        ours = blocks[name].dequantize().to(ref.dtype) if state[name].numel() == 0 else state[name]
        assert ours.dtype == ref.dtype and ours.shape == ref.shape, name
        assert _bits(ours) == _bits(ref), name
    if model.cfg.tie_word_embeddings and "lm_head.weight" in blocks:  # the tied lm_head reads the embedding's
        assert _bits(blocks["lm_head.weight"].dequantize()) == _bits(ref_state["embed.weight"].float())
    kernels = {n: m.kernel for n, m in model.named_modules() if isinstance(getattr(m, "kernel", None), Int4Linear)}
    if model.dtype == torch.bfloat16 and kernels:
        # int4 runs where the platform puts it (no bias): those layers match the old parts exactly
        assert set(kernels) <= set(ref_int4)
        for name, k in kernels.items():
            assert torch.equal(k.packed, ref_int4[name][0]), name
            assert _bits(k.scales_zeros) == _bits(ref_int4[name][1]), name
    return model, kernels


def _assert_header_matches_reader(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    f = G.GGUFFile(path, remember=False)
    assert list(f.metadata) == list(reader.fields)
    for key, field in reader.fields.items():
        ours, theirs = f.meta(key), field.contents()
        assert type(ours) is type(theirs) and ours == theirs, key
    assert f.tensor_names == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = f.info(t.name)
        assert info.dims == tuple(int(x) for x in t.shape) and info.ggml_type == int(t.tensor_type), t.name
        assert info.offset == t.data_offset and info.nbytes == t.n_bytes, t.name
        assert f.shape(t.name) == tuple(int(x) for x in reversed(t.shape))
        assert f.raw(t.name).tobytes() == t.data.tobytes(), t.name
    return f


# A tiny byte-level BPE vocabulary: the 256 byte symbols, a few merges, specials.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _vocab():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    merges = ["h e", "Ġ t", "Ġt he", "l l", "he ll"]
    tokens = SPECIALS + alphabet + ["he", "Ġt", "Ġthe", "ll", "hell"]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, merges


def write_tiny_gguf(path: Path, arch: str, seed: int = 0, nested: bool = False) -> str:
    """A 2-layer model of `arch` (llama: tied embeddings and llama.cpp's rotary
    row order; qwen2: q/k/v biases, its own output), tensors in every type the
    loader vectorises plus one it hands to gguf (Q4_0), every metadata value type,
    and the vocabulary above. `nested` adds an array of arrays (which transformers'
    own GGUF reader, used by AutoTokenizer, cannot read)."""
    import gguf
    from gguf import GGMLQuantizationType as T
    from gguf.constants import GGUFValueType as V

    hidden, inter, heads, kv_heads, layers = 64, 128, 4, 2, 2
    tokens, types, merges = _vocab()
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", layers)
    w.add_uint32(f"{arch}.context_length", 256)
    w.add_uint32(f"{arch}.embedding_length", hidden)
    w.add_uint32(f"{arch}.feed_forward_length", inter)
    w.add_uint32(f"{arch}.attention.head_count", heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", kv_heads)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_string("general.name", "tiny test model")
    # one of each value type the format has, for the parser
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -5)
    w.add_uint16("test.u16", 65000)
    w.add_int16("test.i16", -30000)
    w.add_int32("test.i32", -7)
    w.add_uint64("test.u64", 2 ** 63 + 5)
    w.add_int64("test.i64", -(2 ** 40))
    w.add_float64("test.f64", 1.0 / 3.0)
    w.add_float32("test.f32", 0.1)
    w.add_bool("test.bool", True)
    w.add_string("test.unicode", "Café ☕ 日本語 🙂")
    w.add_array("test.floats", [0.5, -1.25, 3.0])
    w.add_array("test.bools", [True, False, True])
    w.add_key_value("test.i8s", [-1, 2, -3], V.ARRAY, sub_type=V.INT8)
    w.add_key_value("test.u64s", [1, 2 ** 60], V.ARRAY, sub_type=V.UINT64)
    if nested:
        w.add_array("test.nested", [[1, 2], [3, 4, 5]])
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "qwen2" if arch == "qwen2" else "smollm")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_key_value("tokenizer.ggml.token_type", types, V.ARRAY, sub_type=V.INT32)
    w.add_array("tokenizer.ggml.merges", merges)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    w.add_uint32("tokenizer.ggml.padding_token_id", 2)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_string("tokenizer.chat_template", CHAT_TEMPLATE)

    def add(name, shape, qtype):
        data = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        if qtype == T.F32:
            w.add_tensor(name, data)
        elif qtype == T.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    add("token_embd.weight", (len(tokens), hidden), T.Q8_0)
    add("output_norm.weight", (hidden,), T.F32)
    if arch == "qwen2":
        add("output.weight", (len(tokens), hidden), T.BF16)
    hd = hidden // heads
    for i in range(layers):
        b = f"blk.{i}."
        add(b + "attn_norm.weight", (hidden,), T.F32)
        add(b + "ffn_norm.weight", (hidden,), T.F16)
        add(b + "attn_q.weight", (heads * hd, hidden), T.Q4_1)
        add(b + "attn_k.weight", (kv_heads * hd, hidden), T.Q4_1)
        add(b + "attn_v.weight", (kv_heads * hd, hidden), T.Q4_1 if i == 0 else T.Q8_0)
        if arch == "qwen2":
            add(b + "attn_q.bias", (heads * hd,), T.F32)
            add(b + "attn_k.bias", (kv_heads * hd,), T.F32)
            add(b + "attn_v.bias", (kv_heads * hd,), T.F32)
        add(b + "attn_output.weight", (hidden, heads * hd), T.Q4_1)
        add(b + "ffn_gate.weight", (inter, hidden), T.Q4_1)
        add(b + "ffn_up.weight", (inter, hidden), T.Q4_1)
        add(b + "ffn_down.weight", (hidden, inter), T.Q4_1 if i == 0 else T.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_gguf(request, tmp_path_factory) -> str:
    return write_tiny_gguf(tmp_path_factory.mktemp(f"gguf_{request.param}") / "tiny.gguf", request.param)


# ---------------------------------------------------------------- header


def test_default_header_matches_gguf_reader(default_model_path):
    f = _assert_header_matches_reader(default_model_path)
    assert f.architecture == "llama" and len(f.meta("tokenizer.ggml.tokens")) == 49152
    assert len(f.meta("tokenizer.ggml.merges")) > 40000 and f.meta("tokenizer.chat_template")


def test_tiny_header_matches_gguf_reader(tiny_gguf, tmp_path):
    arch = G.GGUFFile(tiny_gguf, remember=False).architecture
    f = _assert_header_matches_reader(write_tiny_gguf(tmp_path / "nested.gguf", arch, nested=True))
    assert f.meta("test.u64") == 2 ** 63 + 5 and f.meta("test.i8s") == [-1, 2, -3]
    assert f.meta("test.nested") == [1, 2, 3, 4, 5]  # flattened, as gguf's reader has it
    assert f.meta("test.unicode") == "Café ☕ 日本語 🙂" and f.meta("missing", 7) == 7


def test_corrupt_and_truncated_files_raise_gguf_error(tiny_gguf, tmp_path):
    data = Path(tiny_gguf).read_bytes()
    header_end = G.GGUFFile(tiny_gguf, remember=False).header.data_offset
    bad = tmp_path / "bad.gguf"
    # cut inside the metadata, the tensor table, and the tensor data
    for cut in (5, 24, 40, 300, header_end // 2, header_end - 3, header_end + 10, len(data) - 1):
        bad.write_bytes(data[:cut])
        with pytest.raises(G.GGUFError, match="corrupt GGUF"):
            G.GGUFFile(bad)
    for blob, why in [(b"GGUF" + (1).to_bytes(4, "little") + data[8:], "version 1"),
                      (b"GGUF" + (3 << 24).to_bytes(4, "little") + data[8:], "big-endian"),
                      (b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64, "implausible")]:
        bad.write_bytes(blob)
        with pytest.raises(G.GGUFError, match="corrupt GGUF"):
            G.GGUFFile(bad)
    # a length field pointing past the end of the file
    first_key_len = 24
    bad.write_bytes(data[:first_key_len] + (10 ** 12).to_bytes(8, "little") + data[first_key_len + 8:])
    with pytest.raises(G.GGUFError, match="past the end"):
        G.GGUFFile(bad)
    bad.write_bytes(b"GGML" + data[4:])
    with pytest.raises(G.GGUFError, match="not a GGUF"):
        G.GGUFFile(bad)
    bad.write_bytes(data[:len(data) - 1])
    with pytest.raises(ModelLoadError, match="corrupt GGUF.*truncated"):
        load_model(str(bad))


# ---------------------------------------------------------------- tensors


def _assert_dequantize_matches_gguf(path) -> set:
    f = G.GGUFFile(path, remember=False)
    seen = set()
    for name in f.tensor_names:
        seen.add(f.info(name).ggml_type)
        w = f.dequantize(name)
        assert w.dtype == torch.float32 and tuple(w.shape) == f.shape(name)
        assert _bits(w) == _bits(_reference_tensor(f, name)), name
        out = torch.empty(f.shape(name))
        assert f.tensor(name, out=out) is out and torch.equal(out, w)
    return seen


def test_default_dequantize_is_bit_identical_to_gguf(default_model_path):
    assert _assert_dequantize_matches_gguf(default_model_path) == {G.Q4_1, G.Q8_0, G.F32}


def test_tiny_dequantize_is_bit_identical_to_gguf(tiny_gguf):
    from gguf import GGMLQuantizationType as T

    seen = _assert_dequantize_matches_gguf(tiny_gguf)
    assert {G.Q4_1, G.Q8_0, G.F32, G.F16, int(T.Q4_0)} <= seen  # Q4_0: dequantized by gguf itself
    if "qwen2" in tiny_gguf:
        assert G.BF16 in seen


def test_gguf_blocks_rebuild_the_weights(default_model_path):
    from baton.platform.quant import from_gguf_blocks

    f = G.GGUFFile(default_model_path, remember=False)
    for name, kind, size in (("blk.3.ffn_down.weight", "q4_1", 20), ("token_embd.weight", "q8_0", 34)):
        N, K = f.shape(name)
        qw = from_gguf_blocks(kind, f.raw(name).reshape(N, K // 32, size))
        assert qw.shape == (N, K) and qw.d.shape == (N, K // 32)
        assert torch.equal(qw.dequantize(), f.tensor(name)), name


def test_default_model_weights_and_int4_parts_match_previous_loader(default_model_path):
    _check_model_matches_reference(default_model_path, "float32")
    model, kernels = _check_model_matches_reference(default_model_path, "bfloat16")
    from baton.platform.cpu import int4_works

    if int4_works():
        assert len(kernels) == 4 * model.cfg.num_layers  # qkv, o, gate_up, down


def test_tiny_model_weights_and_int4_parts_match_previous_loader(tiny_gguf):
    _check_model_matches_reference(tiny_gguf, "float32")
    _check_model_matches_reference(tiny_gguf, "bfloat16")


def test_float16_load_matches(tiny_gguf):
    _check_model_matches_reference(tiny_gguf, "float16")


# ---------------------------------------------------------------- tokenizer


def _assert_same_tokenizer(ours, ref):
    assert type(ours) is type(ref)
    assert ours.backend_tokenizer.to_str() == ref.backend_tokenizer.to_str()
    assert ours.init_kwargs == ref.init_kwargs
    assert str(ours) == str(ref)
    assert ours.special_tokens_map == ref.special_tokens_map and ours.all_special_ids == ref.all_special_ids
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == \
        (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, ref.unk_token_id)
    assert ours.chat_template == ref.chat_template
    assert getattr(ours, "add_bos_token", None) == getattr(ref, "add_bos_token", None)
    assert ours.get_vocab() == ref.get_vocab() and len(ours) == len(ref)
    for text in ["Hello world", "  two leading spaces\tand a tab\n", "the hell the", "Café ☕ costs 5€ — 日本語 🙂",
                 "<|im_start|>user\nhi<|im_end|>", "", "1234567 + 89 = ?"]:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special), text
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Merci ☕"}]
    for gen in (True, False):
        text = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)


def _auto(path):
    from transformers import AutoTokenizer

    p = Path(path)
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def test_default_tokenizer_matches_autotokenizer(default_model_path):
    from baton.tokenizer import gguf_hf_tokenizer, load_tokenizer

    ours = gguf_hf_tokenizer(Path(default_model_path))
    _assert_same_tokenizer(ours, _auto(default_model_path))
    tok = load_tokenizer(default_model_path, [2])
    assert tok.eos_token_ids == [2] and tok.hf.bos_token_id == 1 and tok.vocab_size == 49152
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}])[:1] == [1]  # <|im_start|>


def test_tiny_tokenizer_matches_autotokenizer(tiny_gguf):
    from baton.tokenizer import gguf_hf_tokenizer

    ours = gguf_hf_tokenizer(Path(tiny_gguf))
    _assert_same_tokenizer(ours, _auto(tiny_gguf))
    if "qwen2" in tiny_gguf:
        assert type(ours).__name__ == "Qwen2Tokenizer"


def test_tokenizer_defers_to_autotokenizer_beside_tokenizer_files(tiny_gguf, tmp_path, monkeypatch):
    import transformers

    from baton.tokenizer import gguf_hf_tokenizer

    p = tmp_path / "m.gguf"
    os.symlink(tiny_gguf, p)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    calls = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        classmethod(lambda cls, *a, **k: calls.append((a, k)) or "auto"))
    assert gguf_hf_tokenizer(p) == "auto" and calls == [((str(tmp_path),), {"gguf_file": "m.gguf"})]


def test_model_load_leaves_its_header_for_the_tokenizer(tiny_gguf):
    f = G.GGUFFile(tiny_gguf)
    assert G.take_header(tiny_gguf) is f.header  # the same parse
    again = G.take_header(tiny_gguf)  # taken: parsed anew
    assert again is not f.header and again.metadata == f.header.metadata
    G.GGUFFile(tiny_gguf)
    st = os.stat(tiny_gguf)
    os.utime(tiny_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # the file "changed"
    assert G.take_header(tiny_gguf) is not f.header


def test_load_progress_bar_is_optional(tiny_gguf, tiny_llama, capsys):
    load_model(tiny_gguf, "float32")
    load_model(tiny_llama, "float32")
    assert capsys.readouterr().err == ""  # hidden unless asked for
    load_model(tiny_gguf, "float32", progress=True)  # shown only after a second: not here
    load_model(tiny_llama, "float32", progress=True)
