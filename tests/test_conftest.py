"""The test session's platform (tests/conftest.py): ``pytest`` runs on 8 forced CPU devices,
``pytest -m gpu`` (or ``JSCALE_TEST_PLATFORM``) on the accelerator, or fails without one."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest


@pytest.mark.parametrize("markexpr, env, platform", [
    ("", {}, "cpu"),
    ("not slow", {}, "cpu"),
    ("not gpu", {}, "cpu"),
    ("gpu", {}, "gpu"),
    ("gpu and not slow", {}, "gpu"),
    ("(gpu)", {}, "gpu"),
    ("gpu or not gpu", {}, "cpu"),          # selects unmarked tests too: the default CPU session
    ("slow", {}, "cpu"),
    ("gpu", {"JSCALE_TEST_PLATFORM": "cpu"}, "cpu"),
    ("", {"JSCALE_TEST_PLATFORM": "tpu"}, "tpu"),
    ("", {"JSCALE_TEST_PLATFORM": " GPU "}, "gpu"),
])
def test_conftest_requested_platform(markexpr, env, platform):
    from conftest import requested_platform
    assert requested_platform(markexpr, env) == platform


def test_conftest_environment_forces_cpu_only_by_default():
    from conftest import configure_environment, requested_platform
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    configure_environment("cpu", env)
    assert env == {"JAX_PLATFORMS": "cpu", "XLA_FLAGS":
                   "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8 "
                   "--xla_backend_optimization_level=1"}
    env = {"XLA_FLAGS": "--xla_backend_optimization_level=3"}  # a level given is kept
    configure_environment("cpu", env)
    assert env["XLA_FLAGS"] == ("--xla_backend_optimization_level=3 "
                                "--xla_force_host_platform_device_count=8")
    env = {}
    configure_environment("gpu", env)
    assert "JAX_PLATFORMS" not in env  # JAX picks the GPU
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
    with pytest.raises(pytest.UsageError, match="JSCALE_TEST_PLATFORM='cuda': must be one of"):
        requested_platform("", {"JSCALE_TEST_PLATFORM": "cuda"})


def test_conftest_reports_a_missing_backend():
    from conftest import missing_backend_message
    assert missing_backend_message(jax.default_backend()) is None
    if jax.default_backend() == "cpu":  # this session runs on the CPU only
        assert "has no 'gpu' backend" in missing_backend_message("gpu")


@pytest.mark.slow
def test_pytest_m_gpu_without_a_gpu_fails_with_a_message():
    """``pytest -m gpu`` where JAX has no GPU stops with a usage error instead of skipping."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # as on a machine without a GPU
    env.pop("JSCALE_TEST_PLATFORM", None)
    tests = Path(__file__).parent
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q",
                           "-p", "no:cacheprovider", str(tests / "test_selective_scan.py")], cwd=tests.parent,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    assert "no 'gpu' backend" in proc.stderr, proc.stderr
