"""The batches HessianCallback evaluates on (lightning_hessian.batch_cache): copies, fingerprints, and
taking the first batches of a loader without a trace on the training run's random state.
"""

from __future__ import annotations

import torch

from lightning_hessian.batch_cache import detached_copy, fingerprint, take_first
from tests.helpers import loader


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


def test_take_first_leaves_the_global_random_state_and_the_batch_order_alone():
    data = loader(n=32, batch_size=8, shuffle=True)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = take_first(data, 2)
    assert len(first) == 2 and torch.equal(torch.get_rng_state(), state)
    following = [x for x, _ in data]  # what the training run would see next
    torch.manual_seed(0)
    expected = [x for x, _ in data]
    assert all(torch.equal(a, b) for a, b in zip(following, expected, strict=True))
    assert torch.equal(first[0][0], expected[0])  # the batches the run's own epoch starts with
    assert len(take_first(data, None)) == 4
