"""Tests of the fused MHGA op (:mod:`gtpt_kernels.ops.group_attention`).

Truth is :func:`gtpt_kernels.reference.group_attention_reference` run in fp64 on the same inputs. On a machine
without a GPU the Triton kernels run in the interpreter (conftest sets ``TRITON_INTERPRET=1``); shapes are kept
tiny there (each program costs ~50-100 ms). Cases marked ``gpu`` run GTPT-sized shapes on CUDA only.

Every kernel output buffer is pre-filled with NaN (``_POISON_OUTPUTS``), so an element a kernel forgets to write
fails the finiteness checks.
"""

import pytest
import torch

from gtpt_kernels import GroupAttention, group_attention, use_backend
from gtpt_kernels.backend import ENV_VAR
from gtpt_kernels.ops import group_attention as ga_mod
from gtpt_kernels.ops.group_attention import group_attention_flops, group_attention_macs
from gtpt_kernels.reference import group_attention_reference
from gtpt_kernels.testing import assert_close

from conftest import DEVICE, ON_GPU


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    monkeypatch.setattr(ga_mod, "_POISON_OUTPUTS", True)


@pytest.fixture
def small_tiles(monkeypatch):
    """Force 16-wide tiles, so that tiny problems still run several key/query tiles per program, tiles that
    straddle the shared/own boundary, and several dk/dv query-tile iterations per group."""
    def cfg(N, L, D, dtype, interpret):
        block_d = max(16, ga_mod._next_pow2(D))
        return dict(fwd_m=16, fwd_n=16, bwd_m=16, bwd_n=16, block_d=block_d, num_warps=4, dkdv_warps=4,
                    num_stages=1)
    monkeypatch.setattr(ga_mod, "_launch_config", cfg)


def make_qkv(B, G, N, heads, head_dim, dtype=torch.float32, noncontig=False, seed=0, amp=1.0):
    """Random packed qkv; ``noncontig`` returns a strided view (groups and tokens transposed, padded rows)."""
    gen = torch.Generator().manual_seed(seed)
    C3 = 3 * heads * head_dim
    if noncontig:
        base = torch.randn(B, N, G, C3 + 5, generator=gen) * amp
        qkv = base.to(DEVICE, dtype).transpose(1, 2)[..., 2:C3 + 2]
        assert not qkv.is_contiguous()
    else:
        qkv = (torch.randn(B, G, N, C3, generator=gen) * amp).to(DEVICE, dtype)
    return qkv


def run(qkv, heads, num_shared, grad_out, backend, **kw):
    """Forward + backward; returns (out, dqkv)."""
    x = qkv.detach().clone() if qkv.is_contiguous() else qkv.detach()
    x.requires_grad_(True)
    if backend == "fp64":
        x = qkv.detach().double().requires_grad_(True)
        out = group_attention_reference(x, heads, num_shared, **kw)
        out.backward(grad_out.double())
    elif backend == "eager":
        out = group_attention_reference(x, heads, num_shared, **kw)
        out.backward(grad_out)
    else:
        out = group_attention(x, heads, num_shared, backend=backend, **kw)
        out.backward(grad_out)
    return out.detach(), x.grad


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


# (B, G, N, heads, head_dim, S, pad_token, scale, noncontig)
FP32_CASES = [
    (1, 1, 1, 1, 16, 0, False, None, False),        # single token, plain attention
    (2, 1, 7, 2, 16, 0, False, None, False),        # plain MHSA (GTPT coarse layer form)
    (1, 3, 19, 2, 24, 6, True, None, False),        # GTPT layout: 3 groups, 6 shared, pad token, D=24
    (1, 3, 37, 1, 32, 6, False, 1.0, True),         # peaky softmax, strided qkv
    (2, 3, 7, 1, 64, 1, True, None, False),         # D=64, one shared token per group (the pad)
    (1, 3, 6, 2, 16, 6, False, None, True),         # every token shared (S == N)
    (1, 1, 2, 1, 24, 1, True, 4.0, False),          # pad leaves one key: key tile 0 is all-masked for shared
    (1, 3, 82, 1, 24, 6, True, None, False),        # COCO-S fine layer, one head
    (2, 3, 19, 1, 16, 0, False, None, False),       # G=3 without sharing: independent groups
    (1, 3, 37, 2, 32, 1, True, None, False),        # one shared token per group, pad
    (1, 1, 19, 1, 64, 6, True, None, True),         # G=1 with "shared" prefix = its own first tokens
]


def _ids(cases):
    return ["B{}G{}N{}H{}D{}S{}{}{}{}".format(*c[:6], "-pad" if c[6] else "", f"-s{c[7]}" if c[7] else "",
                                             "-strided" if c[8] else "") for c in cases]


def _check_fp32(case, seed=0):
    B, G, N, H, D, S, pad, scale, noncontig = case
    qkv = make_qkv(B, G, N, H, D, noncontig=noncontig, seed=seed)
    grad_out = torch.randn(B, G, N, H * D, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    kw = dict(scale=scale, pad_token=pad)
    out, dqkv = run(qkv, H, S, grad_out, "triton", **kw)
    ref, dref = run(qkv, H, S, grad_out, "fp64", **kw)
    assert torch.isfinite(out).all() and torch.isfinite(dqkv).all()
    # fp32 with IEEE dots: absolute 1e-5 on O(1) outputs; gradients scale with |grad|, so 1e-5 relative to it.
    assert max_err(out, ref) <= 1e-5, f"out err {max_err(out, ref):.3e}"
    assert max_err(dqkv, dref) <= 1e-5 * max(1.0, dref.abs().max().item()), f"dqkv err {max_err(dqkv, dref):.3e}"
    assert_close(out, ref.float(), what="out")
    for name, sl in (("dq", slice(0, H * D)), ("dk", slice(H * D, 2 * H * D)), ("dv", slice(2 * H * D, None))):
        if dref[..., sl].abs().max() > 1e-3:  # relative check; an exactly-zero gradient (N=1: dq = 0) is
            assert_close(dqkv[..., sl], dref[..., sl].float(), what=name)  # covered by the absolute bound


@pytest.mark.parametrize("case", FP32_CASES, ids=_ids(FP32_CASES))
def test_fp32_matches_fp64_reference(case):
    _check_fp32(case)


TILED_CASES = [
    (1, 3, 37, 1, 24, 6, True, None, True),         # 4 key tiles, tile 1 straddles the shared/own boundary
    (1, 3, 21, 1, 16, 17, False, 1.0, False),       # shared rows span two dk/dv tiles; peaky softmax
    (1, 1, 40, 1, 32, 0, False, 2.0, False),        # plain attention, 3x3 tiles, online rescaling
]


@pytest.mark.parametrize("case", TILED_CASES, ids=_ids(TILED_CASES))
def test_fp32_multi_tile(case, small_tiles):
    _check_fp32(case, seed=3)


@pytest.fixture
def lazy_small_tiles(monkeypatch):
    """16-wide tiles with the forward's lazy rescaling (the running max moves only when a tile's max exceeds it by
    more than ``lazy`` log2 units), as 16-bit compiled configs run it."""
    def cfg(N, L, D, dtype, interpret):
        block_d = max(16, ga_mod._next_pow2(D))
        return dict(fwd_m=16, fwd_n=16, bwd_m=16, bwd_n=16, block_d=block_d, num_warps=4, dkdv_warps=4,
                    num_stages=1, lazy=ga_mod._LAZY_RESCALE)
    monkeypatch.setattr(ga_mod, "_launch_config", cfg)


@pytest.mark.parametrize("case", TILED_CASES, ids=_ids(TILED_CASES))
def test_fp32_multi_tile_lazy_rescale(case, lazy_small_tiles):
    _check_fp32(case, seed=3)


@pytest.mark.parametrize("grow", [4.0, 40.0])
def test_lazy_rescale_when_the_max_grows(grow, lazy_small_tiles):
    """Keys whose logits grow along the sequence: by ~4 log2 units in all (the stale max is kept, P up to 2^4) and
    by ~40 (the rescale branch runs on later tiles), fp32 against the fp64 reference, forward and backward."""
    B, G, N, H, D, S = 1, 3, 45, 1, 24, 6
    qkv = make_qkv(B, G, N, H, D, seed=11)
    q = qkv[..., :H * D]
    q.copy_(q.abs().mean(-1, keepdim=True).expand_as(q).clone() + 0.1 * q)  # queries along +1 (logits ~ sum(k))
    ramp = torch.linspace(0.0, 1.0, N).to(DEVICE)[None, None, :, None]
    k = qkv[..., H * D:2 * H * D]
    k.copy_(0.3 * k + ramp * grow / (D * 0.5))
    grad_out = torch.randn(B, G, N, H * D, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    kw = dict(scale=1.0, pad_token=True)
    out, dqkv = run(qkv, H, S, grad_out, "triton", **kw)
    ref, dref = run(qkv, H, S, grad_out, "fp64", **kw)
    assert torch.isfinite(out).all() and torch.isfinite(dqkv).all()
    assert max_err(out, ref) <= 1e-5 * max(1.0, ref.abs().max().item()), f"out err {max_err(out, ref):.3e}"
    assert max_err(dqkv, dref) <= 2e-5 * max(1.0, dref.abs().max().item()), f"dqkv err {max_err(dqkv, dref):.3e}"


@pytest.fixture
def one_loop_tiles(monkeypatch):
    """16-wide tiles in the kernels' one-loop form (every tile masked, PEEL=False), which compiled fp32 runs;
    the interpreter otherwise runs the peeled form (first/last tiles masked, the rest unmasked)."""
    def cfg(N, L, D, dtype, interpret):
        block_d = max(16, ga_mod._next_pow2(D))
        return dict(fwd_m=16, fwd_n=16, bwd_m=16, bwd_n=16, block_d=block_d, num_warps=4, dkdv_warps=4,
                    num_stages=1, peel=False)
    monkeypatch.setattr(ga_mod, "_launch_config", cfg)


@pytest.mark.parametrize("case", TILED_CASES[:2], ids=_ids(TILED_CASES[:2]))
def test_fp32_multi_tile_one_loop(case, one_loop_tiles):
    _check_fp32(case, seed=4)


def test_dkdv_work_split_covers_every_key(small_tiles):
    # 16-row dk/dv tiles, G*S = 3*7 = 21 shared keys -> 2 shared tiles and per group 1 own tile (N - S = 9):
    # 3 groups x cdiv(16, 16) = 3 slots for 5 work items, so two slots run an own tile and then a shared one.
    # Every dk/dv row must come from exactly one work item (poisoned outputs catch a missed row).
    case = (1, 3, 16, 1, 16, 7, True, None, False)
    assert ga_mod.triton.cdiv(3 * 7, 16) == 2 and ga_mod.triton.cdiv(16 - 7, 16) == 1
    _check_fp32(case, seed=13)


@pytest.mark.parametrize("scale", [-8.0, 0.0])
def test_non_positive_scale(scale):
    # The kernels take the row max of the unscaled logits when the scale is positive (one FFMA per logit); a
    # negative or zero scale must take the other path (max after scaling; -inf * 0 must not appear). At -8 the
    # scaled logits span ~2^200: exp2 overflows unless the max is taken after scaling.
    _check_fp32((1, 3, 11, 1, 16, 2, True, scale, False), seed=21)


HALF_CASES = [
    (torch.float16, (1, 3, 19, 2, 24, 6, True)),
    (torch.float16, (2, 1, 13, 1, 32, 0, False)),
    (torch.bfloat16, (1, 3, 19, 2, 24, 6, True)),   # interpreter: dots upcast to fp32 (triton#11584)
]


@pytest.mark.parametrize("dtype,case", HALF_CASES, ids=[f"{d}".split(".")[1] + "-" + _ids([c + (None, False)])[0]
                                                       for d, c in HALF_CASES])
def test_half_precision_within_2x_3x_of_eager(dtype, case):
    B, G, N, H, D, S, pad = case
    _check_half(dtype, B, G, N, H, D, S, pad)


def _check_half(dtype, B, G, N, H, D, S, pad, noncontig=False):
    qkv = make_qkv(B, G, N, H, D, dtype=dtype, noncontig=noncontig, seed=5)
    grad_out = torch.randn(B, G, N, H * D, generator=torch.Generator().manual_seed(6)).to(DEVICE, dtype)
    out, dqkv = run(qkv, H, S, grad_out, "triton", pad_token=pad)
    eager, deager = run(qkv, H, S, grad_out, "eager", pad_token=pad)
    ref, dref = run(qkv, H, S, grad_out, "fp64", pad_token=pad)
    assert out.dtype == dtype and dqkv.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(dqkv).all()
    eps = torch.finfo(dtype).eps
    # FlashAttention's rule: kernel error <= 2x (output) / 3x (gradients) the same-dtype eager error, with a
    # floor of a few ulp so that a lucky exact eager result cannot fail the kernel.
    assert max_err(out, ref) <= 2 * max_err(eager, ref) + 2 * eps, (max_err(out, ref), max_err(eager, ref))
    for name, sl in (("dq", slice(0, H * D)), ("dk", slice(H * D, 2 * H * D)), ("dv", slice(2 * H * D, None))):
        err, e_err = max_err(dqkv[..., sl], dref[..., sl]), max_err(deager[..., sl], dref[..., sl])
        floor = 4 * eps * max(1.0, dref[..., sl].abs().max().item())
        assert err <= 3 * e_err + floor, f"{name}: kernel {err:.3e} vs eager {e_err:.3e}"


def official_masked_attention(qkv, heads, num_shared):
    """The official ``GroupAttention`` body (repeated shared keys, boolean mask filled with ``-finfo.max``, see
    tests/official_port.py), written independently of gtpt_kernels.reference as a second oracle for the pad."""
    B, G, N, C3 = qkv.shape
    C, S = C3 // 3, num_shared
    q, k, v = (t.reshape(B, G, N, heads, -1).permute(0, 3, 1, 2, 4) for t in qkv.chunk(3, dim=-1))
    k = torch.cat([k[:, :, :, :S].flatten(2, 3).unsqueeze(2).repeat(1, 1, G, 1, 1), k[:, :, :, S:]], 3)
    v = torch.cat([v[:, :, :, :S].flatten(2, 3).unsqueeze(2).repeat(1, 1, G, 1, 1), v[:, :, :, S:]], 3)
    dots = torch.einsum("bhgid,bhgjd->bhgij", q, k) * C ** -0.5
    keep_q = torch.ones(G, N, dtype=torch.bool, device=qkv.device)
    keep_q[0, 0] = False
    keep_k = torch.ones(k.shape[3], dtype=torch.bool, device=qkv.device)
    keep_k[0] = False
    dots = dots.masked_fill(~(keep_q[:, :, None] & keep_k), -torch.finfo(dots.dtype).max)
    out = torch.einsum("bhgij,bhgjd->bhgid", dots.softmax(-1), v)
    return out.permute(0, 2, 3, 1, 4).reshape(B, G, N, C)


def test_pad_token_matches_official_masking():
    """GTPT's padded head group with peaky logits: no NaN/Inf; every row, the pad query row included, equals the
    official layer's masking (the pad row: uniform weights over all of group 0's keys); exact zeros where the
    official gradient is structurally zero (dq of the pad row, dk of the pad key)."""
    B, G, N, H, D, S = 2, 3, 9, 2, 16, 6
    C, L = H * D, G * S + N - S
    qkv = make_qkv(B, G, N, H, D, seed=11, amp=6.0)  # logits ~ +-100: exp2 over/underflow if unguarded
    grad_out = torch.randn(B, G, N, C, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    out, dqkv = run(qkv, H, S, grad_out, "triton", pad_token=True)
    ref, dref = run(qkv, H, S, grad_out, "fp64", pad_token=True)
    x = qkv.detach().double().requires_grad_(True)
    official = official_masked_attention(x, H, S)
    official.backward(grad_out.double())
    assert_close(ref, official, what="reference vs official out")
    assert_close(dref, x.grad, what="reference vs official dqkv")

    assert torch.isfinite(out).all() and torch.isfinite(dqkv).all()
    assert_close(out, ref.float(), what="out")
    assert_close(dqkv, dref.float(), rtol=5e-5, what="dqkv")
    # The pad row is the mean of group 0's L values (the shared tokens of every group, then its own tokens).
    v = qkv.double()[..., 2 * C:]
    group0_values = torch.cat([v[:, :, :S].flatten(1, 2), v[:, 0, S:]], dim=1)  # (B, L, C)
    assert group0_values.shape[1] == L
    assert_close(out[:, 0, 0], group0_values.mean(1).float(), what="pad row")
    assert torch.equal(dqkv[:, 0, 0, :C], torch.zeros_like(dqkv[:, 0, 0, :C]))        # dq of the pad query
    assert torch.equal(dqkv[:, 0, 0, C:2 * C], torch.zeros_like(dqkv[:, 0, 0, :C]))   # dk of the pad key
    # dv of the pad key: only the pad query row weighs it, with 1/L
    assert_close(dqkv[:, 0, 0, 2 * C:], grad_out[:, 0, 0] / L, rtol=5e-5, what="dv of the pad key")


def test_pad_with_single_other_key():
    """Smallest legal padded problem (G=1, S=1, N=2): each row's softmax has a single valid key, so a wrong
    mask or an unguarded max shows up as NaN or as a wrong (non-identity) weight."""
    qkv = make_qkv(1, 1, 2, 1, 16, seed=2, amp=10.0)
    grad_out = torch.ones(1, 1, 2, 16, device=DEVICE)
    out, dqkv = run(qkv, 1, 1, grad_out, "triton", pad_token=True)
    ref, dref = run(qkv, 1, 1, grad_out, "fp64", pad_token=True)
    assert torch.isfinite(out).all() and torch.isfinite(dqkv).all()
    assert_close(out, ref.float(), what="out")
    assert_close(dqkv, dref.float(), rtol=5e-5, what="dqkv")


def test_bitwise_deterministic():
    qkv = make_qkv(1, 3, 23, 2, 24, seed=7, noncontig=True)
    grad_out = torch.randn(1, 3, 23, 48, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    out1, d1 = run(qkv, 2, 6, grad_out, "triton", pad_token=True)
    out2, d2 = run(qkv, 2, 6, grad_out, "triton", pad_token=True)
    assert torch.equal(out1, out2)
    assert torch.equal(d1, d2)


def test_channel_strided_qkv_and_grad_out():
    # qkv and the output gradient with a non-unit last-dim stride (every other channel of a wider buffer): the
    # kernels must use the channel strides they are given, not assume 1.
    B, G, N, H, D, S = 1, 3, 11, 2, 16, 6
    C = H * D
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, G, N, 2 * 3 * C, generator=gen).to(DEVICE)[..., ::2]
    go = torch.randn(B, G, N, 2 * C, generator=gen).to(DEVICE)[..., ::2]
    assert qkv.stride(-1) == 2 and go.stride(-1) == 2
    x = qkv.detach().requires_grad_(True)
    out = group_attention(x, H, S, pad_token=True, backend="triton")
    out.backward(go)
    x64 = qkv.detach().double().requires_grad_(True)
    ref = group_attention_reference(x64, H, S, pad_token=True)
    ref.backward(go.double())
    assert_close(out, ref.float(), what="out")
    assert_close(x.grad, x64.grad.float(), rtol=5e-5, what="dqkv")


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_bf16_output_rounds_to_nearest(seed):
    # Least-squares gain of the bf16 output against fp64: within ~5e-5 of 1 when every fp32 -> bf16 cast rounds to
    # nearest, ~2e-3 short when a cast truncates (the interpreter's own casts do; the kernel rounds by hand there).
    # The 2x-eager bound above cannot see a one-ulp bias.
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(2, 3, 19, 3 * 48, generator=gen).to(DEVICE, torch.bfloat16)
    out = group_attention(qkv, 2, 6, pad_token=True, backend="triton").double()
    ref = group_attention_reference(qkv.double(), 2, 6, pad_token=True)
    gain = float((out * ref).sum() / (ref * ref).sum())
    assert abs(gain - 1) < 5e-4, gain


def test_noncontiguous_grad_output():
    B, G, N, H, D, S = 1, 3, 11, 2, 16, 2
    qkv = make_qkv(B, G, N, H, D, seed=9)
    g = torch.randn(B, N, G, H * D + 3, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    grad_out = g.transpose(1, 2)[..., 1:H * D + 1]
    assert not grad_out.is_contiguous()
    _, dqkv = run(qkv, H, S, grad_out, "triton")
    _, dref = run(qkv, H, S, grad_out.contiguous(), "fp64")
    assert_close(dqkv, dref.float(), rtol=5e-5, what="dqkv")


def test_output_layout_and_dtype():
    qkv = make_qkv(2, 3, 5, 2, 16, noncontig=True)
    out = group_attention(qkv, 2, 1, backend="triton")
    assert out.shape == (2, 3, 5, 32) and out.dtype == qkv.dtype and out.is_contiguous()


def test_tf32_precision_option_is_validated_and_accepted():
    qkv = make_qkv(1, 3, 7, 1, 16)
    ref = group_attention_reference(qkv.double(), 1, 2)
    # The interpreter ignores the tensor-core mode; on a GPU TF32 must stay within the 5e-3 budget.
    out = group_attention(qkv, 1, 2, backend="triton", fp32_precision="tf32")
    assert max_err(out, ref) <= 5e-3
    with pytest.raises(ValueError, match="fp32_precision"):
        group_attention(qkv, 1, 2, backend="triton", fp32_precision="fp8")


# ---------------------------------------------------------------------------------------------------------------
# Validation and backend selection
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qkv_shape,heads,S,pad,exc,match", [
    ((2, 3, 5), 1, 0, False, ValueError, "shape"),
    ((1, 1, 5, 48), 5, 0, False, ValueError, "divisible"),
    ((1, 1, 5, 47), 1, 0, False, ValueError, "3\\*C"),
    ((1, 3, 5, 48), 2, 6, False, ValueError, "num_shared"),
    ((1, 3, 5, 48), 2, 0, True, ValueError, "pad_token"),
    ((1, 1, 1, 48), 2, 1, True, ValueError, "besides"),
])
def test_input_validation(qkv_shape, heads, S, pad, exc, match):
    with pytest.raises(exc, match=match):
        group_attention(torch.zeros(qkv_shape, device=DEVICE), heads, S, pad_token=pad, backend="triton")


def test_dtype_validation():
    with pytest.raises(TypeError, match="floating"):
        group_attention(torch.zeros(1, 1, 4, 48, dtype=torch.int32, device=DEVICE), 2, 0, backend="triton")
    qkv64 = make_qkv(1, 3, 5, 2, 16).double()
    with pytest.raises(TypeError, match="float64"):
        group_attention(qkv64, 2, 1, backend="triton")
    # "auto" falls back to the reference for inputs the kernels do not take.
    assert torch.equal(group_attention(qkv64, 2, 1, backend="auto"), group_attention_reference(qkv64, 2, 1))


def test_integer_like_heads_and_num_shared():
    # numpy / 0-d tensor ints work on every path (the direct-launch inference path hands them to the launcher,
    # which takes Python ints only); bools and floats are refused.
    import numpy as np
    qkv = make_qkv(1, 3, 5, 2, 16)
    want = group_attention_reference(qkv, 2, 1)
    with torch.no_grad():
        for heads, shared in ((np.int64(2), np.int64(1)), (torch.tensor(2), torch.tensor(1))):
            assert_close(group_attention(qkv, heads, shared, backend="triton"), want, what="int-like")
    m = GroupAttention(np.int64(32), np.int64(2), np.int64(1), backend="triton").to(DEVICE)
    assert isinstance(m.heads, int) and isinstance(m.num_shared, int) and isinstance(m.dim, int)
    with torch.no_grad():
        m(torch.randn(1, 3, 5, 32, device=DEVICE))
    for bad in (True, 2.0):
        with pytest.raises(TypeError, match="heads must be an int"):
            group_attention(qkv, bad, 1, backend="triton")
    with pytest.raises(TypeError, match="num_shared must be an int"):
        group_attention(qkv, 2, True, backend="reference")


def test_forward_mode_autodiff_goes_to_the_reference():
    # No forward-mode rule in the kernels (torch would return zero tangents silently): "auto" runs the reference
    # under torch.func.jvp and for dual tensors; an explicit "triton" refuses.
    qkv = make_qkv(1, 3, 5, 2, 16)
    tangent = torch.randn_like(qkv)
    _, want = torch.func.jvp(lambda x: group_attention(x, 2, 1, backend="reference"), (qkv,), (tangent,))
    assert want.abs().sum() > 0
    _, got = torch.func.jvp(lambda x: group_attention(x, 2, 1, backend="auto"), (qkv,), (tangent,))
    assert torch.equal(got, want)
    with pytest.raises(NotImplementedError, match="forward-mode"):
        torch.func.jvp(lambda x: group_attention(x, 2, 1, backend="triton"), (qkv,), (tangent,))
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        got = fwAD.unpack_dual(group_attention(fwAD.make_dual(qkv, tangent), 2, 1, backend="auto")).tangent
    assert torch.equal(got, want)


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    import gtpt_kernels.backend as backend_mod
    # kernels built without the interpreter (TRITON_INTERPRET unset when gtpt_kernels was imported)
    monkeypatch.setattr(backend_mod, "_INTERPRET_AT_IMPORT", False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET") as e:
        group_attention(torch.zeros(1, 1, 4, 48), 2, 0, backend="triton")
    assert "was not when" not in str(e.value)
    # setting the variable after the import changes nothing, and the error says so
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="is set now, but was not when gtpt_kernels was imported"):
        group_attention(torch.zeros(1, 1, 4, 48), 2, 0, backend="triton")
    # ... while "auto" quietly runs the reference.
    x = torch.randn(1, 1, 4, 48)
    assert torch.equal(group_attention(x, 2, 0, backend="auto"), group_attention_reference(x, 2, 0))


def test_backend_switch_routes_calls(monkeypatch):
    calls = []
    real = ga_mod._fwd_impl
    monkeypatch.setattr(ga_mod, "_fwd_impl", lambda *a: calls.append(1) or real(*a))
    qkv = make_qkv(1, 3, 5, 1, 16)
    group_attention(qkv, 1, 1, backend="reference")
    assert not calls
    group_attention(qkv, 1, 1)  # default "auto": triton on CUDA or under the interpreter
    assert len(calls) == 1
    with use_backend("reference"):
        group_attention(qkv, 1, 1)
    assert len(calls) == 1
    monkeypatch.setenv(ENV_VAR, "reference")
    group_attention(qkv, 1, 1)
    assert len(calls) == 1
    group_attention(qkv, 1, 1, backend="triton")  # the per-call argument beats the environment
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------------------------------
# Module, FLOP counting, torch.compile
# ---------------------------------------------------------------------------------------------------------------

def test_module_parameters_and_backends_agree():
    torch.manual_seed(0)
    dim, heads = 48, 2
    m_tri = GroupAttention(dim, heads, num_shared=6, pad_token=True, backend="triton").to(DEVICE)
    m_ref = GroupAttention(dim, heads, num_shared=6, pad_token=True, backend="reference").to(DEVICE)
    assert [n for n, _ in m_tri.named_parameters()] == ["to_qkv.weight", "to_out.0.weight", "to_out.0.bias"]
    m_ref.load_state_dict(m_tri.state_dict())
    x = torch.randn(1, 3, 10, dim, device=DEVICE)
    y_tri, y_ref = m_tri(x), m_ref(x)
    assert_close(y_tri, y_ref, what="module out")
    y_tri.square().sum().backward()
    y_ref.square().sum().backward()
    for (name, p_tri), p_ref in zip(m_tri.named_parameters(), m_ref.parameters()):
        assert_close(p_tri.grad, p_ref.grad, rtol=5e-5, what=name)
    out, qkv = m_tri(x, return_qkv=True)
    assert qkv.shape == (1, 3, 10, 3 * dim)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_functional_op_under_autocast(dtype):
    # An fp32 qkv under autocast: both backends compute in the autocast dtype and return it (the reference's
    # matmuls autocast; the kernels get a cast copy), and the gradient comes back fp32.
    qkv = make_qkv(1, 3, 7, 2, 16).requires_grad_(True)
    outs, grads = {}, {}
    for be in ("triton", "reference"):
        qkv.grad = None
        with torch.autocast(DEVICE, dtype=dtype):
            outs[be] = group_attention(qkv, 2, 2, backend=be)
        outs[be].float().sum().backward()
        grads[be] = qkv.grad.clone()
    assert outs["triton"].dtype == outs["reference"].dtype == dtype
    assert_close(outs["triton"], outs["reference"], what="autocast functional out")
    assert grads["triton"].dtype == torch.float32
    assert_close(grads["triton"], grads["reference"], dtype=dtype, what="autocast functional grad")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_module_under_autocast(dtype):
    # Mixed-precision training: fp32 parameters and activations, torch.autocast makes to_qkv emit half precision,
    # so the op sees half qkv and returns half; fp32 parameter gradients must match the reference's under autocast.
    torch.manual_seed(0)
    dim, heads = 48, 2
    mods = {be: GroupAttention(dim, heads, num_shared=6, pad_token=True, backend=be).to(DEVICE)
            for be in ("triton", "reference")}
    mods["reference"].load_state_dict(mods["triton"].state_dict())
    x = torch.randn(2, 3, 9, dim, device=DEVICE)
    outs = {}
    for be, m in mods.items():
        with torch.autocast(DEVICE, dtype=dtype):
            outs[be] = m(x)
        outs[be].float().square().sum().backward()
    assert outs["triton"].dtype == outs["reference"].dtype == dtype
    assert_close(outs["triton"], outs["reference"], what="autocast out")
    for (name, p_tri), p_ref in zip(mods["triton"].named_parameters(), mods["reference"].parameters()):
        assert p_tri.grad.dtype == torch.float32
        assert_close(p_tri.grad, p_ref.grad, dtype=dtype, what=f"autocast {name}.grad")


def test_macs_formula():
    # COCO-S fine layer: 3 groups x 82 queries x 94 keys, H=8, D=24.
    assert group_attention_macs(1, 3, 82, 192, 8, 6) == 2 * 3 * 8 * 82 * 94 * 24
    assert group_attention_macs(1, 1, 257, 192, 8, 0) == 2 * 8 * 257 * 257 * 24
    assert group_attention_flops((2, 3, 82, 576), 8, 6) == 2 * group_attention_macs(2, 3, 82, 192, 8, 6)


def test_flop_counter_matches_reference():
    from torch.utils.flop_counter import FlopCounterMode
    qkv = make_qkv(1, 3, 7, 2, 16).requires_grad_(True)
    counts = {}
    for backend in ("reference", "triton"):
        with FlopCounterMode(display=False) as fc:
            group_attention(qkv, 2, 2, pad_token=True, backend=backend).sum().backward()
        counts[backend] = fc.get_total_flops()
    assert counts["triton"] == counts["reference"] == 3 * 2 * group_attention_macs(1, 3, 7, 32, 2, 2)


def test_torch_compile_fullgraph():
    # On CPU only dynamo + AOTAutograd are exercised (the op is opaque under the interpreter); the GPU test below
    # runs Inductor.
    backend = "inductor" if ON_GPU else "aot_eager"
    qkv = make_qkv(1, 3, 9, 2, 16).requires_grad_(True)
    f = torch.compile(lambda x: group_attention(x, 2, 3, pad_token=True, backend="triton"), backend=backend,
                      fullgraph=True)
    out = f(qkv)
    (dq,) = torch.autograd.grad(out.square().sum(), qkv)
    x = qkv.detach().double().requires_grad_(True)
    ref = group_attention_reference(x, 2, 3, pad_token=True)
    (dref,) = torch.autograd.grad(ref.square().sum(), x)
    assert_close(out, ref.float(), what="compiled out")
    assert_close(dq, dref.float(), rtol=5e-5, what="compiled grad")


# ---------------------------------------------------------------------------------------------------------------
# GPU-only: GTPT-sized shapes
# ---------------------------------------------------------------------------------------------------------------

GPU_SHAPES = [  # (B, G, N, S): COCO-S fine L0-3, L4-5, teacher pass, WholeBody-S, coarse layer
    (4, 3, 82, 6), (4, 3, 31, 6), (2, 3, 262, 6), (2, 3, 134, 6), (4, 1, 257, 0), (3, 3, 300, 1),
]


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [16, 24, 32, 64])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=[f"B{b}G{g}N{n}S{s}" for b, g, n, s in GPU_SHAPES])
def test_gpu_fp32_gtpt_shapes(shape, head_dim):
    B, G, N, S = shape
    _check_fp32((B, G, N, 8, head_dim, S, S > 0, None, True), seed=N)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 24, 64])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=[f"B{b}G{g}N{n}S{s}" for b, g, n, s in GPU_SHAPES])
def test_gpu_half_gtpt_shapes(shape, head_dim, dtype):
    B, G, N, S = shape
    _check_half(dtype, B, G, N, 8, head_dim, S, S > 0, noncontig=True)


@pytest.mark.gpu
def test_gpu_tf32_within_budget():
    qkv = make_qkv(4, 3, 82, 8, 24)
    out = group_attention(qkv, 8, 6, pad_token=True, backend="triton", fp32_precision="tf32")
    assert max_err(out, group_attention_reference(qkv.double(), 8, 6, pad_token=True)) <= 5e-3


@pytest.mark.gpu
def test_gpu_bitwise_deterministic_large():
    qkv = make_qkv(8, 3, 262, 8, 24, dtype=torch.bfloat16)
    grad_out = torch.randn(8, 3, 262, 192, device=DEVICE, dtype=torch.bfloat16)
    o1, d1 = run(qkv, 8, 6, grad_out, "triton", pad_token=True)
    o2, d2 = run(qkv, 8, 6, grad_out, "triton", pad_token=True)
    assert torch.equal(o1, o2) and torch.equal(d1, d2)
