"""Shared fixtures (helpers live in testutil.py, importable from any test folder)."""
from __future__ import annotations

import pytest

from testutil import make_tiny_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2")


@pytest.fixture(scope="session")
def default_model_path() -> str:
    from baton.models.loader import default_model_path as find

    return find()
