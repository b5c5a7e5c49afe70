"""pytest-benchmark suite: fused MHGA kernel vs baselines at GTPT shapes (not a test suite).

Run on a GPU machine::

    python -m pytest benchmarks/bench_group_attention.py --benchmark-only \\
        --benchmark-group-by=param:shape,param:B,param:dtype,param:mode --benchmark-json=out.json

Cases, baselines and timed steps come from ``run_group_attention.py`` (the standalone table script), so both
tools measure the same code. Every timed call ends with ``torch.cuda.synchronize()``. Shapes, dtype, device,
library versions, the memory-bandwidth floor and peak memory go to ``benchmark.extra_info``. Without a GPU
only a tiny CPU case of the eager reference and the SDPA baseline runs; everything else skips.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run_group_attention as rga  # noqa: E402

ON_GPU = torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")

SHAPE_NAMES = list(rga.SHAPES)


def _bench(benchmark, impl, shape_name, B, dtype_name, mode, device):
    shape = rga.SHAPES[shape_name]
    dtype = rga.DTYPES[dtype_name]
    qkv, grad = rga.make_inputs(shape, B, dtype, device, requires_grad=(mode != "fwd"))
    fn = rga.make_callable(impl, shape, B, dtype, device)
    sync = device == "cuda"
    unsynced = rga.make_step(fn, mode, qkv, grad)

    def step():  # pytest-benchmark reads a wall clock: wait for the GPU inside the timed call
        unsynced()
        if sync:
            torch.cuda.synchronize()
    for _ in range(3):  # compile, autotune caches, cuDNN/flash heuristics: all outside the measurement
        step()
    benchmark.extra_info.update(rga.environment(device))
    benchmark.extra_info.update(dict(impl=impl, shape=shape_name, B=B, G=shape.G, N=shape.N, L=shape.keys,
                                     S=shape.S, heads=shape.heads, dim=shape.dim, dtype=dtype_name, mode=mode,
                                     floor_bytes=rga.floor_bytes(shape, B, dtype, mode),
                                     floor_ms=rga.floor_bytes(shape, B, dtype, mode) / rga.HBM_BYTES_PER_S * 1e3))
    if mode == "fwd":
        benchmark.extra_info["max_err_vs_eager"] = rga.check_against_reference(fn, shape, qkv)
    peak = rga._peak_mb(step, device)
    if peak is not None:
        benchmark.extra_info["peak_mb"] = peak
    benchmark.pedantic(step, rounds=50 if sync else 3, iterations=5 if sync else 1, warmup_rounds=1)


@gpu_only
@pytest.mark.parametrize("mode", rga.MODES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("B", [32, 128])
@pytest.mark.parametrize("shape", SHAPE_NAMES)
@pytest.mark.parametrize("impl", rga.IMPLS)
def test_group_attention_gpu(benchmark, impl, shape, B, dtype, mode):
    _bench(benchmark, impl, shape, B, dtype, mode, "cuda")


@pytest.mark.parametrize("mode", rga.MODES)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_group_attention_cpu_reference(benchmark, impl, mode):
    """Tiny CPU case: keeps the harness itself exercised on machines without a GPU."""
    _bench(benchmark, impl, "coco_fine_late", 1, "fp32", mode, "cpu")
