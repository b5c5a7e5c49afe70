"""The synthetic dataset generator (gtpt.synth, `gtpt synth`): deterministic, valid COCO / COCO-WholeBody files that
load through gtpt.data and score through gtpt.evaluate, keypoints where the figures are drawn, a valid detection file,
the cache that `gtpt train` uses."""
import hashlib
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from gtpt.cli import main
from gtpt.data import TopDownDataset, load_annotation_file
from gtpt.evaluate import coco_keypoint_eval
from gtpt.synth import (PART_COLOURS, SynthError, dataset_paths, ensure_cached, generate, render_image)

pytestmark = pytest.mark.usefixtures("one_thread")


def digests(root):
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha1(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def body_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth") / "body")
    info = generate(root, 14, seed=3)
    return root, info


def test_same_seed_same_bytes_other_seed_other_images(body_set, tmp_path):
    root, _ = body_set
    again = str(tmp_path / "again")
    generate(again, 14, seed=3)
    assert digests(again) == digests(root)
    other = str(tmp_path / "other")
    generate(other, 14, seed=4)
    d, o = digests(root), digests(other)
    assert d.keys() == o.keys()
    assert sum(d[k] != o[k] for k in d if k.endswith(".jpg")) == sum(k.endswith(".jpg") for k in d)


def test_annotations_are_valid_and_load_through_the_data_pipeline(body_set):
    root, info = body_set
    p = dataset_paths(root)
    assert (info["train"]["images"], info["val"]["images"]) == (12, 2)
    for split in ("train", "val"):
        data = load_annotation_file(p[f"{split}_ann_file"], 17)  # the structural checks of gtpt.data
        images = {im["id"]: im for im in data["images"]}
        assert len(images) == info[split]["images"] and len(data["annotations"]) == info[split]["people"] >= 1
        assert data["categories"][0]["keypoints"][9] == "left_wrist" and len(data["categories"][0]["skeleton"]) == 19
        for ann in data["annotations"]:
            im = images[ann["image_id"]]
            kp = np.array(ann["keypoints"]).reshape(17, 3)
            assert set(kp[:, 2]) <= {0, 1, 2} and ann["num_keypoints"] == int((kp[:, 2] > 0).sum())
            lab = kp[kp[:, 2] > 0]
            assert ((lab[:, 0] >= 0) & (lab[:, 0] < im["width"]) & (lab[:, 1] >= 0) & (lab[:, 1] < im["height"])).all()
            assert (kp[kp[:, 2] == 0, :2] == 0).all()  # unlabelled joints at (0, 0), as COCO
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"]
            assert 0 < ann["area"] <= w * h
            with Image.open(os.path.join(p[f"{split}_image_root"], im["file_name"])) as img:
                assert img.format == "JPEG" and img.size == (im["width"], im["height"])
    train = TopDownDataset(p["train_ann_file"], p["train_image_root"], 17, train=True, flip=False)
    item = train[0]
    assert item["image"].shape == (3, 256, 192) and item["target_weight"].sum() > 0
    assert len(train) == info["train"]["people"]


def test_keypoints_lie_where_the_figure_is_drawn():
    """The label map: a visible (v=2) joint is drawn by its own limb, a hidden one (v=1) by something else; and the
    saved JPEG has the limb's colour there."""
    colour_checked = occluded = 0
    for i in range(8):
        image, people, labels = render_image(np.random.default_rng([7, 0, i]))
        from gtpt.synth import _BODY_OWNER
        pixels = np.asarray(image, dtype=np.float64)
        for person_i, person in enumerate(people):
            for k, (x, y, v) in enumerate(person["keypoints"]):
                if v == 0:
                    continue
                label = labels[int(y), int(x)]
                own = {1 + 32 * person_i + part for part in _BODY_OWNER[k]}
                if v == 2:
                    assert label in own, (i, k)
                    if k in (7, 8, 13, 14):  # elbows and knees: the colour of one of the two limbs meeting there
                        rgb = pixels[int(y), int(x)]
                        dist = min(np.abs(rgb - PART_COLOURS[part]).max() for part in _BODY_OWNER[k])
                        assert dist <= 20, (i, k, rgb)  # the per-figure jitter is at most 18 per channel
                        colour_checked += 1
                else:
                    assert label not in own
                    occluded += 1
    assert colour_checked >= 10 and occluded >= 1


def test_jpeg_pixels_match_the_drawn_limb_colours(body_set):
    root, _ = body_set
    p = dataset_paths(root)
    data = json.load(open(p["train_ann_file"]))
    checked = 0
    names = {im["id"]: im["file_name"] for im in data["images"]}
    for ann in data["annotations"]:
        kp = np.array(ann["keypoints"]).reshape(17, 3)
        rgb = np.asarray(Image.open(os.path.join(p["train_image_root"], names[ann["image_id"]])).convert("RGB"),
                         dtype=np.float64)
        for k, parts in ((7, (2, 3)), (8, (4, 5))):  # left elbow: red / orange; right elbow: blue / cyan
            x, y, v = kp[k]
            if v == 2:
                dist = min(np.abs(rgb[int(y), int(x)] - PART_COLOURS[part]).max() for part in parts)
                assert dist <= 45, (ann["id"], k)  # jitter + JPEG
                checked += 1
    assert checked >= 5


def test_detection_file_and_evaluation(body_set):
    root, _ = body_set
    p = dataset_paths(root)
    for split in ("train", "val"):
        gt = json.load(open(p[f"{split}_ann_file"]))
        dets = json.load(open(p[f"{split}_detections_file"]))
        ids = {im["id"] for im in gt["images"]}
        assert len(dets) >= len(gt["annotations"]) and all(
            d["image_id"] in ids and d["category_id"] == 1 and len(d["bbox"]) == 4 and d["bbox"][2] > 0
            and d["bbox"][3] > 0 and 0 < d["score"] <= 1 for d in dets)
    ds = TopDownDataset(p["val_ann_file"], p["val_image_root"], 17, detections=p["val_detections_file"])
    assert len(ds) >= 1
    # ground truth as predictions scores AP 1 through gtpt.evaluate
    gt = json.load(open(p["val_ann_file"]))
    results = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
               for a in gt["annotations"]]
    assert coco_keypoint_eval(results, p["val_ann_file"], 17)["AP"] == pytest.approx(1.0)


def test_wholebody_files_load_and_evaluate(tmp_path):
    root = str(tmp_path / "wb")
    generate(root, 4, wholebody=True, seed=1)
    p = dataset_paths(root, wholebody=True)
    assert os.path.basename(p["train_ann_file"]) == "coco_wholebody_train.json"
    ds = TopDownDataset(p["train_ann_file"], p["train_image_root"], 133, train=True, flip=False)
    assert ds[0]["target_weight"].shape == (133,) and (ds[0]["target_weight"][23:91] > 0).any()
    gt = json.load(open(p["train_ann_file"]))
    ann = gt["annotations"][0]
    assert len(ann["face_kpts"]) == 204 and len(ann["lefthand_kpts"]) == 63 and len(ann["foot_kpts"]) == 18
    assert ann["face_valid"] and len(ann["face_box"]) == 4
    fields = ("keypoints", "foot_kpts", "face_kpts", "lefthand_kpts", "righthand_kpts")
    results = [{"image_id": a["image_id"], "category_id": 1, "score": 1.0,
                "keypoints": sum((a[f] for f in fields), [])} for a in gt["annotations"]]
    metrics = coco_keypoint_eval(results, p["train_ann_file"], 133)
    for part in ("body", "foot", "face", "lefthand", "righthand", "wholebody"):
        assert metrics[part]["AP"] == pytest.approx(1.0), part


def test_synth_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["synth", "--out", str(out), "--images", "3", "--seed", "2"]) == 0
    assert "2 train images" in capsys.readouterr().out
    assert os.path.isfile(out / "annotations" / "person_keypoints_val.json")
    assert json.load(open(out / "synth.json"))["seed"] == 2
    # bad output folders and counts: one line, exit 2, nothing written
    (tmp_path / "file").write_text("x")
    for argv in (["--out", str(out), "--images", "3"],                       # not empty
                 ["--out", str(tmp_path / "file"), "--images", "3"],         # a file
                 ["--out", str(tmp_path / "file" / "sub"), "--images", "3"],  # under a file
                 ["--out", str(tmp_path / "new"), "--images", "1"]):        # too few images
        try:
            rc = main(["synth"] + argv)
        except SystemExit as e:  # argparse's own errors
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert not os.path.exists(tmp_path / "new")


def test_cache_is_reused_and_follows_gtpt_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GTPT_CACHE", str(tmp_path / "cache"))
    root, made = ensure_cached(3, seed=5)
    assert made and root.startswith(str(tmp_path / "cache")) and os.path.isfile(os.path.join(root, "synth.json"))
    again, made_again = ensure_cached(3, seed=5)
    assert again == root and not made_again
    assert [n for n in os.listdir(tmp_path / "cache") if ".tmp-" in n] == []  # no half-written folder left
    with pytest.raises(SynthError, match="--images"):
        generate(str(tmp_path / "x"), 1)


def test_easy_setting_draws_one_whole_unoccluded_figure_and_keys_the_cache(tmp_path):
    """The `gtpt train` default dataset ("easy"): one figure per image, every body joint labelled inside the image,
    no occluder pixels, moderate lean; the full setting (gtpt synth's default) varies more. Its cache folder is
    keyed apart from the full one."""
    leans_easy, occluded_full, two_full = [], 0, 0
    for i in range(40):
        image, people, labels = render_image(np.random.default_rng([0, 0, i]), difficulty="easy")
        assert len(people) == 1
        kp = people[0]["keypoints"]
        assert (kp[:, 2] > 0).all() and (kp[:, 0] > 0).all() and (kp[:, 0] < image.width).all()
        assert not (labels == 255).any()
        mid_sh, mid_hip = (kp[5, :2] + kp[6, :2]) / 2, (kp[11, :2] + kp[12, :2]) / 2
        leans_easy.append(abs(math.atan2(mid_sh[0] - mid_hip[0], mid_hip[1] - mid_sh[1])))
        _, people_full, labels_full = render_image(np.random.default_rng([0, 0, i]))
        occluded_full += bool((labels_full == 255).any())
        two_full += len(people_full) == 2
    assert max(leans_easy) <= 0.31 and occluded_full > 0 and two_full > 0
    easy, _ = ensure_cached(3, seed=1, cache_dir=str(tmp_path), difficulty="easy", val_fraction=0.34)
    full, _ = ensure_cached(3, seed=1, cache_dir=str(tmp_path))
    assert easy != full and "easy" in os.path.basename(easy)
    info = json.load(open(os.path.join(easy, "synth.json")))
    assert info["difficulty"] == "easy" and (info["train"]["images"], info["val"]["images"]) == (2, 1)
    with pytest.raises(SynthError, match="difficulty"):
        generate(str(tmp_path / "x"), 3, difficulty="hard")


def test_easy_setting_marks_the_limb_joints_in_their_colours():
    """Easy images carry a disc of its MARKER_COLOURS entry on each of the 12 limb joints (visible, label 2); the
    full setting draws none."""
    from gtpt.synth import MARKER_COLOURS
    for i in range(5):
        for difficulty, marked in (("easy", True), ("full", False)):
            image, people, _ = render_image(np.random.default_rng([0, 0, i]), difficulty=difficulty)
            px = np.asarray(image)
            for k in range(5, 17):
                x, y, v = people[0]["keypoints"][k]
                if v == 0:
                    continue
                hit = tuple(int(c) for c in px[int(y), int(x)]) == MARKER_COLOURS[k - 5]
                assert hit == marked, (difficulty, i, k)
                if marked:
                    assert v == 2


def test_readme_states_the_synthetic_training_defaults():
    """README's "Training without COCO" names the defaults `gtpt train` uses on the synthetic set."""
    from gtpt import train as T
    from gtpt.synth import DIFFICULTIES
    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    text = " ".join(text[text.index("<!-- synth:start -->"):text.index("<!-- synth:end -->")].split())
    d, n_val = T.SYNTH_DEFAULTS, round(T.SYNTH_IMAGES * T.SYNTH_VAL_FRACTION)
    steps = (T.SYNTH_IMAGES - n_val) // d["batch_size"]
    assert T.SYNTH_DIFFICULTY == "easy" and DIFFICULTIES["easy"]["markers"] and "MARKER_COLOURS" in text
    assert f"{T.SYNTH_IMAGES} images ({T.SYNTH_IMAGES - n_val} train = {steps} steps of batch {d['batch_size']}, " \
           f"{n_val} val), {d['epochs']} epochs ({d['epochs'] * steps} steps" in text
    assert f"Adam {d['lr']:g}".replace("0.003", "3e-3") in text and f"{d['warmup_steps']}-step linear warm-up" in text
    assert f"EMA momentum held at {d['ema_momentum']}" in text and f"std {d['joint_token_std']}" in text
    assert d["augment"] == "none" and d["flip"] is False and "no augmentation, no flip" in text
