"""Top-down crop geometry shared by the data pipeline, evaluation and inference.

Conventions follow the official GTPT code (inherited from HRNet / TokenPose, ``lib/utils/transforms.py`` and
``lib/dataset/coco.py``; ``shared/reference/gtpt-reference.md`` §7): a person box becomes a ``center`` and a
``scale`` in units of ``pixel_std = 200`` pixels, padded by 1.25 to the 192:256 aspect; the crop is the affine
map that sends the center to the middle of the 192 x 256 input and the scaled box onto it, after a rotation of
``rot`` degrees. Pixel centres sit at integer coordinates (OpenCV's convention); :func:`warp_affine` reproduces
``cv2.warpAffine(..., INTER_LINEAR)`` with Pillow, so OpenCV is not a dependency.
"""
from __future__ import annotations

import os
from typing import Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

PIXEL_STD = 200.0
BOX_PADDING = 1.25
# ImageNet statistics, applied to RGB in [0, 1] (the official ``transforms.Normalize``).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def box_to_center_scale(box: Sequence[float], aspect_ratio: float = 0.75, padding: float = BOX_PADDING
                        ) -> Tuple[np.ndarray, np.ndarray]:
    """``(x, y, w, h)`` box -> ``(center (2,), scale (2,))``: the box grown to ``aspect_ratio`` (= W / H of the
    model input) and multiplied by ``padding``, in units of ``PIXEL_STD`` pixels."""
    x, y, w, h = (float(v) for v in box[:4])
    if not (w > 0 and h > 0) or not np.isfinite([x, y, w, h]).all():
        raise ValueError(f"box must be a finite (x, y, w, h) with w, h > 0, got {tuple(box[:4])}")
    center = np.array([x + 0.5 * w, y + 0.5 * h], dtype=np.float64)
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    scale = np.array([w / PIXEL_STD, h / PIXEL_STD], dtype=np.float64) * padding
    return center, scale


def _rotate(point: np.ndarray, rot_rad: float) -> np.ndarray:
    sn, cs = np.sin(rot_rad), np.cos(rot_rad)
    return np.array([point[0] * cs - point[1] * sn, point[0] * sn + point[1] * cs])


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = a - b
    return b + np.array([-d[1], d[0]])


def get_affine_transform(center: Sequence[float], scale: Sequence[float], rot: float,
                         output_size: Sequence[int], inv: bool = False) -> np.ndarray:
    """The 2 x 3 matrix mapping image coordinates into the ``output_size = (W, H)`` crop (``inv``: back).

    Built from three point pairs like the official function (center, a point above it, and a third point at a
    right angle), so rotations and the width-only scale behave identically."""
    center = np.asarray(center, dtype=np.float64)
    src_w = float(np.asarray(scale, dtype=np.float64)[0]) * PIXEL_STD
    dst_w, dst_h = float(output_size[0]), float(output_size[1])
    rot_rad = np.pi * float(rot) / 180.0
    src = np.zeros((3, 2))
    dst = np.zeros((3, 2))
    src[0] = center
    src[1] = center + _rotate(np.array([0.0, -0.5 * src_w]), rot_rad)
    dst[0] = [0.5 * dst_w, 0.5 * dst_h]
    dst[1] = dst[0] + np.array([0.0, -0.5 * dst_w])
    src[2] = _third_point(src[0], src[1])
    dst[2] = _third_point(dst[0], dst[1])
    a, b = (dst, src) if inv else (src, dst)
    # Solve [x y 1] @ M.T = [u v] for the three pairs.
    return np.linalg.solve(np.hstack([a, np.ones((3, 1))]), b).T


def affine_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2 x 3 affine matrix to ``(..., 2)`` points."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def load_image(path: Union[str, os.PathLike], exif_orientation: bool = False) -> Image.Image:
    """An RGB image from disk, with a clear error for a missing or unreadable file.

    ``exif_orientation=False`` keeps the stored pixel order, as the official pipeline reads COCO
    (``cv2.IMREAD_IGNORE_ORIENTATION``; the annotations refer to it); ``True`` turns the image upright as a viewer
    shows it (photos from phones), which is what boxes read off a viewer refer to. 16-bit grey images are scaled
    to 8 bits (a plain RGB conversion would clip them to white)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            if exif_orientation:
                im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I;16") or im.mode == "I":
                grey = np.asarray(im, dtype=np.float64)
                if im.mode.startswith("I;16") or grey.max(initial=0) > 255:
                    grey = grey / 257.0  # 0..65535 -> 0..255
                return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8)).convert("RGB")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot decode image {path}: {e}") from e


def warp_affine(image: Union[Image.Image, np.ndarray], matrix: np.ndarray, output_size: Sequence[int]
                ) -> np.ndarray:
    """Crop ``image`` with the forward matrix of :func:`get_affine_transform`: an ``(H, W, 3)`` uint8 array,
    bilinear, zeros outside the image (what ``cv2.warpAffine`` gives with its defaults).

    Pillow samples with pixel centres at half-integers, OpenCV at integers; the half-pixel shifts on both sides
    make the two agree (checked on a linear ramp, which bilinear interpolation reproduces exactly). At the image
    edge OpenCV blends the edge pixels with the zero border over one pixel, while Pillow copies the edge pixel up
    to half a pixel out and gives zero beyond; a one-pixel zero frame around the image makes Pillow blend as
    OpenCV does."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = ImageOps.expand(image, border=1, fill=0)
    inv = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
    # In Pillow's half-pixel coordinates of the framed image: p_in = inv @ (p_out - 0.5) + 0.5 + 1.
    a, b, c = inv[0]
    d, e, f = inv[1]
    coeffs = (a, b, c - 0.5 * (a + b) + 1.5, d, e, f - 0.5 * (d + e) + 1.5)
    out = image.transform((int(output_size[0]), int(output_size[1])), Image.AFFINE, coeffs,
                          resample=Image.BILINEAR, fillcolor=0)
    return np.array(out)  # a writable copy (asarray of a PIL image is read-only)


def to_model_input(crop: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB crop -> normalised ``(3, H, W)`` float32 tensor."""
    t = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (t - mean) / std
