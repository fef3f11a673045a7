"""``kernels.testing``: the comparison every numerical test relies on must be able to fail."""
import pytest
import torch

from linear_moe.kernels.testing import assert_rel_close, rel_error


def test_rel_error_is_rms_difference_over_rms_reference():
    reference = torch.tensor([3.0, 4.0])
    actual = torch.tensor([3.0, 5.0])
    assert rel_error(reference, actual) == pytest.approx((0.5 ** 0.5) / (12.5 ** 0.5))
    assert rel_error(torch.zeros(3), torch.zeros(3)) == 0.0
    with pytest.raises(ValueError, match="shape mismatch"):
        rel_error(torch.zeros(2), torch.zeros(3))


def test_close_tensors_pass_and_far_ones_fail():
    reference = torch.randn(64, generator=torch.Generator().manual_seed(0))
    assert_rel_close("x", reference, reference * (1 + 1e-7), 1e-6)
    with pytest.raises(AssertionError, match="x: relative error .* exceeds 1.0e-06"):
        assert_rel_close("x", reference, reference * (1 + 1e-3), 1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("role", ["reference", "result"])
def test_non_finite_values_on_either_side_fail(bad, role):
    good = torch.ones(4)
    broken = torch.tensor([1.0, bad, 1.0, 1.0])
    reference, actual = (broken, good) if role == "reference" else (good, broken)
    with pytest.raises(AssertionError, match=f"non-finite values in the {role}"):
        assert_rel_close("t", reference, actual, 1.0)


def test_empty_comparison_fails_unless_allowed():
    with pytest.raises(AssertionError, match="empty tensors"):
        assert_rel_close("t", torch.zeros(0), torch.zeros(0), 1e-6)
    assert_rel_close("t", torch.zeros(2, 0), torch.zeros(2, 0), 1e-6, allow_empty=True)
    with pytest.raises(AssertionError, match="shape"):
        assert_rel_close("t", torch.zeros(2, 0), torch.zeros(3, 0), 1e-6, allow_empty=True)
