"""--quantization / EngineConfig.quantization / LLM(quantization=...): validated,
parsed, and applied to every linear layer when the engine loads the model."""
from __future__ import annotations

import pytest
import torch

from testutil import baton_logits, engine_device

from baton import SamplingParams
from baton.engine import EngineConfig


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("bad", ["int3", "INT8", "q4_1", "fp8", 8])
def test_engine_config_rejects_unknown_quantization(bad):
    with pytest.raises(ValueError) as e:
        EngineConfig(quantization=bad).validate()
    msg = str(e.value)
    assert "quantization" in msg
    for allowed in ("none", "int8", "int4"):
        assert allowed in msg
    assert repr(bad) in msg


@pytest.mark.parametrize("value, expected", [(None, None), ("none", None), ("int8", "int8"), ("int4", "int4")])
def test_engine_config_accepts_quantization(value, expected):
    cfg = EngineConfig(quantization=value)
    cfg.validate()
    assert cfg.quantization == expected


# ---------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def parser():
    from baton.cli import build_parser

    return build_parser()


@pytest.mark.parametrize("argv", [["generate", "hi"], ["chat"], ["serve"]])
@pytest.mark.parametrize("q", ["int8", "int4", "none"])
def test_cli_quantization_flag(parser, argv, q):
    from baton.cli_args import engine_kwargs

    args = parser.parse_args([*argv, "--quantization", q])
    kw = engine_kwargs(args)
    assert kw["quantization"] == (None if q == "none" else q)
    EngineConfig(**{**kw, "device": "cpu"}).validate()


@pytest.mark.parametrize("argv", [["generate", "hi"], ["serve"]])
def test_cli_quantization_default_and_short_flag(parser, argv):
    from baton.cli_args import engine_kwargs

    assert engine_kwargs(parser.parse_args(argv))["quantization"] is None
    assert engine_kwargs(parser.parse_args([*argv, "-q", "int8"]))["quantization"] == "int8"


@pytest.mark.parametrize("argv", [["generate", "hi"], ["serve"], ["bench", "throughput"]])
def test_cli_rejects_unknown_quantization(parser, argv, capsys):
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--quantization", "int3"])
    err = capsys.readouterr().err
    assert "--quantization" in err and "int3" in err


@pytest.mark.parametrize("argv", [["bench", "throughput"], ["bench", "prefix"], ["bench", "structured"],
                                  ["bench", "beyond"]])
def test_bench_quantization_flag(parser, argv):
    args = parser.parse_args([*argv, "--quantization", "int8"])
    assert args.quantization == "int8"
    assert parser.parse_args(argv).quantization == "none"


def test_help_text(parser, capsys):
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--quantization {none,int8,int4}" in out
    assert "Q8_0/Q4_1" in out


# ---------------------------------------------------------------- engine

@pytest.fixture(scope="module")
def reference(tiny_llama):
    """The tiny model as stored (float32, no quantization)."""
    from baton.models.loader import load_model

    model, _ = load_model(tiny_llama, "float32", engine_device())
    return model


def _linears(model):
    from baton.models.layers import Linear

    return [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)]


@pytest.mark.parametrize("q, kind", [("int8", "q8_0"), ("int4", "q4_1")])
def test_llm_quantized_generates(tiny_llama, reference, q, kind):
    from baton import LLM
    from baton.platform import cpu, native
    from baton.platform.quant import quantize

    llm = LLM(tiny_llama, dtype="float32", device=engine_device(), quantization=q, max_num_seqs=4,
              kv_cache_bytes=64 << 20)
    assert llm.engine.config.quantization == q
    max_tokens = 12
    prompts = [[1, 2, 3, 4, 5], [7, 9, 11], list(range(20, 50))]
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)
    assert len(outs) == len(prompts)
    for o in outs:
        assert o.error is None
        assert len(o.outputs[0].token_ids) == max_tokens
        assert all(0 <= t < reference.cfg.vocab_size for t in o.outputs[0].token_ids)

    model = llm.engine.model
    ref_linears = dict(_linears(reference))
    linears = _linears(model)
    assert linears and set(n for n, _ in linears) == set(ref_linears)
    on_cpu = model.device.type == "cpu"
    if on_cpu and native.kernels() is not None and cpu.native_applies(model.dtype):
        # baton's kernels compute on the blocks: every linear layer holds them, the
        # blocks are the reference weight quantized (the output layer always as q8_0,
        # with float activations).
        for name, m in linears:
            k = m.kernel
            want_kind = "q8_0" if name == "lm_head" else kind
            assert isinstance(k, cpu.NativeQuantLinear), name
            assert k.quant.kind == want_kind and k.exact == (name == "lm_head"), name
            want = quantize(ref_linears[name].weight, want_kind)
            assert torch.equal(k.quant.qs, want.qs) and torch.equal(k.quant.d, want.d), name
    elif on_cpu:
        # No kernel: the weight takes the quantized values.
        for name, m in linears:
            want = quantize(ref_linears[name].weight, kind).dequantize().to(m.weight.dtype)
            assert torch.equal(m.weight.detach(), want), name

    # The logits follow the quantize -> dequantize weights (the native kernels also
    # round activations to int8, so close rather than equal).
    ids, nxt = [3, 17, 42, 99, 5, 8], [11, 12]
    ref_q = _dequantized_copy(tiny_llama, kind)
    got = baton_logits(model, ids, len(nxt), nxt)
    want = baton_logits(ref_q, ids, len(nxt), nxt)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 0.05 * scale  # measured: 1.5% (int8), 1.9% (int4)


def _dequantized_copy(path, kind):
    """The model loaded unquantized, its linear weights replaced by their quantize -> dequantize values."""
    from baton.models.loader import load_model
    from baton.platform.quant import quantize

    from baton.platform import cpu

    model, _ = load_model(path, "float32", engine_device(), prepack=False, native_kernels=False)
    # with baton's kernels the output layer is q8_0 whatever the --quantization
    lm_head_kind = "q8_0" if engine_device() == "cpu" and cpu.native_applies(torch.float32) else kind
    with torch.no_grad():
        for name, m in _linears(model):
            m.kernel = None
            m.weight.copy_(quantize(m.weight, lm_head_kind if name == "lm_head" else kind).dequantize()
                           .to(m.weight.dtype))
    return model


def test_engine_loads_with_quantization(tiny_llama):
    """LLMEngine(EngineConfig(...)) passes quantization to the loader ("none" loads as stored)."""
    from baton.engine import LLMEngine
    from baton.platform import cpu

    eng = LLMEngine(EngineConfig(model=tiny_llama, dtype="float32", device=engine_device(), quantization="none",
                                 kv_cache_bytes=64 << 20))
    assert eng.config.quantization is None
    assert not any(isinstance(m.kernel, cpu.NativeQuantLinear) for _, m in _linears(eng.model))
    assert all(m.weight.numel() for _, m in _linears(eng.model))


def test_bench_throughput_quantized(tiny_llama, tmp_path):
    """`baton bench throughput --quantization int4` loads through load_for_bench and records it."""
    import json

    from baton.cli import main

    rc = main(["bench", "throughput", "--model", tiny_llama, "--dtype", "float32", "--quantization", "int4",
               "--policy", "baton-pd", "--dataset", "random", "--num-prompts", "2", "--input-len", "8",
               "--output-len", "4", "--max-num-seqs", "2", "--num-threads", "1", "--no-progress",
               "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "throughput.json").read_text())
    assert res["quantization"] == "int4"
    assert res["rows"][0]["completed"] == 2 and res["rows"][0]["output_len_mismatches"] == 0


def test_quantization_with_the_transformers_backend_is_an_error(tiny_llama):
    from baton.models.loader import load_model

    with pytest.raises(ValueError, match="quantization='int8' is not supported with the transformers backend"):
        load_model(tiny_llama, "float32", model_impl="transformers", quantization="int8")
