"""gtpt.inference: PoseEstimator on a coco_tiny image, the drawing helper and the ``gtpt infer`` entry point."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from gtpt import build_model
from gtpt.evaluate import predict
from gtpt.inference import (COCO_SKELETON, PoseEstimator, RandomWeightsWarning, add_infer_arguments, draw_keypoints,
                            run_inference_cli)
from gtpt.transforms import box_to_center_scale, get_affine_transform, load_image, to_model_input, warp_affine

IMAGE = "000000040083.jpg"            # 500 x 333, 2 people with keypoints
BOXES = np.array([[30.0, 20.0, 120.0, 280.0], [260.0, 60.0, 150.0, 240.0]])


@pytest.fixture(scope="module")
def estimator():
    torch.manual_seed(0)
    with pytest.warns(RandomWeightsWarning, match="random weights"):
        est = PoseEstimator("gtpt-t", device="cpu", backend="reference")
    return est


@pytest.fixture
def image_path(coco_tiny):
    return os.path.join(coco_tiny, "images", IMAGE)


def test_pose_estimator_shapes_and_coordinates(estimator, image_path, one_thread):
    kps = estimator(image_path, BOXES)
    assert kps.shape == (2, 17, 3) and np.isfinite(kps).all()
    assert ((kps[..., 2] > 0) & (kps[..., 2] <= 1)).all()
    assert not estimator.model.training
    for kp, box in zip(kps, BOXES):
        c, s = box_to_center_scale(box)
        half = s * 100.0  # the padded crop box, in image pixels
        assert (np.abs(kp[:, :2] - c) <= half + 1).all()
    # Same image as PIL and as an array: same keypoints.
    img = load_image(image_path)
    np.testing.assert_array_equal(estimator(img, BOXES), kps)
    np.testing.assert_array_equal(estimator(np.asarray(img), BOXES), kps)
    # One box at a time (batching) and the single-box (4,) form give the same result.
    np.testing.assert_allclose(estimator(img, BOXES[1]), kps[1:], atol=1e-6)


def test_pose_estimator_equals_the_evaluation_path(estimator, image_path, one_thread):
    """PoseEstimator and evaluate.predict share the crop convention: same crops, same keypoints."""
    img = load_image(image_path)
    items = []
    for box in BOXES:
        c, s = box_to_center_scale(box)
        crop = warp_affine(img, get_affine_transform(c, s, 0.0, (192, 256)), (192, 256))
        items.append({"image": to_model_input(crop), "center": c, "scale": s, "score": 1.0, "image_id": 40083})
    for flip in (True, False):
        estimator.flip_test = flip
        try:
            kps = estimator(img, BOXES)
        finally:
            estimator.flip_test = True
        res = predict(estimator.model, torch.utils.data.DataLoader(items, batch_size=2), flip_test=flip,
                      nms_threshold=None)
        np.testing.assert_allclose(kps, np.array([np.reshape(r["keypoints"], (17, 3)) for r in res]), atol=1e-6)


def test_pose_estimator_bad_inputs(estimator, image_path, coco_tiny):
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        estimator(image_path, [[0, 0, 10]])
    with pytest.raises(ValueError, match="w, h > 0"):
        estimator(image_path, [[0, 0, 0, 10], [0, 0, 10, 10]])
    with pytest.raises(ValueError, match="bad rows: \\[0\\]"):
        estimator(image_path, [[np.nan, 0, 10, 10]])
    with pytest.raises(ValueError, match="uint8"):
        estimator(np.zeros((50, 40), np.uint8), BOXES)
    with pytest.raises(ValueError, match="uint8"):
        estimator(np.zeros((50, 40, 3), np.float32), BOXES)
    with pytest.raises(TypeError, match="path, a PIL image"):
        estimator(42, BOXES)
    with pytest.raises(FileNotFoundError):
        estimator(os.path.join(coco_tiny, "images", "missing.jpg"), BOXES)
    with pytest.raises(ValueError, match="cannot decode"):
        estimator(os.path.join(coco_tiny, "README.md"), BOXES)
    assert estimator(image_path, np.zeros((0, 4))).shape == (0, 17, 3)
    with pytest.raises(ValueError, match="box_scores"):
        estimator.estimate(image_path, BOXES, [0.9])
    with pytest.raises(ValueError, match="unknown GTPT variant"):
        PoseEstimator("gtpt-xl")
    with pytest.raises(ValueError, match="batch_size"):
        PoseEstimator(estimator.model, batch_size=0)


def test_estimate_rescoring_and_nms(estimator, image_path, one_thread):
    boxes = np.concatenate([BOXES, BOXES[:1]])  # a duplicate of the first box: OKS 1, removed by NMS
    people = estimator.estimate(image_path, boxes, [0.8, 0.6, 0.5])
    assert len(people) == 2
    kps = estimator(image_path, BOXES)
    for p in people:
        i = [0, 1][p["box"] == BOXES[1].tolist()]
        conf = kps[i, :, 2]
        confident = conf > 0.01  # random weights: near-uniform probabilities, possibly none above 0.01
        assert p["score"] == pytest.approx(p["box_score"] * conf[confident].mean() if confident.any() else 0.0)
        np.testing.assert_allclose(p["keypoints"], kps[i], atol=1e-6)
    assert people[0]["score"] >= people[1]["score"]
    assert len(estimator.estimate(image_path, boxes, nms_threshold=None)) == 3


def test_model_instance_and_checkpoint(tmp_path, image_path, one_thread):
    torch.manual_seed(1)
    model = build_model("gtpt-t", backend="reference")
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    torch.manual_seed(2)
    loaded = PoseEstimator("gtpt-t", checkpoint=path, device="cpu", backend="reference", flip_test=False)
    direct = PoseEstimator(model, flip_test=False)
    assert direct.model is model and direct.device == torch.device("cpu")
    np.testing.assert_allclose(loaded(image_path, BOXES[:1]), direct(image_path, BOXES[:1]), atol=1e-5)


def test_draw_keypoints(image_path):
    img = load_image(image_path)
    kp = np.zeros((1, 17, 3))
    kp[0, :, 0] = np.linspace(50, 450, 17)
    kp[0, :, 1] = 150
    kp[0, :, 2] = 1.0
    kp[0, 3] = [100.0, 250.0, 0.1]   # below the threshold: neither the dot nor its limbs (1-3, 3-5) are drawn
    kp[0, 4] = [300.0, 250.0, 0.9]
    out = draw_keypoints(img, kp, threshold=0.3, boxes=BOXES[:1])
    assert isinstance(out, Image.Image) and out.size == img.size and out is not img
    a, b = np.asarray(img).astype(int), np.asarray(out).astype(int)
    for x, y in [(50, 150), (250, 150), (450, 150), (300, 250)]:
        assert np.abs(a[y, x] - b[y, x]).sum() > 0, (x, y)
    assert np.array_equal(a[245:256, 95:106], b[245:256, 95:106])
    assert (3, 5) in COCO_SKELETON and len(COCO_SKELETON) == 19
    wb = draw_keypoints(np.asarray(img), np.tile(kp, (1, 133 // 17 + 1, 1))[:, :133])
    assert wb.size == img.size
    with pytest.raises(ValueError, match="keypoints"):
        draw_keypoints(img, np.zeros((17, 2)))


def _cli(argv):
    parser = add_infer_arguments(argparse.ArgumentParser(prog="gtpt infer"))
    return run_inference_cli(parser.parse_args(argv))


def test_infer_cli_with_boxes_and_vis(image_path, tmp_path, capsys, one_thread):
    out, vis = tmp_path / "poses.json", tmp_path / "vis" / "pose.png"
    rc = _cli([image_path, "-o", str(out), "--variant", "gtpt-t", "--backend", "reference", "--device", "cpu",
               "--box", "30,20,120,280", "--box", "260,60,150,240", "--vis", str(vis)])
    assert rc == 0
    err = capsys.readouterr().err
    assert "random weights" in err and "meaningless" in err
    entries = json.load(open(out))
    assert len(entries) == 2
    for e in entries:
        assert e["image"] == image_path and e["image_id"] == 40083 and e["category_id"] == 1
        assert len(e["keypoints"]) == 51 and e["box"] in BOXES.tolist() and e["box_score"] == 1.0
    assert Image.open(vis).size == (500, 333)


def test_infer_cli_box_starting_outside_the_image(image_path, tmp_path, one_thread):
    # argparse takes "-20,10,300,400" for an option; `gtpt infer` accepts it as the box value it is.
    from gtpt.cli import main
    from gtpt.inference import join_negative_box_values
    assert join_negative_box_values(["--box", "-20,10,300,400", "--box", "1,2,3,4", "-o", "x"]) == \
        ["--box=-20,10,300,400", "--box", "1,2,3,4", "-o", "x"]
    assert join_negative_box_values(["--box", "--no-flip"]) == ["--box", "--no-flip"]
    out = tmp_path / "poses.json"
    rc = main(["infer", image_path, "-o", str(out), "--variant", "gtpt-t", "--backend", "reference",
               "--device", "cpu", "--box", "-20,-10,150,300", "--no-flip"])
    assert rc == 0
    assert [e["box"] for e in json.load(open(out))] == [[-20.0, -10.0, 150.0, 300.0]]


def test_infer_cli_with_detections(coco_tiny, tmp_path, one_thread):
    dets = os.path.join(coco_tiny, "person_detection_results", "COCO_tiny_detections_AP_H_56_person.json")
    image = os.path.join(coco_tiny, "images", "000000000785.jpg")
    out = tmp_path / "poses.json"
    rc = _cli([image, "-o", str(out), "--variant", "gtpt-t", "--backend", "reference", "--device", "cpu",
               "--detections", dets, "--det-score-thr", "0.5", "--no-flip"])
    assert rc == 0
    expect = [d for d in json.load(open(dets)) if d["image_id"] == 785 and d["score"] >= 0.5]
    entries = json.load(open(out))
    assert 1 <= len(entries) <= len(expect)
    assert all(e["box_score"] >= 0.5 and e["image_id"] == 785 for e in entries)


def test_infer_cli_errors(image_path, coco_tiny, tmp_path, capsys):
    base = ["-o", str(tmp_path / "o.json"), "--variant", "gtpt-t", "--backend", "reference", "--device", "cpu"]
    assert _cli([image_path, *base, "--box", "1,2,3"]) == 2
    assert "x,y,w,h" in capsys.readouterr().err
    assert _cli([image_path, *base, "--box", "1,2,0,5"]) == 2
    assert _cli([os.path.join(coco_tiny, "images", "nope.jpg"), *base]) == 2
    assert _cli([image_path, *base, "--checkpoint", str(tmp_path / "missing.pth")]) == 2
    photo = tmp_path / "photo.png"  # a synthetic image whose name is not a COCO image id
    Image.new("RGB", (64, 48)).save(photo)
    dets = os.path.join(coco_tiny, "person_detection_results", "COCO_tiny_detections_AP_H_56_person.json")
    assert _cli([str(photo), *base, "--detections", dets]) == 2
    assert "COCO image id" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()
