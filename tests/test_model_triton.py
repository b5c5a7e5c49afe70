"""The whole model on the Triton kernels (interpreter on CPU) against the same model on the reference ops.

To keep the interpreter affordable the model is a narrow GTPT (dim 32, 2 heads of 16, 16 stem channels) with
the real token schedule (256 patches, 17 / 133 keypoints, the official keep rates): every attention layer, the
three pruning sites and the WholeBody per-group paths run through the kernels.
"""
import dataclasses

import pytest
import torch

import gtpt
from gtpt.model import GTPT
from gtpt_kernels.backend import interpreter_enabled
from gtpt_kernels.testing import assert_close

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or interpreter_enabled()),
                                reason="needs a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def narrow(variant):
    cfg = dataclasses.replace(gtpt.get_config(variant), name=variant + "-narrow", dim=32, heads=2, stem_channels=16)
    torch.manual_seed(0)
    return GTPT(cfg, backend="reference").to(DEVICE)


def _loss(out):
    """A scalar that weights every SimCC logit differently, so every gradient path is exercised."""
    return sum((o.float().log_softmax(-1) * torch.linspace(-1, 1, o.shape[-1], device=o.device)).sum() for o in out)


def run(model, x, backend):
    model.set_backend(backend)
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = _loss(out)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach() for o in out], grads


def test_train_step_triton_matches_reference():
    """Both passes (pruned student, unpruned teacher) and every parameter gradient."""
    model = narrow("gtpt-t").train()
    x = torch.randn(1, 3, 256, 192, device=DEVICE)
    ref_out, ref_grads = run(model, x, "reference")
    tri_out, tri_grads = run(model, x, "triton")
    for a, b in zip(tri_out, ref_out):
        assert_close(a, b, rtol=1e-4, what="outputs")
    assert ref_grads.keys() == tri_grads.keys()
    # Every stem conv feeds a training-mode BatchNorm, so its bias has an analytic gradient of zero and both
    # backends hold only cancellation noise there (1e-3 scale after BN's large reductions): skip those.
    zero_grad = {n + ".bias" for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    floor = 1e-4 * max(float(g.abs().max()) for g in ref_grads.values())
    for name, g in ref_grads.items():
        if name in zero_grad:
            continue
        err = float((tri_grads[name] - g).abs().max())
        assert torch.isfinite(tri_grads[name]).all(), name
        assert err <= 1e-3 * max(float(g.abs().max()), floor), f"{name}: max abs error {err:.3e}"


def test_wholebody_eval_triton_matches_reference_both_paths():
    """WholeBody's per-group pruning paths (pruned) and its always-on fine-entry ranking (unpruned)."""
    model = narrow("gtpt-t-wholebody").eval()
    x = torch.randn(1, 3, 256, 192, device=DEVICE)
    for rates in (None, [1.0] * 12):
        ref = model.set_backend("reference").predict(x, rates)
        tri = model.set_backend("triton").predict(x, rates)
        for t, r in zip(tri, ref):
            assert_close(t, r, rtol=1e-4, what=f"wholebody eval keep={rates}")


def test_eval_triton_is_deterministic():
    model = narrow("gtpt-t").eval().set_backend("triton")
    x = torch.randn(1, 3, 256, 192, device=DEVICE)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("variant", ["gtpt-t", "gtpt-t-wholebody"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_model_compiles_fullgraph(variant, backend):
    """The whole model traces as one graph (no graph break anywhere: the pruning bookkeeping, the WholeBody
    per-group assembly, the op calls) and the compiled model gives the eager outputs. Dynamo with the ``eager``
    backend (no Inductor / C++ toolchain on CPU CI); on a GPU the ops are triton_ops Inductor decomposes
    (tests/test_op_tracing.py)."""
    torch._dynamo.reset()
    # The plain modules on both sides: compiling turns the fast inference path off (gtpt.fast_inference, compared
    # with the plain modules within float tolerance in tests/test_fast_inference.py), so eager must not use it.
    model = narrow(variant).eval().set_backend(backend).set_fast_inference(False)
    x = torch.randn(1, 3, 256, 192, device=DEVICE)
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, fullgraph=True, backend="eager")(x)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_train_step_compiles_fullgraph_aot():
    """A training step (student and teacher passes, backward through every custom op's autograd formula) under
    torch.compile(fullgraph=True) with AOTAutograd (``aot_eager``): same outputs and gradients as eager."""
    torch._dynamo.reset()
    model = narrow("gtpt-t").train().set_backend("triton")
    x = torch.randn(1, 3, 256, 192, device=DEVICE)
    eager_out, eager_grads = run(model, x, "triton")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    model.zero_grad(set_to_none=True)
    out = compiled(x)
    loss = _loss(out)
    loss.backward()
    for a, b in zip(out, eager_out):
        assert_close(a.detach(), b, rtol=1e-5, what="compiled outputs")
    params = dict(model.named_parameters())
    zero_grad = {n + ".bias" for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}  # see above
    for name, g in eager_grads.items():
        assert params[name].grad is not None, name
        if name not in zero_grad:
            assert_close(params[name].grad, g, rtol=1e-4, what=f"compiled grad {name}")
