"""Top-down crop geometry (gtpt.transforms) against hand-computed values and OpenCV's pixel convention."""
import numpy as np
import pytest
import torch
from PIL import Image

from gtpt.transforms import (IMAGENET_MEAN, IMAGENET_STD, affine_points, box_to_center_scale, get_affine_transform,
                             load_image, to_model_input, warp_affine)

OUT = (192, 256)  # (W, H)


def test_box_to_center_scale_pads_to_aspect():
    # Tall box: width grows to 0.75 * h; then x1.25 and /200.
    c, s = box_to_center_scale([100, 50, 60, 120])
    np.testing.assert_allclose(c, [130.0, 110.0])
    np.testing.assert_allclose(s, [90 / 200 * 1.25, 120 / 200 * 1.25])
    # Wide box: height grows to w / 0.75.
    c, s = box_to_center_scale([0, 0, 150, 60])
    np.testing.assert_allclose(s, [150 / 200 * 1.25, 200 / 200 * 1.25])


@pytest.mark.parametrize("box", [[0, 0, 0, 10], [0, 0, 10, -1], [0, float("nan"), 10, 10]])
def test_box_to_center_scale_rejects_degenerate_boxes(box):
    with pytest.raises(ValueError, match="box"):
        box_to_center_scale(box)


@pytest.mark.parametrize("rot", [0.0, 30.0, -75.0])
def test_affine_maps_box_center_to_crop_center_and_inverts(rot):
    c, s = box_to_center_scale([100, 50, 60, 120])
    fwd = get_affine_transform(c, s, rot, OUT)
    inv = get_affine_transform(c, s, rot, OUT, inv=True)
    np.testing.assert_allclose(affine_points(c, fwd), [96.0, 128.0], atol=1e-9)
    pts = np.array([[10.0, 20.0], [300.0, 7.0], [130.0, 110.0]])
    np.testing.assert_allclose(affine_points(affine_points(pts, fwd), inv), pts, atol=1e-9)
    # The scaled box width spans the crop width: 200 * s[0] image px -> 192 crop px, whatever the rotation.
    assert np.isclose(np.linalg.det(fwd[:, :2]), (192 / (200 * s[0])) ** 2)


def test_warp_matches_integer_pixel_centres():
    # Bilinear sampling reproduces a linear ramp exactly, so each crop pixel must hold its source x coordinate
    # under OpenCV's convention (pixel centres at integers); a half-pixel slip shows as a 0.5 offset.
    w, h = 300, 200
    ramp = Image.fromarray(np.tile(np.arange(w, dtype=np.float32), (h, 1)), mode="F")
    c, s = box_to_center_scale([80, 40, 90, 110])
    fwd = get_affine_transform(c, s, 20.0, OUT)
    inv = get_affine_transform(c, s, 20.0, OUT, inv=True)
    crop = warp_affine(ramp, fwd, OUT)
    assert crop.shape == (256, 192)
    uv = np.stack(np.meshgrid(np.arange(192), np.arange(256)), -1)
    src = affine_points(uv, inv)
    inside = (src[..., 0] > 1) & (src[..., 0] < w - 2) & (src[..., 1] > 1) & (src[..., 1] < h - 2)
    assert inside.sum() > 10000
    np.testing.assert_allclose(crop[inside], src[..., 0][inside], atol=1e-3)
    # Outside the image: zeros, as cv2.warpAffine's constant border.
    assert (crop[(src[..., 0] < -2) | (src[..., 1] < -2)] == 0).all()


def test_warp_blends_the_image_edge_with_the_zero_border_as_opencv():
    # cv2.warpAffine (bilinear, constant 0 border) weighs the border's zeros in over the one pixel around the image:
    # on a constant image the crop is value * wx * wy, wx = 1 + x for x in [-1, 0], W - 1 - x + 1 for x in
    # [W - 1, W], 1 inside and 0 beyond (pixel centres at integers). Pillow alone copies the edge half a pixel out.
    w, h, value = 60, 50, 100.0
    flat = Image.fromarray(np.full((h, w), value, dtype=np.float32), mode="F")
    c, s = box_to_center_scale([-3, -4, w + 6, h + 8])  # the crop sees every edge, rotated so x and y both vary
    fwd = get_affine_transform(c, s, 17.0, OUT)
    inv = get_affine_transform(c, s, 17.0, OUT, inv=True)
    crop = warp_affine(flat, fwd, OUT)
    src = affine_points(np.stack(np.meshgrid(np.arange(192), np.arange(256)), -1), inv)

    def weight(t, n):
        return np.clip(np.minimum(1.0 + t, float(n) - t), 0.0, 1.0)
    expect = value * weight(src[..., 0], w) * weight(src[..., 1], h)
    band = (expect > 0) & (expect < value)
    assert band.sum() > 300  # the edge band is in the crop
    np.testing.assert_allclose(crop, expect, atol=1e-3)


def test_warp_rgb_uint8_and_normalise():
    img = np.zeros((40, 30, 3), dtype=np.uint8)
    img[..., 0] = 255
    crop = warp_affine(img, get_affine_transform([15, 20], [0.15, 0.2], 0.0, (30, 40)), (30, 40))
    assert crop.dtype == np.uint8 and crop.shape == (40, 30, 3)
    x = to_model_input(crop)
    assert x.shape == (3, 40, 30) and x.dtype == torch.float32
    red = (1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert torch.allclose(x[0, 20, 15], torch.tensor(red))
    assert torch.allclose(x[1, 20, 15], torch.tensor(-IMAGENET_MEAN[1] / IMAGENET_STD[1]))


def test_load_image_exif_orientation_and_16_bit(tmp_path):
    # EXIF orientation 6 (a phone held upright): stored 40 x 30, shown 30 x 40. Data loading keeps the stored
    # order (as the official cv2.IMREAD_IGNORE_ORIENTATION); inference asks for the upright image.
    stored = np.zeros((30, 40, 3), dtype=np.uint8)
    stored[:, :5] = 255  # a white band on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = tmp_path / "phone.png"
    Image.fromarray(stored).save(photo, exif=exif)
    assert load_image(photo).size == (40, 30)
    upright = load_image(photo, exif_orientation=True)
    assert upright.size == (30, 40)
    assert np.asarray(upright)[:5].mean() > 250 and np.asarray(upright)[5:].mean() < 5  # now the top edge
    # 16-bit grey: scaled to 8 bits, not clipped to white
    grey16 = np.tile(np.linspace(0, 65535, 50).astype(np.uint16), (20, 1))
    path16 = tmp_path / "grey16.png"
    Image.fromarray(grey16).save(path16)
    rgb = np.asarray(load_image(path16))
    assert rgb.shape == (20, 50, 3) and rgb.dtype == np.uint8
    np.testing.assert_allclose(rgb[..., 0], np.rint(grey16 / 257.0), atol=1)
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot decode"):
        load_image(bad)


def test_load_real_image(coco_tiny):
    im = load_image(f"{coco_tiny}/images/000000000785.jpg")
    assert im.mode == "RGB" and im.size == (640, 425)
