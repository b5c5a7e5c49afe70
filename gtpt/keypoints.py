"""Keypoint metadata for COCO (17) and COCO-WholeBody (133), in one place.

Values follow ``shared/reference/gtpt-reference.md`` §2 and §8 (from the official GTPT code and the
COCO / COCO-WholeBody evaluation kits); face flip pairs and part names follow COCO-WholeBody's 68-point face
layout and 21-point hands (as in mmpose's ``coco_wholebody`` dataset info).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

COCO_NAMES: Tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle")
FOOT_NAMES = ("left_big_toe", "left_small_toe", "left_heel", "right_big_toe", "right_small_toe", "right_heel")
FACE_NAMES = tuple(f"face-{i}" for i in range(68))
_HAND = ("hand_root",) + tuple(f"{f}{j}" for f in ("thumb", "forefinger", "middle_finger", "ring_finger",
                                                   "pinky_finger") for j in range(1, 5))
LEFT_HAND_NAMES = tuple("left_" + n for n in _HAND)
RIGHT_HAND_NAMES = tuple("right_" + n for n in _HAND)
WHOLEBODY_NAMES = COCO_NAMES + FOOT_NAMES + FACE_NAMES + LEFT_HAND_NAMES + RIGHT_HAND_NAMES

COCO_SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89]) / 10.0
FOOT_SIGMAS = np.array([0.068, 0.066, 0.066, 0.092, 0.094, 0.094])
FACE_SIGMAS = np.array([
    0.042, 0.043, 0.044, 0.043, 0.040, 0.035, 0.031, 0.025, 0.020, 0.023, 0.029, 0.032, 0.037, 0.038, 0.043, 0.041,
    0.045, 0.013, 0.012, 0.011, 0.011, 0.012, 0.012, 0.011, 0.011, 0.013, 0.015, 0.009, 0.007, 0.007, 0.007, 0.012,
    0.009, 0.008, 0.016, 0.010, 0.017, 0.011, 0.009, 0.011, 0.009, 0.007, 0.013, 0.008, 0.011, 0.012, 0.010, 0.034,
    0.008, 0.008, 0.009, 0.008, 0.008, 0.007, 0.010, 0.008, 0.009, 0.009, 0.009, 0.007, 0.007, 0.008, 0.011, 0.008,
    0.008, 0.008, 0.01, 0.008])
HAND_SIGMAS = np.array([0.029, 0.022, 0.035, 0.037, 0.047, 0.026, 0.025, 0.024, 0.035, 0.018, 0.024, 0.022, 0.026,
                        0.017, 0.021, 0.021, 0.032, 0.02, 0.019, 0.022, 0.031])
WHOLEBODY_SIGMAS = np.concatenate([COCO_SIGMAS, FOOT_SIGMAS, FACE_SIGMAS, HAND_SIGMAS, HAND_SIGMAS])

COCO_FLIP_PAIRS = tuple((i, i + 1) for i in range(1, 17, 2))
_FACE_FLIP = ([(i, 16 - i) for i in range(8)] + [(17 + i, 26 - i) for i in range(5)] + [(31, 35), (32, 34)]
              + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)] + [(48, 54), (49, 53), (50, 52)]
              + [(55, 59), (56, 58), (60, 64), (61, 63), (65, 67)])
WHOLEBODY_FLIP_PAIRS = (COCO_FLIP_PAIRS + ((17, 20), (18, 21), (19, 22))
                        + tuple((23 + a, 23 + b) for a, b in _FACE_FLIP)
                        + tuple((91 + i, 112 + i) for i in range(21)))

# Slices of the 133 WholeBody keypoints by part (loader order body | foot | face | lhand | rhand).
WHOLEBODY_PARTS = {"body": slice(0, 17), "foot": slice(17, 23), "face": slice(23, 91),
                   "lefthand": slice(91, 112), "righthand": slice(112, 133)}
# The COCO-WholeBody annotation field of each part, in the order the loader concatenates them
# (official ``lib/dataset/coco_wholebody.py``).
WHOLEBODY_FIELDS = (("keypoints", "body"), ("foot_kpts", "foot"), ("face_kpts", "face"),
                    ("lefthand_kpts", "lefthand"), ("righthand_kpts", "righthand"))


@dataclass(frozen=True)
class PartToken:
    """A WholeBody part token born at Human-2-Keypoint and expanded into dense tokens at the fine entry."""
    name: str
    group: int                 # fine group (0 head/face, 1 upper/hands, 2 lower/feet)
    dense: Tuple[int, int]     # [start, stop) into the 116 ``fine_keypoint_token``s
    keypoints: Tuple[int, int]  # [start, stop) into the 133 WholeBody keypoints


WHOLEBODY_PART_TOKENS = (
    PartToken("face", 0, (0, 68), (23, 91)),
    PartToken("left_hand", 1, (68, 89), (91, 112)),
    PartToken("right_hand", 1, (89, 110), (112, 133)),
    PartToken("left_foot", 2, (110, 113), (17, 20)),
    PartToken("right_foot", 2, (113, 116), (20, 23)),
)

# Fine-encoder groups. Every group carries 6 sparse body tokens; COCO's head group has only 5 keypoints, so the
# official code pads it with a masked copy of the nose token (index -1 here = the padding token).
GROUP_NAMES = ("head", "upper", "lower")
GROUP_SPARSE = ((-1, 0, 1, 2, 3, 4), (5, 6, 7, 8, 9, 10), (11, 12, 13, 14, 15, 16))
NUM_SPARSE_PER_GROUP = 6
WHOLEBODY_DENSE_PER_GROUP = (68, 42, 6)  # face | both hands | both feet
# Rows of the coarse-L5 attention that rank visual tokens for each group at the WholeBody fine entry:
# (part tokens, body keypoints) as indices into the 5 part tokens and the 17 body tokens.
WHOLEBODY_ENTRY_ROWS = (((0,), (0, 1, 2, 3, 4)), ((1, 2), (5, 6, 7, 8, 9, 10)), ((3, 4), (11, 12, 13, 14, 15, 16)))


def flip_permutation(num_keypoints: int) -> np.ndarray:
    """Index permutation that swaps left/right keypoints (for flip test and flip augmentation)."""
    pairs = {17: COCO_FLIP_PAIRS, 133: WHOLEBODY_FLIP_PAIRS}.get(num_keypoints)
    if pairs is None:
        raise ValueError(f"no flip pairs for {num_keypoints} keypoints (17 or 133)")
    perm = np.arange(num_keypoints)
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return perm


def sigmas(num_keypoints: int) -> np.ndarray:
    """OKS sigmas for 17 (COCO) or 133 (COCO-WholeBody) keypoints."""
    if num_keypoints == 17:
        return COCO_SIGMAS.copy()
    if num_keypoints == 133:
        return WHOLEBODY_SIGMAS.copy()
    raise ValueError(f"no OKS sigmas for {num_keypoints} keypoints (17 or 133)")


def names(num_keypoints: int) -> Tuple[str, ...]:
    if num_keypoints == 17:
        return COCO_NAMES
    if num_keypoints == 133:
        return WHOLEBODY_NAMES
    raise ValueError(f"no keypoint names for {num_keypoints} keypoints (17 or 133)")
