"""Issue 15: what `gtpt infer` reads and writes (drawing names, boxes outside the image, unreadable files,
per-image boxes, detections by file name, folders) and PoseEstimator from `gtpt` with optional boxes."""
import json
import os
import warnings

import numpy as np
import pytest
import torch

from gtpt.cli import main

IMAGE = "000000040083.jpg"   # 500 x 333
OTHER = "000000000785.jpg"   # 640 x 425
FAST = ["--variant", "gtpt-t", "--no-flip", "--device", "cpu", "--backend", "reference"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _err_lines(capsys, word="error"):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if word in line]


@pytest.fixture
def images(coco_tiny):
    return os.path.join(coco_tiny, "images")


@pytest.fixture
def same_names(images, tmp_path):
    """a/skier.jpg and b/skier.jpg: two different photos with one file name (symlinks to coco_tiny, no copies)."""
    for d, src in (("a", IMAGE), ("b", OTHER)):
        (tmp_path / d).mkdir()
        os.symlink(os.path.join(images, src), tmp_path / d / "skier.jpg")
    return [str(tmp_path / "a" / "skier.jpg"), str(tmp_path / "b" / "skier.jpg")]


# -- finding 3: no drawing lost ------------------------------------------------------------------------------------

def test_same_file_names_get_distinct_drawings(same_names, tmp_path, capsys):
    vis = tmp_path / "vis"
    assert main(["infer", *same_names, "-o", str(tmp_path / "p.json"), "--vis", str(vis), "--box", "30,20,120,280",
                 *FAST]) == 0
    from PIL import Image
    sizes = {Image.open(vis / d / "skier_pose.png").size for d in ("a", "b")}
    assert sizes == {(500, 333), (640, 425)}  # each photo's own drawing


def test_vis_file_with_several_images_is_an_error(same_names, tmp_path, capsys):
    assert main(["infer", *same_names, "-o", str(tmp_path / "p.json"), "--vis", str(tmp_path / "out.png"),
                 *FAST]) == 2
    line, = _err_lines(capsys)
    assert "--vis" in line and "2 inputs" in line and "folder" in line
    assert not (tmp_path / "out.png").exists() and not (tmp_path / "p.json").exists()


# -- finding 4: a box entirely outside the image ----------------------------------------------------------------

def test_box_outside_the_image_gets_no_keypoints(images, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["infer", os.path.join(images, OTHER), "-o", str(out), "--box", "5000,5000,100,100",
                 "--box", "30,20,120,280", *FAST]) == 0
    warn, = _err_lines(capsys, "outside")
    assert "5000" in warn and "640x425" in warn and "skipped" in warn
    assert [e["box"] for e in json.load(open(out))] == [[30.0, 20.0, 120.0, 280.0]]


def test_pose_estimator_from_gtpt_boxes_optional_and_outside_boxes(images):
    import gtpt
    from gtpt.inference import LowConfidenceWarning, OutsideImageWarning
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = gtpt.PoseEstimator("gtpt-t", device="cpu", backend="reference", flip_test=False)
    path = os.path.join(images, IMAGE)
    whole = est(path)  # no boxes: the whole image, as the CLI
    np.testing.assert_allclose(whole, est(path, [0, 0, 500, 333]))
    with pytest.warns(OutsideImageWarning, match="entirely outside the 500x333 image"):
        kps = est(path, [[5000, 5000, 100, 100], [30, 20, 120, 280]])
    assert np.isnan(kps[0, :, :2]).all() and (kps[0, :, 2] == 0).all() and np.isfinite(kps[1]).all()
    with pytest.warns(OutsideImageWarning):
        people = est.estimate(path, [[5000, 5000, 100, 100], [30, 20, 120, 280]])
    assert [p["box"] for p in people] == [[30.0, 20.0, 120.0, 280.0]]
    # finding 11: untrained heads (here: zeroed, uniform over the 384 / 512 bins) stay below the 0.01 drawing
    # threshold, and the estimator says why, once
    with torch.no_grad():
        for head in (est.model.mlp_head_x, est.model.mlp_head_y):
            head[1].weight.zero_()
            head[1].bias.zero_()
    with pytest.warns(LowConfidenceWarning, match="random or barely trained"):
        est.estimate(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LowConfidenceWarning)
        est.estimate(path)  # said once per estimator


# -- finding 8: unreadable files --------------------------------------------------------------------------------

def test_unreadable_file_is_an_error_before_inference_or_skipped(images, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    good = os.path.join(images, IMAGE)
    out = tmp_path / "p.json"
    import gtpt.inference as inf
    real = inf.PoseEstimator
    monkeypatch.setattr(inf, "PoseEstimator", lambda *a, **k: pytest.fail("built the model before reading inputs"))
    assert main(["infer", good, str(bad), "-o", str(out), *FAST]) == 2
    line, = _err_lines(capsys)
    assert str(bad) in line and "--skip-bad" in line and not out.exists()
    monkeypatch.setattr(inf, "PoseEstimator", real)
    assert main(["infer", good, str(bad), "-o", str(out), "--skip-bad", "--box", "30,20,120,280", *FAST]) == 0
    assert any(str(bad) in w for w in _err_lines(capsys, "skipping"))
    assert {e["image"] for e in json.load(open(out))} == {good}


# -- finding 9: per-image boxes, detections by file name, folders --------------------------------------------------

def test_boxes_mapping_per_image(same_names, tmp_path, capsys):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({same_names[0]: [[30, 20, 120, 280]],
                                 same_names[1]: [{"bbox": [260, 60, 150, 240], "score": 0.7}]}))
    out = tmp_path / "p.json"
    assert main(["infer", *same_names, "-o", str(out), "--boxes", str(boxes), *FAST]) == 0
    got = {(e["image"], tuple(e["box"]), e["box_score"]) for e in json.load(open(out))}
    assert got == {(same_names[0], (30.0, 20.0, 120.0, 280.0), 1.0), (same_names[1], (260.0, 60.0, 150.0, 240.0), 0.7)}
    boxes.write_text(json.dumps({"nothing.jpg": [[1, 2, 3, 4]]}))
    assert main(["infer", *same_names, "-o", str(out), "--boxes", str(boxes), *FAST]) == 2
    assert "none of its 1 file names matches an input" in _err_lines(capsys)[0]
    boxes.write_text(json.dumps({"skier.jpg": [[1, 2, 0, 4]]}))
    assert main(["infer", *same_names, "-o", str(out), "--boxes", str(boxes), *FAST]) == 2
    assert "entry 'skier.jpg' box 0" in _err_lines(capsys)[0]


def test_detections_matched_by_file_name_through_the_images_list(coco_tiny, images, tmp_path, capsys):
    photo = tmp_path / "my_photo.jpg"  # a name that is not a COCO image id
    os.symlink(os.path.join(images, OTHER), photo)
    dets = os.path.join(coco_tiny, "person_detection_results", "COCO_tiny_detections_AP_H_56_person.json")
    ann = tmp_path / "images.json"
    ann.write_text(json.dumps({"images": [{"id": 785, "file_name": "my_photo.jpg"}]}))
    out = tmp_path / "p.json"
    assert main(["infer", str(photo), "-o", str(out), "--detections", dets, "--ann-file", str(ann),
                 "--det-score-thr", "0.9", *FAST]) == 0
    expect = sorted(tuple(d["bbox"]) for d in json.load(open(dets)) if d["image_id"] == 785 and d["score"] >= 0.9)
    entries = json.load(open(out))
    assert entries and all(e["image_id"] == 785 for e in entries)
    assert {tuple(e["box"]) for e in entries} <= set(expect)
    # a detection file whose records carry file_name needs no images list
    recs = tmp_path / "named.json"
    recs.write_text(json.dumps([{"file_name": "my_photo.jpg", "bbox": [30, 20, 120, 280], "score": 0.95,
                                 "category_id": 1}]))
    assert main(["infer", str(photo), "-o", str(out), "--detections", str(recs), *FAST]) == 0
    assert [e["box"] for e in json.load(open(out))] == [[30.0, 20.0, 120.0, 280.0]]
    # without either, the error says what to pass
    assert main(["infer", str(photo), "-o", str(out), "--detections", dets, *FAST]) == 2
    assert "--ann-file" in _err_lines(capsys)[0]


def test_folder_input(images, tmp_path, capsys):
    out, vis = tmp_path / "p.json", tmp_path / "vis"
    assert main(["infer", images, "-o", str(out), "--box", "0,0,60,80", "--vis", str(vis), *FAST]) == 0
    names = sorted(f for f in os.listdir(images) if f.endswith(".jpg"))
    assert sorted({os.path.basename(e["image"]) for e in json.load(open(out))}) == names
    assert sorted(os.listdir(vis)) == sorted(n.replace(".jpg", "_pose.png") for n in names)
    err = capsys.readouterr().err
    assert "no joint reached confidence 0.01" in err and "Google Drive" in err  # finding 11's hint, random weights
