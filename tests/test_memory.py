"""Free memory and the memory autograd saves (lightning_hessian.memory)."""

from __future__ import annotations

import torch

from lightning_hessian.memory import available_memory, saved_tensor_bytes


def test_available_memory_is_a_positive_byte_count_or_unknown():
    free = available_memory("cpu")
    assert free is None or (isinstance(free, int) and free > 0)
    assert available_memory(torch.device("meta")) is None


def test_saved_tensor_bytes_counts_each_storage_once():
    x = torch.randn(10, 100, requires_grad=True)
    with saved_tensor_bytes() as counter:
        y = x * x  # saves x twice: one storage
    assert counter[0] == x.numel() * x.element_size()
    y.sum().backward()  # the saved tensors still unpack
    torch.testing.assert_close(x.grad, 2 * x.detach())
    with saved_tensor_bytes() as counter:
        torch.nn.functional.linear(x.detach(), torch.randn(50, 100, requires_grad=True))
    assert counter[0] >= 10 * 100 * 4  # at least the input, saved for the weight's gradient
