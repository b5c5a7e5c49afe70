"""A seeded generator of a synthetic COCO-format pose dataset: articulated figures with known keypoints.

``gtpt synth --out DIR --images N [--wholebody] [--seed S]`` writes::

    DIR/images/train/000000.jpg ...          JPEG images (train split)
    DIR/images/val/000000.jpg ...            JPEG images (held-out split)
    DIR/annotations/person_keypoints_{train,val}.json     (17 keypoints; COCO-WholeBody: coco_wholebody_*.json)
    DIR/detections/person_detections_{train,val}.json     COCO results: image_id, category_id, bbox, score
    DIR/synth.json                           what was generated (version, seed, counts, paths)

Every figure is a 2-D kinematic skeleton seen from the front (the person's left on the image's right when the
torso is upright): pelvis, torso with a random lean, head (nose, eyes, ears drawn on it), arms and legs with
random joint angles, limbs drawn as thick tapered shapes. Each limb has its own colour and the two sides differ
(left: warm colours, right: cool ones), so left and right can be told apart from the pixels alone. Hands and feet
are drawn too; with ``--wholebody`` the 68 face points (jaw, brows, nose, eyes, mouth), 21 points per hand
(palm and four joints per finger) and 3 per foot (big toe, small toe, heel) are drawn as well, in COCO-WholeBody's
order and left/right convention.

Because the sides differ in colour the images are not mirror-symmetric: a horizontally flipped figure is not a
plausible figure with swapped labels. Train on them without flip augmentation and evaluate without the flip test
(``gtpt train`` does both by itself on this data; ``gtpt eval`` / ``gtpt infer``: ``--no-flip``).

Varied per figure: figure height (30-95 % of the image), position (some figures cut by the image border:
keypoints outside get visibility 0 and (0, 0), as COCO leaves unlabelled joints), lean, limb angles and bends,
limb proportions, colour jitter, which arm passes behind the torso. Occluders (random shapes over the figure)
and the torso / other limbs hide joints: a joint is visibility 2 when its own limb is the drawn pixel at its
position, else 1 (labelled but hidden). Backgrounds: coloured noise, gradients, clutter (random shapes and lines),
mixed. Some images hold two figures. ``bbox`` is the extent of the figure's drawn pixels (hidden parts included),
``area`` their count (the segmentation area COCO's OKS uses).

Detection file: per figure its box jittered by a few percent with a score in [0.6, 1), plus an occasional false
positive on the background with a low score, as a person detector's output would look.

Everything comes from ``numpy.random.default_rng([seed, split, index])``: the same seed gives byte-identical
files, and an image does not depend on how many others are generated. The images are made here, so they carry
no third-party licence.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .cli_options import int_at_least
from .keypoints import COCO_NAMES, WHOLEBODY_NAMES

__all__ = ["SYNTH_VERSION", "generate", "dataset_paths", "render_image", "ensure_cached", "default_cache_dir",
           "add_synth_arguments", "run_synth_cli", "PART_COLOURS", "SynthError"]

SYNTH_VERSION = 1            # bump when the images change: cached datasets are keyed by it
VAL_FRACTION = 0.15
JPEG_QUALITY = 92
MAX_PERSONS = 2

# Part ids of the label map (0 = background); a person's label is 1 + person * 32 + part.
TORSO, HEAD, L_UPPERARM, L_FOREARM, R_UPPERARM, R_FOREARM, L_THIGH, L_SHIN, R_THIGH, R_SHIN, \
    L_HAND, R_HAND, L_FOOT, R_FOOT = range(14)
OCCLUDER = 255
# Base colours (RGB), jittered per figure. Left = warm, right = cool; upper and lower segments differ.
PART_COLOURS: Dict[int, Tuple[int, int, int]] = {
    HEAD: (236, 196, 160), L_UPPERARM: (220, 30, 30), L_FOREARM: (250, 150, 0), R_UPPERARM: (30, 60, 220),
    R_FOREARM: (0, 190, 230), L_THIGH: (150, 0, 170), L_SHIN: (245, 90, 200), R_THIGH: (0, 140, 50),
    R_SHIN: (160, 230, 40), L_HAND: (130, 10, 10), R_HAND: (10, 20, 120), L_FOOT: (120, 70, 0),
    R_FOOT: (0, 85, 75)}

# The part whose drawn pixel makes each keypoint visible (several: the limbs meeting at a joint).
_BODY_OWNER = ((HEAD,), (HEAD,), (HEAD,), (HEAD,), (HEAD,), (TORSO, L_UPPERARM), (TORSO, R_UPPERARM),
               (L_UPPERARM, L_FOREARM), (R_UPPERARM, R_FOREARM), (L_FOREARM, L_HAND), (R_FOREARM, R_HAND),
               (TORSO, L_THIGH), (TORSO, R_THIGH), (L_THIGH, L_SHIN), (R_THIGH, R_SHIN), (L_SHIN, L_FOOT),
               (R_SHIN, R_FOOT))
_WB_OWNER = (_BODY_OWNER + ((L_FOOT,),) * 3 + ((R_FOOT,),) * 3 + ((HEAD,),) * 68 + ((L_HAND,),) * 21
             + ((R_HAND,),) * 21)


# Generator settings: "full" (the default of `gtpt synth`) varies everything the module docstring lists; "easy" (the
# default dataset of `gtpt train`, sized so a small model learns it in minutes on a CPU) draws one whole figure per
# image, 55-90 % of the image high, with moderate lean and limb angles, no occluders and plain gradient backgrounds.
DIFFICULTIES: Dict[str, Dict[str, Any]] = {
    "full": {"lean_sd": 0.22, "lean_max": 0.6, "arm1": (-0.5, 2.8), "arm2": (-0.3, 2.4), "arm2_back": 0.3,
             "leg1": (-0.35, 1.2), "leg2": (0.0, 1.6), "leg2_back": 0.4, "behind": 0.3, "yaw_sd": 0.25,
             "height": (0.3, 0.95), "two": 0.2, "cut": 0.12, "occluder": 0.35, "backgrounds": (0, 1, 2, 3),
             "margins": (0.25, 0.47, 0.45), "width_ref": None},
    "easy": {"lean_sd": 0.1, "lean_max": 0.3, "arm1": (0.0, 1.8), "arm2": (-0.2, 1.2), "arm2_back": 0.0,
             "leg1": (-0.1, 0.5), "leg2": (0.0, 0.7), "leg2_back": 0.0, "behind": 0.0, "yaw_sd": 0.1,
             "height": (0.55, 0.9), "two": 0.0, "cut": 0.0, "occluder": 0.0, "backgrounds": (1,),
             # (pelvis to the image side, top, bottom in figure heights: room for outstretched or raised arms;
             # the height is taken of min(image height, width_ref x width) so a narrow image still holds it)
             "margins": (0.5, 0.58, 0.47), "width_ref": 1.0,
             # a disc of its own colour on each shoulder, elbow, wrist, hip, knee and ankle (a mannequin's joints)
             "markers": True},
}
# Marker colours of the 12 limb joints (COCO order from the left shoulder): left light, right dark, all unlike the
# limb colours.
MARKER_COLOURS = ((255, 255, 255), (0, 0, 0), (255, 255, 0), (70, 70, 70), (120, 255, 170), (0, 90, 90),
                  (255, 170, 255), (90, 0, 60), (200, 255, 255), (40, 40, 110), (255, 215, 140), (60, 90, 0))


class SynthError(ValueError):
    """A bad argument or output folder for the generator; the message names the flag or path."""


# ----------------------------------------------------------------------------------------------------------------
# Geometry helpers

def _rot(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def _unit(angle: float) -> np.ndarray:
    """Direction ``angle`` radians from straight down (image y grows downwards), positive towards +x."""
    return np.array([math.sin(angle), math.cos(angle)])


def _jitter(rng: np.random.Generator, colour: Sequence[int], amount: int) -> Tuple[int, int, int]:
    d = rng.integers(-amount, amount + 1, 3)
    return tuple(min(255, max(0, int(c) + int(e))) for c, e in zip(colour, d))


class _Painter:
    """Draws each shape on the image, the image-wide label map and the person's own silhouette mask."""

    def __init__(self, image: Image.Image, labels: Image.Image):
        self.draw = ImageDraw.Draw(image)
        self.labels = ImageDraw.Draw(labels)
        self.mask: Optional[ImageDraw.ImageDraw] = None
        self.label_base = 0

    def person(self, mask: Image.Image, index: int) -> None:
        self.mask = ImageDraw.Draw(mask)
        self.label_base = 1 + 32 * index

    def _label(self, part: int) -> int:
        return OCCLUDER if part == OCCLUDER else self.label_base + part

    def polygon(self, pts: Sequence[np.ndarray], part: int, fill, outline=None) -> None:
        xy = [(float(p[0]), float(p[1])) for p in pts]
        self.draw.polygon(xy, fill=fill, outline=outline)
        self.labels.polygon(xy, fill=self._label(part))
        if self.mask is not None and part != OCCLUDER:
            self.mask.polygon(xy, fill=1)

    def ellipse(self, c: np.ndarray, rx: float, ry: float, part: int, fill, outline=None, angle: float = 0.0
                ) -> None:
        if angle:
            t = np.linspace(0, 2 * math.pi, 20, endpoint=False)
            pts = [c + _rot(np.array([rx * math.cos(a), ry * math.sin(a)]), angle) for a in t]
            self.polygon(pts, part, fill, outline)
            return
        box = [float(c[0] - rx), float(c[1] - ry), float(c[0] + rx), float(c[1] + ry)]
        self.draw.ellipse(box, fill=fill, outline=outline)
        self.labels.ellipse(box, fill=self._label(part))
        if self.mask is not None and part != OCCLUDER:
            self.mask.ellipse(box, fill=1)

    def limb(self, a: np.ndarray, b: np.ndarray, wa: float, wb: float, part: int, fill) -> None:
        """A tapered limb from ``a`` (width ``wa``) to ``b`` (width ``wb``) with rounded ends."""
        d = b - a
        n = np.array([-d[1], d[0]]) / max(float(np.hypot(*d)), 1e-6)
        self.polygon([a + n * wa / 2, b + n * wb / 2, b - n * wb / 2, a - n * wa / 2], part, fill)
        self.ellipse(a, wa / 2, wa / 2, part, fill)
        self.ellipse(b, wb / 2, wb / 2, part, fill)

    def line(self, pts: Sequence[np.ndarray], width: float, fill) -> None:
        """Detail drawn on a part already labelled (face features, fingers drawn over the palm): image only."""
        self.draw.line([(float(p[0]), float(p[1])) for p in pts], fill=fill, width=max(1, int(round(width))))


# ----------------------------------------------------------------------------------------------------------------
# Backgrounds and occluders

def _random_colour(rng: np.random.Generator, grey_mix: float = 0.0) -> Tuple[int, int, int]:
    c = rng.integers(0, 256, 3).astype(np.float64)
    c = c * (1 - grey_mix) + c.mean() * grey_mix
    return tuple(int(v) for v in c)


def _background(rng: np.random.Generator, width: int, height: int, kinds: Sequence[int] = (0, 1, 2, 3)
                ) -> Image.Image:
    # 0 noise, 1 gradient, 2 clutter, 3 gradient + clutter
    kind = int(rng.integers(0, 4)) if len(kinds) == 4 else int(kinds[int(rng.integers(0, len(kinds)))])
    if kind == 0:
        base = np.array(_random_colour(rng, 0.5), dtype=np.float32)
        coarse = rng.normal(0, rng.uniform(15, 50), (max(2, height // 16), max(2, width // 16), 3))
        low = np.asarray(Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize(
            (width, height), Image.Resampling.BILINEAR), dtype=np.float32) - 128
        arr = base + low + rng.standard_normal((height, width, 3), dtype=np.float32) * rng.uniform(4, 25)
    else:
        c0 = np.array(_random_colour(rng, 0.4), dtype=np.float32)
        c1 = np.array(_random_colour(rng, 0.4), dtype=np.float32)
        ang = rng.uniform(0, 2 * math.pi)
        t = (np.arange(width, dtype=np.float32)[None, :] * math.cos(ang)
             + np.arange(height, dtype=np.float32)[:, None] * math.sin(ang))
        t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
        arr = (c0 + (c1 - c0) * t[..., None]
               + rng.standard_normal((height, width, 3), dtype=np.float32) * rng.uniform(2, 10))
    image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if kind >= 2:
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(8, 30))):
            colour = _random_colour(rng, rng.uniform(0.2, 0.7))
            x, y = rng.uniform(-0.1, 1.1) * width, rng.uniform(-0.1, 1.1) * height
            s = rng.uniform(0.03, 0.25) * min(width, height)
            shape = int(rng.integers(0, 3))
            if shape == 0:
                draw.rectangle([x, y, x + s * rng.uniform(0.3, 2), y + s * rng.uniform(0.3, 2)], fill=colour)
            elif shape == 1:
                draw.ellipse([x, y, x + s, y + s * rng.uniform(0.4, 1.5)], fill=colour)
            else:
                draw.line([x, y, x + rng.uniform(-2, 2) * s, y + rng.uniform(-2, 2) * s], fill=colour,
                          width=int(rng.integers(1, 6)))
    return image


def _occluder(p: _Painter, rng: np.random.Generator, at: np.ndarray, size: float) -> None:
    colour = _random_colour(rng, rng.uniform(0.0, 0.6))
    w, h = size * rng.uniform(0.5, 1.5), size * rng.uniform(0.5, 1.5)
    c = at + rng.normal(0, 0.3, 2) * size
    if rng.random() < 0.5:
        angle = rng.uniform(0, math.pi)
        pts = [c + _rot(np.array(v), angle) for v in ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2),
                                                      (-w / 2, h / 2))]
        p.polygon(pts, OCCLUDER, colour)
        stripe = _random_colour(rng)
        for k in range(1, int(rng.integers(1, 5))):  # a few stripes: a textured object, not a flat patch
            f = k / 5
            p.line([pts[0] + (pts[1] - pts[0]) * f, pts[3] + (pts[2] - pts[3]) * f], max(1.0, size / 12), stripe)
    else:
        p.ellipse(c, w / 2, h / 2, OCCLUDER, colour)


# ----------------------------------------------------------------------------------------------------------------
# The figure

@dataclass
class _Figure:
    keypoints: np.ndarray   # (K, 2) float image coordinates
    owners: Tuple[Tuple[int, ...], ...]


def _face_template() -> np.ndarray:
    """The 68 face points (iBUG order: point 0 = the subject's right jaw, on the image's left for a frontal
    face) in head units (radius 1, y down)."""
    pts = [(0.88 * math.cos(math.pi - math.pi * i / 16), 0.88 * math.sin(math.pi - math.pi * i / 16) * 0.95 + 0.05)
           for i in range(17)]                                                   # 0-16 jaw
    pts += [(-0.62 + 0.11 * i, -0.42 - 0.06 * math.sin(math.pi * i / 4)) for i in range(5)]   # 17-21 brow
    pts += [(0.18 + 0.11 * i, -0.42 - 0.06 * math.sin(math.pi * i / 4)) for i in range(5)]    # 22-26 brow
    pts += [(0.0, -0.28 + 0.12 * i) for i in range(4)]                         # 27-30 nose bridge
    pts += [(-0.16 + 0.08 * i, 0.16 + 0.03 * (1 - abs(i - 2) / 2)) for i in range(5)]  # 31-35 nostrils
    for cx in (-0.36, 0.36):                                                    # 36-41, 42-47 eyes
        pts += [(cx - 0.16, -0.18), (cx - 0.06, -0.25), (cx + 0.06, -0.25), (cx + 0.16, -0.18),
                (cx + 0.06, -0.12), (cx - 0.06, -0.12)]
    outer = [(-0.32, 0.45), (-0.2, 0.37), (-0.08, 0.35), (0.0, 0.37), (0.08, 0.35), (0.2, 0.37), (0.32, 0.45),
             (0.2, 0.55), (0.1, 0.59), (0.0, 0.6), (-0.1, 0.59), (-0.2, 0.55)]    # 48-59
    inner = [(-0.22, 0.45), (-0.1, 0.42), (0.0, 0.42), (0.1, 0.42), (0.22, 0.45), (0.1, 0.5), (0.0, 0.51),
             (-0.1, 0.5)]                                                        # 60-67
    return np.array(pts + outer + inner, dtype=np.float64)


_FACE = _face_template()


def _draw_figure(p: _Painter, rng: np.random.Generator, pelvis: np.ndarray, h: float, wholebody: bool,
                 d: Optional[Mapping[str, Any]] = None) -> _Figure:
    """Draw one figure of height ``h`` around ``pelvis``; returns its keypoints in COCO(-WholeBody) order. ``d``:
    the ranges of a :data:`DIFFICULTIES` entry (default "full")."""
    d = DIFFICULTIES["full"] if d is None else d
    lean = float(np.clip(rng.normal(0, d["lean_sd"]), -d["lean_max"], d["lean_max"]))
    up = -_unit(lean)                                  # pelvis -> neck
    side = np.array([-up[1], up[0]])                  # towards the person's left (image right when upright)
    prop = rng.uniform(0.9, 1.1, 8)
    torso_len, shoulder_half, hip_half = 0.30 * h * prop[0], 0.11 * h * prop[1], 0.075 * h * prop[2]
    upper_arm, forearm, thigh, shin = (0.16 * h * prop[3], 0.14 * h * prop[4], 0.23 * h * prop[5],
                                       0.22 * h * prop[6])
    head_r = 0.068 * h * prop[7]
    neck = pelvis + up * torso_len
    jit = 18
    col = {k: _jitter(rng, v, jit) for k, v in PART_COLOURS.items()}
    col[TORSO] = _random_colour(rng, rng.uniform(0.0, 0.5))   # a shirt of any colour
    l_sh, r_sh = neck + side * shoulder_half, neck - side * shoulder_half
    l_hip, r_hip = pelvis + side * hip_half, pelvis - side * hip_half

    def arm(shoulder: np.ndarray, sign: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        a1 = lean + sign * rng.uniform(*d["arm1"])         # from hanging down, outwards for sign = +1 (left)
        a2 = a1 + sign * rng.uniform(*d["arm2"]) * (1 if rng.random() < 1 - d["arm2_back"] else -1)
        elbow = shoulder + _unit(a1) * upper_arm
        wrist = elbow + _unit(a2) * forearm
        return elbow, wrist, _unit(a2)

    def leg(hip: np.ndarray, sign: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        a1 = lean + sign * rng.uniform(*d["leg1"])
        a2 = a1 - sign * rng.uniform(*d["leg2"]) * (1 if rng.random() < 1 - d["leg2_back"] else -0.4)
        knee = hip + _unit(a1) * thigh
        ankle = knee + _unit(a2) * shin
        return knee, ankle, _unit(a2)

    l_el, l_wr, l_dir = arm(l_sh, +1.0)
    r_el, r_wr, r_dir = arm(r_sh, -1.0)
    l_kn, l_an, l_sdir = leg(l_hip, +1.0)
    r_kn, r_an, r_sdir = leg(r_hip, -1.0)
    w_ua, w_fa, w_th, w_sh = 0.055 * h, 0.042 * h, 0.085 * h, 0.06 * h

    # feet: heel under the ankle, toes pointing outwards (the person's left foot to the image right)
    def foot(ankle: np.ndarray, sdir: np.ndarray, sign: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = np.array([-sdir[1], sdir[0]]) * sign
        heel = ankle + sdir * 0.035 * h - out * 0.015 * h
        big = ankle + sdir * 0.045 * h + out * 0.085 * h
        small = ankle + sdir * 0.025 * h + out * 0.075 * h
        return big, small, heel

    feet = {L_FOOT: foot(l_an, l_sdir, +1.0), R_FOOT: foot(r_an, r_sdir, -1.0)}

    # hands: palm beyond the wrist, five fingers of four points fanning out along the forearm direction
    def hand(wrist: np.ndarray, fdir: np.ndarray, sign: float) -> np.ndarray:
        palm = wrist + fdir * 0.03 * h
        pts = [wrist]
        for f, spread in enumerate((-0.9, -0.35, 0.0, 0.3, 0.6)):
            d = _rot(fdir, sign * spread)
            base = palm + d * 0.018 * h if f else wrist + _rot(fdir, sign * -0.7) * 0.02 * h
            step = (0.011 if f else 0.01) * h
            curl = rng.uniform(-0.25, 0.25)
            for j in range(4):
                pts.append(base + d * step * j)
                d = _rot(d, curl)
        return np.array(pts)

    hands = {L_HAND: hand(l_wr, l_dir, +1.0), R_HAND: hand(r_wr, r_dir, -1.0)}

    def draw_arm(which: int) -> None:
        sh, el, wr, up_part, fo_part, hand_part = ((l_sh, l_el, l_wr, L_UPPERARM, L_FOREARM, L_HAND) if which == 0
                                                   else (r_sh, r_el, r_wr, R_UPPERARM, R_FOREARM, R_HAND))
        p.limb(sh, el, w_ua, w_ua * 0.85, up_part, col[up_part])
        p.limb(el, wr, w_fa, w_fa * 0.8, fo_part, col[fo_part])
        pts = hands[hand_part]
        fdir = (wr - el) / max(float(np.hypot(*(wr - el))), 1e-6)
        p.ellipse(wr + fdir * 0.03 * h, 0.026 * h, 0.026 * h, hand_part, col[hand_part])
        if wholebody:
            for f in range(5):
                seg = [pts[0]] + list(pts[1 + 4 * f:5 + 4 * f])
                for a, b in zip(seg[:-1], seg[1:]):
                    p.limb(a, b, 0.011 * h, 0.009 * h, hand_part, col[hand_part])

    def draw_leg(which: int) -> None:
        hip, kn, an, th_part, sh_part, ft_part = ((l_hip, l_kn, l_an, L_THIGH, L_SHIN, L_FOOT) if which == 0
                                                  else (r_hip, r_kn, r_an, R_THIGH, R_SHIN, R_FOOT))
        p.limb(hip, kn, w_th, w_th * 0.75, th_part, col[th_part])
        p.limb(kn, an, w_sh, w_sh * 0.7, sh_part, col[sh_part])
        big, small, heel = feet[ft_part]
        p.polygon([an, heel, small, big], ft_part, col[ft_part])
        p.limb(heel, big, 0.03 * h, 0.022 * h, ft_part, col[ft_part])

    behind = int(rng.integers(0, 2)) if rng.random() < d["behind"] else -1   # an arm passing behind the torso
    if behind >= 0:
        draw_arm(behind)
    for leg_i in (0, 1):
        draw_leg(leg_i)
    p.polygon([l_sh + up * 0.02 * h, r_sh + up * 0.02 * h, r_hip - up * 0.02 * h, l_hip - up * 0.02 * h], TORSO,
              col[TORSO])
    p.ellipse((l_sh + r_sh) / 2, shoulder_half * 1.05, 0.035 * h, TORSO, col[TORSO], angle=lean)
    for arm_i in (0, 1):
        if arm_i != behind:
            draw_arm(arm_i)

    # head: tilt, a small yaw that shifts the face towards one side
    tilt = lean + rng.normal(0, 0.12)
    yaw = float(np.clip(rng.normal(0, d["yaw_sd"]), -0.5, 0.5))
    head_c = neck - _unit(tilt) * (0.09 * h * rng.uniform(0.95, 1.05))
    p.limb(neck, head_c, 0.04 * h, 0.04 * h, HEAD, col[HEAD])

    def face_point(v: Sequence[float]) -> np.ndarray:
        x = v[0] * (1 - 0.3 * abs(yaw)) + 0.35 * yaw * (1 - abs(v[0]) * 0.5)
        return head_c + _rot(np.array([x, v[1]]) * head_r, tilt)

    ear_col = tuple(int(c * 0.8) for c in col[HEAD])
    l_ear, r_ear = face_point((0.98, -0.05)), face_point((-0.98, -0.05))
    for e in (l_ear, r_ear):
        p.ellipse(e, 0.22 * head_r, 0.32 * head_r, HEAD, ear_col, angle=tilt)
    p.ellipse(head_c, head_r, head_r * 1.08, HEAD, col[HEAD], angle=tilt)
    dark = (40, 25, 20)
    l_eye, r_eye = face_point((0.36, -0.18)), face_point((-0.36, -0.18))
    nose = face_point((0.0, 0.08))
    face = np.array([face_point(v) for v in _FACE])
    if wholebody:
        p.line(list(face[0:17]), max(1.0, 0.06 * head_r), ear_col)
        p.line(list(face[17:22]), max(1.0, 0.09 * head_r), dark)
        p.line(list(face[22:27]), max(1.0, 0.09 * head_r), dark)
        p.line(list(face[27:31]), max(1.0, 0.07 * head_r), ear_col)
        p.line(list(face[31:36]), max(1.0, 0.07 * head_r), ear_col)
        for s in (slice(36, 42), slice(42, 48)):
            p.line(list(face[s]) + [face[s][0]], max(1.0, 0.05 * head_r), dark)
        p.line(list(face[48:60]) + [face[48]], max(1.0, 0.07 * head_r), (170, 40, 50))
        p.line(list(face[60:68]) + [face[60]], max(1.0, 0.04 * head_r), (120, 20, 30))
    for e in (l_eye, r_eye):
        p.ellipse(e, 0.11 * head_r, 0.09 * head_r, HEAD, dark)
    p.ellipse(nose, 0.1 * head_r, 0.08 * head_r, HEAD, (190, 90, 70))

    body = np.array([nose, l_eye, r_eye, l_ear, r_ear, l_sh, r_sh, l_el, r_el, l_wr, r_wr, l_hip, r_hip, l_kn,
                     r_kn, l_an, r_an])
    if d.get("markers"):                 # drawn last, labelled as the joint's limb, so the joint stays visible
        for k in range(5, 17):
            p.ellipse(body[k], 0.028 * h, 0.028 * h, _BODY_OWNER[k][-1], MARKER_COLOURS[k - 5])
    if not wholebody:
        return _Figure(body, _BODY_OWNER)
    foot_pts = np.array(list(feet[L_FOOT]) + list(feet[R_FOOT]))
    return _Figure(np.concatenate([body, foot_pts, face, hands[L_HAND], hands[R_HAND]]), _WB_OWNER)


def render_image(rng: np.random.Generator, wholebody: bool = False, size: Optional[Tuple[int, int]] = None,
                 difficulty: str = "full") -> Tuple[Image.Image, List[Dict[str, Any]], np.ndarray]:
    """One image: ``(image, people, label_map)``. Each person is a dict with ``keypoints`` ``(K, 3)`` (x, y,
    visibility 0 / 1 / 2), ``bbox`` (x, y, w, h) and ``area``; ``label_map`` (H, W) uint8 holds
    ``1 + 32 * person + part`` where a figure's part is the drawn pixel, 255 for occluders, 0 for background."""
    d = DIFFICULTIES[difficulty]
    width, height = size if size is not None else (int(rng.integers(256, 385)), int(rng.integers(256, 385)))
    image = _background(rng, width, height, d["backgrounds"])
    labels = Image.new("L", (width, height), 0)
    p = _Painter(image, labels)
    n = 1 if rng.random() < 1 - d["two"] else MAX_PERSONS
    figures, masks = [], []
    for i in range(n):
        ref = height if d["width_ref"] is None else min(height, d["width_ref"] * width)
        h = rng.uniform(*d["height"]) * ref / (1.0 if n == 1 else 1.15)
        cut = rng.random() < d["cut"]          # some figures run over the border
        margin_x = d["margins"][0] * h
        left, right = width * i / n, width * (i + 1) / n      # two figures: one in each half, overlapping a bit
        lo_x, hi_x = (left + margin_x / n, right - margin_x / n) if not cut else (left, right)
        if hi_x <= lo_x:
            lo_x = hi_x = (left + right) / 2
        x = rng.uniform(lo_x, hi_x)
        top, bottom = d["margins"][1] * h, d["margins"][2] * h     # pelvis to head top / feet
        lo_y, hi_y = (top, height - bottom) if not cut else (0.2 * h, height - 0.1 * h)
        y = rng.uniform(lo_y, hi_y) if hi_y > lo_y else height / 2
        mask = Image.new("1", (width, height), 0)
        p.person(mask, i)
        figures.append(_draw_figure(p, rng, np.array([x, y]), h, wholebody, d))
        masks.append(mask)
        if rng.random() < d["occluder"]:             # an object over part of this figure
            p.mask = None
            for _ in range(int(rng.integers(1, 3))):
                at = figures[-1].keypoints[int(rng.integers(0, 17))]
                _occluder(p, rng, at, rng.uniform(0.08, 0.22) * h)
    label_map = np.asarray(labels, dtype=np.uint8)
    people = []
    for i, (fig, mask) in enumerate(zip(figures, masks)):
        m = np.asarray(mask, dtype=bool)
        ys, xs = np.nonzero(m)
        if xs.size == 0:
            continue
        x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
        kp = np.zeros((len(fig.keypoints), 3))
        for k, (pt, owners) in enumerate(zip(fig.keypoints, fig.owners)):
            xi, yi = int(math.floor(pt[0])), int(math.floor(pt[1]))
            if not (0 <= pt[0] < width and 0 <= pt[1] < height):
                continue                    # outside the image: unlabelled (0, 0, 0)
            own = label_map[yi, xi] in {1 + 32 * i + o for o in owners}
            kp[k] = (round(float(pt[0]), 2), round(float(pt[1]), 2), 2 if own else 1)
        people.append({"keypoints": kp, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(xs.size)})
    return image, people, label_map


# ----------------------------------------------------------------------------------------------------------------
# Dataset files

_BODY_SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9],
                  [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]  # COCO, 1-based


def dataset_paths(root: str, wholebody: bool = False) -> Dict[str, str]:
    """Where :func:`generate` puts each file under ``root`` (the keys are ``gtpt train``'s data options)."""
    stem = "coco_wholebody" if wholebody else "person_keypoints"
    return {"train_ann_file": os.path.join(root, "annotations", f"{stem}_train.json"),
            "train_image_root": os.path.join(root, "images", "train"),
            "val_ann_file": os.path.join(root, "annotations", f"{stem}_val.json"),
            "val_image_root": os.path.join(root, "images", "val"),
            "val_detections_file": os.path.join(root, "detections", "person_detections_val.json"),
            "train_detections_file": os.path.join(root, "detections", "person_detections_train.json")}


def _part_box(kp: np.ndarray) -> List[float]:
    lab = kp[kp[:, 2] > 0]
    if len(lab) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    x0, y0 = lab[:, :2].min(0)
    x1, y1 = lab[:, :2].max(0)
    return [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2), round(float(y1 - y0), 2)]


def _annotation(person: Dict[str, Any], ann_id: int, image_id: int, wholebody: bool) -> Dict[str, Any]:
    kp = person["keypoints"]
    body = kp[:17]
    ann = {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
           "bbox": [round(v, 2) for v in person["bbox"]], "area": person["area"],
           "num_keypoints": int((body[:, 2] > 0).sum()), "segmentation": [],
           "keypoints": [float(v) if i % 3 < 2 else int(v) for i, v in enumerate(body.reshape(-1))]}
    if wholebody:
        for field, sl in (("foot_kpts", slice(17, 23)), ("face_kpts", slice(23, 91)),
                          ("lefthand_kpts", slice(91, 112)), ("righthand_kpts", slice(112, 133))):
            part = kp[sl]
            ann[field] = [float(v) if i % 3 < 2 else int(v) for i, v in enumerate(part.reshape(-1))]
            name = field.split("_")[0]
            ann[f"{name}_valid"] = bool((part[:, 2] > 0).any())
            if name != "foot":
                ann[f"{name}_box"] = _part_box(part)
    return ann


def _categories(wholebody: bool) -> List[Dict[str, Any]]:
    names = WHOLEBODY_NAMES if wholebody else COCO_NAMES
    return [{"id": 1, "name": "person", "supercategory": "person", "keypoints": list(names),
             "skeleton": _BODY_SKELETON}]


def _detections(rng: np.random.Generator, people: Sequence[Dict[str, Any]], image_id: int, width: int,
                height: int) -> List[Dict[str, Any]]:
    dets = []
    for person in people:
        x, y, w, h = person["bbox"]
        dx, dy = rng.normal(0, 0.03, 2) * (w, h)
        sw, sh = np.exp(rng.normal(0, 0.04, 2))
        cx, cy = x + w / 2 + dx, y + h / 2 + dy
        w2, h2 = w * sw, h * sh
        x0, y0 = max(0.0, cx - w2 / 2), max(0.0, cy - h2 / 2)
        x1, y1 = min(float(width), cx + w2 / 2), min(float(height), cy + h2 / 2)
        if x1 - x0 > 1 and y1 - y0 > 1:
            dets.append({"image_id": image_id, "category_id": 1, "bbox": [round(float(v), 2) for v in
                                                                          (x0, y0, x1 - x0, y1 - y0)],
                         "score": round(float(rng.uniform(0.6, 1.0)), 4)})
    if rng.random() < 0.1:                  # a false positive somewhere on the background
        w2, h2 = rng.uniform(0.1, 0.4) * width, rng.uniform(0.2, 0.6) * height
        x0, y0 = rng.uniform(0, width - w2), rng.uniform(0, height - h2)
        dets.append({"image_id": image_id, "category_id": 1,
                     "bbox": [round(float(v), 2) for v in (x0, y0, w2, h2)],
                     "score": round(float(rng.uniform(0.05, 0.4)), 4)})
    return dets


def _write_split(root: str, split: str, count: int, seed: int, wholebody: bool, progress=None,
                 difficulty: str = "full") -> Dict[str, int]:
    paths = dataset_paths(root, wholebody)
    image_dir = paths[f"{split}_image_root"]
    os.makedirs(image_dir, exist_ok=True)
    images, annotations, detections = [], [], []
    split_id = 0 if split == "train" else 1
    for i in range(count):
        rng = np.random.default_rng([seed, split_id, i])
        image, people, _ = render_image(rng, wholebody, difficulty=difficulty)
        name = f"{i:06d}.jpg"
        image.save(os.path.join(image_dir, name), quality=JPEG_QUALITY)
        image_id = i + 1
        images.append({"id": image_id, "file_name": name, "width": image.width, "height": image.height})
        for person in people:
            annotations.append(_annotation(person, len(annotations) + 1, image_id, wholebody))
        detections += _detections(rng, people, image_id, image.width, image.height)
        if progress is not None and (i + 1) % 200 == 0:
            progress(f"{split}: {i + 1}/{count} images")
    data = {"info": {"description": f"gtpt synthetic figures v{SYNTH_VERSION} ({split}, seed {seed})"},
            "licenses": [], "images": images, "annotations": annotations, "categories": _categories(wholebody)}
    os.makedirs(os.path.dirname(paths[f"{split}_ann_file"]), exist_ok=True)
    with open(paths[f"{split}_ann_file"], "w") as f:
        json.dump(data, f, separators=(",", ":"))
    os.makedirs(os.path.dirname(paths[f"{split}_detections_file"]), exist_ok=True)
    with open(paths[f"{split}_detections_file"], "w") as f:
        json.dump(detections, f, separators=(",", ":"))
    return {"images": count, "people": len(annotations), "detections": len(detections)}


def split_counts(num_images: int, val_fraction: float = VAL_FRACTION) -> Tuple[int, int]:
    """(train, val) image counts for ``num_images`` in all: at least one of each."""
    if num_images < 2:
        raise SynthError(f"--images must be >= 2 (one train and one val image), got {num_images}")
    val = min(max(1, int(round(num_images * val_fraction))), num_images - 1)
    return num_images - val, val


def generate(out_dir: str, num_images: int, wholebody: bool = False, seed: int = 0,
             val_fraction: float = VAL_FRACTION, progress=None, difficulty: str = "full") -> Dict[str, Any]:
    """Write a dataset of ``num_images`` images (train + val) into ``out_dir`` (created; must be empty or
    absent). ``difficulty``: a key of :data:`DIFFICULTIES`. Returns the ``synth.json`` record (counts and paths)."""
    if difficulty not in DIFFICULTIES:
        raise SynthError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")
    if isinstance(num_images, bool) or not isinstance(num_images, int):
        raise SynthError(f"--images must be an integer, got {num_images!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SynthError(f"--seed must be an integer >= 0, got {seed!r}")
    n_train, n_val = split_counts(num_images, val_fraction)
    out_dir = os.path.abspath(os.fspath(out_dir))
    _check_out_dir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    info = {"format": "gtpt-synth", "version": SYNTH_VERSION, "seed": seed, "wholebody": wholebody,
            "num_keypoints": 133 if wholebody else 17, "images": num_images, "difficulty": difficulty}
    info["train"] = _write_split(out_dir, "train", n_train, seed, wholebody, progress, difficulty)
    info["val"] = _write_split(out_dir, "val", n_val, seed, wholebody, progress, difficulty)
    info["paths"] = {k: os.path.relpath(v, out_dir) for k, v in dataset_paths(out_dir, wholebody).items()}
    with open(os.path.join(out_dir, "synth.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def _check_out_dir(out_dir: str) -> None:
    """Fail before any work: a file in the way, a parent that is a file, or a non-empty folder."""
    if os.path.isfile(out_dir):
        raise SynthError(f"--out {out_dir} is a file; give a folder")
    parent = out_dir
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise SynthError(f"--out {out_dir}: {parent} is a file, so the folder cannot be created")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise SynthError(f"--out {out_dir} is not empty; give a new or empty folder")
    if parent and not os.access(parent, os.W_OK):
        raise SynthError(f"--out {out_dir}: {parent} is not writable")


# ----------------------------------------------------------------------------------------------------------------
# The cache used by `gtpt train` without data options

def default_cache_dir() -> str:
    """``$GTPT_CACHE``, else ``$XDG_CACHE_HOME/gtpt``, else ``~/.cache/gtpt``."""
    env = os.environ.get("GTPT_CACHE")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gtpt")


def ensure_cached(num_images: int, wholebody: bool = False, seed: int = 0, cache_dir: Optional[str] = None,
                  progress=None, difficulty: str = "full", val_fraction: float = VAL_FRACTION) -> Tuple[str, bool]:
    """The folder of a generated dataset with these parameters under the cache, generated first when it is not
    there (into a temporary folder renamed into place, so an interrupted generation is never reused). Returns
    ``(folder, generated_now)``."""
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    fields = {"v": SYNTH_VERSION, "n": num_images, "wb": bool(wholebody), "seed": seed}
    if difficulty != "full" or val_fraction != VAL_FRACTION:   # (the key of a default dataset is unchanged)
        fields.update(difficulty=difficulty, val=val_fraction)
    if difficulty != "full":                                      # a changed setting is a new dataset
        fields.update(spec=repr(sorted(DIFFICULTIES[difficulty].items())))
    key = json.dumps(fields, sort_keys=True)
    name = (f"synth-{'wholebody-' if wholebody else ''}{'' if difficulty == 'full' else difficulty + '-'}"
            f"{num_images}-{hashlib.sha1(key.encode()).hexdigest()[:10]}")
    root = os.path.join(cache_dir, name)
    if os.path.isfile(os.path.join(root, "synth.json")):
        return root, False
    try:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=name + ".tmp-", dir=cache_dir)
    except OSError as e:
        raise SynthError(f"cannot create the dataset cache in {cache_dir} ({e.strerror or e}); set GTPT_CACHE "
                         f"to a writable folder") from None
    try:
        shutil.rmtree(tmp)
        generate(tmp, num_images, wholebody, seed, val_fraction=val_fraction, progress=progress,
                 difficulty=difficulty)
        try:
            os.rename(tmp, root)
        except OSError:
            if not os.path.isfile(os.path.join(root, "synth.json")):   # not another process winning the race
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return root, True


# ----------------------------------------------------------------------------------------------------------------
# gtpt synth

def add_synth_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    count, seed = int_at_least(2), int_at_least(0)
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (new or empty)")
    parser.add_argument("--images", type=count, required=True, metavar="N",
                        help=f"images in all; {VAL_FRACTION:.0%}% (at least one) go to the val split")
    parser.add_argument("--wholebody", action="store_true",
                        help="133 COCO-WholeBody keypoints (face, hands, feet) instead of COCO's 17")
    parser.add_argument("--seed", type=seed, default=0, help="random seed (default 0); the same seed gives the "
                                                             "same files")
    return parser


def run_synth_cli(args: argparse.Namespace) -> int:
    try:
        info = generate(args.out, args.images, args.wholebody, args.seed,
                        progress=lambda s: print(f"gtpt synth: {s}", file=sys.stderr, flush=True))
    except SynthError as e:
        print(f"gtpt synth: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"gtpt synth: error: cannot write {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    root = os.path.abspath(args.out)
    p = {k: os.path.join(root, v) for k, v in info["paths"].items()}
    print(f"wrote {info['train']['images']} train images ({info['train']['people']} people) and "
          f"{info['val']['images']} val images ({info['val']['people']} people) to {root}")
    print(f"train on it:  gtpt train --variant gtpt-t{'-wholebody' if args.wholebody else ''} --output-dir RUN "
          f"--train-ann-file {p['train_ann_file']} --train-image-root {p['train_image_root']} "
          f"--val-ann-file {p['val_ann_file']} --val-image-root {p['val_image_root']} --no-flip")
    return 0
