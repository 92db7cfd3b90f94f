"""Shared fixtures (helpers live in testutil.py, importable from any test folder)."""
from __future__ import annotations

import os

import pytest

from testutil import make_tiny_model


def pytest_addoption(parser):
    parser.addoption("--device", default=os.environ.get("BATON_TEST_DEVICE", "cpu"),
                     help="device for the engine in tests that build one through testutil (cpu or cuda); "
                          "the HF references stay on the CPU")


def pytest_configure(config):
    os.environ["BATON_TEST_DEVICE"] = config.getoption("--device")


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
