"""Test setup: 8 fake CPU devices for sharding tests, seeded randomness, shared fixtures."""

import os
import tempfile

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test session: the CLI subprocesses of the resume tests compile
# the same train step, and reuse (not correctness) is all it changes.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jscale-jax-cache-"))

import random  # noqa: E402
import socket  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tokenizer / corpus caches go to a per-session temp dir, never the user's home."""
    monkeypatch.setenv("JSCALE_CACHE", str(tmp_path_factory.getbasetemp() / "jscale_cache"))
    yield


@pytest.fixture
def free_port() -> int:
    """A free localhost TCP port (for a jax.distributed coordinator in multi-process tests)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]
