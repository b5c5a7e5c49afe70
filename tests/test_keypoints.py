"""Keypoint metadata: sizes, flip pairs, sigmas and the WholeBody part layout agree with each other."""
import numpy as np
import pytest

from gtpt import keypoints as kp


@pytest.mark.parametrize("k", [17, 133])
def test_names_sigmas_flip(k):
    names = kp.names(k)
    assert len(names) == k == len(set(names)) == len(kp.sigmas(k))
    perm = kp.flip_permutation(k)
    assert np.array_equal(perm[perm], np.arange(k))  # an involution
    for i, j in enumerate(perm):  # left <-> right by name, for every named side
        a, b = names[i], names[j]
        if a.startswith("left_"):
            assert b == "right_" + a[len("left_"):]
    assert (kp.sigmas(k) > 0).all()


def test_coco_sigmas_are_the_cocoeval_constants():
    # pycocotools' COCOeval kpt_oks_sigmas (nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles)
    want = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89]) / 10.0
    np.testing.assert_allclose(kp.sigmas(17), want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(kp.sigmas(133)[:17], want, rtol=0, atol=1e-12)  # WholeBody's body part: the same


def test_wholebody_layout():
    assert len(kp.WHOLEBODY_FLIP_PAIRS) == 8 + 3 + 29 + 21
    parts = kp.WHOLEBODY_PARTS
    assert [parts[p].stop - parts[p].start for p in ("body", "foot", "face", "lefthand", "righthand")] == [17, 6, 68, 21, 21]
    dense = sorted(t.dense for t in kp.WHOLEBODY_PART_TOKENS)
    assert dense[0][0] == 0 and dense[-1][1] == 116
    assert all(a[1] == b[0] for a, b in zip(dense, dense[1:]))  # the 116 fine tokens are tiled exactly once
    for t in kp.WHOLEBODY_PART_TOKENS:
        assert t.dense[1] - t.dense[0] == t.keypoints[1] - t.keypoints[0]
    per_group = [sum(t.dense[1] - t.dense[0] for t in kp.WHOLEBODY_PART_TOKENS if t.group == g) for g in range(3)]
    assert tuple(per_group) == kp.WHOLEBODY_DENSE_PER_GROUP
    assert sorted(i for g in kp.GROUP_SPARSE for i in g) == [-1] + list(range(17))


def test_unknown_keypoint_count():
    for f in (kp.names, kp.sigmas, kp.flip_permutation):
        with pytest.raises(ValueError, match="17 or 133"):
            f(21)
