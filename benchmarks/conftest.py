"""Shared helpers for the pytest-benchmark suites in this directory.

``record_environment(benchmark, **fields)`` puts shapes, dtype, device and library versions into
``benchmark.extra_info`` so every saved JSON (``--benchmark-json`` / ``--benchmark-autosave``) says what it
measured and where. The kernel benchmarks can call it too::

    from conftest import record_environment   # benchmarks/ is on sys.path when pytest collects it
    record_environment(benchmark, shape=(B, G, N, C), dtype="bf16", device="cuda")

Unlike ``tests/conftest.py`` this does not turn on the Triton interpreter: benchmarks time real kernels, and
interpreted ones would be meaningless.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the gtpt package, also without `pip install -e .`
    sys.path.insert(0, ROOT)

ON_GPU = torch.cuda.is_available()


def environment(device: str = "cpu") -> Dict[str, Any]:
    """Versions and hardware (see :func:`gtpt.profiler.environment_info`), plus the git commit when known."""
    from gtpt.profiler import environment_info

    info = environment_info(device)
    try:
        import subprocess
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
    except Exception:  # no git: fine, the versions still identify the run
        info["git_commit"] = None
    return info


_ENV_CACHE: Dict[str, Dict[str, Any]] = {}


def record_environment(benchmark, device: str = "cpu", **fields: Any) -> None:
    """``benchmark.extra_info.update(environment + fields)``; shapes given as tuples are stored as lists."""
    key = str(device)
    if key not in _ENV_CACHE:
        _ENV_CACHE[key] = environment(key)
    benchmark.extra_info.update(_ENV_CACHE[key])
    benchmark.extra_info["device"] = key
    for k, v in fields.items():
        benchmark.extra_info[k] = list(v) if isinstance(v, tuple) else v


def synchronized(fn, device: str = "cpu"):
    """Wrap ``fn`` so that each call waits for the device: the timed region then covers the GPU work."""
    if torch.device(device).type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out
    return call


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running benchmark")


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
