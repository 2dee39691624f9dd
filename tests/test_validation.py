"""One rule per kind of argument: TypeError for a wrong type, ValueError for a wrong value."""

from __future__ import annotations

import pytest
import torch

from lightning_hessian.validation import (
    check_bool,
    check_callable,
    check_choice,
    check_dtype,
    check_int,
    check_optional_int,
    check_patterns,
    check_positive_float,
)


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda: check_bool("trace", 1), TypeError, "`trace` must be True or False, got 1"),
        (lambda: check_int("top_k", 2.0), TypeError, "`top_k` must be an integer, got 2.0"),
        (lambda: check_int("top_k", True), TypeError, "`top_k` must be an integer"),
        (
            lambda: check_int("top_k", -1, 0, "Pass 0."),
            ValueError,
            "`top_k` must be >= 0, got -1. Pass 0.",
        ),
        (lambda: check_optional_int("n", "3", 1), TypeError, "`n` must be an integer"),
        (lambda: check_positive_float("tol", "1e-4"), TypeError, "`tol` must be a number"),
        (lambda: check_positive_float("tol", 0.0), ValueError, "`tol` must be a positive finite number"),
        (lambda: check_positive_float("tol", float("nan")), ValueError, "positive finite"),
        (lambda: check_choice("mode", "training", ("eval", "train")), ValueError, "`mode='training'` is not"),
        (lambda: check_choice("mode", torch.zeros(1), ("eval",)), ValueError, "`mode=tensor"),
        (
            lambda: check_callable("loss_fn", "mse", "loss_fn(module, batch)"),
            TypeError,
            "callable as loss_fn",
        ),
        (lambda: check_patterns("params", 3), TypeError, "`params` must be a glob pattern"),
        (lambda: check_patterns("params", ["a", 1]), TypeError, "`params` must be a glob pattern"),
        (lambda: check_patterns("params", []), ValueError, "`params` is an empty list"),
        (lambda: check_patterns("params", {"a": "b"}), TypeError, "`params`"),
        (lambda: check_dtype("dtype", torch.int64), TypeError, "`dtype` must be None"),
        (lambda: check_dtype("dtype", "int32"), TypeError, "`dtype` must be None"),
        (lambda: check_dtype("dtype", "float1024"), TypeError, "`dtype` must be None"),
    ],
)
def test_each_rule_raises_its_error_naming_the_argument(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)


def test_valid_values_are_returned_normalized():
    assert check_bool("x", False) is False
    assert check_int("x", 3, 0) == 3 and check_optional_int("x", None, 1) is None
    assert check_positive_float("tol", 1) == 1.0
    assert check_choice("mode", "eval", ("eval", "train")) == "eval"
    assert check_choice("flag", True, (True, False, "auto")) is True
    with pytest.raises(ValueError):  # 1 == True, but a number is not the flag True
        check_choice("flag", 1, (True, False, "auto"))
    assert check_patterns("params", "conv.*") == ("conv.*",) and check_patterns("params", None) is None
    assert check_patterns("params", ("a", "b")) == ("a", "b")
    assert check_dtype("dtype", "torch.float64") is torch.float64 and check_dtype("dtype", None) is None
    assert check_callable("f", len, "f(x)") is len


def test_every_entry_point_raises_the_same_error_for_the_same_mistake():
    import torch.nn as nn
    import torch.nn.functional as F

    import lightning_hessian as lh

    model = nn.Linear(3, 2)
    data = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    for call in (
        lambda: lh.analyze(model, loss_fn, data, top_k="3"),
        lambda: lh.HessianCallback(top_k="3"),
        lambda: lh.eigenvalues(lh.MatrixOperator(torch.eye(3)), k="3"),
    ):
        with pytest.raises(TypeError, match="must be an integer"):
            call()
    for call in (
        lambda: lh.analyze(model, loss_fn, data, mode="training"),
        lambda: lh.HessianCallback(mode="training"),
        lambda: lh.HessianOperator(model, loss_fn, data, mode="training"),
        lambda: lh.hessian(model, loss_fn, data, mode="training"),
    ):
        with pytest.raises(ValueError, match="`mode='training'` is not supported. Use 'eval'"):
            call()
    for call in (
        lambda: lh.analyze(model, loss_fn, data, params=3),
        lambda: lh.HessianCallback(params=3),
        lambda: lh.select_parameters(model, 3),
    ):
        with pytest.raises(TypeError, match="`params` must be a glob pattern"):
            call()
