"""pytest-benchmark suite: end-to-end GTPT (not a test suite).

GPU (GTPT-S, inference, B = 32 / 128, fp32 / bf16): eager on the reference ops vs eager on the Triton kernels vs
``torch.compile`` of the reference (default and ``reduce-overhead`` modes) vs CUDA-graph replay (of the kernels and
of the reference)::

    python -m pytest benchmarks/bench_model.py --benchmark-only --benchmark-json=model.json \\
        --benchmark-group-by=param:B,param:dtype

Without a GPU those cases skip and a few small CPU cases of the eager reference run (pruned and unpruned path),
so the suite is usable (and checked) on a laptop. Every timed call synchronizes; shapes, dtype, device, FLOPs and
versions go to ``benchmark.extra_info``. The timed callable is :func:`gtpt.profiler.build_step`, the same one
``gtpt profile`` times.
"""
import functools

import pytest

from conftest import record_environment, synchronized
from gtpt.config import get_config
from gtpt.flops import count_flops
from gtpt.profiler import build_step

GPU_BACKENDS = ["reference", "triton", "compile", "compile-reduce-overhead", "cudagraph", "cudagraph-reference"]


@functools.lru_cache(maxsize=None)
def _macs(variant: str, path: str) -> int:
    """Full-convention MACs per image (fvcore, attention included), counted once per variant and path on CPU."""
    return count_flops(variant, "full", path=path).total


def _bench(benchmark, variant, backend, B, dtype, path, device, rounds, warmup_rounds):
    cfg = get_config(variant)
    built = build_step(variant, backend, B, dtype, "inference", path, device)
    step = synchronized(built.step, device)
    for _ in range(warmup_rounds):  # compilation, autotuning, graph capture warm-up: outside the measurement
        step()
    record_environment(benchmark, device=device, variant=variant, backend=backend, batch_size=B, dtype=dtype,
                       path=path, mode="inference", image_shape=(B, 3, *cfg.image_size),
                       output_shapes=[list(t.shape) for t in built.step()],
                       macs_per_image_full=_macs(variant, path))
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("B", [32, 128])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gtpt_s_gpu(benchmark, backend, B, dtype):
    _bench(benchmark, "gtpt-s", backend, B, dtype, "pruned", "cuda", rounds=30, warmup_rounds=5)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [32, 128])
def test_gtpt_s_gpu_unpruned(benchmark, B):
    _bench(benchmark, "gtpt-s", "reference", B, "bf16", "unpruned", "cuda", rounds=30, warmup_rounds=5)


@pytest.mark.parametrize("path", ["pruned", "unpruned"])
@pytest.mark.parametrize("variant", ["gtpt-t", "gtpt-s"])
def test_cpu_reference(benchmark, variant, path):
    _bench(benchmark, variant, "reference", 1, "fp32", path, "cpu", rounds=5, warmup_rounds=1)
