"""COCO / COCO-WholeBody top-down data: validated annotation loading, person records, training augmentation and
SA-SimCC targets.

Semantics follow the official GTPT code (HRNet / SimCC lineage; ``shared/reference/gtpt-reference.md`` §6-§8):
records as ``lib/dataset/coco.py`` / ``coco_wholebody.py`` (``_load_coco_keypoint_annotation_kernal``,
``_load_coco_person_detection_results``), augmentation and targets as ``lib/dataset/JointsDataset.py``
(``__getitem__``, ``half_body_transform``, ``generate_sa_simdr``, ``adjust_target_weight``), flipping as
``lib/utils/transforms.py: fliplr_joints``.

Randomness: every random choice for sample ``index`` comes from its own ``numpy.random.Generator`` seeded with
``(seed, epoch, index)`` (a ``SeedSequence``), never from global state. A sample is therefore the same whatever
the worker, the number of workers or the order of access, and forked DataLoader workers cannot repeat each other's
draws (the classic bug of the global numpy RNG copied into every worker). Call :meth:`TopDownDataset.set_epoch`
before each epoch; with ``persistent_workers=True`` the workers keep their own copy of the dataset, so the new epoch
would not reach them; use the default ``persistent_workers=False``.

Deviations from the official code, each for a degenerate case or an upstream bug:

- ``fliplr_joints`` returns ``joints * joints_vis``; with WholeBody float visibilities that shrinks the flipped
  coordinates of a joint with ``0 < v < 1`` (and can change its in-crop test). Here flipped coordinates are exact.
- A cleaned GT box (or a detection box) with zero width or height is skipped: the official code keeps it and
  builds a padded box from the other side, but :func:`gtpt.transforms.box_to_center_scale` rejects it.
- A half-body choice whose joints all coincide (zero-size box, zero scale) is ignored instead of producing a
  degenerate crop.
- Detection records carry visibility 0 (the official sets 1 for joints at (0, 0), which only feeds a meaningless
  validation loss); their target weights are therefore all zero.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from .keypoints import WHOLEBODY_FIELDS, WHOLEBODY_PARTS, flip_permutation
from .transforms import (PIXEL_STD, affine_points, box_to_center_scale, get_affine_transform, load_image,
                         to_model_input, warp_affine)

PathLike = Union[str, os.PathLike]

# ``upper_body_ids`` of ``coco.py`` / ``coco_wholebody.py``; every other joint counts as lower body.
UPPER_BODY_IDS: Dict[int, Tuple[int, ...]] = {17: tuple(range(11)), 133: tuple(range(11)) + tuple(range(23, 133))}
PERSON_CATEGORY = 1
HALF_BODY_PADDING = 1.5
ROTATION_PROB = 0.6   # ``random.random() <= 0.6`` in ``JointsDataset.__getitem__``
FLIP_PROB = 0.5


class AnnotationError(ValueError):
    """An annotation, detection or image file that cannot be used; the message names the file and the problem."""


def _check_num_keypoints(num_keypoints: int) -> None:
    if num_keypoints not in UPPER_BODY_IDS:
        raise ValueError(f"num_keypoints must be 17 (COCO) or 133 (COCO-WholeBody), got {num_keypoints!r}")


def _read_json(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise AnnotationError(f"{path}: {what} file not found")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: invalid JSON in {what} file ({e})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: cannot read {what} file ({e})") from e


def _numbers(value: Any, length: int, path: str, where: str) -> np.ndarray:
    """``value`` as a finite float64 vector of ``length`` numbers, else an :class:`AnnotationError`."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise AnnotationError(f"{path}: {where} is not a list of numbers") from None
    if arr.ndim != 1 or arr.size != length:
        raise AnnotationError(f"{path}: {where} has {arr.size} values, expected {length}")
    if not np.isfinite(arr).all():
        raise AnnotationError(f"{path}: {where} contains NaN or infinite values")
    return arr


def _require(obj: Any, keys: Sequence[str], path: str, where: str) -> None:
    if not isinstance(obj, dict):
        raise AnnotationError(f"{path}: {where} is not a JSON object")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise AnnotationError(f"{path}: {where} is missing {', '.join(missing)}")


def load_annotation_file(ann_file: PathLike, num_keypoints: int = 17) -> Dict[str, Any]:
    """Read a COCO(-WholeBody) keypoint annotation file and check its structure.

    Checked here: the file exists and is JSON; the top level has ``images``, ``annotations`` and ``categories``
    lists; every image has ``id`` (unique), ``file_name``, ``width`` and ``height``; every annotation has ``id``,
    ``category_id``, a finite 4-number ``bbox``, a finite ``area`` and an ``image_id`` that names an image.
    Keypoint arrays are checked by :func:`gt_records`, which reads them. Returns the parsed dict."""
    _check_num_keypoints(num_keypoints)
    path = os.path.abspath(os.fspath(ann_file))
    data = _read_json(path, "annotation")
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise AnnotationError(f"{path}: missing top-level key(s) {', '.join(missing)}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise AnnotationError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")
    image_ids = set()
    for i, im in enumerate(data["images"]):
        _require(im, ("id", "file_name", "width", "height"), path, f"images[{i}]")
        if im["id"] in image_ids:
            raise AnnotationError(f"{path}: images[{i}] repeats image id {im['id']}")
        image_ids.add(im["id"])
    for i, ann in enumerate(data["annotations"]):
        where = f"annotations[{i}]"
        _require(ann, ("id", "image_id", "category_id", "bbox", "area"), path, where)
        where = f"annotations[{i}] (id {ann['id']})"
        if ann["image_id"] not in image_ids:
            raise AnnotationError(f"{path}: {where} references image_id {ann['image_id']!r}, which is not in images")
        _numbers(ann["bbox"], 4, path, f"{where} bbox")
        _numbers([ann["area"]], 1, path, f"{where} area")
    return data


@dataclass(frozen=True, eq=False)
class PersonRecord:
    """One person crop: a GT annotation or a detection. Arrays are read-only.

    ``joints`` is ``(K, 3)`` float32 ``x, y, v`` in image pixels with ``v`` clipped to <= 1 (WholeBody float
    visibilities kept); ``center`` / ``scale`` come from :func:`gtpt.transforms.box_to_center_scale` of ``box``
    (``x, y, w, h``; the cleaned box for GT). ``ann_id`` is -1 and ``joints`` all zero for detections; ``score`` is
    1 for GT; ``area`` is the annotation's area for GT, ``w * h`` of the box for detections."""
    image_id: int
    image_file: str
    ann_id: int
    box: Tuple[float, float, float, float]
    center: np.ndarray
    scale: np.ndarray
    joints: np.ndarray
    score: float
    area: float

    def __post_init__(self) -> None:
        for name, dtype in (("center", np.float64), ("scale", np.float64), ("joints", np.float32)):
            arr = np.array(getattr(self, name), dtype=dtype)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    def __reduce__(self) -> Tuple[type, tuple]:
        # Rebuild through __init__ so unpickled copies (spawned DataLoader workers) keep read-only arrays.
        return (PersonRecord, tuple(getattr(self, f.name) for f in fields(self)))


def clean_box(bbox: Sequence[float], width: float, height: float) -> Optional[Tuple[float, float, float, float]]:
    """The official box sanitation (``coco.py``): clip ``(x, y, w, h)`` to the image, with the inclusive
    ``w - 1`` / ``h - 1`` extent; None when nothing is left (or, unlike the official, a side is zero)."""
    x, y, w, h = (float(v) for v in bbox)
    x1, y1 = max(0.0, x), max(0.0, y)
    x2 = min(width - 1.0, x1 + max(0.0, w - 1.0))
    y2 = min(height - 1.0, y1 + max(0.0, h - 1.0))
    if x2 > x1 and y2 > y1:
        return (x1, y1, x2 - x1, y2 - y1)
    return None


def _gt_joints(ann: Mapping[str, Any], num_keypoints: int, path: str, where: str) -> Optional[np.ndarray]:
    """``(K, 3)`` joints of a GT annotation, or None when the official rule skips it: ``max(keypoints) == 0`` on
    the 17 body keypoints (for WholeBody too; the other parts are not consulted)."""
    fields = WHOLEBODY_FIELDS if num_keypoints == 133 else WHOLEBODY_FIELDS[:1]
    parts = []
    for field, part in fields:
        if field not in ann:
            raise AnnotationError(f"{path}: {where} has no '{field}' ({num_keypoints} keypoints requested)")
        n = WHOLEBODY_PARTS[part].stop - WHOLEBODY_PARTS[part].start
        parts.append(_numbers(ann[field], 3 * n, path, f"{where} {field}"))
        if field == "keypoints" and parts[0].max() == 0:
            return None
    joints = np.concatenate(parts).reshape(num_keypoints, 3)
    joints[:, 2] = np.minimum(joints[:, 2], 1.0)
    return joints.astype(np.float32)


def _image_file(image_root: str, image: Mapping[str, Any]) -> str:
    return os.path.abspath(os.path.join(image_root, str(image["file_name"])))


def _check_images_exist(records: Sequence[PersonRecord], source: str) -> None:
    for image_file in sorted({r.image_file for r in records}):
        if not os.path.isfile(image_file):
            raise AnnotationError(f"{source}: image file {image_file} not found")


def gt_records(dataset: Mapping[str, Any], image_root: PathLike, num_keypoints: int = 17,
               aspect_ratio: float = 0.75, source: str = "<annotations>") -> List[PersonRecord]:
    """Person records from GT annotations (a dict from :func:`load_annotation_file`), in the official order
    (images in file order, then their annotations in file order).

    Kept, as ``coco.py`` keeps them: non-crowd, category 1 (person), ``area > 0``, a non-empty cleaned box
    (:func:`clean_box`), and some non-zero body keypoint value. Keypoint arrays are validated as they are read
    (length 3K per part, finite) and every image that keeps a record must exist under ``image_root``: errors
    raise :class:`AnnotationError` naming ``source``."""
    _check_num_keypoints(num_keypoints)
    root = os.fspath(image_root)
    by_image: Dict[Any, List[Tuple[int, Mapping[str, Any]]]] = {im["id"]: [] for im in dataset["images"]}
    for i, ann in enumerate(dataset["annotations"]):
        by_image[ann["image_id"]].append((i, ann))
    records = []
    for image in dataset["images"]:
        for i, ann in by_image[image["id"]]:
            if ann.get("iscrowd", 0) or ann["category_id"] != PERSON_CATEGORY or not ann["area"] > 0:
                continue
            box = clean_box(ann["bbox"], float(image["width"]), float(image["height"]))
            if box is None:
                continue
            joints = _gt_joints(ann, num_keypoints, source, f"annotations[{i}] (id {ann['id']})")
            if joints is None:
                continue
            center, scale = box_to_center_scale(box, aspect_ratio)
            records.append(PersonRecord(int(image["id"]), _image_file(root, image), int(ann["id"]), box, center,
                                        scale, joints, 1.0, float(ann["area"])))
    _check_images_exist(records, source)
    return records


def detection_records(det_file: PathLike, dataset: Mapping[str, Any], image_root: PathLike,
                      num_keypoints: int = 17, score_threshold: float = 0.0,
                      aspect_ratio: float = 0.75) -> List[PersonRecord]:
    """Person records from a detection results JSON (list of ``{image_id, category_id, bbox, score}``), as
    ``_load_coco_person_detection_results``: category 1 with ``score >= score_threshold`` (official
    ``TEST.IMAGE_THRE`` 0.0), the box used as is (not cleaned), joints zero. Every detection must name an image
    of ``dataset``; zero-size boxes are skipped."""
    _check_num_keypoints(num_keypoints)
    path = os.path.abspath(os.fspath(det_file))
    dets = _read_json(path, "detection")
    if not isinstance(dets, list) or not dets:
        raise AnnotationError(f"{path}: expected a non-empty JSON list of detections")
    images = {im["id"]: im for im in dataset["images"]}
    root = os.fspath(image_root)
    records = []
    for i, det in enumerate(dets):
        where = f"detection [{i}]"
        _require(det, ("image_id", "category_id", "bbox", "score"), path, where)
        if det["image_id"] not in images:
            raise AnnotationError(f"{path}: {where} references image_id {det['image_id']!r}, "
                                  "which is not in the annotation file")
        box = _numbers(det["bbox"], 4, path, f"{where} bbox")
        score = float(_numbers([det["score"]], 1, path, f"{where} score")[0])
        if det["category_id"] != PERSON_CATEGORY or score < score_threshold or not (box[2] > 0 and box[3] > 0):
            continue
        center, scale = box_to_center_scale(box, aspect_ratio)
        image = images[det["image_id"]]
        records.append(PersonRecord(int(image["id"]), _image_file(root, image), -1, tuple(float(v) for v in box),
                                    center, scale, np.zeros((num_keypoints, 3), np.float32), score,
                                    float(box[2] * box[3])))
    _check_images_exist(records, path)
    return records


def simcc_targets(joints: np.ndarray, visibility: np.ndarray, image_size: Sequence[int] = (256, 192),
                  split_ratio: float = 2.0, sigma: float = 4.0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SA-SimCC targets of ``JointsDataset.generate_sa_simdr``, vectorised.

    ``joints``: ``(K, 2+)`` coordinates in input pixels; ``visibility``: ``(K,)`` (already clipped to <= 1);
    ``image_size``: ``(H, W)``. Returns ``target_x (K, W * ratio)``, ``target_y (K, H * ratio)`` and
    ``target_weight (K,)``, float32. Per axis a Gaussian ``exp(-(i - mu)^2 / (2 sigma^2)) / (sigma sqrt(2 pi))``
    over the bins, ``mu = coordinate * ratio``, ``sigma`` in bins (so it sums to ~1, not peak 1). The weight is
    the visibility, zeroed when ``adjust_target_weight`` finds the joint out of range: with ``t = 3 sigma`` (in
    *input pixels*: the unscaled coordinate is tested), ``int(x - t) >= W or int(y - t) >= H or int(x + t + 1) < 0
    or int(y + t + 1) < 0`` (``int`` truncates toward zero). The Gaussian is written only where weight > 0.5, so a
    float visibility <= 0.5 keeps its weight with an all-zero target."""
    height, width = int(image_size[0]), int(image_size[1])
    xy = np.asarray(joints, dtype=np.float64)[:, :2]
    weight = np.asarray(visibility, dtype=np.float32).copy()
    t = sigma * 3
    ul = np.trunc(xy - t)
    br = np.trunc(xy + t + 1)
    outside = (ul[:, 0] >= width) | (ul[:, 1] >= height) | (br[:, 0] < 0) | (br[:, 1] < 0)
    weight[outside] = 0.0
    write = (weight > 0.5)[:, None]
    norm = sigma * math.sqrt(2 * math.pi)

    def axis(mu: np.ndarray, n_bins: int) -> np.ndarray:
        bins = np.arange(n_bins, dtype=np.float32)
        g = np.exp(-((bins[None, :] - mu[:, None]) ** 2) / (2 * sigma ** 2)) / norm
        return np.where(write, g, 0.0).astype(np.float32)

    return (axis(xy[:, 0] * split_ratio, int(width * split_ratio)),
            axis(xy[:, 1] * split_ratio, int(height * split_ratio)), weight)


def flip_joints(joints: np.ndarray, image_width: int, perm: np.ndarray) -> np.ndarray:
    """Joints of the horizontally flipped image (``fliplr_joints``): ``x -> width - 1 - x`` and left/right rows
    swapped by ``perm`` (:func:`gtpt.keypoints.flip_permutation`); visibilities move with their joints."""
    out = np.array(joints, dtype=np.float64)[perm]
    out[:, 0] = image_width - 1 - out[:, 0]
    return out


def half_body_center_scale(joints: np.ndarray, rng: np.random.Generator, upper_ids: Sequence[int],
                           aspect_ratio: float = 0.75) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """``JointsDataset.half_body_transform``: pick the visible upper-body joints (when ``randn() < 0.5`` and more
    than 2 of them) else the lower ones (if more than 2, else the upper); center = their **mean**, box = their
    min/max extent grown to ``aspect_ratio``, scale = box / 200 x 1.5. None with fewer than 2 joints (or all at one
    point)."""
    vis = joints[:, 2] > 0
    upper_mask = np.zeros(len(joints), dtype=bool)
    upper_mask[list(upper_ids)] = True
    upper, lower = joints[vis & upper_mask, :2], joints[vis & ~upper_mask, :2]
    if rng.standard_normal() < 0.5 and len(upper) > 2:
        chosen = upper
    else:
        chosen = lower if len(lower) > 2 else upper
    if len(chosen) < 2:
        return None
    center = chosen.mean(axis=0).astype(np.float64)
    w, h = (chosen.max(axis=0) - chosen.min(axis=0)).astype(np.float64)
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    if w <= 0:
        return None
    return center, np.array([w, h]) / PIXEL_STD * HALF_BODY_PADDING


@dataclass(frozen=True)
class Augmentation:
    """One sample's random crop: the final ``center`` / ``scale`` (flipped center when ``flip``), ``rotation`` in
    degrees, and whether the image is flipped / the half-body box was used."""
    center: np.ndarray
    scale: np.ndarray
    rotation: float
    flip: bool
    half_body: bool


def sample_augmentation(joints: np.ndarray, center: Sequence[float], scale: Sequence[float], image_width: int,
                        rng: np.random.Generator, upper_ids: Sequence[int], *, scale_factor: float = 0.35,
                        rotation_factor: float = 45.0, flip: bool = True, half_body_prob: float = 0.3,
                        num_joints_half_body: float = 8, aspect_ratio: float = 0.75) -> Augmentation:
    """The training draws of ``JointsDataset.__getitem__``, in its order: half-body with ``half_body_prob`` when
    the visibilities sum to more than ``num_joints_half_body``; scale x clip(N(1, sf), 1 - sf, 1 + sf); rotation
    clip(N(0, rf), -2 rf, 2 rf) with probability 0.6, else 0; horizontal flip with probability 0.5, which moves
    the center to ``width - 1 - x`` (the caller flips image and joints)."""
    c = np.array(center, dtype=np.float64)
    s = np.array(scale, dtype=np.float64)
    half_body = False
    if joints[:, 2].sum() > num_joints_half_body and rng.random() < half_body_prob:
        picked = half_body_center_scale(joints, rng, upper_ids, aspect_ratio)
        if picked is not None:
            (c, s), half_body = picked, True
    s = s * np.clip(rng.standard_normal() * scale_factor + 1, 1 - scale_factor, 1 + scale_factor)
    rotation = (float(np.clip(rng.standard_normal() * rotation_factor, -2 * rotation_factor, 2 * rotation_factor))
                if rng.random() <= ROTATION_PROB else 0.0)
    flipped = bool(flip and rng.random() <= FLIP_PROB)
    if flipped:
        c[0] = image_width - 1 - c[0]
    return Augmentation(c, s, rotation, flipped, half_body)


class TopDownDataset(Dataset):
    """Top-down COCO (17) / COCO-WholeBody (133) person crops with SA-SimCC targets.

    GT boxes by default (training, or evaluation with GT boxes); ``detections`` (a results JSON) gives evaluation
    records instead. Annotations, keypoints, detections and the existence of every used image file are checked at
    construction (:class:`AnnotationError`); images are decoded on each access, not cached.

    ``__getitem__`` returns ``image`` (3, H, W) float32 (ImageNet-normalised crop), ``target_x`` (K, W * ratio),
    ``target_y`` (K, H * ratio), ``target_weight`` (K,) float32, ``center`` / ``scale`` (2,) float64 (what the crop
    used, after augmentation), ``rotation``, ``score``, ``area`` (floats), ``image_id`` and ``index`` (ints).
    ``coco`` is the pycocotools ``COCO`` of the annotation file, for evaluators. Training randomness: see the
    module docstring."""

    def __init__(self, ann_file: PathLike, image_root: PathLike, num_keypoints: int = 17, train: bool = False,
                 detections: Optional[PathLike] = None, det_score_threshold: float = 0.0,
                 image_size: Sequence[int] = (256, 192), simcc_split_ratio: float = 2.0, sigma: float = 4.0,
                 seed: int = 0, *, scale_factor: float = 0.35, rotation_factor: float = 45.0, flip: bool = True,
                 half_body_prob: float = 0.3, num_joints_half_body: float = 8) -> None:
        _check_num_keypoints(num_keypoints)
        if train and detections is not None:
            raise ValueError("detections give evaluation records (no keypoints); train on GT boxes")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.ann_file = os.path.abspath(os.fspath(ann_file))
        self.image_root = os.path.abspath(os.fspath(image_root))
        self.num_keypoints = num_keypoints
        self.train = train
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.aspect_ratio = self.image_size[1] / self.image_size[0]
        self.simcc_split_ratio = simcc_split_ratio
        self.sigma = sigma
        self.seed = int(seed)
        self.epoch = 0
        self.augment_options = dict(scale_factor=scale_factor, rotation_factor=rotation_factor, flip=flip,
                                    half_body_prob=half_body_prob, num_joints_half_body=num_joints_half_body,
                                    aspect_ratio=self.aspect_ratio)
        self.flip_perm = flip_permutation(num_keypoints)
        self.upper_body_ids = UPPER_BODY_IDS[num_keypoints]

        dataset = load_annotation_file(self.ann_file, num_keypoints)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO()
            self.coco.dataset = dataset
            self.coco.createIndex()
        if detections is None:
            self.records = gt_records(dataset, self.image_root, num_keypoints, self.aspect_ratio, self.ann_file)
        else:
            self.records = detection_records(detections, dataset, self.image_root, num_keypoints,
                                             det_score_threshold, self.aspect_ratio)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (call before iterating each epoch)."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def sample_rng(self, index: int) -> np.random.Generator:
        """The generator of sample ``index`` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def __getitem__(self, index: int) -> Dict[str, Any]:
        index = range(len(self.records))[index]
        rec = self.records[index]
        image = load_image(rec.image_file)
        joints = rec.joints.astype(np.float64)
        center, scale, rotation = rec.center.copy(), rec.scale.copy(), 0.0
        if self.train:
            aug = sample_augmentation(joints, center, scale, image.width, self.sample_rng(index),
                                      self.upper_body_ids, **self.augment_options)
            center, scale, rotation = aug.center, aug.scale, aug.rotation
            if aug.flip:  # the official flips the image first, then the joints
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                joints = flip_joints(joints, image.width, self.flip_perm)
        height, width = self.image_size
        matrix = get_affine_transform(center, scale, rotation, (width, height))
        crop = warp_affine(image, matrix, (width, height))
        target_x, target_y, target_weight = simcc_targets(affine_points(joints[:, :2], matrix), joints[:, 2],
                                                          self.image_size, self.simcc_split_ratio, self.sigma)
        return {
            "image": to_model_input(crop),
            "target_x": torch.from_numpy(target_x),
            "target_y": torch.from_numpy(target_y),
            "target_weight": torch.from_numpy(target_weight),
            "center": torch.from_numpy(np.asarray(center, dtype=np.float64)),
            "scale": torch.from_numpy(np.asarray(scale, dtype=np.float64)),
            "rotation": float(rotation),
            "score": float(rec.score),
            "area": float(rec.area),
            "image_id": int(rec.image_id),
            "index": int(index),
        }
