"""Pose estimation on images with given person boxes, a Pillow visualisation, and the ``gtpt infer`` command.

The crop, flip test, decoding and back-projection are the evaluation path of :mod:`gtpt.evaluate` (the official
test conventions), so keypoints from :class:`PoseEstimator` equal what ``evaluate`` scores for the same boxes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw

from gtpt_kernels.backend import BACKENDS

from .checkpoint import load_official_checkpoint
from .config import list_variants
from .export import RUNTIMES, ExportedRunner
from .evaluate import (IN_VIS_THRESHOLD, OKS_NMS_THRESHOLD, oks_nms_indices, predict_crops, rescore, to_image_coords,
                       write_results)
from .model import GTPT, build_model
from .transforms import (PIXEL_STD, box_to_center_scale, get_affine_transform, load_image, to_model_input,
                         warp_affine)

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]

# COCO's person skeleton (the ``categories[0].skeleton`` of the annotation files), 0-based.
COCO_SKELETON = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
                 (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6))
_PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60))


class RandomWeightsWarning(UserWarning):
    """A model was built without a checkpoint: its keypoints are meaningless."""


def _as_rgb_image(image: ImageInput) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, exif_orientation=True)  # upright, as a viewer shows it (and boxes read off it)
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise ValueError(f"image array must be H x W x 3 uint8 RGB, got shape {image.shape} dtype {image.dtype}")
        return Image.fromarray(image)
    raise TypeError(f"image must be a path, a PIL image or an H x W x 3 uint8 array, got {type(image).__name__}")


def _as_boxes(boxes: Any) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim == 1 and b.size == 4:
        b = b[None]
    if b.size == 0:
        return b.reshape(0, 4)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4) [x, y, w, h], got shape {b.shape}")
    bad = ~np.isfinite(b).all(1) | (b[:, 2] <= 0) | (b[:, 3] <= 0)
    if bad.any():
        raise ValueError(f"boxes must be finite [x, y, w, h] with w, h > 0; bad rows: {np.flatnonzero(bad).tolist()}")
    return b


class PoseEstimator:
    """Top-down GTPT on an image and its person boxes.

    ``model_or_variant``: a :class:`gtpt.model.GTPT` (used as is, on its device unless ``device`` is given) or a
    variant name, built with ``backend`` and loaded from ``checkpoint`` (an official ``.pth``); a name without a
    checkpoint gives random weights and a :class:`RandomWeightsWarning`. The model is put in eval mode.

    ``runtime``: ``"torch"`` (eager), ``"onnxruntime"`` (CPU) or ``"pt2"`` (AOTInductor) runs the forward; the
    crops, flip test and decoding are the same for all. ``exported``: the ``.onnx`` / ``.pt2`` file to run
    (``gtpt export``); without it the model is exported when the estimator is made (a ``.pt2`` compile takes
    minutes on a CPU). ``threads``: ONNX Runtime's intra-op threads. See :class:`gtpt.export.ExportedRunner`."""

    def __init__(self, model_or_variant: Union[GTPT, str], checkpoint: Optional[Union[str, os.PathLike]] = None,
                 device: Optional[Union[str, torch.device]] = None, backend: str = "auto", flip_test: bool = True,
                 batch_size: int = 32, runtime: str = "torch", exported: Optional[Union[str, os.PathLike]] = None,
                 threads: Optional[int] = None):
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
        if runtime == "onnxruntime" and device is None:
            device = "cpu"
        if exported is not None and runtime == "torch":
            raise ValueError("an exported file needs runtime 'onnxruntime' or 'pt2'")
        if isinstance(model_or_variant, GTPT):
            model = model_or_variant
        else:
            model = build_model(model_or_variant, backend=backend)
            if checkpoint is None and exported is None:  # an exported file carries its own weights
                warnings.warn(f"{model.cfg.name} has random weights (no checkpoint): its keypoints are meaningless",
                              RandomWeightsWarning, stacklevel=2)
        if checkpoint is not None:
            load_official_checkpoint(model, checkpoint)
        if device is None:
            device = (next(model.parameters()).device if isinstance(model_or_variant, GTPT)
                      else "cuda" if torch.cuda.is_available() else "cpu")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.flip_test = flip_test
        self.batch_size = batch_size
        self.runtime = runtime
        # what runs the forward: the model itself, or an exported file with the model's cfg and eval-mode call
        self._forward = self.model if runtime == "torch" else ExportedRunner(
            runtime, model.cfg, exported, model=self.model, device=self.device, threads=threads)

    @property
    def num_keypoints(self) -> int:
        return self.model.cfg.num_keypoints

    def __call__(self, image: ImageInput, boxes: Any) -> np.ndarray:
        """Keypoints ``(N, K, 3)`` = (x, y, confidence) in image pixels for ``boxes`` ``(N, 4)`` [x, y, w, h]."""
        img = _as_rgb_image(image)
        boxes = _as_boxes(boxes)
        cfg = self.model.cfg
        crop_wh = (cfg.image_size[1], cfg.image_size[0])
        out = np.zeros((len(boxes), cfg.num_keypoints, 3))
        for start in range(0, len(boxes), self.batch_size):
            chunk = boxes[start:start + self.batch_size]
            cs = [box_to_center_scale(b, aspect_ratio=crop_wh[0] / crop_wh[1]) for b in chunk]
            crops = torch.stack([to_model_input(warp_affine(img, get_affine_transform(c, s, 0.0, crop_wh), crop_wh))
                                 for c, s in cs]).to(self.device)
            coords, conf = predict_crops(self._forward, crops, self.flip_test)
            centers, scales = np.array([c for c, _ in cs]), np.array([s for _, s in cs])
            out[start:start + len(chunk), :, :2] = to_image_coords(coords, centers, scales, 0.0, crop_wh)
            out[start:start + len(chunk), :, 2] = conf
        return out

    def estimate(self, image: ImageInput, boxes: Any, box_scores: Optional[Sequence[float]] = None,
                 nms_threshold: Optional[float] = OKS_NMS_THRESHOLD) -> List[Dict[str, Any]]:
        """Keypoints plus the official instance score (box score x mean confidence of joints above 0.01) and
        OKS-NMS over the image (``nms_threshold=None``: keep all). Returns dicts ``box``, ``box_score``,
        ``score``, ``keypoints`` ``(K, 3)``, best first."""
        boxes = _as_boxes(boxes)
        scores = np.ones(len(boxes)) if box_scores is None else np.asarray(box_scores, dtype=np.float64).reshape(-1)
        if scores.shape != (len(boxes),) or not np.isfinite(scores).all():
            raise ValueError(f"box_scores must be {len(boxes)} finite numbers, got {scores.tolist()}")
        kps = self(image, boxes)
        inst = rescore(kps[..., 2], scores)
        if nms_threshold is None:
            order = np.argsort(-inst, kind="stable").tolist()
        else:
            areas = np.array([np.prod(box_to_center_scale(b)[1] * PIXEL_STD) for b in boxes])
            order = oks_nms_indices(kps, inst, areas, nms_threshold)
        return [{"box": boxes[i].tolist(), "box_score": float(scores[i]), "score": float(inst[i]),
                 "keypoints": kps[i]} for i in order]


def draw_keypoints(image: ImageInput, keypoints: np.ndarray, threshold: float = IN_VIS_THRESHOLD,
                   skeleton: Optional[Sequence[Sequence[int]]] = None, boxes: Optional[Any] = None,
                   radius: Optional[int] = None) -> Image.Image:
    """A copy of ``image`` with keypoints ``(N, K, 3)`` (or ``(K, 3)``) drawn: joints with confidence >=
    ``threshold`` as dots, ``skeleton`` limbs between them (default: the COCO skeleton for 17 joints, none
    otherwise, so WholeBody poses are dots), and optional ``boxes`` ``(N, 4)`` xywh.

    The default threshold is the official visibility threshold (0.01, ``IN_VIS_THRE``): GTPT's confidence is a
    maximum SimCC probability, which a model fitted to its sigma = 4-bin Gaussian targets keeps below the targets'
    peak, 1 / (4 sqrt(2 pi)) ~ 0.1 (we measured 0.02-0.1 on a gtpt-t fitted to coco_tiny). Thresholds like 0.3,
    usual for heatmap models, would hide every joint."""
    img = _as_rgb_image(image).copy()
    kps = np.asarray(keypoints, dtype=np.float64)
    kps = kps[None] if kps.ndim == 2 else kps
    if kps.ndim != 3 or kps.shape[-1] != 3:
        raise ValueError(f"keypoints must be (N, K, 3) or (K, 3), got shape {kps.shape}")
    if skeleton is None:
        skeleton = COCO_SKELETON if kps.shape[1] == 17 else ()
    draw = ImageDraw.Draw(img)
    r = radius if radius is not None else max(2, round(max(img.size) / 200))
    if boxes is not None:
        for i, (x, y, w, h) in enumerate(_as_boxes(boxes)):
            draw.rectangle((x, y, x + w, y + h), outline=_PALETTE[i % len(_PALETTE)], width=max(1, r // 2))
    for i, kp in enumerate(kps):
        color = _PALETTE[i % len(_PALETTE)]
        ok = kp[:, 2] >= threshold
        for a, b in skeleton:
            if ok[a] and ok[b]:
                draw.line((kp[a, 0], kp[a, 1], kp[b, 0], kp[b, 1]), fill=color, width=max(1, r // 2 + 1))
        for x, y, _ in kp[ok]:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=color, outline=(255, 255, 255))
    return img


# ----------------------------------------------------------------------------------------------------------------
# gtpt infer

def add_infer_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``gtpt infer`` options (pair with ``set_defaults(func=run_inference_cli)``)."""
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("-o", "--output", required=True, help="output JSON (one entry per person)")
    parser.add_argument("--variant", default="gtpt-s",
                        help=f"model variant (default gtpt-s): {', '.join(list_variants())}")
    parser.add_argument("--checkpoint", help="official GTPT .pth; without it the weights are random")
    boxes = parser.add_mutually_exclusive_group()
    boxes.add_argument("--detections", help="COCO detection results JSON (image_id, bbox, score, category_id); "
                                            "matched to images whose file name is the COCO image id")
    boxes.add_argument("--box", action="append", metavar="X,Y,W,H",
                       help="a person box for every image (repeatable; negative values allowed, e.g. "
                            "--box -20,10,300,400); default: the whole image")
    parser.add_argument("--det-score-thr", type=float, default=0.5,
                        help="keep detections with score >= this (default 0.5; the official COCO test uses 0.0)")
    parser.add_argument("--no-nms", action="store_true", help=f"skip OKS-NMS (default threshold {OKS_NMS_THRESHOLD})")
    parser.add_argument("--no-flip", action="store_true", help="no flip test")
    parser.add_argument("--vis", help="draw the poses: an image path for one input image, else a folder")
    parser.add_argument("--kpt-thr", type=float, default=IN_VIS_THRESHOLD,
                        help=f"confidence to draw a joint (default {IN_VIS_THRESHOLD}, the official visibility "
                             f"threshold; GTPT's confidences stay below ~0.1)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="gtpt_kernels backend (default auto)")
    parser.add_argument("--batch-size", type=int, default=32, help="crops per forward (default 32)")
    parser.add_argument("--runtime", choices=RUNTIMES, default="torch",
                        help="what runs the model: torch (eager, default), onnxruntime (CPU) or pt2 (AOTInductor)")
    parser.add_argument("--exported", metavar="FILE",
                        help="the .onnx / .pt2 file for --runtime (from gtpt export); default: export on the fly")
    return parser


_BOX_VALUE = re.compile(r"^-[0-9.eE+-]*(,[-0-9.eE+]+){3}$")


def join_negative_box_values(argv: Sequence[str]) -> List[str]:
    """``--box -20,10,300,400`` -> ``--box=-20,10,300,400``: argparse takes a value that starts with '-' and is not
    a plain number for an option, so a box starting left of or above the image would be refused."""
    out: List[str] = []
    it = iter(argv)
    for a in it:
        if a == "--box":
            nxt = next(it, None)
            if nxt is not None and _BOX_VALUE.match(nxt):
                out.append(f"--box={nxt}")
                continue
            out.append(a)
            if nxt is not None:
                out.append(nxt)
            continue
        out.append(a)
    return out


def _parse_box(text: str) -> List[float]:
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise ValueError(f"--box expects x,y,w,h, got {text!r}")
    return box


def _image_id(path: str) -> Optional[int]:
    stem = os.path.splitext(os.path.basename(path))[0]
    return int(stem) if stem.isdigit() else None


def _boxes_for(path: str, size: Sequence[int], args: argparse.Namespace, detections: Optional[List[dict]]):
    if detections is None:
        if args.box:
            boxes = [_parse_box(b) for b in args.box]
        else:
            boxes = [[0.0, 0.0, float(size[0]), float(size[1])]]
        return np.array(boxes), np.ones(len(boxes))
    image_id = _image_id(path)
    if image_id is None:
        raise ValueError(f"cannot match detections to {path}: its file name is not a COCO image id")
    dets = [d for d in detections if isinstance(d, dict) and d.get("image_id") == image_id
            and d.get("category_id", 1) == 1 and d.get("score", 1.0) >= args.det_score_thr]
    if any("bbox" not in d for d in dets):
        raise ValueError(f"{args.detections}: a detection for image {image_id} has no bbox")
    return (np.array([d["bbox"] for d in dets], dtype=np.float64).reshape(-1, 4),
            np.array([d.get("score", 1.0) for d in dets], dtype=np.float64))


def run_inference_cli(args: argparse.Namespace) -> int:
    """Run ``gtpt infer``: estimate poses on ``args.images`` and write ``args.output`` (a JSON list of
    ``image``, ``image_id``, ``category_id``, ``box``, ``box_score``, ``score``, ``keypoints`` flat [x, y, c] * K;
    133 keypoints in the COCO-WholeBody layout: ``keypoints`` = body, then ``foot_kpts``, ``face_kpts``,
    ``lefthand_kpts``, ``righthand_kpts``)
    and optional drawings. Returns 0, or 2 with a one-line error for bad inputs."""
    try:
        detections = None
        if args.detections:
            with open(args.detections) as f:
                detections = json.load(f)
            if not isinstance(detections, list):
                raise ValueError(f"{args.detections}: expected a JSON list of detections")
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        if args.device == "auto" and getattr(args, "runtime", "torch") == "onnxruntime":
            device = "cpu"  # ONNX Runtime's CPU execution provider
        if args.checkpoint is None and not getattr(args, "exported", None):
            print(f"gtpt infer: warning: no --checkpoint, {args.variant} has random weights; the keypoints are "
                  f"meaningless", file=sys.stderr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)
            est = PoseEstimator(args.variant, args.checkpoint, device=device, backend=args.backend,
                                flip_test=not args.no_flip, batch_size=args.batch_size,
                                runtime=getattr(args, "runtime", "torch"), exported=getattr(args, "exported", None))
        entries: List[Dict[str, Any]] = []
        drawings = []
        for path in args.images:
            image = load_image(path, exif_orientation=True)  # boxes and drawings as a viewer shows the photo
            boxes, scores = _boxes_for(path, image.size, args, detections)
            people = est.estimate(image, boxes, scores, None if args.no_nms else OKS_NMS_THRESHOLD)
            entries += [{"image": path, "image_id": _image_id(path), "category_id": 1, "box": p["box"],
                         "box_score": p["box_score"], "score": p["score"],
                         "keypoints": p["keypoints"].reshape(-1).tolist()} for p in people]
            if args.vis:
                kps = np.array([p["keypoints"] for p in people]).reshape(-1, est.num_keypoints, 3)
                drawings.append((path, draw_keypoints(image, kps, args.kpt_thr, boxes=[p["box"] for p in people])))
            print(f"{path}: {len(people)} person(s)", file=sys.stderr)
        write_results(entries, args.output)
        if args.vis:
            for path, drawing in drawings:
                if len(args.images) == 1:
                    out = args.vis
                else:
                    out = os.path.join(args.vis, os.path.splitext(os.path.basename(path))[0] + "_pose.png")
                os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
                drawing.save(out)
    except (ValueError, FileNotFoundError) as e:
        print(f"gtpt infer: error: {e}", file=sys.stderr)
        return 2
    return 0
