"""The OpenAPI document tells the truth: schemathesis fuzzes every operation of
the server's own document (bounded) and checks that no answer is a 5xx and every
status and content type is one the document lists."""
from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from baton.engine import EngineConfig, LLMEngine

from .conftest import MODEL, metrics, serve

EXAMPLES_PER_OPERATION = 100


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir, engine):
    """A tiny random model with a short context: fuzzed requests finish in milliseconds."""
    eng = LLMEngine(EngineConfig(model=tiny_model_dir, dtype="float32", max_num_seqs=8, max_model_len=96),
                    tokenizer=engine.tokenizer)
    with serve(eng, default_max_tokens=8) as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


def test_document_lists_what_the_server_answers(fuzz_server):
    doc = httpx.get(fuzz_server.url + "/openapi.json").json()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, methods in doc["paths"].items():
        for op in methods.values():
            assert "422" not in op["responses"], path
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = doc["paths"][path]["post"]["responses"]
        assert {"200", "400", "404", "408", "413", "429", "500", "503"} <= set(responses)
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
        assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/"
                                                                            "ErrorResponse"}
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert httpx.get(fuzz_server.url + "/metrics").headers["content-type"].startswith("text/plain")


def test_fuzzed_requests_conform(api_schema, fuzz_server):
    """Valid and invalid bodies, paths and parameters, EXAMPLES_PER_OPERATION each
    operation (schemathesis' Hypothesis strategies; its pytest plugin does not run
    under pytest 9.2)."""
    checks = [not_a_server_error, status_code_conformance, content_type_conformance]
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/metrics"}
    for op in operations:
        cases = st.one_of(op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE))

        @given(case=cases)
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def conforms(case):
            case.call_and_validate(base_url=fuzz_server.url, checks=checks, timeout=60)

        conforms()


def test_server_still_serves_after_fuzzing(fuzz_server):
    m = metrics(fuzz_server.url)
    answered = sum(v for (name, _), v in m.items() if name in ("baton_requests_rejected_total",
                                                                "baton_requests_finished_total"))
    assert answered >= EXAMPLES_PER_OPERATION, m  # the fuzzer reached the generation endpoints
    r = httpx.post(fuzz_server.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3,
                                                              "ignore_eos": True}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
