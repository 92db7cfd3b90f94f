"""The OpenAPI document as the server behaves, so generated clients get the
shapes right: every status a route answers, each error with OpenAI's error body,
streams as text/event-stream, /metrics as Prometheus text, and no 422 (FastAPI
documents one for validation errors; this server answers those with 400)."""
from __future__ import annotations

from .protocol import ErrorResponse

ERROR_DESCRIPTIONS = {
    400: "Invalid request: `error.param` names the field at fault",
    401: "Missing or wrong API key (when the server has one)",
    404: "Unknown model",
    408: "The request body did not arrive in time",
    413: "The request body is larger than the server accepts",
    429: "Too many requests waiting; retry later (see Retry-After)",
    500: "The request failed inside the engine",
    503: "Shutting down, or too many open connections",
}


def error_responses(*statuses: int) -> dict:
    return {s: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[s]} for s in statuses}


GENERATION_RESPONSES = {
    200: {"description": "The completion, or with `stream: true` a stream of server-sent events ending "
                         "with `data: [DONE]`",
          "content": {"text/event-stream": {"schema": {"type": "string"}}}},
    **error_responses(400, 401, 404, 408, 413, 429, 500, 503),
}
PROMETHEUS_RESPONSES = {
    200: {"description": "Prometheus text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}},
    **error_responses(401, 503),
}


def without_validation_422(app) -> None:
    """Make app.openapi() drop FastAPI's 422 entries and their schemas."""
    make = app.openapi

    def openapi():
        if app.openapi_schema is None:
            doc = make()
            for methods in doc.get("paths", {}).values():
                for op in methods.values():
                    op.get("responses", {}).pop("422", None)
            schemas = doc.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
