"""Shared pieces of the tests: small models, data, an independent reference Hessian, a hand-built
report, and the LightningModule, loaders and trainers of the HessianCallback tests.

Holds no tests itself. Every test runs torch on one thread (see conftest.py): the models are tiny,
and on a shared 2-core machine intra-op threads only contend.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian.results import BlockReport, EigenResult, HessianReport, SpectralDensity, TraceResult

if TYPE_CHECKING:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def cross_entropy_loss(module: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(module(x), y)


# --------------------------------------------------------------------------- the seed's examples


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


class Quadratic(nn.Module):
    """The seed's quadratic ``b^T x + x^T A x / 2`` in three parameters (Hessian ``A``)."""

    def __init__(self) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor([0.0, 0.0, 0.0]))


SEED_A = torch.tensor([[-5, -3, -0.5], [-3, -2, 0], [-0.5, 0, -0.5]])
SEED_B = torch.tensor([1.0, 3, 5])


def quadratic_loss(module: Quadratic, batch) -> torch.Tensor:
    x = module.x
    return SEED_B @ x + 0.5 * x @ SEED_A @ x


# --------------------------------------------------------------------------- the zoo


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h.mean(1))


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class DictModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 1)

    def forward(self, features):
        return self.b(torch.tanh(self.a(features))).squeeze(-1)


def dict_loss(module, batch):
    return (module(batch["features"]) - batch["target"]).pow(2).mean()


ZOO = ["mlp", "conv_bn_eval", "conv_bn_train", "attention", "recurrent", "dict_batch"]


def zoo(name: str):
    """``(model, loss_fn, data, mode)`` of one of the :data:`ZOO` problems (fixed seeds)."""
    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        data = [(torch.randn(10, 4, generator=g), torch.randint(0, 3, (10,), generator=g))]
        return model, cross_entropy_loss, data, "eval"
    if name in ("conv_bn_eval", "conv_bn_train"):
        model = ConvBN()
        with torch.no_grad():  # non-trivial running statistics
            model.bn.running_mean.uniform_(-0.5, 0.5)
            model.bn.running_var.uniform_(0.5, 1.5)
        data = [(torch.randn(6, 2, 4, 4, generator=g), torch.randint(0, 3, (6,), generator=g))]
        return model, cross_entropy_loss, data, name.removeprefix("conv_bn_")
    if name == "attention":
        data = [(torch.randn(4, 5, 3, generator=g), torch.randint(0, 3, (4,), generator=g))]
        return Attention(), cross_entropy_loss, data, "eval"
    if name == "recurrent":
        data = [(torch.randn(4, 6, 3, generator=g), torch.randint(0, 3, (4,), generator=g))]
        return Recurrent(), cross_entropy_loss, data, "eval"
    if name == "dict_batch":
        data = [{"features": torch.randn(7, 4, generator=g), "target": torch.randn(7, generator=g)}]
        return DictModel(), dict_loss, data, "eval"
    raise KeyError(name)


def tiny():
    """A Linear(3, 2) classifier and one batch of four samples."""
    model = nn.Sequential(nn.Linear(3, 2))
    return model, [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]


# --------------------------------------------------------------------------- a hand-built report


def sample_report() -> HessianReport:
    """Block ``a``: exact (4 eigenvalues); block ``b``: iterative, top-1 and an SLQ density only."""
    spectrum = torch.tensor([-0.5, 0.0, 0.25, 2.0], dtype=torch.float64)
    exact = BlockReport(
        name="a",
        size=4,
        method="dense",
        eigenvalues=EigenResult(
            spectrum.flip(0)[:2], None, torch.ones(2, dtype=torch.bool), torch.zeros(2), 0
        ),
        min_eigenvalue=EigenResult(spectrum[:1], None, torch.ones(1, dtype=torch.bool), torch.zeros(1), 0),
        trace=TraceResult(1.75, 0.0, 4, "exact"),
        spectrum=spectrum,
    )
    nodes = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    slq = BlockReport(
        name="b",
        size=100,
        method="iterative",
        eigenvalues=EigenResult(
            torch.tensor([3.0]), None, torch.ones(1, dtype=torch.bool), torch.zeros(1), 9
        ),
        density=SpectralDensity(nodes, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), 8, 2),
    )
    return HessianReport(blocks={"a": exact, "b": slq}, loss=0.7, num_samples=8, num_matvecs=13, seconds=0.5)


# --------------------------------------------------------------------------- HessianCallback runs

FAST = {"hvp": "reverse-over-reverse"}  # skips the auto method choice: same numbers, less time


class TinyModule(L.LightningModule):
    """Linear(4, 6) -> BatchNorm -> ReLU -> Dropout -> Linear(6, 3): 63 parameters (12 of BatchNorm)."""

    def __init__(
        self, dropout: float = 0.25, lr: float = 0.1, momentum: float = 0.9, manual: bool = False
    ) -> None:
        super().__init__()
        self.automatic_optimization = not manual
        self.lr, self.momentum = lr, momentum
        self.net = nn.Sequential(
            nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(dropout), nn.Linear(6, 3)
        )
        self.seen: list[float] = []  # fingerprint of every training batch, in order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            return None
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.seen.append(float(batch[0].sum()))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def dataset(n: int = 48, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


def loader(n: int = 48, batch_size: int = 8, shuffle: bool = True, seed: int = 0) -> DataLoader:
    """A shuffled loader drawing its order from torch's global RNG (the case RNG leaks would break)."""
    return DataLoader(dataset(n, seed), batch_size=batch_size, shuffle=shuffle)


def trainer(root: Path, callbacks: list[Callback] | None = None, **kwargs: Any) -> L.Trainer:
    settings: dict[str, Any] = {
        "max_epochs": 2,
        "default_root_dir": root,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "log_every_n_steps": 1,
        "num_sanity_val_steps": 0,
        "accelerator": "cpu",
        "devices": 1,
    }
    settings.update(kwargs)
    return L.Trainer(callbacks=callbacks or [], **settings)


class Snapshot(Callback):
    """Placed after a HessianCallback: copies the module whenever that callback has just evaluated."""

    def __init__(self, hessian: Callback) -> None:
        self.hessian = hessian
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.seen = 0

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if len(self.hessian.history) > self.seen:
            self.seen = len(self.hessian.history)
            self.states[trainer.global_step] = copy.deepcopy(pl_module.state_dict())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.check(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.check(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.check(trainer, pl_module)


def events(log_dir: str | Path) -> EventAccumulator:
    """All events of a run folder (size_guidance 0: keep everything)."""
    from tensorboard.backend.event_processing import event_accumulator

    guidance = {
        event_accumulator.SCALARS: 0,
        event_accumulator.HISTOGRAMS: 0,
        event_accumulator.IMAGES: 0,
        event_accumulator.TENSORS: 0,
        event_accumulator.COMPRESSED_HISTOGRAMS: 0,
    }
    accumulator = event_accumulator.EventAccumulator(str(log_dir), size_guidance=guidance)
    accumulator.Reload()
    return accumulator


def scalar_series(accumulator: EventAccumulator, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in accumulator.Scalars(tag)}


# --------------------------------------------------------------------------- reference Hessian


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
