"""COCO / COCO-WholeBody data pipeline (gtpt.data) on the shared coco_tiny set (used in place; crops stay in memory)
and on small annotation files written to tmp_path."""
import copy
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch

from gtpt import data as D
from gtpt.keypoints import flip_permutation
from gtpt.transforms import IMAGENET_MEAN, IMAGENET_STD, affine_points, get_affine_transform, load_image

COCO_JSON = "annotations/person_keypoints_tiny.json"
WB_JSON = "annotations/coco_wholebody_tiny.json"
DET_JSON = "person_detection_results/COCO_tiny_detections_AP_H_56_person.json"
KEYS = {"image", "target_x", "target_y", "target_weight", "center", "scale", "rotation", "score", "area", "image_id",
        "index"}
NORM = 1.0 / (4.0 * math.sqrt(2 * math.pi))  # Gaussian peak for sigma = 4 bins


def dataset(root, k=17, ann=None, **kw):
    return D.TopDownDataset(os.path.join(root, ann or (COCO_JSON if k == 17 else WB_JSON)),
                            os.path.join(root, "images"), num_keypoints=k, **kw)


def raw(root, name):
    with open(os.path.join(root, name)) as f:
        return json.load(f)


def crop_joints(rec, center=None, scale=None, rot=0.0):
    m = get_affine_transform(rec.center if center is None else center, rec.scale if scale is None else scale, rot,
                             (192, 256))
    return affine_points(rec.joints[:, :2], m)


# ----------------------------------------------------------------------------------------------------- records

def test_coco_gt_records(coco_tiny):
    ds = dataset(coco_tiny)
    anns = raw(coco_tiny, COCO_JSON)["annotations"]
    assert len(anns) == 14
    # Official rule: skip max(keypoints) == 0, here the 2 annotations with num_keypoints == 0.
    assert len(ds) == 12
    assert [r.ann_id for r in ds.records] == [a["id"] for a in anns if a["num_keypoints"] > 0]  # file order
    rec = ds.records[0]  # id 442619 in the 640 x 425 image 785, bbox [280.79, 44.73, 218.7, 346.68]
    assert rec.ann_id == 442619 and rec.image_id == 785 and rec.score == 1.0 and rec.area == pytest.approx(27789.11055)
    assert rec.box == pytest.approx((280.79, 44.73, 217.7, 345.68))  # x2 = x1 + w - 1, y2 = y1 + h - 1
    assert rec.center == pytest.approx([280.79 + 217.7 / 2, 44.73 + 345.68 / 2])
    # w < 0.75 h: w := 0.75 * 345.68 = 259.26; x 1.25 / 200.
    assert rec.scale == pytest.approx([259.26 * 1.25 / 200, 345.68 * 1.25 / 200])
    assert rec.joints.dtype == np.float32 and rec.joints.shape == (17, 3)
    kp = np.array(anns[0]["keypoints"], np.float32).reshape(17, 3)
    assert np.array_equal(rec.joints[:, :2], kp[:, :2]) and np.array_equal(rec.joints[:, 2], np.minimum(kp[:, 2], 1))
    assert os.path.isabs(rec.image_file) and os.path.isfile(rec.image_file)
    for r in (rec, pickle.loads(pickle.dumps(rec))):
        with pytest.raises(ValueError):
            r.joints[0, 0] = 1.0  # records are frozen, arrays read-only (also after pickling, for workers)
    assert len(ds.coco.getImgIds()) == 4 and len(ds.coco.getAnnIds()) == 14


def test_clean_box():
    assert D.clean_box([-10, 5, 50, 500], 100, 200) == (0.0, 5.0, 49.0, 194.0)
    assert D.clean_box([10.5, 20, 30, 40], 100, 100) == (10.5, 20.0, 29.0, 39.0)
    assert D.clean_box([120, 0, 10, 10], 100, 100) is None  # starts right of the image
    assert D.clean_box([10, 10, 1, 5], 100, 100) is None    # zero width after the inclusive w - 1


def test_wholebody_records(coco_tiny):
    ds = dataset(coco_tiny, 133)
    body = dataset(coco_tiny)
    assert len(ds) == 12 and [r.ann_id for r in ds.records] == [r.ann_id for r in body.records]
    anns = {a["id"]: a for a in raw(coco_tiny, WB_JSON)["annotations"]}
    for rec, brec in zip(ds.records, body.records):
        a = anns[rec.ann_id]
        want = np.array(a["keypoints"] + a["foot_kpts"] + a["face_kpts"] + a["lefthand_kpts"] + a["righthand_kpts"],
                        np.float32).reshape(133, 3)
        want[:, 2] = np.minimum(want[:, 2], 1)
        assert rec.joints.shape == (133, 3) and np.array_equal(rec.joints, want)
        assert np.array_equal(rec.joints[:17], brec.joints) and np.allclose(rec.center, brec.center)
    v = np.concatenate([r.joints[:, 2] for r in ds.records])
    assert ((v > 0) & (v < 1)).any()  # float visibilities kept as floats


# ------------------------------------------------------------------------------------------- samples, targets

@pytest.mark.parametrize("k", [17, 133])
def test_sample_contract_and_collate(coco_tiny, k):
    ds = dataset(coco_tiny, k)
    s = ds[-1]
    assert set(s) == KEYS and s["index"] == len(ds) - 1
    assert s["image"].shape == (3, 256, 192) and s["image"].dtype == torch.float32
    assert s["target_x"].shape == (k, 384) and s["target_y"].shape == (k, 512) and s["target_weight"].shape == (k,)
    assert all(s[n].dtype == torch.float32 for n in ("target_x", "target_y", "target_weight"))
    assert s["center"].dtype == s["scale"].dtype == torch.float64 and s["center"].shape == s["scale"].shape == (2,)
    assert isinstance(s["rotation"], float) and isinstance(s["score"], float) and isinstance(s["area"], float)
    assert isinstance(s["image_id"], int) and s["image_id"] == ds.records[-1].image_id
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 3, 256, 192) and batch["target_x"].shape == (3, k, 384)
    assert batch["center"].shape == (3, 2) and batch["index"].tolist() == [0, 1, 2]


def test_targets_on_real_sample(coco_tiny):
    ds = dataset(coco_tiny)
    for i in (0, 4):
        rec, s = ds.records[i], ds[i]
        xy = crop_joints(rec)
        tx, ty, w = s["target_x"].numpy(), s["target_y"].numpy(), s["target_weight"].numpy()
        vis = rec.joints[:, 2] > 0
        assert np.array_equal(w, np.where(vis, 1.0, 0.0))  # every labelled joint lies inside its own GT box
        assert not tx[~vis].any() and not ty[~vis].any()
        for j in np.flatnonzero(vis):
            assert abs(tx[j].argmax() / 2 - xy[j, 0]) <= 0.5 and abs(ty[j].argmax() / 2 - xy[j, 1]) <= 0.5
            bins = np.arange(384)
            np.testing.assert_allclose(tx[j], np.exp(-(bins - 2 * xy[j, 0]) ** 2 / 32) * NORM, atol=1e-7)
            # Normalised by sigma * sqrt(2 pi) (a density over bins, sum ~1), not to peak 1.
            assert NORM * math.exp(-0.25 / 32) <= tx[j].max() <= NORM + 1e-7
            if 24 < 2 * xy[j, 1] < 512 - 24:  # tails inside the bins (6 sigma)
                assert ty[j].sum() == pytest.approx(1.0, abs=1e-5)


def test_target_weight_rules():
    # x: int(x - 12) >= 192 or int(x + 13) < 0 drops the joint (int truncates toward zero: -13.5 stays).
    xs = [100, -13.5, -13.9, -14.0, 203.9, 204.0, 100, 100, 100, 100]
    ys = [100, 100, 100, 100, 100, 100, -14.0, 267.9, 268.0, 100]
    tx, ty, w = D.simcc_targets(np.stack([xs, ys], 1), np.ones(10), (256, 192))
    assert w.tolist() == [1, 1, 1, 0, 1, 0, 0, 1, 0, 1]
    assert not tx[w == 0].any() and not ty[w == 0].any()
    assert tx[0].argmax() == 200 and ty[0].argmax() == 200 and tx[1].argmax() == 0
    # Visibility is the weight; the Gaussian is written only when weight > 0.5.
    tx, ty, w = D.simcc_targets(np.full((4, 2), 50.0), np.array([0.0, 0.4, 0.5, 0.7]))
    assert w.tolist() == pytest.approx([0.0, 0.4, 0.5, 0.7])
    assert not tx[:3].any() and not ty[:3].any() and tx[3].max() == pytest.approx(NORM)
    assert tx.dtype == ty.dtype == w.dtype == np.float32


def test_wholebody_float_visibility(coco_tiny):
    ds = dataset(coco_tiny, 133)
    i = next(i for i, r in enumerate(ds.records) if ((r.joints[:, 2] > 0) & (r.joints[:, 2] <= 0.5)).any())
    rec, s = ds.records[i], ds[i]
    v, w = rec.joints[:, 2], s["target_weight"].numpy()
    xy = crop_joints(rec)
    inside = (xy[:, 0] > -12) & (xy[:, 0] < 192 + 12) & (xy[:, 1] > -12) & (xy[:, 1] < 256 + 12)
    low = (v > 0) & (v <= 0.5) & inside
    assert low.any()
    np.testing.assert_allclose(w[low], v[low])  # weight v ...
    assert not s["target_x"].numpy()[low].any() and not s["target_y"].numpy()[low].any()  # ... zero target
    full = (v == 1) & inside
    assert (w[full] == 1).all() and (s["target_x"].numpy()[full].max(1) > 0.5 * NORM).all()


def test_joint_outside_crop_gets_zero_weight(coco_tiny, tmp_path):
    """A GT box around the head only (annotation written to tmp_path, image used in place): the ankles fall far
    below the crop and lose their weight; the head joints keep it."""
    d = raw(coco_tiny, COCO_JSON)
    ann = next(a for a in d["annotations"] if a["id"] == 442619)
    kp = np.array(ann["keypoints"], float).reshape(17, 3)
    x0, y0 = kp[:5, 0].min() - 10, kp[:5, 1].min() - 10
    ann["bbox"] = [x0, y0, kp[:5, 0].max() + 10 - x0, kp[:5, 1].max() + 10 - y0]
    d["annotations"] = [ann]
    path = tmp_path / "head.json"
    path.write_text(json.dumps(d))
    ds = D.TopDownDataset(path, os.path.join(coco_tiny, "images"))
    xy = crop_joints(ds.records[0])
    w = ds[0]["target_weight"].numpy()
    assert (xy[15:, 1] > 256 + 13).all() and (w[15:] == 0).all() and (w[:5] == 1).all()
    far = (xy[:, 1] >= 256 + 12) | (xy[:, 1] <= -14)
    assert (w[far] == 0).all() and (w[~far & (kp[:, 2] > 0)] == 1).all()


# ----------------------------------------------------------------------------------------------------- geometry

def bilinear(img, x, y):
    """OpenCV-convention bilinear sample (pixel centres at integers) of an (H, W, 3) array."""
    x0, y0 = int(math.floor(x)), int(math.floor(y))
    fx, fy = x - x0, y - y0
    p = img[y0:y0 + 2, x0:x0 + 2].astype(float)
    return (p[0, 0] * (1 - fx) * (1 - fy) + p[0, 1] * fx * (1 - fy) + p[1, 0] * (1 - fx) * fy + p[1, 1] * fx * fy)


def to_uint8_scale(image):
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image * std + mean).mul(255).permute(1, 2, 0).numpy()


def test_geometry_round_trip_and_pixels(coco_tiny):
    ds = dataset(coco_tiny)
    rec = ds.records[0]
    fwd = get_affine_transform(rec.center, rec.scale, 30.0, (192, 256))
    inv = get_affine_transform(rec.center, rec.scale, 30.0, (192, 256), inv=True)
    np.testing.assert_allclose(affine_points(affine_points(rec.joints[:, :2], fwd), inv), rec.joints[:, :2],
                               atol=1e-9)
    # The crop pixel at each (rounded) joint equals the original image sampled where that pixel maps back to.
    crop = to_uint8_scale(ds[0]["image"])
    image = np.asarray(load_image(rec.image_file))
    m_inv = get_affine_transform(rec.center, rec.scale, 0.0, (192, 256), inv=True)
    for u, v in np.rint(crop_joints(rec)).astype(int):
        x, y = affine_points(np.array([u, v], float), m_inv)
        np.testing.assert_allclose(crop[v, u], bilinear(image, x, y), atol=1.5)


# -------------------------------------------------------------------------------------------------- augmentation

def same(a, b):
    return all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in KEYS)


def test_augmentation_reproducible_per_seed_epoch_index(coco_tiny):
    ds = dataset(coco_tiny, train=True, seed=3)
    a = ds[5]
    assert same(a, ds[5]) and same(a, dataset(coco_tiny, train=True, seed=3)[5])
    ds.set_epoch(1)
    b = ds[5]
    assert not same(a, b) and not torch.equal(a["scale"], b["scale"])
    assert not same(a, dataset(coco_tiny, train=True, seed=4)[5])
    ds.set_epoch(0)
    assert same(a, ds[5])
    # Per-index streams: no two samples share their draws.
    draws = [ds.sample_rng(i).random() for i in range(len(ds))]
    assert len(set(draws)) == len(draws)
    # Results do not depend on DataLoader workers.
    ds.set_epoch(2)
    serial = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    parallel = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)))
    assert all(torch.equal(serial[k], parallel[k]) for k in KEYS)


def test_augmentation_ranges(coco_tiny):
    ds = dataset(coco_tiny, train=True, half_body_prob=0.0)
    rots, ratios = [], []
    for epoch in range(40):
        ds.set_epoch(epoch)
        s = ds[0]
        rots.append(s["rotation"])
        ratios.append(s["scale"][0].item() / ds.records[0].scale[0])
    rots, ratios = np.array(rots), np.array(ratios)
    assert (np.abs(rots) <= 90).all() and 0.2 < (rots == 0).mean() < 0.7  # 0 with probability 0.4
    assert (ratios >= 0.65 - 1e-9).all() and (ratios <= 1.35 + 1e-9).all() and ratios.std() > 0.1


def test_flip(coco_tiny):
    ds = dataset(coco_tiny, train=True, scale_factor=0.0, rotation_factor=0.0, half_body_prob=0.0)
    rec, width = ds.records[0], 640  # image 785 is 640 wide
    samples = []
    for epoch in range(20):
        ds.set_epoch(epoch)
        samples.append(ds[0])
    plain = next(s for s in samples if s["center"][0] == rec.center[0])
    flipped = next(s for s in samples if s["center"][0] != rec.center[0])
    assert flipped["center"][0].item() == pytest.approx(width - 1 - rec.center[0])
    # Image flipped first, then cropped around the flipped center: the crop is mirrored about u = 96
    # (column u of one is column 192 - u of the other; the one-pixel offset the flip test corrects).
    torch.testing.assert_close(flipped["image"][:, :, 1:], plain["image"][:, :, 1:].flip(-1), atol=1e-5, rtol=0)
    # Left/right swapped: left_shoulder (5) of the flipped sample sits at the mirror of right_shoulder (6).
    perm = flip_permutation(17)
    xy = crop_joints(rec)
    w = flipped["target_weight"].numpy()
    assert np.array_equal(w, plain["target_weight"].numpy()[perm])
    for j in np.flatnonzero(w > 0.5):
        assert abs(flipped["target_x"][j].argmax().item() / 2 - (192 - xy[perm[j], 0])) <= 0.5
        assert abs(flipped["target_y"][j].argmax().item() / 2 - xy[perm[j], 1]) <= 0.5
    # The person faces the camera (left shoulder on the image right); with the pairs swapped, so does the mirror.
    for s in (plain, flipped):
        assert s["target_x"][5].argmax() > s["target_x"][6].argmax()


class FixedNormal:
    """A stand-in generator whose standard_normal() returns a fixed value (picks the half-body branch)."""

    def __init__(self, value):
        self.value = value

    def standard_normal(self):
        return self.value


def test_half_body_choice_and_box():
    rng = np.random.default_rng(0)
    joints = np.concatenate([rng.uniform(100, 300, (17, 2)), np.ones((17, 1))], 1)
    upper, lower = joints[:11, :2], joints[11:, :2]
    for value, chosen in ((0.0, upper), (1.0, lower)):
        center, scale = D.half_body_center_scale(joints, FixedNormal(value), D.UPPER_BODY_IDS[17])
        np.testing.assert_allclose(center, chosen.mean(0))  # the mean of the chosen joints, not the box middle
        w, h = chosen.max(0) - chosen.min(0)
        np.testing.assert_allclose(scale * 200 / 1.5, [max(w, 0.75 * h), max(h, w / 0.75)])
        assert (np.abs(chosen - center) <= scale * 100).all()  # the box holds every chosen joint
    few_upper = joints.copy()
    few_upper[2:11, 2] = 0  # 2 upper joints left: the lower set is taken even when randn() < 0.5
    np.testing.assert_allclose(D.half_body_center_scale(few_upper, FixedNormal(0.0), range(11))[0], lower.mean(0))
    assert D.half_body_center_scale(joints * [1, 1, 0], FixedNormal(0.0), range(11)) is None
    # WholeBody: the feet (17-22) are lower body, face and hands upper.
    assert set(D.UPPER_BODY_IDS[133]) == set(range(11)) | set(range(23, 133))


def test_half_body_in_dataset(coco_tiny):
    ds = dataset(coco_tiny, 133, train=True, half_body_prob=1.0, scale_factor=0.0, rotation_factor=0.0, flip=False)
    rec = ds.records[0]
    vis = rec.joints[:, 2] > 0
    assert rec.joints[:, 2].sum() > 8
    upper = np.zeros(133, bool)
    upper[list(D.UPPER_BODY_IDS[133])] = True
    centers = {tuple(np.round(rec.joints[vis & part, :2].astype(float).mean(0), 6)) for part in (upper, ~upper)}
    seen = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        c = tuple(np.round(ds[0]["center"].numpy(), 6))
        assert c in centers
        seen.add(c)
    assert seen == centers  # both halves get picked


# ---------------------------------------------------------------------------------------------------- detections

def test_detection_records(coco_tiny):
    dets = raw(coco_tiny, DET_JSON)
    ds = dataset(coco_tiny, detections=os.path.join(coco_tiny, DET_JSON), det_score_threshold=0.5)
    assert len(ds) == 18 == sum(d["score"] >= 0.5 for d in dets)
    assert len(dataset(coco_tiny, detections=os.path.join(coco_tiny, DET_JSON))) == len(dets) == 118  # IMAGE_THRE 0
    first = next(d for d in dets if d["score"] >= 0.5)
    rec = ds.records[0]
    x, y, w, h = first["bbox"]
    assert rec.ann_id == -1 and rec.score == first["score"] and rec.image_id == first["image_id"]
    assert rec.center == pytest.approx([x + w / 2, y + h / 2]) and rec.area == pytest.approx(w * h)
    assert not rec.joints.any()
    s = ds[0]
    assert s["score"] == first["score"] and not s["target_weight"].any() and not s["target_x"].any()
    wb = dataset(coco_tiny, 133, detections=os.path.join(coco_tiny, DET_JSON), det_score_threshold=0.5)
    assert len(wb) == 18 and wb[0]["target_weight"].shape == (133,)
    with pytest.raises(ValueError, match="evaluation"):
        dataset(coco_tiny, train=True, detections=os.path.join(coco_tiny, DET_JSON))


# ----------------------------------------------------------------------------------------------- invalid input

def corrupt(d, what):
    a = d["annotations"][0]
    if what == "keypoint length":
        a["keypoints"] = a["keypoints"][:-1]
    elif what == "missing foot":
        del a["foot_kpts"]
    elif what == "face length":
        a["face_kpts"] = a["face_kpts"] + [0, 0, 0]
    elif what == "nan":
        a["keypoints"][3] = float("nan")
    elif what == "bad image id":
        a["image_id"] = 999
    elif what == "missing key":
        del d["categories"]
    elif what == "missing image":
        d["images"][0]["file_name"] = "no_such_image.jpg"
    return d


@pytest.mark.parametrize("what,k,message", [
    ("keypoint length", 17, r"annotations\[0\] \(id 442619\) keypoints has 50 values, expected 51"),
    ("missing foot", 133, "has no 'foot_kpts'"),
    ("face length", 133, "face_kpts has 207 values, expected 204"),
    ("nan", 17, "NaN"),
    ("bad image id", 17, "references image_id 999, which is not in images"),
    ("missing key", 17, r"missing top-level key\(s\) categories"),
    ("missing image", 17, "no_such_image.jpg not found"),
])
def test_invalid_annotation_files(coco_tiny, tmp_path, what, k, message):
    path = tmp_path / "ann.json"
    good = raw(coco_tiny, WB_JSON)
    path.write_text(json.dumps(good))
    assert len(dataset(coco_tiny, k, ann=path)) == 12  # the untouched copy loads
    path.write_text(json.dumps(corrupt(copy.deepcopy(good), what)))
    with pytest.raises(D.AnnotationError, match=message) as info:
        dataset(coco_tiny, k, ann=path)
    assert str(path) in str(info.value)


def test_unreadable_files(coco_tiny, tmp_path):
    truncated = tmp_path / "truncated.json"
    with open(os.path.join(coco_tiny, COCO_JSON)) as f:
        truncated.write_text(f.read()[:5000])
    for path, message in ((truncated, "invalid JSON"), (tmp_path / "absent.json", "annotation file not found")):
        with pytest.raises(D.AnnotationError, match=message) as info:
            dataset(coco_tiny, ann=path)
        assert str(path) in str(info.value)
    listed = tmp_path / "list.json"
    listed.write_text("[]")
    with pytest.raises(D.AnnotationError, match="top level must be a JSON object"):
        dataset(coco_tiny, ann=listed)
    dets = raw(coco_tiny, DET_JSON)[:3]
    dets[1]["image_id"] = 12345
    bad_dets = tmp_path / "dets.json"
    bad_dets.write_text(json.dumps(dets))
    with pytest.raises(D.AnnotationError, match=r"detection \[1\] references image_id 12345") as info:
        dataset(coco_tiny, detections=bad_dets)
    assert str(bad_dets) in str(info.value)
    bad_dets.write_text(json.dumps(dets)[:100])
    with pytest.raises(D.AnnotationError, match="invalid JSON"):
        dataset(coco_tiny, detections=bad_dets)


def test_bad_num_keypoints(coco_tiny):
    with pytest.raises(ValueError, match="17 .* or 133"):
        dataset(coco_tiny, 21, ann=COCO_JSON)
    with pytest.raises(ValueError, match="17 .* or 133"):
        D.gt_records({"images": [], "annotations": []}, ".", 5)
