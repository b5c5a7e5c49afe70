"""What ``gtpt infer`` reads and where it writes, checked before any model runs.

* inputs: image files, folders of images (not recursive, sorted) and video files, each readable (an unreadable
  one is an error naming it, or a warning with ``--skip-bad``);
* boxes: ``--box`` (every image), ``--boxes`` (a JSON mapping file name -> boxes), ``--detections`` (COCO
  detection results, matched by a ``file_name`` field, by the ``images`` list of ``--ann-file`` or of the file
  itself, or by file names that are COCO image ids), or the whole image;
* outputs: ``-o`` must be a writable file path; ``--vis`` is a file for exactly one input, else a folder whose
  drawings mirror the inputs' folders, so two inputs never write the same drawing.

Torch-free: the checks run (and fail) in well under a second, before the model is built.
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import UsageError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")


@dataclass
class Input:
    path: str
    kind: str  # "image" or "video"


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def is_video(path: str) -> bool:
    return _ext(path) in VIDEO_EXTS


def expand_inputs(paths: Sequence[str], warn=None) -> List[Input]:
    """Files as given (a video by its extension, anything else an image), folders as the images directly in them
    (sorted by name). A missing path or an empty folder is a :class:`UsageError`; a path given twice is read
    once (with a note)."""
    out: List[Input] = []
    seen = set()
    for p in paths:
        if os.path.isdir(p):
            files = sorted(f for f in os.listdir(p) if _ext(f) in IMAGE_EXTS and os.path.isfile(os.path.join(p, f)))
            if not files:
                raise UsageError(f"input folder {p} holds no images ({', '.join(IMAGE_EXTS)}); give image or video "
                                 f"files, or a folder of images")
            items = [Input(os.path.join(p, f), "image") for f in files]
        elif os.path.isfile(p):
            items = [Input(p, "video" if is_video(p) else "image")]
        else:
            raise UsageError(f"input not found: {p}")
        for it in items:
            key = os.path.realpath(it.path)
            if key in seen:
                if warn:
                    warn(f"{it.path} is given more than once; it is read once")
                continue
            seen.add(key)
            out.append(it)
    return out


def check_readable(inputs: Sequence[Input], skip_bad: bool, warn) -> List[Input]:
    """Decode every image and open every video (and its first frame) before inference. Without ``skip_bad`` the
    first unreadable input is a :class:`UsageError` naming it; with it, unreadable inputs are dropped with a
    warning each (and all of them unreadable is still an error)."""
    from .transforms import load_image

    good = []
    for it in inputs:
        try:
            if it.kind == "video":
                from .video import probe_video
                probe_video(it.path)
            else:
                load_image(it.path, exif_orientation=True)
        except (ValueError, OSError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            reason = reason.replace(f"cannot decode image {it.path}: ", "")
            if not skip_bad:
                raise UsageError(f"cannot read {it.kind} {it.path} ({reason}); fix or remove it, or pass --skip-bad "
                                 f"to skip unreadable inputs") from None
            warn(f"skipping unreadable {it.kind} {it.path} ({reason})")
            continue
        good.append(it)
    if not good:
        raise UsageError("no readable input left (every input was skipped as unreadable)")
    return good


# ----------------------------------------------------------------------------------------------------------------
# output paths

def check_output_file(path: str, flag: str) -> None:
    """``path`` can be created or replaced as a file: not a folder, and its nearest existing parent a writable
    folder (not a file). Raises :class:`UsageError` naming ``flag``; creates nothing."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder; give a file path")
    parent = os.path.dirname(os.path.abspath(path))
    _check_folder_creatable(parent, flag, path)


def check_output_folder(path: str, flag: str) -> None:
    """``path`` is a folder, or can be created as one. Raises :class:`UsageError` naming ``flag``."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a file, but a folder is needed here (several drawings); give a folder "
                         f"path")
    _check_folder_creatable(os.path.abspath(path), flag, path)


def _check_folder_creatable(folder: str, flag: str, given: str) -> None:
    probe = folder
    while not os.path.exists(probe):
        up = os.path.dirname(probe)
        if up == probe:
            break
        probe = up
    if not os.path.isdir(probe):
        raise UsageError(f"{flag} {given}: {probe} is a file, not a folder; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {given}: folder {probe} is not writable; choose another path")


_VIS_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def vis_targets(inputs: Sequence[Input], vis: Optional[str]) -> Dict[str, str]:
    """Where each input's drawing goes (input path -> output path), checked and unique.

    One input and ``vis`` with an image (or, for a video, a video) extension: ``vis`` itself. Otherwise ``vis`` is
    a folder and each drawing is ``<folder>/<input's folder relative to the inputs' common folder>/<name>_pose.png``
    (``.mp4`` for a video), with the input's extension added, then a number, where names would still collide."""
    if not vis:
        return {}
    ext = _ext(vis)
    looks_like_file = ext in _VIS_IMAGE_EXTS or ext in VIDEO_EXTS or (os.path.isfile(vis))
    if looks_like_file:
        if len(inputs) != 1:
            raise UsageError(f"--vis {vis} is a file name but {len(inputs)} inputs were given: pass a folder for "
                             f"their drawings (e.g. --vis {os.path.splitext(vis)[0] or 'vis'}/)")
        it = inputs[0]
        want = VIDEO_EXTS if it.kind == "video" else _VIS_IMAGE_EXTS
        if ext not in want:
            kind = "a video file (.mp4, .avi, .mkv, ...)" if it.kind == "video" else "an image file (.png, .jpg)"
            raise UsageError(f"--vis {vis}: the drawing of {it.kind} {it.path} must be {kind} or a folder")
        check_output_file(vis, "--vis")
        return {it.path: vis}
    check_output_folder(vis, "--vis")
    dirs = [os.path.dirname(os.path.abspath(it.path)) for it in inputs]
    common = os.path.commonpath(dirs) if dirs else ""
    out: Dict[str, str] = {}
    used = set()
    for it, d in zip(inputs, dirs):
        rel = os.path.relpath(d, common) if common else ""
        stem, in_ext = os.path.splitext(os.path.basename(it.path))
        out_ext = ".mp4" if it.kind == "video" else ".png"
        cands = [f"{stem}_pose{out_ext}", f"{stem}{in_ext.replace('.', '_')}_pose{out_ext}"]
        cands += [f"{stem}{in_ext.replace('.', '_')}_{n}_pose{out_ext}" for n in range(2, len(inputs) + 2)]
        for name in cands:
            target = os.path.normpath(os.path.join(vis, rel, name))
            if target not in used:
                break
        used.add(target)
        out[it.path] = target
    return out


# ----------------------------------------------------------------------------------------------------------------
# boxes

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


def parse_box(text: str) -> List[float]:
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4 or not all(np.isfinite(box)) or box[2] <= 0 or box[3] <= 0:
        raise UsageError(f"--box expects x,y,w,h with w, h > 0, got {text!r}")
    return box


def _read_json(path: str, flag: str) -> Any:
    if not os.path.isfile(path):
        raise UsageError(f"{flag} file not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} {path}: not valid JSON ({e})") from None


def _check_bbox(b: Any, where: str) -> List[float]:
    try:
        v = [float(x) for x in b]
    except (TypeError, ValueError):
        v = []
    if len(v) != 4 or not np.isfinite(v).all() or v[2] <= 0 or v[3] <= 0:
        raise UsageError(f"{where}: expected a box [x, y, w, h] with w, h > 0, got {json.dumps(b)[:80]}")
    return v


def image_id_from_name(path: str) -> Optional[int]:
    stem = os.path.splitext(os.path.basename(path))[0]
    return int(stem) if stem.isdigit() else None


class BoxSource:
    """Person boxes per input: ``boxes_for(path, (width, height))`` -> ``(boxes (N, 4), scores (N,))``."""

    def __init__(self, args: Any, inputs: Sequence[Input]):
        self.kind = "whole"
        self.fixed: Optional[np.ndarray] = None
        self.by_name: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        self.by_id: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
        self.name_to_id: Dict[str, int] = {}
        self.flag = ""
        if getattr(args, "ann_file", None) and not getattr(args, "detections", None):
            raise UsageError("--ann-file only matches --detections image ids to file names; give --detections too")
        if args.box:
            self.kind = "fixed"
            self.fixed = np.array([parse_box(b) for b in args.box], dtype=np.float64)
        elif getattr(args, "boxes", None):
            self.kind, self.flag = "names", f"--boxes {args.boxes}"
            self._load_mapping(args.boxes)
        elif args.detections:
            self.kind, self.flag = "detections", f"--detections {args.detections}"
            self._load_detections(args.detections, getattr(args, "ann_file", None), args.det_score_thr)
        self._check_matches(inputs)

    # -- loading --------------------------------------------------------------------------------------------------
    def _load_mapping(self, path: str) -> None:
        data = _read_json(path, "--boxes")
        if not isinstance(data, dict):
            raise UsageError(f"--boxes {path}: expected a JSON object mapping file names to lists of boxes")
        for name, items in data.items():
            if not isinstance(items, list):
                raise UsageError(f"--boxes {path}: entry {name!r}: expected a list of boxes")
            if len(items) == 4 and all(isinstance(x, (int, float)) for x in items):
                items = [items]  # one bare box
            boxes, scores = [], []
            for i, it in enumerate(items):
                where = f"--boxes {path}: entry {name!r} box {i}"
                if isinstance(it, dict):
                    if "bbox" not in it:
                        raise UsageError(f"{where}: a box object needs 'bbox' (and may have 'score')")
                    boxes.append(_check_bbox(it["bbox"], where))
                    scores.append(float(it.get("score", 1.0)))
                else:
                    boxes.append(_check_bbox(it, where))
                    scores.append(1.0)
            self.by_name[os.path.normpath(name)] = (np.array(boxes, dtype=np.float64).reshape(-1, 4),
                                                     np.array(scores, dtype=np.float64))

    def _load_detections(self, path: str, ann_file: Optional[str], thr: float) -> None:
        data = _read_json(path, "--detections")
        images = None
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            images, data = data.get("images"), data["annotations"]  # a COCO-format detection file
        if not isinstance(data, list):
            raise UsageError(f"--detections {path}: expected a JSON list of detections (COCO results format)")
        if ann_file:
            ann = _read_json(ann_file, "--ann-file")
            images = ann.get("images") if isinstance(ann, dict) else ann
            if not isinstance(images, list):
                raise UsageError(f"--ann-file {ann_file}: expected a COCO annotation file (with 'images') or a "
                                 f"list of images")
        for i, im in enumerate(images or []):
            if not (isinstance(im, dict) and "id" in im and "file_name" in im):
                src = f"--ann-file {ann_file}" if ann_file else f"--detections {path}"
                raise UsageError(f"{src}: image record {i} needs 'id' and 'file_name'")
            self.name_to_id[os.path.normpath(im["file_name"])] = im["id"]
            self.name_to_id.setdefault(os.path.basename(im["file_name"]), im["id"])
        by_name: Dict[str, List[Tuple[List[float], float]]] = {}
        by_id: Dict[int, List[Tuple[List[float], float]]] = {}
        for i, d in enumerate(data):
            if not isinstance(d, dict):
                raise UsageError(f"--detections {path}: record {i} is not an object")
            if d.get("category_id", 1) != 1:
                continue
            score = d.get("score", 1.0)
            if not isinstance(score, (int, float)):
                raise UsageError(f"--detections {path}: record {i} has a non-numeric score")
            if score < thr:
                continue
            if "bbox" not in d:
                raise UsageError(f"--detections {path}: record {i} has no bbox")
            item = (_check_bbox(d["bbox"], f"--detections {path}: record {i}"), float(score))
            if "file_name" in d:
                by_name.setdefault(os.path.normpath(str(d["file_name"])), []).append(item)
            elif "image_id" in d:
                by_id.setdefault(d["image_id"], []).append(item)
            else:
                raise UsageError(f"--detections {path}: record {i} has neither image_id nor file_name")
        pack = lambda items: (np.array([b for b, _ in items], dtype=np.float64).reshape(-1, 4),  # noqa: E731
                              np.array([s for _, s in items], dtype=np.float64))
        self.by_name = {k: pack(v) for k, v in by_name.items()}
        self.by_id = {k: pack(v) for k, v in by_id.items()}

    # -- matching -------------------------------------------------------------------------------------------------
    def _name_keys(self, path: str) -> List[str]:
        return [os.path.normpath(path), os.path.basename(path)]

    def image_id(self, path: str) -> Optional[int]:
        for k in self._name_keys(path):
            if k in self.name_to_id:
                return self.name_to_id[k]
        return image_id_from_name(path)

    def _lookup(self, path: str) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        for k in self._name_keys(path):
            if k in self.by_name:
                return self.by_name[k]
        if self.kind == "detections":
            iid = self.image_id(path)
            if iid is not None:
                return self.by_id.get(iid, (np.zeros((0, 4)), np.zeros(0)))
        return None

    def _check_matches(self, inputs: Sequence[Input]) -> None:
        if self.kind not in ("names", "detections"):
            return
        videos = [it.path for it in inputs if it.kind == "video"]
        if videos:
            raise UsageError(f"{self.flag} gives boxes per image file, but {videos[0]} is a video; use --box for "
                             f"videos, or run them separately")
        if self.kind == "detections":
            unmatched = [it.path for it in inputs
                         if not any(k in self.by_name for k in self._name_keys(it.path)) and self.image_id(it.path) is None]
            if unmatched:
                raise UsageError(f"cannot match {self.flag} to {unmatched[0]}: its file name is not a COCO image id "
                                 f"and no 'file_name' or images list names it; pass --ann-file with the images "
                                 f"list (file_name -> id)")
        else:
            if not any(self._lookup(it.path) is not None for it in inputs):
                keys = list(self.by_name)[:3]
                raise UsageError(f"{self.flag}: none of its {len(self.by_name)} file names matches an input "
                                 f"(keys like {keys}; inputs like {inputs[0].path!r}): use the file names or the "
                                 f"paths as given on the command line")

    def boxes_for(self, path: str, size: Sequence[int], warn=None) -> Tuple[np.ndarray, np.ndarray]:
        if self.kind == "whole":
            return np.array([[0.0, 0.0, float(size[0]), float(size[1])]]), np.ones(1)
        if self.kind == "fixed":
            return self.fixed.copy(), np.ones(len(self.fixed))
        found = self._lookup(path)
        if found is None:
            if warn:
                warn(f"{path}: no boxes for it in {self.flag}; no people there")
            return np.zeros((0, 4)), np.zeros(0)
        return found[0].copy(), found[1].copy()


def outside_image(boxes: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Which ``(N, 4)`` xywh boxes lie entirely outside a ``size = (width, height)`` image (no pixel inside)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    w, h = float(size[0]), float(size[1])
    return (b[:, 0] >= w) | (b[:, 1] >= h) | (b[:, 0] + b[:, 2] <= 0) | (b[:, 1] + b[:, 3] <= 0)


def warn_line(prog: str = "gtpt infer"):
    def warn(msg: str) -> None:
        print(f"{prog}: warning: {msg}", file=sys.stderr, flush=True)
    return warn


# ----------------------------------------------------------------------------------------------------------------
# the variant of a checkpoint

def resolve_variant(variant: Optional[str], checkpoint: Optional[str], use_ema: bool = True,
                    flag: str = "--checkpoint") -> Tuple[str, Any]:
    """``(variant name, state dict or None)``: without a checkpoint, ``variant`` (default gtpt-s); with one, the
    variant its tensors show (:func:`gtpt.checkpoint.read_model_state_dict` and the checkpoint module's variant
    detection). A ``variant`` that disagrees is a one-line :class:`gtpt.checkpoint.CheckpointError` saying what
    to pass. The state dict is returned so the file is read once."""
    from .config import get_config

    if checkpoint is None:
        return get_config(variant or "gtpt-s").name, None
    from .checkpoint import CheckpointError, _guess_variant, read_model_state_dict

    name = get_config(variant).name if variant else None  # an unknown --variant fails before the file is read
    sd = read_model_state_dict(checkpoint, use_ema)
    guess = _guess_variant(sd)
    if "?" in guess or "features.human_token" not in sd:
        raise CheckpointError(f"{flag} {checkpoint}: no GTPT model tensors in it (expected an official GTPT .pth "
                              f"or one written by gtpt train)")
    if name is not None and name != guess:
        raise CheckpointError(f"{flag} {checkpoint} holds {guess} weights but --variant {name} was given: drop "
                              f"--variant (it is read from the checkpoint) or pass --variant {guess}")
    return guess, sd


# ----------------------------------------------------------------------------------------------------------------
# the run

def run_infer(est: Any, inputs: Sequence[Input], boxes: BoxSource, targets: Dict[str, str], args: Any,
              warn) -> Tuple[List[Dict[str, Any]], float]:
    """Estimate poses on every input (images and video frames batched together up to ``est.batch_size`` crops),
    write the drawings to ``targets`` as they are made, and return the JSON entries and the highest joint
    confidence seen (``-1`` when there were no people)."""
    import warnings

    from .evaluate import OKS_NMS_THRESHOLD
    from .inference import LowConfidenceWarning, OutsideImageWarning, draw_keypoints
    from .transforms import load_image

    nms = None if args.no_nms else OKS_NMS_THRESHOLD
    entries: List[Dict[str, Any]] = []
    best = [-1.0]
    pending: List[Tuple[Any, np.ndarray, np.ndarray, Dict[str, Any], Any]] = []  # image, boxes, scores, meta, sink

    def flush() -> None:
        if not pending:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LowConfidenceWarning)  # the CLI gives its own hint at the end
            warnings.simplefilter("ignore", OutsideImageWarning)   # already said, naming the file
            people_per = est.estimate_batch([p[0] for p in pending], [p[1] for p in pending],
                                            [p[2] for p in pending], nms)
        for (image, _, _, meta, sink), people in zip(pending, people_per):
            for p in people:
                best[0] = max(best[0], float(np.max(p["keypoints"][:, 2])))
                entries.append({**meta, "category_id": 1, "box": p["box"], "box_score": p["box_score"],
                                "score": p["score"], "keypoints": p["keypoints"].reshape(-1).tolist()})
            if sink is not None:
                kps = np.array([p["keypoints"] for p in people]).reshape(-1, est.num_keypoints, 3)
                sink(draw_keypoints(image, kps, args.kpt_thr, boxes=[p["box"] for p in people]))
            if meta.get("frame") is None:
                print(f"{meta['image']}: {len(people)} person(s)", file=sys.stderr)
        pending.clear()

    def add(image, size, path: str, meta: Dict[str, Any], sink, said: set) -> None:
        b, s = boxes.boxes_for(path, size, warn)
        away = outside_image(b, size)
        for j in np.flatnonzero(away):
            msg = (f"{path}: box {[round(v, 2) for v in b[j].tolist()]} lies entirely outside the {size[0]}x{size[1]} "
                   f"{'frames' if 'frame' in meta else 'image'}; skipped (no keypoints)")
            if msg not in said:
                said.add(msg)
                warn(msg)
        pending.append((image, b[~away], s[~away], meta, sink))
        if sum(len(p[1]) for p in pending) >= est.batch_size or len(pending) >= est.batch_size:
            flush()

    for it in inputs:
        if it.kind == "image":
            image = load_image(it.path, exif_orientation=True)  # boxes and drawings as a viewer shows the photo
            target = targets.get(it.path)

            def save(drawing, target=target):
                os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
                drawing.save(target)
            add(image, image.size, it.path, {"image": it.path, "image_id": boxes.image_id(it.path)},
                save if target else None, set())
            continue
        from .video import VideoWriter, iter_frames, probe_video
        info = probe_video(it.path)
        target = targets.get(it.path)
        writer = VideoWriter(target, info["fps"], info["width"], info["height"]) if target else None
        said: set = set()
        n = 0
        try:
            for i, t, frame in iter_frames(it.path):
                n += 1
                size = (frame.shape[1], frame.shape[0])
                add(frame, size, it.path, {"image": it.path, "image_id": None, "frame": i,
                                           "time_s": round(t, 4) if t == t else None},
                    (lambda d: writer.write(np.asarray(d))) if writer else None, said)
            flush()  # this video's last frames, before its writer closes
        finally:
            if writer is not None:
                writer.close()
        people = sum(1 for e in entries if e["image"] == it.path and "frame" in e)
        print(f"{it.path}: {n} frame(s), {people} person detection(s)"
              + (f" -> {target}" if target else ""), file=sys.stderr)
    flush()
    return entries, best[0]
