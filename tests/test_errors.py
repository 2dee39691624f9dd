"""The errors the library raises on purpose (lightning_hessian.errors)."""

from __future__ import annotations

import pytest
import torch

import lightning_hessian as lh
from lightning_hessian.errors import NonFiniteHessianError, RankFailedError
from tests.helpers import cross_entropy_loss, tiny


def test_a_nan_loss_is_a_non_finite_hessian_error_and_a_floating_point_error():
    model, data = tiny()
    x, y = data[0]
    x = x.clone()
    x[1, 2] = float("inf")
    op = lh.HessianOperator(model, cross_entropy_loss, [(x, y)], hvp="reverse-over-reverse")
    with pytest.raises(FloatingPointError, match="The loss is not finite") as info:
        op.loss()
    assert isinstance(info.value, NonFiniteHessianError) and lh.NonFiniteHessianError is NonFiniteHessianError
    with pytest.raises(NonFiniteHessianError, match="Check the loss for NaN/inf"):
        op @ torch.ones(op.shape[0])


def test_rank_failed_error_is_a_runtime_error():
    assert issubclass(RankFailedError, RuntimeError)
    assert not issubclass(RankFailedError, NonFiniteHessianError)
