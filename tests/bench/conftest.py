"""Fixtures for the benchmark tests: a tiny random Llama and a fake OpenAI SSE server."""

import asyncio
import json
import socket
import threading
import time

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """config.json + model.safetensors of a random Llama; no tokenizer (prompts are token ids)."""
    import transformers

    path = tmp_path_factory.mktemp("bench_tiny_llama")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(path))
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_fake_app(received: list):
    """An OpenAI-style /v1/completions that streams one SSE chunk per token, a usage
    chunk when asked, then [DONE]. A prompt starting with token id 13 gets HTTP 500."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model", "owned_by": "test"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        received.append(body)
        prompt = body["prompt"]
        if isinstance(prompt, list) and prompt and prompt[0] == 13:
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
        n = int(body["max_tokens"])
        plen = len(prompt) if isinstance(prompt, list) else len(prompt.split())

        async def gen():
            await asyncio.sleep(0.01)  # "prefill"
            for i in range(n):
                chunk = {"id": "cmpl-1", "object": "text_completion", "created": int(time.time()),
                         "model": body["model"],
                         "choices": [{"index": 0, "text": f" t{i}", "logprobs": None,
                                      "finish_reason": "length" if i == n - 1 else None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
                await asyncio.sleep(0.002)
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": plen, "completion_tokens": n, "total_tokens": plen + n}
                yield f"data: {json.dumps({'id': 'cmpl-1', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


@pytest.fixture
def fake_server():
    import uvicorn

    received: list = []
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(make_fake_app(received), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("fake server did not start")
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", received
    server.should_exit = True
    thread.join(timeout=10)
