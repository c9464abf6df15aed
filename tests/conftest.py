"""Session-wide test settings."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """Runs launched by tests (subprocesses inherit the variable) share one XLA compilation cache:
    most of them train the same tiny model, so each program is compiled once per session."""
    if "JAXTRAIN_COMPILATION_CACHE_DIR" in os.environ:
        yield
        return
    os.environ["JAXTRAIN_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla-cache"))
    yield
    os.environ.pop("JAXTRAIN_COMPILATION_CACHE_DIR", None)
