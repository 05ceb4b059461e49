"""Test setup: the platform the session runs on (8 fake CPU devices by default), seeded randomness,
shared fixtures.

Which platform: ``JSCALE_TEST_PLATFORM`` (``cpu`` | ``gpu`` | ``tpu``) when set; otherwise ``gpu``
when the ``-m`` expression selects ``gpu``-marked tests (``pytest -m gpu``), else ``cpu``. On
``cpu`` the session is forced onto the CPU (``JAX_PLATFORMS=cpu`` unless set) with 8 host devices,
and the ``gpu``-marked tests skip. On ``gpu`` / ``tpu`` JAX picks the accelerator, and the session
stops with a usage error (exit status 4) if that backend is absent, instead of skipping every
compiled test.
"""

import os
import re
import sys
import tempfile

# One persistent compilation cache per test session: the CLI subprocesses of the resume tests compile
# the same train step, and reuse (not correctness) is all it changes.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jscale-jax-cache-"))

import random  # noqa: E402
import socket  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

PLATFORMS = ("cpu", "gpu", "tpu")
PLATFORM_ENV = "JSCALE_TEST_PLATFORM"


def _marker_expression_matches(markexpr: str, marks: set[str]) -> bool:
    """Whether pytest's ``-m`` expression ``markexpr`` selects a test carrying ``marks`` (names
    joined by ``and`` / ``or`` / ``not`` and parentheses; marker arguments are ignored)."""
    expr = re.sub(r"\([^()]*=[^()]*\)", "", markexpr)  # gpu(x=1) -> gpu
    py = re.sub(r"[A-Za-z_][\w.-]*",
                lambda m: m.group() if m.group() in ("and", "or", "not") else str(m.group() in marks),
                expr)
    if not re.fullmatch(r"(\s|\(|\)|True|False|and|or|not)*", py):
        return False  # not a marker expression: pytest rejects it with its own message
    try:
        return bool(eval(py, {"__builtins__": {}}, {}))
    except SyntaxError:
        return False


def requested_platform(markexpr: str, env) -> str:
    """The platform a test session asks for: ``env[JSCALE_TEST_PLATFORM]`` if set, else ``"gpu"``
    when ``markexpr`` selects ``gpu``-marked tests and no unmarked ones, else ``"cpu"``."""
    explicit = env.get(PLATFORM_ENV, "").strip().lower()
    if explicit:
        if explicit not in PLATFORMS:
            raise pytest.UsageError(f"{PLATFORM_ENV}={explicit!r}: must be one of {PLATFORMS}")
        return explicit
    if markexpr and _marker_expression_matches(markexpr, {"gpu"}) and not (
            _marker_expression_matches(markexpr, set())):
        return "gpu"
    return "cpu"


#: XLA:CPU's LLVM optimization level for a ``cpu`` session: 1 instead of the default 2 cuts the CPU
#: time of a compilation (what the suite mostly spends) by ~30 % on 2 cores. The HLO passes are the
#: same; every comparison in the suite is between programs compiled alike (CLI subprocesses inherit
#: XLA_FLAGS, see helpers.xla_flags), and the recorded init hashes of tests/families.py hold at both
#: levels. A level already in XLA_FLAGS is kept.
CPU_OPT_LEVEL_FLAG = "--xla_backend_optimization_level=1"


def configure_environment(platform: str, env) -> None:
    """Set the JAX environment for ``platform`` (before JAX initializes a backend): 8 host devices
    for the CPU backend (also present beside an accelerator), and on ``cpu`` only that backend,
    compiled at :data:`CPU_OPT_LEVEL_FLAG`."""
    flag = "--xla_force_host_platform_device_count=8"
    if flag not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
    if platform == "cpu":
        env.setdefault("JAX_PLATFORMS", "cpu")
        if "xla_backend_optimization_level" not in env["XLA_FLAGS"]:
            env["XLA_FLAGS"] += " " + CPU_OPT_LEVEL_FLAG


def missing_backend_message(platform: str) -> str | None:
    """``None`` if JAX has a ``platform`` backend, else the reason the session cannot run."""
    import jax
    try:
        devices = jax.devices(platform)
    except RuntimeError as e:
        return (f"an accelerator test run was requested ({PLATFORM_ENV} or -m gpu selects "
                f"{platform!r}) but JAX has no {platform!r} backend ({e}). Install jax for it "
                "(pip install -e '.[gpu]' / '.[tpu]') on a machine that has one, or run the default "
                "`pytest` (CPU).")
    return None if devices else f"JAX found no {platform!r} devices"


def pytest_configure(config):
    platform = requested_platform(config.getoption("markexpr", "") or "", os.environ)
    configure_environment(platform, os.environ)
    if "jax" in sys.modules and os.environ.get("JAX_PLATFORMS"):
        import jax  # imported early (by a plugin): it read JAX_PLATFORMS at import
        jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])
    if platform != "cpu" and (message := missing_backend_message(platform)):
        raise pytest.UsageError(message)


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
