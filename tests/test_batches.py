"""The nested-batch walker: every container a batch may be made of, in one place."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, namedtuple

import pytest
import torch

from lightning_hessian.batches import (
    batch_signature,
    detached_copy,
    fingerprint,
    infer_batch_size,
    iter_tensors,
    map_tensors,
    prepare_batch,
)

Pair = namedtuple("Pair", ["inputs", "labels"])


@dataclasses.dataclass
class Batch:
    inputs: torch.Tensor
    labels: torch.Tensor
    name: str = "batch"


@dataclasses.dataclass(frozen=True)
class FrozenBatch:
    inputs: torch.Tensor
    extra: dict


def nested():
    return {
        "pair": Pair(torch.ones(2, 3), torch.zeros(2, dtype=torch.long)),
        "list": [torch.ones(2), ("text", torch.ones(2, 1))],
        "data": Batch(torch.ones(2, 4), torch.zeros(2, dtype=torch.long)),
        "frozen": FrozenBatch(torch.ones(2), {"w": torch.ones(2)}),
        "ordered": OrderedDict(a=torch.ones(2)),
    }


def test_map_tensors_keeps_every_container_type_and_non_tensor_leaf():
    out = map_tensors(nested(), lambda t: t + 1)
    assert isinstance(out["pair"], Pair) and float(out["pair"].inputs[0, 0]) == 2.0
    assert isinstance(out["list"], list) and isinstance(out["list"][1], tuple) and out["list"][1][0] == "text"
    assert (
        isinstance(out["data"], Batch)
        and out["data"].name == "batch"
        and float(out["data"].inputs[0, 0]) == 2
    )
    assert isinstance(out["frozen"], FrozenBatch) and float(out["frozen"].extra["w"][0]) == 2.0
    assert isinstance(out["ordered"], OrderedDict)


def test_iter_tensors_visits_every_tensor_in_order():
    shapes = [tuple(t.shape) for t in iter_tensors(nested())]
    assert shapes == [(2, 3), (2,), (2,), (2, 1), (2, 4), (2,), (2,), (2,), (2,)]


def test_prepare_batch_converts_a_dataclass_batch_to_dtype():
    batch = Batch(torch.ones(2, 4), torch.zeros(2, dtype=torch.long))
    out = prepare_batch(batch, torch.float64)
    assert isinstance(out, Batch)
    assert out.inputs.dtype == torch.float64 and out.labels.dtype == torch.long
    nested_out = prepare_batch(nested(), torch.float64)
    assert nested_out["data"].inputs.dtype == torch.float64
    assert nested_out["frozen"].extra["w"].dtype == torch.float64
    assert nested_out["pair"].inputs.dtype == torch.float64


def test_prepare_batch_copies_inference_tensors():
    with torch.inference_mode():
        batch = Batch(torch.ones(2, 4), torch.zeros(2, dtype=torch.long))
    out = prepare_batch(batch)
    assert not out.inputs.is_inference() and not out.labels.is_inference()


def test_infer_batch_size_finds_the_first_tensor_in_any_container():
    assert infer_batch_size(Batch(torch.ones(5, 4), torch.zeros(5))) == 5
    assert infer_batch_size({"x": [("id", torch.ones(7, 2))]}) == 7
    with pytest.raises(ValueError, match="batch_size_fn"):
        infer_batch_size(("no", "tensor"))
    with pytest.raises(ValueError, match="batch_size_fn"):
        infer_batch_size(torch.tensor(3.0))


def test_detached_copy_fingerprint_and_signature():
    x = torch.ones(2, requires_grad=True)
    copy = detached_copy(Batch(x, torch.zeros(2)))
    assert not copy.inputs.requires_grad and copy.inputs.data_ptr() != x.data_ptr()
    assert fingerprint([nested()]) == fingerprint([nested()])
    changed = nested()
    changed["data"].inputs[0, 0] = 5.0
    assert fingerprint([changed]) != fingerprint([nested()])
    assert batch_signature((torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))) == (
        ((2, 3), "torch.float32"),
        ((2,), "torch.int64"),
    )


def test_a_dataclass_batch_is_converted_by_the_operators_dtype():
    import torch.nn as nn
    import torch.nn.functional as F

    import lightning_hessian as lh

    torch.manual_seed(0)
    model = nn.Linear(4, 3)  # float32 parameters, float32 inputs: float64 products need both cast
    batch = Batch(torch.randn(6, 4), torch.randint(0, 3, (6,)))

    def loss_fn(module, b):
        return F.cross_entropy(module(b.inputs), b.labels)

    dense = lh.hessian(model, loss_fn, [batch], dtype=torch.float64)
    assert dense.dtype == torch.float64
    reference = lh.hessian(model.double(), loss_fn, [Batch(batch.inputs.double(), batch.labels)])
    torch.testing.assert_close(dense, reference, rtol=0, atol=1e-12)


def test_detached_copy_copies_every_tensor_and_keeps_the_structure():
    x = torch.ones(2, 3, requires_grad=True)
    batch = {"inputs": (x * 2, "tag"), "target": torch.arange(2)}
    copy = detached_copy(batch)
    assert set(copy) == {"inputs", "target"} and isinstance(copy["inputs"], tuple)
    assert copy["inputs"][1] == "tag"
    assert not copy["inputs"][0].requires_grad
    torch.testing.assert_close(copy["inputs"][0], torch.full((2, 3), 2.0))
    copy["target"][0] = 7  # a copy: the original is untouched
    assert batch["target"].tolist() == [0, 1]


def test_fingerprint_tells_equal_batches_from_different_ones():
    batches = [(torch.zeros(4), torch.arange(4)), (torch.ones(4), torch.arange(4))]
    same = [(torch.zeros(4), torch.arange(4)), (torch.ones(4), torch.arange(4))]
    assert fingerprint(batches) == fingerprint(same)
    different = {
        "order": batches[::-1],
        "value": [(torch.zeros(4), torch.arange(4)), (torch.full((4,), 2.0), torch.arange(4))],
        "dtype": [(torch.zeros(4, dtype=torch.float64), torch.arange(4)), batches[1]],
        "shape": [(torch.zeros(2, 2), torch.arange(4)), batches[1]],
        "count": batches[:1],
    }
    prints = {name: fingerprint(other) for name, other in different.items()}
    assert fingerprint(batches) not in prints.values()
    assert len(set(prints.values())) == len(prints)
