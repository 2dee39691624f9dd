"""Small models and an independent reference Hessian for the tests."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel


def cross_entropy_loss(module: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(module(x), y)


class SeedCNN(nn.Module):
    """The seed document's CNN: Conv2d(1, 32, 3, 1, 1) + Linear(32*h*w, 5)."""

    def __init__(self, h: int, w: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, 1, 1)
        self.f2 = nn.Linear(32 * h * w, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c1(x)
        x = x.view(x.size(0), -1)
        return self.f2(x)


def reference_hessian(model: nn.Module, loss_fn, batches, mode: str = "eval") -> torch.Tensor:
    """Float64 Hessian of the size-weighted mean loss by torch.autograd.functional.hessian.

    Independent of the library: a flat-parameter closure over a float64 copy of the model.
    """
    ref = copy.deepcopy(model).double()
    ref.train(mode == "train")
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False if mode == "train" else m.track_running_stats
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in ref.named_parameters() if p.requires_grad]
    flat0 = torch.cat([p.detach().reshape(-1) for n, p in ref.named_parameters() if p.requires_grad])
    batches = [_double(b) for b in batches]
    sizes = [_size(b) for b in batches]
    total = sum(sizes)

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            n = shape.numel()
            params[name] = flat[start : start + n].reshape(shape)
            start += n
        out = 0.0
        for b, size in zip(batches, sizes, strict=True):
            wrapper = _Wrapper(ref, loss_fn)
            out = out + size / total * functional_call(
                wrapper, {f"m.{k}": v for k, v in params.items()}, (b,)
            )
        return out

    with sdpa_kernel([SDPBackend.MATH]):
        try:
            return torch.autograd.functional.hessian(loss, flat0, vectorize=True)
        except RuntimeError:  # some layers have no vmap rule for their double backward
            return torch.autograd.functional.hessian(loss, flat0)


class _Wrapper(nn.Module):
    def __init__(self, m: nn.Module, loss_fn) -> None:
        super().__init__()
        self.m, self.loss_fn = m, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.m, batch)


def _double(batch):
    if isinstance(batch, torch.Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _double(v) for k, v in batch.items()}
    return type(batch)(_double(v) for v in batch)


def _size(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _size(next(iter(batch.values())))
    return _size(batch[0])
