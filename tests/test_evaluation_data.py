"""Where HessianCallback's batches come from (lightning_hessian.evaluation_data): taking the first
batches of a loader without a trace on the training run's random state, and checking `data=`.
"""

from __future__ import annotations

import torch

from lightning_hessian.evaluation_data import take_first
from tests.helpers import loader


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
