"""The closeness helper itself: the tolerance every kernel test relies on must reject what it should."""
import pytest
import torch

from gtpt_kernels.testing import RTOL, assert_close, poison_, rel_error


def test_assert_close_rejects_nan_inf_and_out_of_tolerance():
    e = torch.ones(4)
    for bad in (torch.tensor([1.0, float("nan"), 1.0, 1.0]), torch.tensor([1.0, float("inf"), 1.0, 1.0]),
                e * (1 + 10 * RTOL[torch.float32])):
        with pytest.raises(AssertionError):
            assert_close(bad, e)
    with pytest.raises(AssertionError, match="NaN"):  # NaN never passes, not even against NaN
        assert_close(torch.full((4,), float("nan")), torch.full((4,), float("nan")))
    assert_close(e * (1 + 0.5 * RTOL[torch.float32]), e)
    with pytest.raises(AssertionError):
        assert_close((e * (1 + 2 * RTOL[torch.float16])).half(), e.half())
    assert_close((e * (1 + 2 * RTOL[torch.float16])).half(), e.half(), dtype=torch.bfloat16)  # looser by dtype
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.ones(3), torch.ones(4))


def test_tolerances_tighten_with_precision():
    assert RTOL[torch.float64] < RTOL[torch.float32] < RTOL[torch.float16] < RTOL[torch.bfloat16] <= 5e-2


def test_rel_error_and_poison():
    assert rel_error(torch.tensor([1.0, 2.5]), torch.tensor([1.0, 2.0])) == pytest.approx(0.25)
    assert rel_error(torch.zeros(2), torch.zeros(2)) == 0.0
    t = poison_(torch.zeros(5))
    assert torch.isnan(t).all()
