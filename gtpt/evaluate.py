"""Top-down evaluation: SimCC decoding, flip test, back-projection, rescoring, OKS-NMS and COCO keypoint AP.

Conventions follow the official GTPT test path (github.com/haonanwang0522/GTPT @ f3a6068, inherited from SimDR /
HRNet; ``shared/reference/gtpt-reference.md`` §7-8):

* ``lib/core/function.py: validate_sa_simdr`` - flip test on logits, softmax, argmax / split ratio, confidence
  ``min(max p_x, max p_y)``, inverse affine of each crop (``lib/utils/transforms.py: transform_preds``);
* ``lib/dataset/coco.py: evaluate`` - rescoring by the mean confidence of joints above ``in_vis_thre = 0.01``,
  per-image OKS-NMS at 0.9 with instance areas ``prod(scale * 200)`` (``lib/nms/nms.py: oks_nms``);
* COCO: pycocotools ``COCOeval(..., 'keypoints')``; COCO-WholeBody: xtcocotools run per part
  (``lib/dataset/coco_wholebody.py``, the same as mmpose's ``CocoWholeBodyMetric``). This module reproduces the
  xtcocotools per-part semantics with pycocotools (see :func:`coco_keypoint_eval`).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import sys
import warnings
from collections import OrderedDict
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn

from . import keypoints as kpmeta
from .checkpoint import atomic_write
from .transforms import PIXEL_STD, affine_points, get_affine_transform

STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
WHOLEBODY_EVAL_PARTS = ("body", "foot", "face", "lefthand", "righthand", "wholebody")
# The COCO-WholeBody annotation fields, in the order the 133 keypoints are concatenated.
WHOLEBODY_GT_FIELDS = tuple(field for field, _ in kpmeta.WHOLEBODY_FIELDS)
IN_VIS_THRESHOLD = 0.01   # official TEST.IN_VIS_THRE
OKS_NMS_THRESHOLD = 0.9   # official TEST.OKS_THRE

MetricDict = Union[Dict[str, float], Dict[str, Dict[str, float]]]


# ----------------------------------------------------------------------------------------------------------------
# SimCC decoding and flip test

def _np(x: Any, dtype: type = np.float64) -> np.ndarray:
    """Array of a tensor (any device) or array-like."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def decode_simcc(x_logits: Tensor, y_logits: Tensor, split_ratio: float = 2.0) -> Tuple[Tensor, Tensor]:
    """SimCC logits ``(B, K, Wx)``, ``(B, K, Wy)`` -> ``(coords (B, K, 2), confidence (B, K))`` in crop pixels.

    Softmax over the bins (in fp32 whatever the input dtype), coordinate = argmax / ``split_ratio``, confidence =
    the smaller of the two maximum probabilities (``validate_sa_simdr``)."""
    if x_logits.dim() != 3 or y_logits.dim() != 3 or x_logits.shape[:2] != y_logits.shape[:2]:
        raise ValueError(f"expected x and y logits (B, K, bins) with the same B, K, got {tuple(x_logits.shape)} "
                         f"and {tuple(y_logits.shape)}")
    px = F.softmax(x_logits.float(), dim=-1)
    py = F.softmax(y_logits.float(), dim=-1)
    max_x, ix = px.max(dim=-1)
    max_y, iy = py.max(dim=-1)
    coords = torch.stack((ix, iy), dim=-1).float() / float(split_ratio)
    return coords, torch.minimum(max_x, max_y)


def flip_back_simcc(x_logits_flipped: Tensor, y_logits_flipped: Tensor, flip_perm: Sequence[int]
                    ) -> Tuple[Tensor, Tensor]:
    """Map the logits of a horizontally flipped crop back onto the original crop (official ``flip_back_simdr`` +
    ``SHIFT_HEATMAP``): reverse the x bins, swap left/right keypoints, then shift x by one bin,
    ``x[..., :-1] = x[..., 1:]`` (the last bin keeps its value).

    Why the shift: pixel centres sit at integers, so a flip maps x to ``W - 1 - x``, i.e. bin ``b = r x`` to
    ``r (W - 1) - b``; reversing the ``r W`` bins then lands on ``b + r - 1``. With the split ratio ``r = 2`` the
    official one-bin shift is exact. Returns new tensors; the inputs are not modified."""
    perm = torch.as_tensor(np.asarray(flip_perm), dtype=torch.long, device=x_logits_flipped.device)
    if perm.numel() != x_logits_flipped.shape[1] or perm.numel() != y_logits_flipped.shape[1]:
        raise ValueError(f"flip permutation has {perm.numel()} entries for {x_logits_flipped.shape[1]} keypoints")
    x = x_logits_flipped.flip(-1)[:, perm]
    x = torch.cat((x[..., 1:], x[..., -1:]), dim=-1)
    return x, y_logits_flipped[:, perm]


@torch.no_grad()
def predict_crops(model: nn.Module, images: Tensor, flip_test: bool = True,
                  amp_dtype: Optional[torch.dtype] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Keypoints of a batch of normalised crops ``(B, 3, H, W)`` in crop pixels: ``(coords (B, K, 2),
    confidence (B, K))`` as float64 arrays. With ``flip_test`` the flipped crops run in the same forward and the
    logits of both passes are averaged before the softmax, as the official test does."""
    if model.training:
        raise ValueError("predict_crops needs the model in eval mode (model.eval())")
    cfg = model.cfg
    n = images.shape[0]
    batch = torch.cat((images, images.flip(3))) if flip_test else images
    with torch.autocast(device_type=images.device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        x, y = model(batch)
    x, y = x.float(), y.float()
    if flip_test:
        xf, yf = flip_back_simcc(x[n:], y[n:], kpmeta.flip_permutation(cfg.num_keypoints))
        x, y = (x[:n] + xf) * 0.5, (y[:n] + yf) * 0.5
    coords, conf = decode_simcc(x, y, cfg.simcc_split_ratio)
    return coords.double().cpu().numpy(), conf.double().cpu().numpy()


def to_image_coords(coords: Union[np.ndarray, Tensor], center: Union[np.ndarray, Tensor],
                    scale: Union[np.ndarray, Tensor], rotation: Union[float, np.ndarray, Tensor] = 0.0,
                    image_size: Sequence[int] = (192, 256)) -> np.ndarray:
    """Crop coordinates ``(B, K, 2)`` (or ``(K, 2)`` with one center/scale) -> original image pixels, through the
    inverse of the crop's affine map (``transform_preds``; ``image_size`` = crop ``(W, H)``; rotation in
    degrees, 0 at test time)."""
    coords = _np(coords)
    single = coords.ndim == 2
    coords = coords[None] if single else coords
    center, scale, rotation = _np(center), _np(scale), _np(rotation)
    b = coords.shape[0]
    center, scale = center.reshape(-1, 2), scale.reshape(-1, 2)
    rotation = np.broadcast_to(rotation.reshape(-1), (b,))
    if coords.ndim != 3 or coords.shape[-1] != 2 or center.shape[0] != b or scale.shape[0] != b:
        raise ValueError(f"coords (B, K, 2) need B centers and scales, got {coords.shape}, {center.shape}, "
                         f"{scale.shape}")
    out = np.stack([affine_points(coords[i], get_affine_transform(center[i], scale[i], rotation[i], image_size,
                                                                  inv=True)) for i in range(b)])
    return out[0] if single else out


# ----------------------------------------------------------------------------------------------------------------
# Rescoring and OKS-NMS

def rescore(confidence: np.ndarray, box_scores: np.ndarray, threshold: float = IN_VIS_THRESHOLD) -> np.ndarray:
    """Instance scores: box score x mean confidence of the joints above ``threshold`` (0 if none are)."""
    conf = np.asarray(confidence, dtype=np.float64)
    valid = conf > threshold
    n = valid.sum(-1)
    mean = np.where(n > 0, (conf * valid).sum(-1) / np.maximum(n, 1), 0.0)
    return mean * np.asarray(box_scores, dtype=np.float64)


def oks_matrix(keypoints: np.ndarray, areas: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Pairwise OKS ``(N, N)`` of ``(N, K, >=2)`` keypoints as the official ``oks_iou`` (all joints count, the
    scale is the mean of the two areas)."""
    kp = np.asarray(keypoints, dtype=np.float64)[..., :2]
    areas = np.asarray(areas, dtype=np.float64)
    var = (2.0 * np.asarray(sigmas, dtype=np.float64)) ** 2
    d2 = ((kp[:, None] - kp[None]) ** 2).sum(-1)                                  # (N, N, K)
    s = (areas[:, None] + areas[None]) / 2.0 + np.spacing(1)
    return np.exp(-d2 / var / s[..., None] / 2.0).mean(-1)


def oks_nms_indices(keypoints: np.ndarray, scores: np.ndarray, areas: np.ndarray,
                    threshold: float = OKS_NMS_THRESHOLD, sigmas: Optional[np.ndarray] = None) -> List[int]:
    """Greedy OKS-NMS of one image (``lib/nms/nms.py: oks_nms``): take the best-scored instance, drop the others
    whose OKS with it exceeds ``threshold``, repeat. Returns kept indices, best first."""
    keypoints = np.asarray(keypoints, dtype=np.float64)
    if len(keypoints) == 0:
        return []
    if sigmas is None:
        sigmas = kpmeta.sigmas(keypoints.shape[1])
    oks = oks_matrix(keypoints, areas, sigmas)
    order = np.asarray(scores, dtype=np.float64).argsort()[::-1]   # the official (descending) visiting order
    keep: List[int] = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        order = rest[oks[i, rest] <= threshold]
    return keep


def oks_nms(results: Sequence[Mapping[str, Any]], threshold: float = OKS_NMS_THRESHOLD,
            sigmas: Optional[np.ndarray] = None) -> List[Mapping[str, Any]]:
    """Per-image OKS-NMS over COCO-style results (``image_id``, ``keypoints`` flat ``3K``, ``score``, ``area``).
    Images keep their first-seen order; within an image, kept results are best first."""
    by_image: "OrderedDict[Any, List[Mapping[str, Any]]]" = OrderedDict()
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    kept: List[Mapping[str, Any]] = []
    for items in by_image.values():
        kps = np.array([np.asarray(r["keypoints"], dtype=np.float64).reshape(-1, 3) for r in items])
        keep = oks_nms_indices(kps, [r["score"] for r in items], [r["area"] for r in items], threshold, sigmas)
        kept.extend(items[i] for i in keep)
    return kept


# ----------------------------------------------------------------------------------------------------------------
# Prediction over a loader

_REQUIRED_BATCH_KEYS = ("image", "center", "scale", "score", "image_id")


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable[Mapping[str, Any]], flip_test: bool = True,
            device: Optional[Union[str, torch.device]] = None, amp_dtype: Optional[torch.dtype] = None,
            nms_threshold: Optional[float] = OKS_NMS_THRESHOLD) -> List[Dict[str, Any]]:
    """COCO keypoint results of ``model`` over ``loader`` (batches as dicts: ``image`` (B, 3, H, W), ``center``,
    ``scale``, ``score`` = box score, ``image_id``, optional ``rotation``), after the official rescoring and
    per-image OKS-NMS (``nms_threshold=None`` skips it).

    Each result: ``image_id``, ``category_id`` = 1, ``keypoints`` = flat ``[x, y, confidence] * K`` in image
    pixels, ``score`` = rescored, plus ``center``, ``scale`` (as the official results file) and ``area`` =
    ``prod(scale * 200)`` (the official NMS area). The model runs in eval mode; its mode is restored after."""
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    cfg = model.cfg
    crop_wh = (cfg.image_size[1], cfg.image_size[0])
    was_training = model.training
    model.eval()
    results: List[Dict[str, Any]] = []
    try:
        for batch in loader:
            missing = [k for k in _REQUIRED_BATCH_KEYS if k not in batch]
            if missing:
                raise ValueError(f"batch lacks {missing}; needs {list(_REQUIRED_BATCH_KEYS)}")
            images = torch.as_tensor(batch["image"]).to(device=device, dtype=next(model.parameters()).dtype)
            coords, conf = predict_crops(model, images, flip_test, amp_dtype)
            center, scale = _np(batch["center"]).reshape(-1, 2), _np(batch["scale"]).reshape(-1, 2)
            xy = to_image_coords(coords, center, scale, _np(batch.get("rotation", 0.0)), crop_wh)
            scores = rescore(conf, _np(batch["score"]).reshape(-1))
            areas = np.prod(scale * PIXEL_STD, axis=1)
            image_ids = _np(batch["image_id"], np.int64).reshape(-1)
            for i in range(len(xy)):
                results.append({
                    "image_id": int(image_ids[i]), "category_id": 1,
                    "keypoints": np.concatenate([xy[i], conf[i][:, None]], axis=1).reshape(-1).tolist(),
                    "score": float(scores[i]), "center": center[i].tolist(), "scale": scale[i].tolist(),
                    "area": float(areas[i]),
                })
    finally:
        model.train(was_training)
    if nms_threshold is None:
        return results
    return list(oks_nms(results, nms_threshold, kpmeta.sigmas(cfg.num_keypoints)))


# ----------------------------------------------------------------------------------------------------------------
# COCO evaluation

@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    if verbose:
        yield
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def _load_gt(coco_gt: Union[COCO, str, os.PathLike], verbose: bool) -> COCO:
    if isinstance(coco_gt, COCO):
        return coco_gt
    path = os.fspath(coco_gt)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    with _quiet(verbose):
        return COCO(path)


def _check_results(results: Sequence[Mapping[str, Any]], num_keypoints: int, image_ids: set) -> None:
    for i, r in enumerate(results):
        if not isinstance(r, Mapping) or not {"image_id", "keypoints", "score"} <= set(r):
            raise ValueError(f"result {i}: needs image_id, keypoints and score, got "
                             f"{sorted(r) if isinstance(r, Mapping) else type(r).__name__}")
        kp = np.asarray(r["keypoints"], dtype=np.float64).reshape(-1)
        if kp.size != 3 * num_keypoints:
            raise ValueError(f"result {i}: keypoints has {kp.size} values, expected 3 x {num_keypoints}")
        if not np.isfinite(kp).all() or not np.isfinite(float(r["score"])):
            raise ValueError(f"result {i}: keypoints or score contain NaN/Inf")
        if r["image_id"] not in image_ids:
            raise ValueError(f"result {i}: image_id {r['image_id']!r} is not in the ground truth")


def _coco(images: List[dict], categories: List[dict], annotations: List[dict], verbose: bool) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
    with _quiet(verbose):
        coco.createIndex()
    return coco


def _detections(results: Sequence[Mapping[str, Any]], part: slice, area_from: slice,
                drop_unscored: bool) -> List[dict]:
    """Result copies for one evaluation: ``keypoints`` = the ``part`` slice of the K joints; ``area`` and ``bbox``
    from the extent of the ``area_from`` joints, as ``loadRes`` does for its ``keypoints`` field; ids 1..N in
    input order. ``drop_unscored`` skips results with no positive confidence in the part (xtcocotools)."""
    dts = []
    for i, r in enumerate(results):
        kp = np.asarray(r["keypoints"], dtype=np.float64).reshape(-1, 3)
        sel = kp[part]
        if drop_unscored and not (sel[:, 2] > 0).any():
            continue
        ext = kp[area_from]
        x0, y0 = ext[:, 0].min(), ext[:, 1].min()
        x1, y1 = ext[:, 0].max(), ext[:, 1].max()
        dts.append({"id": i + 1, "image_id": r["image_id"], "category_id": r.get("category_id", 1),
                    "keypoints": sel.reshape(-1).tolist(), "score": float(r["score"]),
                    "area": float((x1 - x0) * (y1 - y0)), "bbox": [x0, y0, x1 - x0, y1 - y0]})
    return dts


def _run_cocoeval(gt: COCO, dt: COCO, sigmas: np.ndarray, verbose: bool) -> Dict[str, float]:
    ev = COCOeval(gt, dt, "keypoints")
    ev.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
    with _quiet(verbose):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(STAT_NAMES, (float(s) for s in ev.stats)))


def _wholebody_gt(coco: COCO, part: slice, verbose: bool) -> COCO:
    """GT copies whose ``keypoints`` are the ``part`` slice of the 133 joints and ``num_keypoints`` counts its
    labelled (v > 0) joints, so pycocotools ignores an instance exactly when xtcocotools does (crowd, or no
    labelled joint in the part)."""
    anns = []
    for a in coco.dataset["annotations"]:
        missing = [f for f in WHOLEBODY_GT_FIELDS if f not in a]
        if missing:
            raise ValueError(f"annotation {a.get('id')} lacks COCO-WholeBody fields {missing}; is this a "
                             f"COCO-WholeBody annotation file?")
        kp = np.concatenate([np.asarray(a[f], dtype=np.float64) for f in WHOLEBODY_GT_FIELDS]).reshape(-1, 3)[part]
        anns.append({"id": a["id"], "image_id": a["image_id"], "category_id": a["category_id"],
                     "iscrowd": a.get("iscrowd", 0), "area": a["area"], "bbox": a["bbox"],
                     "keypoints": kp.reshape(-1).tolist(), "num_keypoints": int((kp[:, 2] > 0).sum())})
    return _coco(coco.dataset["images"], coco.dataset["categories"], anns, verbose)


def coco_keypoint_eval(results: Sequence[Mapping[str, Any]], coco_gt: Union[COCO, str, os.PathLike],
                       num_keypoints: int = 17, verbose: bool = False) -> MetricDict:
    """COCO keypoint AP/AR of ``results`` (``image_id``, ``keypoints`` flat ``3 * num_keypoints``, ``score``,
    optional ``category_id`` = 1) against ``coco_gt`` (a pycocotools ``COCO`` or an annotation file).

    * 17 keypoints: ``COCOeval(..., 'keypoints')`` with the COCO sigmas -> ``{AP, AP50, ..., ARl}``, as the
      official ``lib/dataset/coco.py``.
    * 133 keypoints (COCO-WholeBody annotations): ``{part: {AP, ...}}`` for body, foot, face, lefthand, righthand
      and wholebody, each with that part's sigmas, reproducing xtcocotools ``COCOeval(iouType='keypoints_<part>',
      use_area=True)`` with pycocotools on per-part copies: GT keypoints = the part slice, ignored when crowd or
      without a labelled joint in the part; detections = the part slice, dropped when no joint of the part has a
      positive confidence, ``area`` (used only to ignore unmatched detections outside an area range) from the
      extent of the 17 body joints, as xtcocotools' ``loadRes`` computes it from the ``keypoints`` field. The OKS
      scale is the GT ``area`` in both (``use_area=True``). Per-part ``<part>_score`` fields are not read: the
      instance ``score`` serves every part, as mmpose writes it.

    WholeBody results may also come in the COCO-WholeBody layout (``keypoints`` = body, plus ``foot_kpts``, ...).
    A stat is -1 where the GT has no non-ignored instance (COCOeval's convention). Empty ``results`` give zeros
    and a warning. pycocotools' prints are silenced unless ``verbose``. The inputs are not modified except that
    COCOeval stores ``ignore`` flags on a passed 17-keypoint ``COCO``'s annotations, as it always does.
    """
    if num_keypoints not in (17, 133):
        raise ValueError(f"COCO keypoint evaluation needs 17 or 133 keypoints, got {num_keypoints}")
    gt = _load_gt(coco_gt, verbose)
    wholebody = num_keypoints == 133
    parts = WHOLEBODY_EVAL_PARTS if wholebody else ()
    if len(results) == 0:
        warnings.warn("no keypoint results to evaluate; reporting zeros", RuntimeWarning, stacklevel=2)
        zeros = {name: 0.0 for name in STAT_NAMES}
        return {p: dict(zeros) for p in parts} if wholebody else zeros
    if wholebody:  # results in the COCO-WholeBody layout (foot_kpts, ...) are scored as well
        results = [from_wholebody_layout(r) if isinstance(r, Mapping) else r for r in results]
    _check_results(results, num_keypoints, set(gt.getImgIds()))
    cats = copy.deepcopy(gt.dataset["categories"])
    if not wholebody:
        dt = _coco(gt.dataset["images"], cats, _detections(results, slice(0, 17), slice(0, 17), False), verbose)
        return _run_cocoeval(gt, dt, kpmeta.COCO_SIGMAS, verbose)
    all_sigmas = kpmeta.sigmas(133)
    metrics: Dict[str, Dict[str, float]] = {}
    for name in parts:
        part = kpmeta.WHOLEBODY_PARTS.get(name, slice(0, 133))
        gt_part = _wholebody_gt(gt, part, verbose)
        dts = _detections(results, part, kpmeta.WHOLEBODY_PARTS["body"], True)
        metrics[name] = _run_cocoeval(gt_part, _coco(gt.dataset["images"], cats, dts, verbose), all_sigmas[part],
                                      verbose)
    return metrics


# ----------------------------------------------------------------------------------------------------------------

_SPLIT_FIELDS = WHOLEBODY_GT_FIELDS[1:]  # the part fields after the body's "keypoints"


def to_wholebody_layout(result: Mapping[str, Any]) -> Dict[str, Any]:
    """A 133-keypoint result in the COCO-WholeBody results layout (official ``coco_wholebody.py``, mmpose,
    xtcocotools): ``keypoints`` = the 17 body joints, then ``foot_kpts``, ``face_kpts``, ``lefthand_kpts``,
    ``righthand_kpts`` (flat ``[x, y, score] * n`` each); other fields are kept. A result already in that layout
    is returned as a copy."""
    out = dict(result)
    if any(f in result for f in _SPLIT_FIELDS):
        return out
    kp = np.asarray(result["keypoints"], dtype=np.float64).reshape(-1, 3)
    if len(kp) != 133:
        raise ValueError(f"a COCO-WholeBody result needs 133 keypoints, got {len(kp)}")
    for field, part in kpmeta.WHOLEBODY_FIELDS:
        out[field] = kp[kpmeta.WHOLEBODY_PARTS[part]].reshape(-1).tolist()
    return out


def from_wholebody_layout(result: Mapping[str, Any]) -> Dict[str, Any]:
    """The inverse of :func:`to_wholebody_layout`: one flat ``keypoints`` of all 133 joints (the layout this module
    computes with). A result without the part fields is returned as a copy; one with only some of them is an
    error."""
    present = [f for f in _SPLIT_FIELDS if f in result]
    out = dict(result)
    if not present:
        return out
    if len(present) != len(_SPLIT_FIELDS) or "keypoints" not in result:
        missing = [f for f in ("keypoints",) + _SPLIT_FIELDS if f not in result]
        raise ValueError(f"COCO-WholeBody result lacks {missing}")
    parts = []
    for field, part in kpmeta.WHOLEBODY_FIELDS:
        v = np.asarray(result[field], dtype=np.float64).reshape(-1)
        n = kpmeta.WHOLEBODY_PARTS[part].stop - kpmeta.WHOLEBODY_PARTS[part].start
        if v.size != 3 * n:
            raise ValueError(f"COCO-WholeBody result: {field} has {v.size} values, expected 3 x {n}")
        parts.append(v)
    for f in _SPLIT_FIELDS:
        del out[f]
    out["keypoints"] = np.concatenate(parts).tolist()
    return out


def write_results(results: Sequence[Mapping[str, Any]], path: Union[str, os.PathLike]) -> None:
    """Write results as JSON atomically (:func:`gtpt.checkpoint.atomic_write`). 133-keypoint results are written in
    the COCO-WholeBody layout (:func:`to_wholebody_layout`), so xtcocotools / mmpose / the official evaluation read
    them; :func:`read_results` reads both layouts back."""
    rows = [to_wholebody_layout(r) if np.asarray(r["keypoints"]).size == 3 * 133 else dict(r) for r in results]
    with atomic_write(path, "w") as f:
        json.dump(rows, f)


def read_results(path: Union[str, os.PathLike]) -> List[Dict[str, Any]]:
    """Read a COCO keypoint results JSON (a list of results; WholeBody in either layout) into this module's
    layout (flat ``keypoints``). A file that is not such a list is a ``ValueError`` naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"results file not found: {path}")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) and "keypoints" in r for r in data):
        raise ValueError(f"{path}: expected a JSON list of results, each with 'keypoints'")
    try:
        return [from_wholebody_layout(r) for r in data]
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def evaluate(model: nn.Module, dataset: Any, batch_size: int = 32, flip_test: bool = True,
             device: Optional[Union[str, torch.device]] = None, results_file: Optional[Union[str, os.PathLike]] = None,
             num_workers: int = 0, amp_dtype: Optional[torch.dtype] = None, verbose: bool = False) -> MetricDict:
    """Predict over a top-down ``dataset`` (items as :class:`gtpt.data.TopDownDataset`; it provides ``.coco`` and
    ``.num_keypoints``), optionally write the results JSON, and return :func:`coco_keypoint_eval`'s metrics."""
    if dataset.num_keypoints != model.cfg.num_keypoints:
        raise ValueError(f"dataset has {dataset.num_keypoints} keypoints, model {model.cfg.name} predicts "
                         f"{model.cfg.num_keypoints}")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    results = predict(model, loader, flip_test=flip_test, device=device, amp_dtype=amp_dtype)
    if results_file is not None:
        write_results(results, results_file)
    return coco_keypoint_eval(results, dataset.coco, dataset.num_keypoints, verbose=verbose)


# ----------------------------------------------------------------------------------------------------------------
# gtpt eval

from .cli_options import add_eval_arguments  # noqa: E402,F401 - re-exported (options live torch-free there)


def run_eval_cli(args: argparse.Namespace) -> int:
    """Run ``gtpt eval``: COCO keypoint AP of a checkpoint on an annotation file, printed as a table (or JSON)."""
    from .checkpoint import load_official_checkpoint
    from .data import AnnotationError, TopDownDataset
    from .model import build_model
    from .train import AMP_DTYPES
    from .errors import debug_enabled, one_line
    from .inference import _resolve_device
    from .inputs import check_output_file, resolve_variant
    try:
        if args.batch_size < 1 or args.workers < 0:
            raise ValueError("--batch-size must be >= 1 and --workers >= 0")
        if args.results:
            check_output_file(args.results, "--results")  # before the evaluation, not after it
        device = _resolve_device(args.device)
        variant, state = resolve_variant(args.variant, args.checkpoint, use_ema=args.weights == "ema")
        model = build_model(variant, backend=args.backend)
        if args.checkpoint:
            load_official_checkpoint(model, state)
        else:
            print(f"gtpt eval: warning: no --checkpoint, {variant} has random weights; the AP is meaningless",
                  file=sys.stderr)
        model.to(device).eval()
        dataset = TopDownDataset(args.ann_file, args.image_root, model.cfg.num_keypoints, train=False,
                                 detections=args.detections, det_score_threshold=args.det_score_thr)
        amp = AMP_DTYPES[args.amp]
        metrics = evaluate(model, dataset, batch_size=args.batch_size, flip_test=not args.no_flip, device=device,
                           results_file=args.results, num_workers=args.workers, amp_dtype=amp)
    except (ValueError, FileNotFoundError, AnnotationError) as e:
        if debug_enabled():
            raise
        print(f"gtpt eval: error: {one_line(e)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    rows = metrics if model.cfg.wholebody else {"keypoints": metrics}
    print(f"{model.cfg.name} on {args.ann_file} ({len(dataset)} boxes, "
          f"{'detections' if args.detections else 'GT boxes'}, flip test {'off' if args.no_flip else 'on'}):")
    print("| part | " + " | ".join(STAT_NAMES) + " |")
    print("|---|" + "---|" * len(STAT_NAMES))
    for part, stats in rows.items():
        print(f"| {part} | " + " | ".join(f"{stats[k]:.4f}" for k in STAT_NAMES) + " |")
    return 0
