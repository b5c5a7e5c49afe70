"""gtpt.evaluate: SimCC decoding, flip test, back-projection, rescoring, OKS-NMS, COCO / COCO-WholeBody AP, and
predict/evaluate end to end on coco_tiny."""
import contextlib
import copy
import io
import json
import math
import os

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from torch import nn

from gtpt import build_model
from gtpt.config import get_config
from gtpt.evaluate import (STAT_NAMES, WHOLEBODY_EVAL_PARTS, coco_keypoint_eval, decode_simcc, evaluate,
                           flip_back_simcc, from_wholebody_layout, oks_matrix, oks_nms, oks_nms_indices, predict,
                           predict_crops, read_results, rescore, to_image_coords, to_wholebody_layout,
                           write_results)
from gtpt.keypoints import COCO_SIGMAS, flip_permutation, sigmas
from gtpt.transforms import (affine_points, box_to_center_scale, get_affine_transform, load_image, to_model_input,
                             warp_affine)

CROP = (192, 256)  # (W, H)
WB_FIELDS = ("keypoints", "foot_kpts", "face_kpts", "lefthand_kpts", "righthand_kpts")
# example_coco_preds.json vs person_keypoints_tiny.json (coco_tiny README; pycocotools == xtcocotools).
README_STATS = [0.8609, 0.9931, 0.9109, 0.7756, 0.9373, 0.875, 1.0, 0.9167, 0.78, 0.9429]


def _paths(root):
    return (os.path.join(root, "annotations", "person_keypoints_tiny.json"),
            os.path.join(root, "annotations", "coco_wholebody_tiny.json"))


def _wb_keypoints(ann):
    return np.concatenate([np.asarray(ann[f], dtype=np.float64) for f in WB_FIELDS]).reshape(-1, 3)


def _one_hot_logits(bins_x, bins_y, nx=384, ny=512, peak=20.0):
    x = torch.zeros(*bins_x.shape, nx)
    y = torch.zeros(*bins_y.shape, ny)
    x.scatter_(-1, bins_x[..., None], peak)
    y.scatter_(-1, bins_y[..., None], peak)
    return x, y


# ----------------------------------------------------------------------------------------------------------------
# decoding and flip

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_simcc_one_hot(dtype):
    bx = torch.tensor([[0, 101, 383], [7, 200, 50]])
    by = torch.tensor([[511, 3, 256], [0, 9, 400]])
    x, y = _one_hot_logits(bx, by)
    y[1, 2] *= 0.5  # a flatter y distribution: the confidence is the smaller maximum
    coords, conf = decode_simcc(x.to(dtype), y.to(dtype))
    assert coords.dtype == conf.dtype == torch.float32 and coords.shape == (2, 3, 2) and conf.shape == (2, 3)
    torch.testing.assert_close(coords, torch.stack((bx, by), -1).float() / 2)
    px = math.exp(20) / (math.exp(20) + 383)
    py = math.exp(20) / (math.exp(20) + 511)
    expect = torch.full((2, 3), min(px, py))
    expect[1, 2] = math.exp(10) / (math.exp(10) + 511)
    torch.testing.assert_close(conf, expect, rtol=2e-3, atol=1e-6)
    with pytest.raises(ValueError, match="logits"):
        decode_simcc(x, y[:, :2])


def _gaussian_logits(centers, bins):
    b = torch.arange(bins, dtype=torch.float64)
    return -((b - centers[..., None].double()) ** 2) / 8.0


def test_flip_back_reproduces_ideal_logits_with_one_bin_shift():
    # "Ideal" logits peak at 2x for a joint at crop pixel x. In the flipped crop joint k sits at pixel 191 - x,
    # i.e. bin 382 - 2x, under the mirrored name perm[k]; the y bins do not move.
    g = torch.Generator().manual_seed(0)
    perm = flip_permutation(17)
    cx = torch.randint(2, 380, (2, 17), generator=g)
    cy = torch.randint(0, 512, (2, 17), generator=g)
    x, y = _gaussian_logits(cx, 384), _gaussian_logits(cy, 512)
    inv = np.argsort(perm)  # perm is an involution; argsort keeps the construction explicit
    xf, yf = _gaussian_logits((382 - cx)[:, inv], 384), y[:, inv]
    xb, yb = flip_back_simcc(xf, yf, perm)
    torch.testing.assert_close(yb, y, rtol=0, atol=0)
    torch.testing.assert_close(xb[..., :-1], x[..., :-1], rtol=0, atol=0)  # the last bin keeps its own value
    # Without the shift the reversed logits sit one bin to the right.
    unshifted = xf.flip(-1)[:, torch.as_tensor(perm)]
    torch.testing.assert_close(unshifted[..., 1:], x[..., :-1], rtol=0, atol=0)
    assert xf.data_ptr() != xb.data_ptr() and torch.equal(xf, _gaussian_logits((382 - cx)[:, inv], 384))


class _EquivariantFake(nn.Module):
    """A flip-equivariant stand-in for GTPT: finds the brightest pixel (xs, ys) of channel 0 and puts joint k at
    (xs + d_k, ys + e_k) with d = +4 for left joints, -4 for right ones, 0 for the nose, e symmetric. One-hot
    logits, so an average of two disagreeing passes would show as a lower confidence."""

    def __init__(self):
        super().__init__()
        self.cfg = get_config("gtpt-t")
        k = torch.arange(17)
        self.register_buffer("d", torch.where(k == 0, 0, torch.where(k % 2 == 1, 4, -4)))
        self.register_buffer("e", (k + 1) // 2)
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        idx = images[:, 0].flatten(1).argmax(1)
        ys, xs = idx // images.shape[3], idx % images.shape[3]
        return _one_hot_logits(2 * (xs[:, None] + self.d), 2 * (ys[:, None] + self.e), peak=10.0)


def test_predict_crops_flip_test_is_exact_for_an_equivariant_model():
    spots = [(20, 30), (150, 200), (96, 128)]
    images = torch.zeros(len(spots), 3, 256, 192)
    for i, (x, y) in enumerate(spots):
        images[i, 0, y, x] = 5.0
    fake = _EquivariantFake().eval()
    expect = np.array([[[x + d, y + e] for d, e in zip(fake.d.tolist(), fake.e.tolist())] for x, y in spots])
    c1, p1 = predict_crops(fake, images, flip_test=False)
    c2, p2 = predict_crops(fake, images, flip_test=True)
    np.testing.assert_array_equal(c1, expect)
    np.testing.assert_array_equal(c2, expect)
    # Both passes agree bin for bin (reverse + swap + shift), so the averaged logits are the single-pass ones.
    np.testing.assert_allclose(p2, p1, rtol=1e-6)
    np.testing.assert_allclose(p1, math.exp(10) / (math.exp(10) + 511), rtol=1e-5)  # min(max p_x, max p_y)
    assert fake.calls == 2  # one forward each: the flipped crops share the batch
    with pytest.raises(ValueError, match="eval"):
        predict_crops(fake.train(), images)


@pytest.mark.parametrize("rot", [0.0, 30.0])
def test_to_image_coords_inverts_the_crop_transform(rot):
    rng = np.random.default_rng(1)
    boxes = [[100, 50, 60, 120], [10, 300, 200, 90]]
    cs = [box_to_center_scale(b) for b in boxes]
    pts = rng.uniform(0, 400, (2, 17, 2))
    crop = np.stack([affine_points(p, get_affine_transform(c, s, rot, CROP)) for p, (c, s) in zip(pts, cs)])
    center, scale = np.stack([c for c, _ in cs]), np.stack([s for _, s in cs])
    np.testing.assert_allclose(to_image_coords(crop, center, scale, rot, CROP), pts, atol=1e-9)
    np.testing.assert_allclose(to_image_coords(torch.from_numpy(crop[1]), center[1], scale[1], rot, CROP), pts[1],
                               atol=1e-9)
    with pytest.raises(ValueError, match="centers"):
        to_image_coords(crop, center[:1], scale[:1])


def test_gt_through_simcc_quantisation_scores_ap_one(coco_tiny):
    """GT joints -> crop pixels -> one-hot SimCC logits -> decode -> image pixels: within the quantisation error
    (half a bin = 0.25 crop px), so the COCO AP of the round trip is 1."""
    body, _ = _paths(coco_tiny)
    gt = json.load(open(body))
    anns = [a for a in gt["annotations"] if a["num_keypoints"] > 0]
    cs = [box_to_center_scale(a["bbox"]) for a in anns]
    kp = np.array([np.asarray(a["keypoints"], dtype=np.float64).reshape(17, 3) for a in anns])
    crop = np.stack([affine_points(k[:, :2], get_affine_transform(c, s, 0.0, CROP)) for k, (c, s) in zip(kp, cs)])
    bins = torch.from_numpy(np.clip(np.round(crop * 2), 0, [383, 511]).astype(np.int64))
    coords, conf = decode_simcc(*_one_hot_logits(bins[..., 0], bins[..., 1]))
    center, scale = np.stack([c for c, _ in cs]), np.stack([s for _, s in cs])
    xy = to_image_coords(coords, center, scale, 0.0, CROP)
    vis = kp[..., 2] > 0
    px_per_crop_px = scale[:, 0] * 200 / 192
    assert (np.abs(xy - kp[..., :2]).max(-1) <= 0.25 * px_per_crop_px[:, None] + 1e-9)[vis].all()
    results = [{"image_id": a["image_id"], "category_id": 1, "score": 1.0,
                "keypoints": np.concatenate([p, c[:, None]], 1).ravel().tolist()}
               for a, p, c in zip(anns, xy, conf.numpy())]
    assert coco_keypoint_eval(results, body)["AP"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------------------
# rescoring and OKS-NMS

def test_rescore_mean_of_confident_joints_times_box_score():
    conf = np.array([[0.5, 0.005, 0.9, 0.01], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(rescore(conf, [0.8, 0.9]), [0.8 * (0.5 + 0.9) / 2, 0.0])


def _official_oks_nms(kpts, scores, areas, thresh, sig):
    """A literal loop transcription of the official lib/nms/nms.py (oks_iou with in_vis_thre=None)."""
    var = (sig * 2) ** 2
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        ious = np.zeros(order.size - 1)
        for n, j in enumerate(order[1:]):
            dx = kpts[j, :, 0] - kpts[i, :, 0]
            dy = kpts[j, :, 1] - kpts[i, :, 1]
            e = (dx ** 2 + dy ** 2) / var / ((areas[i] + areas[j]) / 2 + np.spacing(1)) / 2
            ious[n] = np.sum(np.exp(-e)) / e.shape[0]
        order = order[np.where(ious <= thresh)[0] + 1]
    return keep


@pytest.mark.parametrize("k", [17, 133])
def test_oks_nms_matches_the_official_loop(k):
    rng = np.random.default_rng(k)
    for trial in range(20):
        people = rng.uniform(0, 400, (4, 1, 2)) + rng.normal(0, 30, (4, k, 2))
        # Near-duplicates of random people at several noise levels, so OKS spans the threshold.
        src = rng.integers(0, 4, 12)
        kp = people[src] + rng.normal(0, 1, (12, 1, 1)) ** 2 * rng.normal(0, 3, (12, k, 2))
        kp = np.concatenate([kp, rng.uniform(0, 1, (12, k, 1))], -1)
        scores, areas = rng.uniform(0, 1, 12), rng.uniform(2000, 30000, 12)
        thr = [0.5, 0.9][trial % 2]
        assert oks_nms_indices(kp, scores, areas, thr) == _official_oks_nms(kp, scores, areas, thr, sigmas(k))


def test_oks_nms_removes_duplicates_keeps_distinct_people_per_image():
    rng = np.random.default_rng(3)
    a, b = rng.uniform(100, 300, (2, 17, 2))

    def res(image_id, xy, score):
        kp = np.concatenate([xy, np.ones((17, 1))], 1)
        return {"image_id": image_id, "keypoints": kp.ravel().tolist(), "score": score, "area": 20000.0}

    results = [res(1, a, 0.6), res(1, a + 0.5, 0.9), res(1, b, 0.5), res(2, a, 0.1), res(2, a, 0.2)]
    kept = oks_nms(results, 0.9)
    assert [(r["image_id"], r["score"]) for r in kept] == [(1, 0.9), (1, 0.5), (2, 0.2)]
    assert oks_matrix(np.stack([a, a + 0.5]), np.array([2e4, 2e4]), COCO_SIGMAS)[0, 1] > 0.9
    assert oks_nms([], 0.9) == [] and oks_nms_indices(np.zeros((0, 17, 3)), [], []) == []


# ----------------------------------------------------------------------------------------------------------------
# COCO evaluation

def test_reference_stats_for_example_predictions(coco_tiny):
    body, _ = _paths(coco_tiny)
    preds = json.load(open(os.path.join(coco_tiny, "results", "example_coco_preds.json")))
    before = copy.deepcopy(preds)
    stats = coco_keypoint_eval(preds, body)
    assert list(stats) == list(STAT_NAMES)
    np.testing.assert_allclose([stats[n] for n in STAT_NAMES], README_STATS, atol=5e-5)
    assert preds == before  # results are not modified
    # The same through a COCO object, twice (the evaluation must not leave state behind).
    gt = COCO()
    gt.dataset = json.load(open(body))
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    for _ in range(2):
        np.testing.assert_allclose([coco_keypoint_eval(preds, gt)[n] for n in STAT_NAMES], README_STATS, atol=5e-5)


def _gt_as_predictions(path, num_keypoints, confidence="visibility"):
    gt = json.load(open(path))
    out = []
    for a in gt["annotations"]:
        if a["num_keypoints"] == 0:
            continue
        kp = _wb_keypoints(a) if num_keypoints == 133 else np.asarray(a["keypoints"], np.float64).reshape(-1, 3)
        kp[:, 2] = (kp[:, 2] > 0) if confidence == "visibility" else 1.0
        out.append({"image_id": a["image_id"], "category_id": 1, "keypoints": kp.ravel().tolist(), "score": 1.0})
    return out


def test_gt_as_predictions_scores_ap_one(coco_tiny):
    body, _ = _paths(coco_tiny)
    stats = coco_keypoint_eval(_gt_as_predictions(body, 17), body)
    assert stats["AP"] == pytest.approx(1.0) and stats["AR"] == pytest.approx(1.0)


def test_wholebody_gt_as_predictions_scores_ap_one_per_part(coco_tiny):
    """Every part has labelled instances in coco_tiny, so each of the 6 evaluations is 1.0 when a prediction's
    part confidences are the GT visibilities (a part with no labelled joint is then dropped, as xtcocotools
    drops detections without a positive part confidence). With confidence 1 everywhere, the part copies of
    people without labels in that part (keypoints at 0, 0, far outside their box) become false positives."""
    _, wb = _paths(coco_tiny)
    metrics = coco_keypoint_eval(_gt_as_predictions(wb, 133), wb, 133)
    assert list(metrics) == list(WHOLEBODY_EVAL_PARTS)
    for part, stats in metrics.items():
        assert stats["AP"] == pytest.approx(1.0), part
        assert stats["AR"] == pytest.approx(1.0), part
    ones = coco_keypoint_eval(_gt_as_predictions(wb, 133, "ones"), wb, 133)
    assert ones["body"]["AP"] == ones["wholebody"]["AP"] == pytest.approx(1.0)
    assert all(ones[p]["AP"] < 0.9 for p in ("foot", "face", "lefthand", "righthand"))


def perturbed_wholebody_predictions(wb_path):
    """Deterministic noisy predictions for every coco_tiny WholeBody person (3 noise levels, unlabelled joints
    scattered in the box, some zero confidences), plus one copy whose face and hands all have confidence 0."""
    gt = json.load(open(wb_path))
    j = np.arange(133)
    frac = lambda v: v - np.floor(v)  # noqa: E731
    out = []
    for n, a in enumerate(gt["annotations"]):
        kp = _wb_keypoints(a)
        x, y, w, h = a["bbox"]
        for rep, s in enumerate((2.0, 5.0, 12.0)):
            p = kp.copy()
            lab = p[:, 2] > 0
            p[~lab, 0] = x + w * frac(j * 0.618 + rep * 0.3)[~lab]
            p[~lab, 1] = y + h * frac(j * 0.382 + rep * 0.7)[~lab]
            p[:, 0] += s * np.sin(j * 1.3 + rep + n)
            p[:, 1] += s * np.cos(j * 0.7 + rep * 2 + n)
            p[:, 2] = 0.05 + 0.9 * frac(j * 0.754877 + rep * 0.1 + n * 0.3)
            if rep == 2:
                p[j % 3 == 0, 2] = 0.0
            out.append({"image_id": a["image_id"], "category_id": 1, "keypoints": p.ravel().tolist(),
                        "score": float(0.2 + 0.8 * frac((3 * n + rep) * 0.618034))})
    p = np.asarray(out[0]["keypoints"]).reshape(-1, 3)
    p[23:, 2] = 0.0
    out.append({"image_id": out[0]["image_id"], "category_id": 1, "keypoints": p.ravel().tolist(), "score": 0.99})
    return out


# xtcocotools 1.14.3 (numpy 1.26.4) on perturbed_wholebody_predictions, run as mmpose's CocoWholeBodyMetric does
# (results split into keypoints / foot_kpts / face_kpts / lefthand_kpts / righthand_kpts, use_area=True).
# A stat of -1 means no GT of that part in the area range (no medium-sized face here). Dropping detections without
# a positive part confidence changes face/hands; a part-extent detection area changes all but body.
XTCOCOTOOLS_STATS = {
    "body": [0.7092, 0.9274, 0.6899, 0.7366, 0.7917, 0.975, 1.0, 1.0, 0.94, 1.0],
    "foot": [0.8276, 0.8998, 0.8618, 0.9365, 0.8833, 1.0, 1.0, 1.0, 1.0, 1.0],
    "face": [0.2887, 0.7294, 0.0798, -1.0, 0.2936, 0.575, 1.0, 0.5, -1.0, 0.575],
    "lefthand": [0.3246, 0.4696, 0.2588, 0.1, 0.555, 0.84, 1.0, 0.8, 0.5, 0.925],
    "righthand": [0.3508, 0.5156, 0.26, 0.3, 0.3823, 0.94, 1.0, 1.0, 0.9, 0.95],
    "wholebody": [0.4963, 0.6524, 0.5581, 0.5767, 0.5505, 0.8583, 1.0, 0.9167, 0.9, 0.8286],
}


def test_wholebody_matches_xtcocotools_on_perturbed_predictions(coco_tiny):
    _, wb = _paths(coco_tiny)
    metrics = coco_keypoint_eval(perturbed_wholebody_predictions(wb), wb, 133)
    for part, expect in XTCOCOTOOLS_STATS.items():
        np.testing.assert_allclose([metrics[part][n] for n in STAT_NAMES], expect, atol=5e-5, err_msg=part)


def test_wholebody_results_file_uses_the_coco_wholebody_layout(coco_tiny, tmp_path):
    # Written files follow the official / mmpose / xtcocotools layout (keypoints = 17 body joints, then foot_kpts,
    # face_kpts, lefthand_kpts, righthand_kpts); both layouts read back and score the same.
    _, wb = _paths(coco_tiny)
    preds = perturbed_wholebody_predictions(wb)
    path = tmp_path / "wb.json"
    write_results(preds, path)
    rows = json.load(open(path))
    sizes = {f: len(rows[0][f]) for f in ("keypoints", "foot_kpts", "face_kpts", "lefthand_kpts", "righthand_kpts")}
    assert sizes == {"keypoints": 51, "foot_kpts": 18, "face_kpts": 204, "lefthand_kpts": 63, "righthand_kpts": 63}
    assert rows[0]["foot_kpts"][:3] == preds[0]["keypoints"][51:54]
    assert rows[0]["righthand_kpts"][-3:] == preds[0]["keypoints"][-3:]
    assert read_results(path) == preds
    split = coco_keypoint_eval(rows, wb, 133)
    flat = coco_keypoint_eval(preds, wb, 133)
    assert split == flat
    assert to_wholebody_layout(rows[0]) == rows[0] and from_wholebody_layout(preds[0]) == preds[0]
    broken = dict(rows[0])
    del broken["face_kpts"]
    with pytest.raises(ValueError, match="lacks \\['face_kpts'\\]"):
        from_wholebody_layout(broken)
    with pytest.raises(ValueError, match="foot_kpts has 15 values, expected 3 x 6"):
        from_wholebody_layout(dict(rows[0], foot_kpts=rows[0]["foot_kpts"][:15]))
    # 17-keypoint results are written as they are
    write_results([{"image_id": 1, "keypoints": [0.0] * 51, "score": 1.0}], tmp_path / "body.json")
    assert json.load(open(tmp_path / "body.json")) == [{"image_id": 1, "keypoints": [0.0] * 51, "score": 1.0}]


def test_read_results_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="results file not found"):
        read_results(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"image_id": 1, "keypoints": [')
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        read_results(bad)
    bad.write_text('{"image_id": 1}')
    with pytest.raises(ValueError, match="expected a JSON list of results"):
        read_results(bad)


def test_noisier_predictions_score_lower(coco_tiny):
    body, _ = _paths(coco_tiny)
    rng = np.random.default_rng(0)
    aps = []
    for noise in (0.0, 3.0, 10.0):
        preds = _gt_as_predictions(body, 17)
        for p in preds:
            kp = np.asarray(p["keypoints"]).reshape(-1, 3)
            kp[:, :2] += rng.normal(0, noise, (17, 2))
            p["keypoints"] = kp.ravel().tolist()
        aps.append(coco_keypoint_eval(preds, body)["AP"])
    assert aps[0] == pytest.approx(1.0) and aps[0] > aps[1] > aps[2]


def test_invalid_and_empty_results(coco_tiny):
    body, wb = _paths(coco_tiny)
    good = _gt_as_predictions(body, 17)[0]
    with pytest.raises(ValueError, match="keypoints has 48 values"):
        coco_keypoint_eval([dict(good, keypoints=good["keypoints"][:48])], body)
    with pytest.raises(ValueError, match="NaN"):
        coco_keypoint_eval([dict(good, keypoints=[float("nan")] + good["keypoints"][1:])], body)
    with pytest.raises(ValueError, match="NaN"):
        coco_keypoint_eval([dict(good, score=float("inf"))], body)
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_keypoint_eval([dict(good, image_id=123456789)], body)
    with pytest.raises(ValueError, match="needs image_id"):
        coco_keypoint_eval([{"image_id": good["image_id"], "keypoints": good["keypoints"]}], body)
    with pytest.raises(ValueError, match="17 or 133"):
        coco_keypoint_eval([good], body, 21)
    with pytest.raises(ValueError, match="COCO-WholeBody"):
        coco_keypoint_eval(_gt_as_predictions(wb, 133)[:1], body, 133)
    with pytest.raises(FileNotFoundError):
        coco_keypoint_eval([good], os.path.join(coco_tiny, "missing.json"))
    with pytest.warns(RuntimeWarning, match="no keypoint results"):
        assert coco_keypoint_eval([], body) == {n: 0.0 for n in STAT_NAMES}
    with pytest.warns(RuntimeWarning):
        empty = coco_keypoint_eval([], wb, 133)
    assert list(empty) == list(WHOLEBODY_EVAL_PARTS) and all(v["AP"] == 0.0 for v in empty.values())


def test_eval_is_silent_unless_verbose(coco_tiny, capsys):
    body, _ = _paths(coco_tiny)
    preds = _gt_as_predictions(body, 17)
    coco_keypoint_eval(preds, body)
    assert capsys.readouterr().out == ""
    coco_keypoint_eval(preds, body, verbose=True)
    assert "Average Precision" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# predict / evaluate end to end (random weights: AP ~ 0, the checks are on the pipeline and the format)

class _GtBoxDataset(torch.utils.data.Dataset):
    """Minimal stand-in for gtpt.data.TopDownDataset at test time: GT boxes of people with keypoints, cropped
    with gtpt.transforms; items follow the same dict contract."""

    def __init__(self, ann_file, image_root, num_keypoints):
        self.coco = COCO()
        self.coco.dataset = json.load(open(ann_file))
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()
        self.num_keypoints = num_keypoints
        self.items = []
        for a in self.coco.dataset["annotations"]:
            if a["num_keypoints"] == 0:
                continue
            info = self.coco.imgs[a["image_id"]]
            c, s = box_to_center_scale(a["bbox"])
            crop = warp_affine(load_image(os.path.join(image_root, info["file_name"])),
                               get_affine_transform(c, s, 0.0, CROP), CROP)
            self.items.append({"image": to_model_input(crop), "center": c, "scale": s, "rotation": 0.0,
                               "score": 1.0, "area": float(a["area"]), "image_id": a["image_id"],
                               "index": len(self.items)})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.fixture(scope="module")
def gtpt_t():
    torch.manual_seed(0)
    return build_model("gtpt-t", backend="reference").eval()


def _check_results_format(results, k, coco):
    assert results, "no results"
    for r in results:
        assert set(r) >= {"image_id", "category_id", "keypoints", "score", "center", "scale", "area"}
        assert r["image_id"] in coco.imgs and r["category_id"] == 1
        kp = np.asarray(r["keypoints"]).reshape(k, 3)
        assert np.isfinite(kp).all() and ((kp[:, 2] > 0) & (kp[:, 2] <= 1)).all()
        info = coco.imgs[r["image_id"]]
        half = np.asarray(r["scale"]) * 100 + 1  # inside the padded crop box
        assert (np.abs(kp[:, :2] - np.asarray(r["center"])) <= half).all()
        assert 0 <= r["score"] <= 1 and info["width"] > 0
    json.dumps(results)


def test_predict_and_evaluate_end_to_end(coco_tiny, gtpt_t, tmp_path, one_thread):
    body, _ = _paths(coco_tiny)
    ds = _GtBoxDataset(body, os.path.join(coco_tiny, "images"), 17)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)
    gtpt_t.train()
    raw = predict(gtpt_t, loader, flip_test=True, nms_threshold=None)
    assert gtpt_t.training  # mode restored
    gtpt_t.eval()
    assert len(raw) == len(ds) == 12
    _check_results_format(raw, 17, ds.coco)
    # Rescoring: box score 1 x mean confidence of joints above 0.01, 0 when none is (random weights give
    # near-uniform SimCC probabilities, ~1/384, so which case occurs depends on the initialisation).
    for r in raw:
        kp = np.asarray(r["keypoints"]).reshape(17, 3)
        confident = kp[:, 2] > 0.01
        assert r["score"] == pytest.approx(kp[confident, 2].mean() if confident.any() else 0.0)
    assert raw[0]["area"] == pytest.approx(np.prod(np.asarray(raw[0]["scale"]) * 200))
    nmsed = predict(gtpt_t, loader, flip_test=False)
    assert 1 <= len(nmsed) <= 12
    out = tmp_path / "sub" / "results.json"
    metrics = evaluate(gtpt_t, ds, batch_size=8, flip_test=True, results_file=out)
    assert list(metrics) == list(STAT_NAMES)
    assert all(-1 <= v <= 1 for v in metrics.values())
    saved = json.load(open(out))
    assert saved == json.loads(json.dumps(oks_nms(raw, 0.9)))
    assert not [f for f in os.listdir(out.parent) if f.startswith(".tmp")]
    with pytest.raises(ValueError, match="keypoints"):
        evaluate(build_model("gtpt-t-wholebody", backend="reference"), ds)


def test_predict_crops_under_autocast(gtpt_t, one_thread):
    x = torch.randn(2, 3, 256, 192, generator=torch.Generator().manual_seed(0))
    c32, p32 = predict_crops(gtpt_t, x)
    c16, p16 = predict_crops(gtpt_t, x, amp_dtype=torch.bfloat16)
    assert c16.dtype == p16.dtype == np.float64 and c16.shape == (2, 17, 2) and np.isfinite(p16).all()
    np.testing.assert_allclose(p16, p32, atol=0.05)


def test_predict_wholebody_end_to_end(coco_tiny, one_thread):
    _, wb = _paths(coco_tiny)
    ds = _GtBoxDataset(wb, os.path.join(coco_tiny, "images"), 133)
    ds.items = ds.items[:4]
    torch.manual_seed(0)
    model = build_model("gtpt-t-wholebody", backend="reference").eval()
    results = predict(model, torch.utils.data.DataLoader(ds, batch_size=4), flip_test=True)
    _check_results_format(results, 133, ds.coco)
    metrics = coco_keypoint_eval(results, ds.coco, 133)
    assert list(metrics) == list(WHOLEBODY_EVAL_PARTS)
    assert all(-1 <= v <= 1 for stats in metrics.values() for v in stats.values())


def test_evaluate_through_gtpt_data(coco_tiny, gtpt_t, tmp_path, one_thread):
    data = pytest.importorskip("gtpt.data")
    body, _ = _paths(coco_tiny)
    images = os.path.join(coco_tiny, "images")
    ds = data.TopDownDataset(body, images, num_keypoints=17, train=False)
    assert len(ds) == 12
    # Crops made here from the dataset's own center/scale give the same predictions: the contract (center, scale
    # in pixel_std units of the crop actually used) is what predict back-projects with.
    ref = _GtBoxDataset(body, images, 17)
    for item, rec in zip(ref.items, ds.records):
        c, s = rec.center.copy(), rec.scale.copy()
        crop = warp_affine(load_image(rec.image_file), get_affine_transform(c, s, 0.0, CROP), CROP)
        item.update(image=to_model_input(crop), center=c, scale=s, image_id=rec.image_id)
    a = predict(gtpt_t, torch.utils.data.DataLoader(ds, batch_size=6), flip_test=False, nms_threshold=None)
    b = predict(gtpt_t, torch.utils.data.DataLoader(ref, batch_size=6), flip_test=False, nms_threshold=None)
    assert [r["image_id"] for r in a] == [r["image_id"] for r in b]
    for ra, rb in zip(a, b):
        np.testing.assert_allclose(ra["keypoints"], rb["keypoints"], rtol=1e-6, atol=1e-6)
    # Detection boxes (the official test input), end to end with a results file.
    dets = os.path.join(coco_tiny, "person_detection_results", "COCO_tiny_detections_AP_H_56_person.json")
    det_ds = data.TopDownDataset(body, images, num_keypoints=17, detections=dets, det_score_threshold=0.5)
    out = tmp_path / "det_results.json"
    metrics = evaluate(gtpt_t, det_ds, batch_size=16, flip_test=True, results_file=out)
    assert list(metrics) == list(STAT_NAMES) and all(-1 <= v <= 1 for v in metrics.values())
    saved = json.load(open(out))
    assert 1 <= len(saved) <= len(det_ds)
    _check_results_format(saved, 17, ds.coco)
