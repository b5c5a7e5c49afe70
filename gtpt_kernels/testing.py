"""Test helpers shared by the test-suite and benchmarks: one closeness rule, poisoned outputs."""
from __future__ import annotations

import torch
from torch import Tensor

# Relative-error tolerance by dtype: max|actual - expected| <= RTOL * max(max|expected|, 1e-6) elementwise
# max, plus NaN/Inf never pass. fp32 is for IEEE-exact kernels; half types allow a few ulp of accumulation.
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def rel_error(actual: Tensor, expected: Tensor) -> float:
    """max|a - e| / max|e| (computed in fp64)."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-6)) if e.numel() else 0.0


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype = None, rtol: float = None, what: str = ""):
    """Assert ``actual`` matches ``expected`` within the relative tolerance for ``dtype`` (default: actual's).

    Shapes must match exactly; any NaN or Inf in ``actual`` fails, whatever ``expected`` holds.
    """
    assert actual.shape == expected.shape, f"{what} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what} has NaN/Inf"
    tol = rtol if rtol is not None else RTOL[dtype or actual.dtype]
    err = rel_error(actual, expected)
    assert err <= tol, f"{what} relative error {err:.3e} > {tol:.1e}"


def poison_(t: Tensor) -> Tensor:
    """Fill a freshly allocated output with NaN so that elements a kernel forgot to write fail the check."""
    return t.fill_(float("nan"))
