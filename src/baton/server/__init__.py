"""OpenAI-compatible server (`baton serve`). Imported lazily so the rest of the
package does not pull in FastAPI and uvicorn."""

__all__ = ["create_app", "ServerThread", "BatonServer", "AsyncEngine"]


def __getattr__(name):
    if name in ("create_app", "ServerThread", "BatonServer"):
        from . import app
        return getattr(app, name)
    if name == "AsyncEngine":
        from .async_engine import AsyncEngine
        return AsyncEngine
    raise AttributeError(name)
