"""The fast eval path (gtpt.fast_inference): same outputs as the unfused modules for every variant, training and
checkpoints untouched, the folded-weight cache follows weight changes, and the CPU runtime benchmark runs."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import gtpt
from gtpt import fast_inference
from gtpt.runtimes import trained_like_weights
from gtpt_kernels.reference import group_attention_reference
from gtpt_kernels.testing import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = gtpt.list_variants()


def images(b=2, seed=1, dtype=torch.float32):
    return torch.randn(b, 3, 256, 192, generator=torch.Generator().manual_seed(seed)).to(dtype)


def model(variant, seed=0):
    torch.manual_seed(seed)
    return trained_like_weights(gtpt.build_model(variant, backend="reference"), seed).eval()


def both(m, x, rates=None):
    """(unfused, fused) outputs of ``m`` on ``x``."""
    with torch.no_grad():
        m.set_fast_inference(False)
        plain = m.predict(x, rates)
        m.set_fast_inference(True)
        fused = m.predict(x, rates)
    return plain, fused


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_matches_unfused(one_thread, variant):
    """Pruned and unpruned paths, fp32 (trained-like BN statistics, so the folding matters)."""
    m = model(variant)
    x = images(2)
    for rates in (None, [1.0] * 12):
        plain, fused = both(m, x, rates)
        for a, b in zip(fused, plain):
            assert_close(a, b, rtol=2e-5, what=f"{variant} rates={rates}")
        assert not torch.equal(fused[0], plain[0])  # the fused path did run (fp32 rounding differs)


def test_fused_matches_unfused_fp64_eval_call(one_thread):
    m = model("gtpt-s-wholebody").double()
    x = images(1, dtype=torch.float64)
    with torch.no_grad():
        fused = m(x)
        plain = m.set_fast_inference(False)(x)
    for a, b in zip(fused, plain):
        assert_close(a, b, rtol=1e-11, what="fp64")


@pytest.mark.parametrize("shape,heads,shared,pad", [((2, 1, 33, 96), 8, 0, False), ((2, 3, 21, 96), 8, 6, True),
                                                    ((1, 3, 9, 48), 4, 6, True)])
def test_sdpa_attention_equals_reference_on_every_row(shape, heads, shared, pad):
    """The padded query row included (the official uniform mean over its group's values)."""
    qkv = torch.randn(*shape[:-1], 3 * shape[-1], dtype=torch.float64)
    C = shape[-1]
    ref = group_attention_reference(qkv, heads, shared, C ** -0.5, pad)
    out = fast_inference.sdpa_group_attention(qkv, heads, shared, C ** -0.5, pad)
    assert_close(out, ref, rtol=1e-12, what="sdpa attention")


def test_train_mode_is_untouched(one_thread):
    """After fused eval forwards, train() gives bit-identical training outputs, gradients and BN statistics to a
    model that never went through eval; training never calls the fast path."""
    torch.manual_seed(0)
    fresh = gtpt.build_model("gtpt-t", backend="reference")
    used = copy.deepcopy(fresh).eval()
    with torch.no_grad():
        used(images(1))
    assert used.features.__dict__.get("_fast_cache") is not None
    used.train()
    assert "_fast_cache" not in used.features.__dict__
    calls = []
    orig = (fast_inference.fast_patch_embed, fast_inference.sdpa_group_attention)
    fast_inference.fast_patch_embed = lambda *a: calls.append(1) or orig[0](*a)
    fast_inference.sdpa_group_attention = lambda *a: calls.append(1) or orig[1](*a)
    try:
        x = images(2)
        outs = [m.train()(x) for m in (fresh, used)]
    finally:
        fast_inference.fast_patch_embed, fast_inference.sdpa_group_attention = orig
    assert not calls
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    for o, m in zip(outs, (fresh, used)):
        sum(t.logsumexp(-1).sum() for t in o).backward()
    for (n, p), (_, q) in zip(fresh.named_parameters(), used.named_parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), n
    for (n, p), (_, q) in zip(fresh.named_buffers(), used.named_buffers()):
        assert torch.equal(p, q), n


def test_state_dict_and_checkpoint_loading_unchanged(tmp_path, one_thread):
    """No cache in the state dict; an official-style checkpoint loads into a model that has run fused, and the
    fused outputs follow the new weights (the cache is invalidated)."""
    m = model("gtpt-t", seed=0)
    keys = list(m.state_dict())
    with torch.no_grad():
        m(images(1))
    assert list(m.state_dict()) == keys
    other = model("gtpt-t", seed=1)
    path = tmp_path / "official.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in other.state_dict().items()}}, path)
    gtpt.load_official_checkpoint(m, str(path))
    x = images(1)
    with torch.no_grad():
        fused = m(x)
        expect = other.set_fast_inference(False)(x)
    for a, b in zip(fused, expect):
        assert_close(a, b, rtol=2e-5, what="after loading a checkpoint")


def test_cache_follows_in_place_weight_changes(one_thread):
    m = model("gtpt-t")
    x = images(1)
    with torch.no_grad():
        m(x)
        cache = m.features.__dict__["_fast_cache"]
        m(x)
        assert m.features.__dict__["_fast_cache"] is cache  # reused while nothing changed
        m.features.stem.layer[1].branch2[1].running_var.mul_(3.0)
        m.features.patch2emb_norm.bias.add_(0.5)
        fused = m(x)
        plain = m.set_fast_inference(False)(x)
    for a, b in zip(fused, plain):
        assert_close(a, b, rtol=2e-5, what="after in-place weight edits")


def test_eval_gradients_reach_the_original_parameters(one_thread):
    m = model("gtpt-t")
    ref = copy.deepcopy(m).set_fast_inference(False)
    x = images(1)
    for net in (m, ref):
        out = net(x)
        (out[0].logsumexp(-1).sum() + out[1].logsumexp(-1).sum()).backward()
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        if q.grad is not None:
            assert_close(p.grad, q.grad, rtol=1e-4, what=n)


def test_fast_path_off_under_modes_and_when_disabled():
    from torch.utils.flop_counter import FlopCounterMode
    m = model("gtpt-t")
    attn = m.features.transformer.layers[0][0].fn.fn
    assert fast_inference.fast_inference_active(m.features) and fast_inference.fast_inference_active(attn)
    with FlopCounterMode(display=False):
        assert not fast_inference.fast_inference_active(m.features)
    m.set_fast_inference(False)
    assert not fast_inference.fast_inference_active(m.features) and not fast_inference.fast_inference_active(attn)
    m.set_fast_inference(True).train()
    assert not fast_inference.fast_inference_active(m.features)


def test_cpu_benchmark_smoke(tmp_path):
    """The benchmark script end to end on the smallest configuration (official, eager, fused; one round)."""
    out = tmp_path / "bench"
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_cpu_inference.py"), "--variants", "gtpt-t",
           "--batch-sizes", "1", "--threads", "1", "--repeats", "1", "--warmup", "1", "--runtimes", "official",
           "eager", "eager-fused", "--out-dir", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    data = json.loads((out / "results.json").read_text())
    cfg = data["ratios"]["gtpt-t B=1 threads=1"]
    assert set(cfg["speedup_vs_official"]) == {"eager", "eager-fused"}
    assert all(v > 0 for v in cfg["speedup_vs_official"].values())
    timed = data["configs"][0]["runtimes"]
    assert all(timed[r]["max_rel_err"] < 1e-4 for r in timed)
    assert all(timed[r]["setup_s"] >= 0 for r in timed)  # the one-time cost (export / compile + warm-up)
    md = (out / "results.md").read_text()
    assert "| gtpt-t | 1 | 1 |" in md and "git commit:" in (out / "environment.txt").read_text()
    assert not (out / "_exports").exists()


def test_profile_runtimes_bad_name_is_one_line(capsys, tmp_path):
    from gtpt.cli import main
    assert main(["profile", "--runtimes", "tensorrt", "--no-flops", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tensorrt" in err[0] and "onnxruntime" in err[0]
