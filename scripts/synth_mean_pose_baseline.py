"""The floor a trained model must beat on a synthetic dataset: COCO AP (pycocotools, GT boxes, as `gtpt train`
validates) of predicting every validation figure at the MEAN pose of the training figures.

The mean is taken in the crop frame the data pipeline uses (GT box, aspect 3:4, x1.25; joints weighted by their
visibility), mapped back into each validation box with the same inverse transform as the model's predictions, all
confidences 1. A model whose AP is near this number has learned where joints usually are, not where they are.

    python scripts/synth_mean_pose_baseline.py DATASET_ROOT      # a `gtpt synth` folder, e.g. the training cache
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gtpt.data import TopDownDataset  # noqa: E402
from gtpt.evaluate import coco_keypoint_eval, to_image_coords  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", help="dataset folder (annotations/person_keypoints_{train,val}.json, images/{train,val})")
    a = p.parse_args()
    ann = lambda s: os.path.join(a.root, "annotations", f"person_keypoints_{s}.json")  # noqa: E731
    img = lambda s: os.path.join(a.root, "images", s)  # noqa: E731
    for s in ("train", "val"):
        if not os.path.isfile(ann(s)):
            sys.exit(f"{ann(s)}: not found; give a folder written by `gtpt synth` (or the training cache)")
    train = TopDownDataset(ann("train"), img("train"), train=False)
    num, den = 0.0, 0.0
    for i in range(len(train)):
        it = train[i]
        w = np.asarray(it["target_weight"], dtype=np.float64)[:, None]
        xy = np.stack([np.argmax(it["target_x"], -1), np.argmax(it["target_y"], -1)], -1) / train.simcc_split_ratio
        num, den = num + w * xy, den + w
    mean = num / np.maximum(den, 1e-9)  # (K, 2) crop pixels
    val = TopDownDataset(ann("val"), img("val"), train=False)
    crop_wh = (val.image_size[1], val.image_size[0])
    results = []
    for i in range(len(val)):
        it = val[i]
        center, scale = np.asarray(it["center"]).reshape(1, 2), np.asarray(it["scale"]).reshape(1, 2)
        xy = to_image_coords(mean[None], center, scale, np.zeros(1), crop_wh)[0]
        kp = np.concatenate([xy, np.ones((len(xy), 1))], 1).reshape(-1).tolist()
        results.append({"image_id": int(it["image_id"]), "category_id": 1, "keypoints": kp, "score": 1.0})
    metrics = coco_keypoint_eval(results, ann("val"))
    print(f"mean pose of {len(train)} training figures on {len(val)} validation figures: "
          + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
