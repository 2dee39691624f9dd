"""The cross-rank agreement primitives on one process (the multi-process tests use them on two)."""

from __future__ import annotations

import pytest
import torch

from lightning_hessian.distributed import (
    agree_on_failure,
    all_finite,
    all_reduce_or_raise,
    resolve_process_group,
)
from lightning_hessian.errors import NonFiniteHessianError


def test_without_a_process_group_the_agreement_is_local():
    ok = agree_on_failure(None, None, values=[3.0, 4.0])
    assert (ok.failed_ranks, ok.values, ok.message, ok.error) == (0, [3.0, 4.0], "", None)
    ok.raise_error()  # nothing to raise
    error = ValueError("boom")
    failed = agree_on_failure(error, None)
    assert failed.failed_ranks == 1 and failed.error is error and failed.message == "ValueError: boom"
    with pytest.raises(ValueError, match="boom"):
        failed.raise_error()


def test_all_reduce_or_raise_runs_locally_and_checks_finiteness():
    out = all_reduce_or_raise(lambda: torch.ones(3), None, shape=(3,), dtype=torch.float32, device="cpu")
    assert torch.equal(out, torch.ones(3))
    with pytest.raises(NonFiniteHessianError, match="The loss is not finite"):
        all_reduce_or_raise(
            lambda: torch.tensor([float("nan")]),
            None,
            shape=(1,),
            dtype=torch.float32,
            device="cpu",
            what="The loss",
        )

    def fails() -> torch.Tensor:
        raise KeyError("local")

    with pytest.raises(KeyError):  # one process: the error itself, unchanged
        all_reduce_or_raise(fails, None, shape=(1,), dtype=torch.float32, device="cpu")


def test_all_finite_sums_once_and_checks_entrywise_only_where_the_sum_is_not_finite():
    big = torch.finfo(torch.float32).max
    assert all_finite(torch.tensor([1.0, -2.0])) and all_finite(torch.zeros(0))
    assert all_finite(torch.tensor([big, big]))  # the sum overflows, every entry is finite
    assert all_finite(torch.tensor([60000.0, 60000.0], dtype=torch.float16))
    assert all_finite(torch.tensor([1, 2]))
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not all_finite(torch.tensor([1.0, bad])), bad
    assert not all_finite(torch.tensor([float("inf"), -float("inf")]))  # a NaN sum


def test_process_group_auto_is_none_without_torch_distributed():
    assert resolve_process_group("auto") is None
    assert resolve_process_group(None) is None
    sentinel = object()
    assert resolve_process_group(sentinel) is sentinel
