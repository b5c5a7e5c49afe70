"""The lean export graph (gtpt/export_graph.py) against the eager model, in eager PyTorch (cheap; the ONNX and
.pt2 files built from it are checked in test_export.py)."""
from __future__ import annotations

import pytest
import torch

import gtpt
from gtpt import export_graph
from gtpt.config import list_variants
from gtpt.evaluate import decode_simcc
from gtpt.runtimes import trained_like_weights
from gtpt_kernels.testing import assert_close


def _model(variant: str) -> torch.nn.Module:
    torch.manual_seed(list_variants().index(variant))
    model = trained_like_weights(gtpt.build_model(variant, backend="reference")).eval()
    with torch.no_grad():  # peaked SimCC logits, as a trained model has, so that the decoded argmax is stable
        for head in (model.mlp_head_x, model.mlp_head_y):
            head[1].weight.mul_(50.0)
    return model


def _check(model: torch.nn.Module, images: torch.Tensor) -> None:
    with torch.no_grad():
        got = export_graph.export_forward(model, images)
        model.set_fast_inference(False)
        try:
            want = model(images)
        finally:
            model.set_fast_inference(True)
    for g, w, name in zip(got, want, ("simcc_x", "simcc_y")):
        assert_close(g, w, rtol=2e-5, what=name)
    assert torch.equal(decode_simcc(*got)[0], decode_simcc(*want)[0]), "decoded keypoints differ from eager's"


@pytest.mark.parametrize("variant", list_variants())
def test_export_forward_equals_eager(variant, one_thread):
    _check(_model(variant), torch.randn(2, 3, 256, 192, generator=torch.Generator().manual_seed(7)))


def test_export_forward_keeps_the_tie_rule(one_thread):
    """Every pruning site sees all-equal scores (q = 0): the kept tokens follow from the tie rule alone."""
    model = _model("gtpt-t")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, gtpt.model.Attention):
                m.to_qkv.weight[: m.to_qkv.weight.shape[0] // 3].zero_()
    _check(model, torch.randn(2, 3, 256, 192, generator=torch.Generator().manual_seed(8)))


def test_masks_equal_the_model_buffers():
    t = gtpt.build_model("gtpt-t").features.transformer
    assert t._coco_rows.tolist() == export_graph.coco_rows(3, 6)
    t = gtpt.build_model("gtpt-t-wholebody").features.transformer
    rows, cols = export_graph.wholebody_l3_masks(6, 256)
    assert t._wb_entry_rows.tolist() == export_graph.wholebody_entry_rows()
    assert t._wb_l3_rows.tolist() == rows and t._wb_l3_cols.tolist() == cols


def test_lean_graph_only_while_exporting(monkeypatch, one_thread):
    """Eager eval and training never take it; a trace does unless ``set_lean_export(False)``."""
    model = _model("gtpt-t")
    calls = []
    real = export_graph.export_forward
    monkeypatch.setattr(export_graph, "export_forward", lambda m, x: calls.append(1) or real(m, x))
    x = torch.randn(1, 3, 256, 192)
    with torch.no_grad():
        model(x)
        assert not calls
        torch.jit.trace(model, (x,), check_trace=False)
        assert len(calls) == 1
        model.set_lean_export(False)
        torch.jit.trace(model, (x,), check_trace=False)
        assert len(calls) == 1
