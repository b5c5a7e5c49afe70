"""Eager inference calls launch the kernels without the torch.library dispatcher (gtpt_kernels.backend.
direct_launch); everything that needs the registration (autograd, compile/tracing, dispatch modes, functorch)
still goes through it, and both paths give bitwise the same results."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gtpt_kernels import group_attention, softmax_pool_scores, token_prune
from gtpt_kernels.backend import DIRECT_LAUNCH_ENV_VAR, direct_launch
from gtpt_kernels.ops import token_prune as tp_mod

from conftest import DEVICE


def test_direct_launch_conditions(monkeypatch):
    x = torch.randn(3, device=DEVICE)
    w = torch.randn(3, device=DEVICE, requires_grad=True)
    assert direct_launch(x, None)
    assert not direct_launch(x, w)            # autograd needs the registered op's backward
    with torch.no_grad():
        assert direct_launch(x, w)
    with torch.inference_mode():
        assert direct_launch(x)
    with FlopCounterMode(display=False):      # a dispatch mode counts the registered op
        assert not direct_launch(x)
    assert torch.func.vmap(lambda t: torch.tensor(float(direct_launch(t))))(torch.zeros(2)).eq(0).all()
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
    assert not direct_launch(fake)            # tensor subclasses go through the dispatcher
    monkeypatch.setenv(DIRECT_LAUNCH_ENV_VAR, "0")
    assert not direct_launch(x)


def _counting(monkeypatch, owner, name):
    calls = []
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_group_attention_paths_agree(monkeypatch):
    torch.manual_seed(0)
    qkv = torch.randn(2, 3, 11, 3 * 2 * 16, device=DEVICE)
    op_calls = _counting(monkeypatch, torch.ops.gtpt, "group_attention")
    with torch.no_grad():
        direct = group_attention(qkv, 2, 6, pad_token=True, backend="triton")
        assert op_calls == []
        monkeypatch.setenv(DIRECT_LAUNCH_ENV_VAR, "0")
        via_op = group_attention(qkv, 2, 6, pad_token=True, backend="triton")
        assert op_calls == [1]
    assert torch.equal(direct, via_op)
    monkeypatch.delenv(DIRECT_LAUNCH_ENV_VAR)
    out = group_attention(qkv.requires_grad_(), 2, 6, pad_token=True, backend="triton")  # training: the op
    assert op_calls == [1, 1] and out.grad_fn is not None and torch.equal(out.detach(), direct)


def test_token_prune_paths_agree(monkeypatch):
    torch.manual_seed(0)
    B, G, H, R, N, D, C, keep = 2, 3, 2, 4, 13, 8, 16, 5
    q = torch.randn(B, G, H, R, D, device=DEVICE)
    k = torch.randn(B, G, H, N, D, device=DEVICE)
    tokens = torch.randn(B, G, N, C, device=DEVICE)
    pos = torch.randn(B, G, N, C, device=DEVICE)
    gate = torch.randn(B, G, N, C, device=DEVICE)
    prune_calls = _counting(monkeypatch, tp_mod, "_token_prune_op")
    score_calls = _counting(monkeypatch, tp_mod, "_softmax_pool_scores_op")

    def both():
        return (token_prune(q, k, tokens, pos, keep, 0.3, gate=gate, gate_logits=True, backend="triton"),
                softmax_pool_scores(q, k, 0.3, backend="triton"))
    direct = both()
    assert prune_calls == [] and score_calls == []
    monkeypatch.setenv(DIRECT_LAUNCH_ENV_VAR, "0")
    via_op = both()
    assert prune_calls == [1] and score_calls == [1]
    for a, b in zip(list(direct[0]) + [direct[1]], list(via_op[0]) + [via_op[1]]):
        assert torch.equal(a, b)
    monkeypatch.delenv(DIRECT_LAUNCH_ENV_VAR)
    out, _, _ = token_prune(q, k, tokens.requires_grad_(), pos, keep, 0.3, backend="triton")
    assert prune_calls == [1, 1] and out.grad_fn is not None


def test_direct_launch_is_named_in_profiles():
    qkv = torch.randn(1, 3, 7, 3 * 16, device=DEVICE)
    with torch.no_grad(), torch.profiler.profile() as prof:
        group_attention(qkv, 1, 6, pad_token=True, backend="triton")
    assert any(e.name == "gtpt::group_attention" for e in prof.events())


@pytest.mark.parametrize("fn", ["group_attention", "token_prune"])
def test_flop_counter_still_counts_inference(fn):
    # FlopCounterMode counts the registered ops; an inference call under it must not take the direct path.
    torch.manual_seed(0)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if fn == "group_attention":
            group_attention(torch.randn(1, 3, 7, 3 * 16, device=DEVICE), 1, 6, backend="triton")
        else:
            q, k = torch.randn(1, 1, 2, 3, 8, device=DEVICE), torch.randn(1, 1, 2, 9, 8, device=DEVICE)
            token_prune(q, k, torch.randn(1, 1, 9, 16, device=DEVICE), None, 4, 0.3, backend="triton")
    assert counter.get_total_flops() > 0


@pytest.mark.parametrize("fn", ["softmax_pool_scores", "token_prune"])
def test_prune_flops_match_reference(fn):
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 2, 4, 8, device=DEVICE), torch.randn(2, 1, 2, 9, 8, device=DEVICE)
    tokens = torch.randn(2, 1, 9, 16, device=DEVICE)
    counts = {}
    for backend in ("reference", "triton"):
        with FlopCounterMode(display=False) as counter:
            if fn == "token_prune":
                token_prune(q, k, tokens, None, 4, 0.3, backend=backend)
            else:
                softmax_pool_scores(q, k, 0.3, backend=backend)
        counts[backend] = counter.get_total_flops()
    assert counts["triton"] == counts["reference"] == 2 * 2 * 3 * 2 * 4 * 9 * 8
