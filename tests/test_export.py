"""gtpt.export: ONNX and .pt2 (AOTInductor) exports against the eager model, the exportable top-k's tie rule,
PoseEstimator runtimes and ``gtpt export`` errors.

Exports are module-scoped and shared (one per variant and format, run at batch 1 and 3 on its dynamic batch axis;
the gtpt-t ONNX file is written once, by ``gtpt export``, and serves the CLI, runner and PoseEstimator tests).
Cost on the 2-core CPU (measured, CPU seconds): an opset-17 ONNX export ~8 s per variant, the dynamo exporter
(opset 18) ~65 s, an AOTInductor CPU compile ~170 s (gtpt-t). The default run keeps one export per default path:
opset-17 ONNX of the variants that cover distinct code (gtpt-t: one-stage stem + body pruning; gtpt-b-wholebody:
U-shaped stem + WholeBody grouping), the gtpt-t ``.pt2``, the tie-rule export, the one-line errors. The rest
(the other four ONNX variants, every dynamo-exporter case, the other five ``.pt2``) are marked ``slow`` and skip
unless ``GTPT_TEST_ALL_EXPORTS=1`` (or the older ``GTPT_TEST_ALL_PT2=1``) is set.
"""
import os
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

import gtpt
from gtpt.cli import main
from gtpt.config import list_variants
from gtpt.evaluate import decode_simcc
from gtpt.export import (DECODED_NAMES, OUTPUT_NAMES, ExportedRunner, export_onnx, export_pt2, load_onnx_session,
                         load_pt2, read_metadata)
from gtpt_kernels.reference import topk_indices_exportable, topk_indices_reference
from gtpt_kernels.testing import assert_close

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

RTOL = 1e-4  # the bar: exported outputs within 1e-4 relative of eager
ALL_EXPORTS = any(os.environ.get(k, "0") not in ("", "0") for k in ("GTPT_TEST_ALL_EXPORTS", "GTPT_TEST_ALL_PT2"))
ONNX_DEFAULT = ("gtpt-t", "gtpt-b-wholebody")  # one-stage stem + body pruning; U-shaped stem + WholeBody groups
PT2_DEFAULT = ("gtpt-t",)
IMAGE = "000000040083.jpg"
BOXES = np.array([[30.0, 20.0, 120.0, 280.0], [260.0, 60.0, 150.0, 240.0]])


def _slow(reason):
    """Marks of a case that runs only with ``GTPT_TEST_ALL_EXPORTS=1`` (see the module docstring)."""
    if ALL_EXPORTS:
        return [pytest.mark.slow]
    return [pytest.mark.slow, pytest.mark.skip(reason=f"{reason}; set GTPT_TEST_ALL_EXPORTS=1 to run it")]


def _stable(scores, keep):
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :keep]


def _tied_scores(seed, shape, dtype=torch.float32):
    """Scores with many exact ties, signed zeros, -inf (masked columns) and NaN."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(-3, 3, shape, generator=g).to(dtype)
    s[s == -3] = float("-inf")
    s[s == 2] = float("nan") if seed % 2 else 2.0
    zero = s == 0
    s[zero] = torch.where(torch.rand(int(zero.sum()), generator=g) < 0.5, -0.0, 0.0).to(dtype)
    return s


# ----------------------------------------------------------------------------------------------------------------
# the exportable top-k

def test_exportable_topk_equals_the_stable_sort_on_exact_ties():
    for dtype in (torch.float32, torch.float64):
        for n in (1, 2, 7, 76, 179, 256):
            for seed in range(12):
                s = _tied_scores(seed, (2, 3, n), dtype)
                for keep in sorted({1, max(1, n // 2), n}):
                    assert torch.equal(topk_indices_exportable(s, keep), _stable(s, keep)), (dtype, n, seed, keep)
    s = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    assert topk_indices_exportable(s, 4).tolist() == [[1, 2, 4, 3]]
    # all scores equal: index order (the case a plain topk gets wrong most often)
    assert topk_indices_exportable(torch.zeros(1, 256), 179).tolist() == [list(range(179))]


class _TopK(nn.Module):
    def __init__(self, keep):
        super().__init__()
        self.keep = keep

    def forward(self, scores):
        return topk_indices_reference(scores, self.keep)


@pytest.mark.parametrize("opset", [17, pytest.param(18, marks=_slow("dynamo exporter, ~10 s"))])
def test_onnx_topk_keeps_the_tie_rule(tmp_path, opset):
    """The exported ranking (TopK + CumSum + TopK + GatherElements in the graph) on inputs full of exact ties,
    run by ONNX Runtime, equals eager's stable sort; both exporters."""
    import onnx

    path = tmp_path / "topk.onnx"
    example = _tied_scores(0, (4, 256))
    kw = dict(input_names=["scores"], output_names=["index"], opset_version=opset)
    if opset == 17:
        torch.onnx.export(_TopK(100).eval(), (example,), str(path), dynamo=False, dynamic_axes={"scores": {0: "n"}},
                          **kw)
    else:
        torch.onnx.export(_TopK(100).eval(), (example,), str(path), dynamo=True,
                          dynamic_shapes={"scores": {0: torch.export.Dim("n", max=64)}}, **kw)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "TopK" in ops and not ops & {"Sort"}, ops
    sess = load_onnx_session(path, threads=1)
    for seed in range(1, 9):
        s = _tied_scores(seed, (5, 256))
        got = sess.run(None, {"scores": s.numpy()})[0]
        np.testing.assert_array_equal(got, _stable(s, 100).numpy())


# ----------------------------------------------------------------------------------------------------------------
# exports of every variant

@pytest.fixture(scope="module")
def models():
    """One seeded random-weight model per variant (reference ops, eval, heads scaled up), shared here."""
    cache = {}

    def get(variant):
        if variant not in cache:
            torch.manual_seed(list_variants().index(variant))
            model = gtpt.build_model(variant, backend="reference").eval()
            with torch.no_grad():  # peaked SimCC logits, as a trained model has: an untrained head is so flat
                for head in (model.mlp_head_x, model.mlp_head_y):  # that 1e-6 noise flips its argmax
                    head[1].weight.mul_(50.0)
            cache[variant] = model
        return cache[variant]
    return get


@pytest.fixture(scope="module")
def gtpt_t_checkpoint(models, tmp_path_factory):
    """The gtpt-t test weights as a checkpoint file (EMA keys, as training writes them)."""
    path = tmp_path_factory.mktemp("ckpt") / "gtpt-t.pth"
    torch.save({f"ema_{k}": v for k, v in models("gtpt-t").state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def cli_export(gtpt_t_checkpoint, tmp_path_factory):
    """``gtpt export gtpt-t --checkpoint ... --format onnx --decode`` once: (path, return code, stdout, stderr).
    Its file is the gtpt-t ONNX export every other test uses."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("cli") / "sub" / "gtpt-t.onnx"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["export", "gtpt-t", "--checkpoint", str(gtpt_t_checkpoint), "--format", "onnx", "-o", str(out),
                   "--decode"])
    return out, rc, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def exports(models, cli_export, tmp_path_factory):
    """Exported files by (variant, kind), made on first use; the gtpt-t ONNX file comes from ``gtpt export``."""
    root = tmp_path_factory.mktemp("exports")
    cache = {}

    def get(variant, kind):
        key = (variant, kind)
        if key not in cache:
            model = models(variant)
            if kind == "onnx" and variant == "gtpt-t":
                path, rc, _, err = cli_export
                assert rc == 0, err
                cache[key] = path
            elif kind == "onnx":
                cache[key] = export_onnx(model, root / f"{variant}.onnx", decode=True)
            elif kind == "onnx18":
                cache[key] = export_onnx(model, root / f"{variant}-18.onnx", opset=18)
            else:
                cache[key] = export_pt2(model, root / f"{variant}.pt2")
        return cache[key]
    return get


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(123)
    return {b: torch.randn(b, 3, 256, 192, generator=g) for b in (1, 3)}


def _check_against_eager(model, outputs_by_batch, inputs):
    for b, outs in outputs_by_batch.items():
        with torch.no_grad():
            ex, ey = model(inputs[b])
        x, y = outs[0], outs[1]
        assert_close(x, ex, rtol=RTOL, what=f"simcc_x B={b}")
        assert_close(y, ey, rtol=RTOL, what=f"simcc_y B={b}")
        coords, conf = decode_simcc(ex, ey)
        got_coords, got_conf = decode_simcc(x, y)
        assert torch.equal(got_coords, coords), f"decoded keypoints differ from eager's at B={b}"
        assert_close(got_conf, conf, rtol=RTOL, what=f"scores B={b}")
        if len(outs) == 4:  # decoded in the graph
            assert torch.equal(outs[2], coords), f"in-graph keypoints differ from eager's at B={b}"
            assert_close(outs[3], conf, rtol=RTOL, what=f"in-graph scores B={b}")


def _onnx_params():
    return [pytest.param(v, marks=[] if v in ONNX_DEFAULT else _slow("its code paths are covered by "
                                                                    + " and ".join(ONNX_DEFAULT)))
            for v in list_variants()]


@pytest.mark.parametrize("variant", _onnx_params())
def test_onnx_export_matches_eager(variant, models, exports, inputs, one_thread):
    path = exports(variant, "onnx")
    sess = load_onnx_session(path, threads=1)
    assert [i.name for i in sess.get_inputs()] == ["images"]
    assert [o.name for o in sess.get_outputs()] == list(OUTPUT_NAMES + DECODED_NAMES)
    assert sess.get_inputs()[0].shape[1:] == [3, 256, 192] and isinstance(sess.get_inputs()[0].shape[0], str)
    meta = read_metadata(sess)
    cfg = models(variant).cfg
    assert meta["gtpt_variant"] == variant and int(meta["gtpt_num_keypoints"]) == cfg.num_keypoints
    outs = {b: [torch.from_numpy(o) for o in sess.run(None, {"images": x.numpy()})] for b, x in inputs.items()}
    _check_against_eager(models(variant), outs, inputs)


def test_onnx_graph_is_lean(exports):
    """The exported graph never reads the batch size or scatters (gtpt/export_graph.py): ~1,300 nodes for gtpt-t,
    most of them constants, against ~5,000 when the eager code was traced."""
    import onnx

    nodes = onnx.load(str(exports("gtpt-t", "onnx"))).graph.node
    ops = [n.op_type for n in nodes]
    assert len(nodes) < 1600, len(nodes)
    assert "ScatterND" not in ops and "BatchNormalization" not in ops, sorted(set(ops))
    assert ops.count("Shape") <= 10, ops.count("Shape")


@pytest.mark.slow
@pytest.mark.skipif(not ALL_EXPORTS, reason="dynamo exporter ~65 CPU-s; set GTPT_TEST_ALL_EXPORTS=1 to run it")
def test_onnx_dynamo_exporter_matches_eager(models, exports, inputs, one_thread):
    """opset >= 18 goes through the torch.export-based exporter: same outputs."""
    import onnx

    path = exports("gtpt-t", "onnx18")
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 18
    sess = load_onnx_session(path, threads=1)
    outs = {b: [torch.from_numpy(o) for o in sess.run(None, {"images": x.numpy()})] for b, x in inputs.items()}
    _check_against_eager(models("gtpt-t"), outs, inputs)


def test_onnx_export_of_a_model_with_tied_scores(models, tmp_path, inputs, one_thread):
    """Every pruning site sees all-equal scores (the queries' to_qkv rows are zero, so every logit is 0): the kept
    tokens are then chosen by the tie rule alone, and the exported graph must keep the same ones as eager. The
    model goes in in train mode on the ``auto`` backend: the export must hand it back that way."""
    model = gtpt.build_model("gtpt-t", backend="auto").train()
    model.load_state_dict(models("gtpt-t").state_dict())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, gtpt.model.Attention):
                m.to_qkv.weight[: m.to_qkv.weight.shape[0] // 3].zero_()  # q = 0: logits 0, scores all tied
    path = export_onnx(model, tmp_path / "tied.onnx")
    assert model.training and model.backend == "auto", "the export did not restore the model's mode / backend"
    model.set_backend("reference").eval()
    sess = load_onnx_session(path, threads=1)
    outs = {b: [torch.from_numpy(o) for o in sess.run(None, {"images": x.numpy()})] for b, x in inputs.items()}
    _check_against_eager(model, outs, inputs)
    # and the ties matter: a plain (unordered) topk in eager gives different outputs on this model
    import gtpt_kernels.reference as ref
    orig = ref.topk_indices_reference
    ref.topk_indices_reference = lambda s, k: torch.topk(s, k, dim=-1).indices
    try:
        with torch.no_grad():
            x_plain, _ = model(inputs[3])
    finally:
        ref.topk_indices_reference = orig
    with torch.no_grad():
        x_rule, _ = model(inputs[3])
    assert not torch.allclose(x_plain, x_rule, rtol=RTOL, atol=0), "test model has no tie-sensitive output"


def _pt2_params():
    out = []
    for v in list_variants():
        marks = [] if v in PT2_DEFAULT else _slow("AOTInductor CPU compile ~170 CPU-s per variant")
        out.append(pytest.param(v, marks=marks))
    return out


@pytest.mark.parametrize("variant", _pt2_params())
def test_pt2_export_matches_eager(variant, models, exports, inputs, one_thread):
    path = exports(variant, "pt2")
    package = load_pt2(path)
    meta = read_metadata(package)
    assert meta["gtpt_variant"] == variant and meta["AOTI_DEVICE_KEY"] == "cpu"
    outs = {b: list(package(x)) for b, x in inputs.items()}
    _check_against_eager(models(variant), outs, inputs)


@pytest.mark.gpu
def test_cuda_pt2_carries_the_triton_kernels(tmp_path):
    model = gtpt.build_model("gtpt-t", backend="triton").cuda().eval()
    path = export_pt2(model, tmp_path / "gtpt-t-cuda.pt2", device="cuda")
    with zipfile.ZipFile(path) as z:
        text = b"".join(z.read(n) for n in z.namelist() if n.endswith((".cpp", ".h", ".json", ".py")))
    for kernel in (b"_mhga_fwd_kernel", b"_prune_kernel"):
        assert kernel in text, f"{kernel.decode()} not in the package"
    package = load_pt2(path)
    for b in (1, 3):
        x = torch.randn(b, 3, 256, 192, device="cuda")
        with torch.no_grad():
            ex, ey = model(x)
        px, py = package(x)
        assert_close(px, ex, rtol=RTOL, what="simcc_x")
        assert_close(py, ey, rtol=RTOL, what="simcc_y")
        assert torch.equal(decode_simcc(px, py)[0], decode_simcc(ex, ey)[0])


def test_export_bad_arguments(models, tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_onnx("gtpt-t", tmp_path / "m.onnx", opset=16)
    with pytest.raises(ValueError, match=r"\.pt2"):
        export_pt2("gtpt-t", tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="unknown GTPT variant"):
        export_onnx("gtpt-x", tmp_path / "m.onnx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx("gtpt-t", tmp_path / "m.onnx", checkpoint=tmp_path / "missing.pth")


# ----------------------------------------------------------------------------------------------------------------
# PoseEstimator runtimes

def test_pose_estimator_runtimes_give_the_same_keypoints(models, exports, coco_tiny, one_thread):
    from gtpt.inference import PoseEstimator

    image = os.path.join(coco_tiny, "images", IMAGE)
    model = models("gtpt-t")
    # No flip test: on an untrained model the logits barely depend on the image, so averaging them with their
    # flipped-back copy makes mirror-image x bins tie exactly and 1e-6 noise picks either (measured: 1 of 68
    # coordinates moved by one bin). The flip test is the same host code for every runtime.
    ref = PoseEstimator(model, device="cpu", flip_test=False)(image, BOXES)
    for runtime, kind in (("onnxruntime", "onnx"), ("pt2", "pt2")):
        est = PoseEstimator(model, device="cpu", runtime=runtime, exported=exports("gtpt-t", kind), flip_test=False)
        kps = est(image, BOXES)
        np.testing.assert_array_equal(kps[..., :2], ref[..., :2])
        np.testing.assert_allclose(kps[..., 2], ref[..., 2], rtol=RTOL)
        assert est.model is model and not model.training
    with pytest.raises(ValueError, match="exported for gtpt-t"):
        PoseEstimator(models("gtpt-t-wholebody"), device="cpu", runtime="onnxruntime",
                      exported=exports("gtpt-t", "onnx"))
    with pytest.raises(ValueError, match="unknown runtime"):
        PoseEstimator(model, device="cpu", runtime="tensorrt")
    with pytest.raises(ValueError, match="needs a .onnx file"):
        ExportedRunner("onnxruntime", model.cfg, exports("gtpt-t", "pt2"))


def test_infer_cli_runtime(models, exports, gtpt_t_checkpoint, coco_tiny, tmp_path, capsys, one_thread):
    import json

    image = os.path.join(coco_tiny, "images", IMAGE)
    onnx_file = exports("gtpt-t", "onnx")
    results = {}
    for runtime in ("onnxruntime", "torch"):
        out = tmp_path / f"{runtime}.json"
        argv = ["infer", image, "--box", "30,20,120,280", "--variant", "gtpt-t", "-o", str(out), "--device", "cpu",
                "--backend", "reference", "--no-nms", "--no-flip"]
        if runtime == "torch":  # the eager model with the same weights, from a checkpoint file
            argv += ["--checkpoint", str(gtpt_t_checkpoint)]
        else:
            argv += ["--runtime", runtime, "--exported", str(onnx_file)]
        assert main(argv) == 0, capsys.readouterr().err
        results[runtime] = json.loads(out.read_text())
    a, b = results["onnxruntime"][0]["keypoints"], results["torch"][0]["keypoints"]
    np.testing.assert_allclose(a, b, rtol=RTOL)
    assert main(["infer", image, "-o", str(tmp_path / "x.json"), "--runtime", "pt2",
                 "--exported", str(tmp_path / "missing.pt2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gtpt infer: error:") and "missing.pt2" in err[-1]


# ----------------------------------------------------------------------------------------------------------------
# gtpt export

def _run(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors
        rc = e.code
    return rc, capsys.readouterr()


def test_export_cli_writes_an_onnx_file(cli_export, models):
    """The shared gtpt-t file came from ``gtpt export`` (into a folder it had to create), with the checkpoint's
    weights: its outputs equal the eager model's (checked in test_onnx_export_matches_eager[gtpt-t])."""
    out, rc, stdout, stderr = cli_export
    assert rc == 0, stderr
    assert f"wrote {out}" in stdout and "warning" not in stderr
    sess = load_onnx_session(out)
    assert [o.name for o in sess.get_outputs()] == list(OUTPUT_NAMES + DECODED_NAMES)
    assert read_metadata(sess)["gtpt_variant"] == "gtpt-t"


@pytest.mark.parametrize("argv, fragment", [
    (["export", "gtpt-x", "--format", "onnx", "-o", "{tmp}/m.onnx"], "unknown GTPT variant 'gtpt-x'"),
    (["export", "gtpt-t", "--format", "tflite", "-o", "{tmp}/m.onnx"], "invalid choice: 'tflite'"),
    (["export", "gtpt-t", "--format", "onnx", "-o", "{tmp}/afile/m.onnx"], "is not writable"),
    (["export", "gtpt-t", "--format", "onnx", "-o", "{tmp}"], "is a directory"),
    (["export", "gtpt-t", "--format", "pt2", "-o", "{tmp}/m.onnx"], "must be named *.pt2"),
    (["export", "gtpt-t", "--format", "onnx", "-o", "{tmp}/m.onnx", "--opset", "13"], "--opset must be >= 17"),
    (["export", "gtpt-t", "--format", "pt2", "-o", "{tmp}/m.pt2", "--opset", "18"], "--opset applies to"),
    (["export", "gtpt-t", "--format", "onnx", "-o", "{tmp}/m.onnx", "--checkpoint", "{tmp}/no.pth"],
     "does not exist"),
    (["export", "gtpt-t", "--format", "pt2", "-o", "{tmp}/m.pt2", "--device", "tpu"], "--device must be"),
])
def test_export_cli_bad_arguments_are_one_line(argv, fragment, tmp_path, capsys, monkeypatch):
    import gtpt.export as ex

    (tmp_path / "afile").write_text("not a folder")

    def no_export(*a, **k):
        raise AssertionError("the export started before the arguments were checked")
    monkeypatch.setattr(ex, "export_onnx", no_export)
    monkeypatch.setattr(ex, "export_pt2", no_export)
    rc, cap = _run([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert rc == 2
    err = [line for line in cap.err.strip().splitlines() if "warning" not in line]
    assert len(err) == 1 and fragment in err[0], cap.err
