"""End-to-end memorisation check: train a GTPT variant from scratch on coco_tiny's 12 people, then score the same
people with COCO AP (GT boxes).

A model that fits its training crops can only score well if targets, crops, loss, decoding, the inverse affine,
rescoring, NMS and COCOeval agree with each other; with ``--flip`` (flip augmentation on) the flip test then has to
raise AP, which checks its bin shift and left/right swap. Not an accuracy figure: 12 people, no held-out data.

    python scripts/overfit_coco_tiny.py --steps 200 [--flip] [--variant gtpt-t] [--out /tmp/overfit]

On a 2-core CPU, gtpt-t takes about 4.5 s per step (batch 12, both passes, reference backend).
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

from conftest import find_coco_tiny  # noqa: E402
from gtpt.config import get_config  # noqa: E402
from gtpt.data import TopDownDataset  # noqa: E402
from gtpt.evaluate import evaluate  # noqa: E402
from gtpt.train import TrainConfig, train  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (one epoch = one batch of 12)")
    p.add_argument("--flip", action="store_true", help="flip augmentation on (scale, rotation, half-body stay off)")
    p.add_argument("--variant", default="gtpt-t", help="a body variant (coco_tiny's 17-keypoint annotations)")
    p.add_argument("--backend", default="reference", help="gtpt_kernels backend (default reference)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="overfit-run", help="training output folder (must not hold a run)")
    args = p.parse_args()
    root = find_coco_tiny()
    if root is None:
        p.error("coco_tiny not found: set GTPT_COCO_TINY to shared/data/coco_tiny")
    if get_config(args.variant).wholebody:
        p.error("use a body variant (gtpt-t, gtpt-s, gtpt-b)")
    ann, images = os.path.join(root, "annotations", "person_keypoints_tiny.json"), os.path.join(root, "images")
    data = TopDownDataset(ann, images, 17, train=True, scale_factor=0.0, rotation_factor=0.0, flip=args.flip,
                          half_body_prob=0.0)
    # Fast EMA (0.9) so the averaged weights are not stuck near the initialisation after a few hundred steps.
    cfg = TrainConfig(args.variant, args.out, epochs=args.steps, batch_size=len(data), workers=0,
                      backend=args.backend, ema_momentum=0.9, log_every=10, lr_milestones=(args.steps + 1,),
                      resume=False)
    t0 = time.perf_counter()
    run = train(cfg, data, device=args.device)
    train_s = time.perf_counter() - t0
    val = TopDownDataset(ann, images, 17, train=False)
    report = {"variant": args.variant, "steps": args.steps, "flip_augmentation": args.flip,
              "train_s": round(train_s, 1), "final_loss": run["final_loss"]}
    for name, model in (("student", run["model"]), ("ema", run["ema_model"])):
        for flip_test in (False, True):
            m = evaluate(model.eval(), val, batch_size=len(val), flip_test=flip_test, device=args.device)
            report[f"{name}_{'flip' if flip_test else 'noflip'}"] = {k: round(m[k], 4) for k in ("AP", "AP50",
                                                                                                   "AP75", "AR")}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
