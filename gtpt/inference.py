"""Pose estimation on images with given person boxes, a Pillow visualisation, and the ``gtpt infer`` command.

The crop, flip test, decoding and back-projection are the evaluation path of :mod:`gtpt.evaluate` (the official
test conventions), so keypoints from :class:`PoseEstimator` equal what ``evaluate`` scores for the same boxes.
"""
from __future__ import annotations

import argparse
import os
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
from .cli_options import add_infer_arguments  # noqa: F401 - re-exported (the options live torch-free there)
from .inputs import join_negative_box_values, outside_image  # noqa: F401 - join_negative_box_values re-exported
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
    minutes on a CPU). ``threads``: ONNX Runtime's intra-op threads. See :class:`gtpt.export.ExportedRunner`.
    On a CPU ``runtime="onnxruntime"`` was the fastest runtime measured (README, CPU inference; a one-time export
    of a few seconds, none with ``exported``); the default ``"torch"`` needs no export."""

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

    @classmethod
    def from_checkpoint(cls, checkpoint: Union[str, os.PathLike], variant: Optional[str] = None, **kwargs
                        ) -> "PoseEstimator":
        """An estimator for ``checkpoint`` whose variant is read from the checkpoint itself (``variant``, if given,
        must agree: a :class:`gtpt.checkpoint.CheckpointError` otherwise). ``kwargs`` as the constructor's."""
        from .inputs import resolve_variant
        name, state = resolve_variant(variant, checkpoint)
        return cls(name, state, **kwargs)

    def __call__(self, image: ImageInput, boxes: Any = None) -> np.ndarray:
        """Keypoints ``(N, K, 3)`` = (x, y, confidence) in image pixels for ``boxes`` ``(N, 4)`` [x, y, w, h]
        (default: one box, the whole image, as ``gtpt infer``). A box entirely outside the image gets no
        keypoints: NaN coordinates and confidence 0, with an :class:`OutsideImageWarning`."""
        return self.keypoints_batch([image], [boxes])[0]

    def keypoints_batch(self, images: Sequence[ImageInput], boxes: Sequence[Any]) -> List[np.ndarray]:
        """:meth:`__call__` for several images at once (e.g. video frames): their crops share forwards of up to
        ``batch_size``. ``boxes[i]`` may be None (the whole image)."""
        if len(images) != len(boxes):
            raise ValueError(f"got {len(images)} images but {len(boxes)} box lists")
        cfg = self.model.cfg
        crop_wh = (cfg.image_size[1], cfg.image_size[0])
        imgs = [_as_rgb_image(im) for im in images]
        bxs = [_as_boxes([[0.0, 0.0, float(im.size[0]), float(im.size[1])]] if b is None else b)
               for im, b in zip(imgs, boxes)]
        outs = [np.zeros((len(b), cfg.num_keypoints, 3)) for b in bxs]
        jobs = []  # (image index, box index) of every box with pixels inside its image
        for i, (im, b) in enumerate(zip(imgs, bxs)):
            away = outside_image(b, im.size)
            for j in np.flatnonzero(away):
                warnings.warn(f"box {b[j].tolist()} lies entirely outside the {im.size[0]}x{im.size[1]} image: "
                              f"no keypoints for it", OutsideImageWarning, stacklevel=3)
                outs[i][j, :, :2] = np.nan
            jobs += [(i, j) for j in np.flatnonzero(~away)]
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start:start + self.batch_size]
            cs = [box_to_center_scale(bxs[i][j], aspect_ratio=crop_wh[0] / crop_wh[1]) for i, j in chunk]
            crops = torch.stack([to_model_input(warp_affine(imgs[i], get_affine_transform(c, s, 0.0, crop_wh),
                                                            crop_wh)) for (i, _), (c, s) in zip(chunk, cs)]
                                ).to(self.device)
            coords, conf = predict_crops(self._forward, crops, self.flip_test)
            centers, scales = np.array([c for c, _ in cs]), np.array([s for _, s in cs])
            xy = to_image_coords(coords, centers, scales, 0.0, crop_wh)
            for k, (i, j) in enumerate(chunk):
                outs[i][j, :, :2] = xy[k]
                outs[i][j, :, 2] = conf[k]
        return outs

    def estimate(self, image: ImageInput, boxes: Any = None, box_scores: Optional[Sequence[float]] = None,
                 nms_threshold: Optional[float] = OKS_NMS_THRESHOLD) -> List[Dict[str, Any]]:
        """Keypoints plus the official instance score (box score x mean confidence of joints above 0.01) and
        OKS-NMS over the image (``nms_threshold=None``: keep all). Returns dicts ``box``, ``box_score``,
        ``score``, ``keypoints`` ``(K, 3)``, best first. ``boxes`` default: the whole image; boxes entirely
        outside the image are left out (with an :class:`OutsideImageWarning`)."""
        return self.estimate_batch([image], [boxes], [box_scores], nms_threshold)[0]

    def estimate_batch(self, images: Sequence[ImageInput], boxes: Sequence[Any],
                       box_scores: Optional[Sequence[Optional[Sequence[float]]]] = None,
                       nms_threshold: Optional[float] = OKS_NMS_THRESHOLD) -> List[List[Dict[str, Any]]]:
        """:meth:`estimate` for several images (video frames) at once, their crops batched together."""
        imgs = [_as_rgb_image(im) for im in images]
        bxs = [_as_boxes([[0.0, 0.0, float(im.size[0]), float(im.size[1])]] if b is None else b)
               for im, b in zip(imgs, boxes)]
        box_scores = [None] * len(imgs) if box_scores is None else box_scores
        scs = []
        for b, sc in zip(bxs, box_scores):
            s = np.ones(len(b)) if sc is None else np.asarray(sc, dtype=np.float64).reshape(-1)
            if s.shape != (len(b),) or not np.isfinite(s).all():
                raise ValueError(f"box_scores must be {len(b)} finite numbers, got {s.tolist()}")
            scs.append(s)
        all_kps = self.keypoints_batch(imgs, bxs)
        out = []
        for im, b, s, kps in zip(imgs, bxs, scs, all_kps):
            keep = ~outside_image(b, im.size)
            b, s, kps = b[keep], s[keep], kps[keep]
            inst = rescore(kps[..., 2], s)
            if nms_threshold is None:
                order = np.argsort(-inst, kind="stable").tolist()
            else:
                areas = np.array([np.prod(box_to_center_scale(x)[1] * PIXEL_STD) for x in b])
                order = oks_nms_indices(kps, inst, areas, nms_threshold)
            out.append([{"box": b[i].tolist(), "box_score": float(s[i]), "score": float(inst[i]),
                         "keypoints": kps[i]} for i in order])
        people = [p["keypoints"] for ps in out for p in ps]
        if people and not self._hinted and max(float(k[:, 2].max()) for k in people) < IN_VIS_THRESHOLD:
            self._hinted = True
            warnings.warn(low_confidence_hint(max(float(k[:, 2].max()) for k in people)), LowConfidenceWarning,
                          stacklevel=2)
        return out

    _hinted = False  # the low-confidence hint is given once per estimator


class OutsideImageWarning(UserWarning):
    """A person box lies entirely outside its image: it gets no keypoints."""


class LowConfidenceWarning(UserWarning):
    """No joint reached the drawing / rescoring threshold: the weights are random or barely trained."""


def low_confidence_hint(best: float, threshold: float = IN_VIS_THRESHOLD) -> str:
    return (f"no joint reached confidence {threshold:g} (the best was {best:.4f}), so drawings show boxes only: "
            f"the weights are random or barely trained (official weights: the Google Drive links in the README of "
            f"github.com/haonanwang0522/GTPT; see this project's README, Model)")


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
# gtpt infer (options: gtpt.cli_options; inputs, boxes, output paths and the run: gtpt.inputs; video: gtpt.video)

def _resolve_device(text: str) -> str:
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda, cuda:N or auto, got {text!r}")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {text}: no such CUDA device on this machine (use --device cpu)")
    return text


def run_inference_cli(args: argparse.Namespace) -> int:
    """Run ``gtpt infer``: estimate poses on ``args.images`` (image files, folders, videos) and write
    ``args.output`` (a JSON list of ``image``, ``image_id``, ``category_id``, ``box``, ``box_score``, ``score``,
    ``keypoints`` flat [x, y, c] * K, plus ``frame`` and ``time_s`` for video frames; 133 keypoints in the
    COCO-WholeBody layout: ``keypoints`` = body, then ``foot_kpts``, ``face_kpts``, ``lefthand_kpts``,
    ``righthand_kpts``) and optional drawings. Every argument, input and output path is checked before the
    model is built. Returns 0, or 2 with a one-line error for bad inputs."""
    from .errors import debug_enabled, one_line
    from .inputs import (BoxSource, check_output_file, check_readable, expand_inputs, resolve_variant, run_infer,
                         vis_targets, warn_line)
    warn = warn_line()
    try:
        check_output_file(args.output, "-o")
        inputs = expand_inputs(args.images, warn)
        targets = vis_targets(inputs, args.vis)
        clash = {os.path.abspath(args.output)} & ({os.path.abspath(t) for t in targets.values()}
                                                  | {os.path.abspath(i.path) for i in inputs})
        if clash:
            raise ValueError(f"-o {args.output} is also an input or a drawing; choose another output file")
        boxes = BoxSource(args, inputs)
        device = _resolve_device(args.device)
        variant, checkpoint = resolve_variant(args.variant, args.checkpoint)
        inputs = check_readable(inputs, args.skip_bad, warn)
        runtime, exported = getattr(args, "runtime", "torch"), getattr(args, "exported", None)
        if exported is not None and runtime == "torch":
            raise ValueError("--exported needs --runtime onnxruntime or pt2")
        if exported is not None and not os.path.isfile(exported):
            raise ValueError(f"--exported {exported}: no such file (make one with gtpt export)")
        if args.device == "auto" and runtime == "onnxruntime":
            device = "cpu"  # ONNX Runtime's CPU execution provider
        if args.checkpoint is None and exported is None:
            print(f"gtpt infer: warning: no --checkpoint, {variant} has random weights; the keypoints are "
                  f"meaningless", file=sys.stderr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)
            est = PoseEstimator(variant, checkpoint, device=device, backend=args.backend,
                                flip_test=not args.no_flip, batch_size=args.batch_size,
                                runtime=runtime, exported=exported)
        entries, best = run_infer(est, inputs, boxes, targets, args, warn)
        write_results(entries, args.output)
        if 0 <= best < args.kpt_thr:
            print(f"gtpt infer: note: {low_confidence_hint(best, args.kpt_thr)}", file=sys.stderr)
    except (ValueError, FileNotFoundError) as e:
        if debug_enabled():
            raise
        print(f"gtpt infer: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0
