"""`baton bench ppl`: llama-perplexity's chunking and scoring against a direct HF
transformers reference on a tiny random model, the llama.cpp output parser, and
the command end to end."""
from __future__ import annotations

import json
import math
import os
import stat

import pytest
import torch

from testutil import load_cached, make_tiny_model

BOS = 256


@pytest.fixture(scope="module")
def tiny_with_bytes_tokenizer(tmp_path_factory) -> str:
    """A tiny random Llama and a byte-level tokenizer (one token per byte, ids
    0..255) that adds <s> (id 256) in front of every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny_ppl")
    make_tiny_model(d, "llama", vocab_size=260, bos_token_id=BOS)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>").save_pretrained(str(d))
    return str(d)


def reference_ppl(path: str, tokens: list[int], n_ctx: int, n_chunks: int, bos) -> tuple[float, int]:
    """llama.cpp's perplexity() loops, transcribed, over HF transformers' logits."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager").eval()
    first = n_ctx // 2
    nll, count = 0.0, 0
    for i in range(n_chunks):
        start = i * n_ctx
        batch = tokens[start:start + n_ctx]
        if bos is not None:
            batch[0] = bos  # tokens[seq_start] = llama_vocab_bos(vocab), restored after
        with torch.no_grad():
            logits = hf(torch.tensor([batch])).logits[0].float()
        for j in range(first, n_ctx - 1):  # process_logits(..., n_ctx - 1 - first) from position first
            logp = torch.log_softmax(logits[j], dim=-1)
            nll += -logp[tokens[start + j + 1]].item()
            count += 1
    return math.exp(nll / count), count


def test_chunking_and_scoring_match_a_direct_reference(tiny_with_bytes_tokenizer):
    from baton.bench.ppl import perplexity, perplexity_of_ids, tokenize

    path = tiny_with_bytes_tokenizer
    model, tok = load_cached(path, "float32")
    text = "".join(chr(32 + (7 * i * i + 3 * i) % 90) for i in range(400))  # 401 tokens with the BOS
    tokens, bos = tokenize(tok, text)
    assert bos == BOS and tokens[0] == BOS and len(tokens) == 401
    ctx = 64
    res = perplexity(model, tok, text, ctx=ctx, max_chunks=None, progress=False)
    assert res["chunks"] == 401 // ctx == 6 and res["ctx"] == ctx and res["bos_replaced"]
    assert res["tokens_scored"] == 6 * (ctx - ctx // 2 - 1) == 186
    ref, count = reference_ppl(path, list(tokens), ctx, 6, BOS)
    assert count == res["tokens_scored"]
    assert res["ppl"] == pytest.approx(ref, rel=1e-4)
    assert res["nll_mean"] == pytest.approx(math.log(ref), rel=1e-4)
    assert len(res["running_ppl"]) == 6 and res["running_ppl"][-1] == pytest.approx(res["ppl"], rel=1e-12)
    assert res["ppl_stderr"] > 0

    # --max-chunks, and no BOS replacement (a tokenizer that adds none): the first
    # token of each chunk stays the text's own.
    part = perplexity_of_ids(model, tokens, ctx=ctx, max_chunks=2, bos_id=None, progress=False)
    ref2, count2 = reference_ppl(path, list(tokens), ctx, 2, None)
    assert part["chunks"] == 2 and part["tokens_scored"] == count2 == 62
    assert part["ppl"] == pytest.approx(ref2, rel=1e-4)
    assert part["running_ppl"][0] == pytest.approx(res["running_ppl"][0], rel=1e-4)  # chunk 0 starts with BOS

    with pytest.raises(ValueError, match="at least 128 tokens"):
        perplexity_of_ids(model, tokens[:127], ctx=ctx, progress=False)


def test_parse_llama_perplexity_output():
    from baton.bench.ppl import parse_llama_perplexity

    out = ("perplexity: tokenizing the input ..\nperplexity: calculating perplexity over 3 chunks, n_ctx=512\n"
           "perplexity: 1.02 seconds per pass - ETA 0.05 minutes\n[1]14.2071,[2]15.8410,[3]16.0027,\n"
           "Final estimate: PPL = 16.0027 +/- 0.70312\n\nllama_perf_context_print:        load time =     123.45 ms\n")
    assert parse_llama_perplexity(out) == {"ppl": 16.0027, "ppl_stderr": 0.70312, "chunks": 3}
    assert parse_llama_perplexity("[1]9.5000,[2]9.2500,\nUnexpected negative standard deviation of log(prob)\n") \
        == {"ppl": 9.25, "ppl_stderr": None, "chunks": 2}
    with pytest.raises(ValueError, match="Final estimate"):
        parse_llama_perplexity("main: error: unable to load model\n")


def test_cli_end_to_end(tiny_with_bytes_tokenizer, tmp_path):
    from baton.bench.ppl import DEFAULT_TEXT
    from baton.cli import main

    # The committed text, cut at a line boundary.
    text = DEFAULT_TEXT.read_text(encoding="utf-8")
    assert 59000 < len(text) <= 60000 and text.endswith("\n") and text.startswith("First Citizen:")

    # A stand-in llama-perplexity: records its arguments, prints llama.cpp's lines.
    fake = tmp_path / "llama-perplexity"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'args.txt'}\n"
                    "echo '[1]20.0000,'\necho 'Final estimate: PPL = 20.0000 +/- 1.50000' >&2\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    gguf = tmp_path / "other.gguf"
    gguf.write_bytes(b"GGUF")
    out = tmp_path / "out"
    rc = main(["bench", "ppl", "--model", tiny_with_bytes_tokenizer, "--dtype", "float32", "--quantization", "none",
               "--ctx", "64", "--max-chunks", "1", "--num-threads", "1", "--no-progress", "--out", str(out),
               "--llama-perplexity", str(fake), "--llama-gguf", f"Q8_0={gguf}"])
    assert rc == 0
    res = json.loads((out / "ppl.json").read_text())
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == ["none", "llama.cpp Q8_0"]  # the model is no GGUF: no plain "llama.cpp" row
    assert rows["none"]["chunks"] == 1 and rows["none"]["tokens_scored"] == 31 and rows["none"]["ppl"] > 1
    assert rows["llama.cpp Q8_0"]["ppl"] == 20.0 and rows["llama.cpp Q8_0"]["tokens_scored"] == 31
    assert res["text"]["chars"] == len(text) - 1  # llama.cpp's -f drops one trailing newline
    assert res["tokens_total"] == len(text)  # one byte a token, plus the BOS
    assert res["machine"]["torch_threads"] == 1 and res["notes"]
    args = (tmp_path / "args.txt").read_text().split()
    assert args == ["-m", str(gguf), "-f", str(DEFAULT_TEXT), "-c", "64", "-t", "1", "--chunks", "1"]
    report = (out / "report.md").read_text()
    assert "| none |" in report and "| llama.cpp Q8_0 | 20.0000 | 1.5000 |" in report
    assert os.path.exists(out / "ppl.json")
