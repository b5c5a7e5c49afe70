"""fp32 -> bf16 rounding shared by the kernels, for the Triton interpreter only.

Compiled Triton kernels round fp32 -> bf16 casts to nearest-even, like PyTorch. The interpreter truncates them
(even with ``fp_downcast_rounding="rtne"``; seen on triton 3.2, 3.6 and 3.9), which would make CPU results differ
from GPU and PyTorch in the last bf16 bit. Kernels call :func:`cast` with a constexpr flag that their launchers set
only when they run in the interpreter with bf16 in play; compiled kernels never see the extra instructions.
"""
try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton missing: only the reference backend is usable
    triton = None

if triton is not None:

    @triton.jit
    def cast(x, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
        """``x.to(dtype)``; with RNE_BF16, round to the nearest bf16 (ties to even) first, so that the cast that
        follows is exact whatever the interpreter does. Finite values only (+-inf stay, NaN may become inf)."""
        if RNE_BF16:
            bits = x.to(tl.float32).to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            x = bits.to(tl.float32, bitcast=True)
        return x.to(dtype)
