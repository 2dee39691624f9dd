"""Shared model/data builders and a subprocess runner for the benchmarks.

Names here are a contract for every script in ``benchmarks/``: ``SeedCNN``, ``seed_cnn_problem()``,
``MidCNN``, ``mid_cnn_problem()``, ``tanh_mlp_problem()``, ``trained_tanh_mlp_problem()`` (each problem
returns ``(model, loss_fn, batches)``), and ``run_isolated()`` / ``Measurement``. The peer libraries and
their product counters are in ``benchmarks/peers.py``.

Every builder fixes its seeds, so two processes building the same problem get identical weights and
batches (the dense benchmark relies on this to compare Hessians computed in separate processes).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import resource
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GB = 1e9  # decimal gigabytes, as the issue quotes them (23,365² float32 = 2.18 GB)

# ----------------------------------------------------------------------------------------- models


class SeedCNN(nn.Module):
    """The seed document's CNN: Conv2d(1, 32, 3, 1, 1) then Linear(32*h*w, 5); 23,365 params at 12x12."""

    def __init__(self, h: int = 12, w: int = 12) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, 1, 1)
        self.f2 = nn.Linear(32 * h * w, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.c1(x)
        x = x.view(x.size(0), -1)
        return self.f2(x)


class MidCNN(nn.Module):
    """Five conv(3x3, no bias)-BatchNorm-ReLU blocks of 32/32/64/64/128 channels, global average pool,
    Linear to 10 classes: 141,034 parameters. Blocks 2 and 4 have stride 2 (32 -> 16 -> 8 pixels).
    """

    CHANNELS = (32, 32, 64, 64, 128)
    STRIDES = (1, 2, 1, 2, 1)

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out, stride in zip(self.CHANNELS, self.STRIDES, strict=True):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        return self.fc(x.mean(dim=(2, 3)))


def cross_entropy_loss(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """``loss_fn(module, batch)`` for ``(inputs, labels)`` batches."""
    x, y = batch
    return F.cross_entropy(module(x), y)


def seed_cnn_problem(h: int = 12, w: int = 12, batch_size: int = 8, seed: int = 0):
    """The seed's problem: SeedCNN, one batch of ``batch_size`` random 1xhxw images, 5 classes.

    Returns:
        ``(model, loss_fn, batches)`` with ``batches = [(x, y)]``.
    """
    torch.manual_seed(seed)
    model = SeedCNN(h, w)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch_size, 1, h, w, generator=generator)
    y = torch.randint(0, 5, (batch_size,), generator=generator)
    return model, cross_entropy_loss, [(x, y)]


def mid_cnn_problem(batch_size: int = 64, seed: int = 0, warm_up_statistics: bool = True):
    """MidCNN with one batch of ``batch_size`` random 3x32x32 images, 10 classes.

    Args:
        batch_size: Images in the batch.
        seed: Seed for the weights and the data.
        warm_up_statistics: Run a few train-mode forward passes (no gradient) so BatchNorm's
            running statistics are those of the data rather than the (0, 1) defaults; the model is
            returned in eval mode either way.

    Returns:
        ``(model, loss_fn, batches)`` with ``batches = [(x, y)]``.
    """
    torch.manual_seed(seed)
    model = MidCNN()
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch_size, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (batch_size,), generator=generator)
    if warm_up_statistics:
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(x)
    model.eval()
    return model, cross_entropy_loss, [(x, y)]


def tanh_mlp_problem(num_points: int = 512, num_batches: int = 1, seed: int = 0):
    """A tanh MLP 20-40-40-5 (2,685 parameters) on ``num_points`` random points, 5 classes.

    Returns:
        ``(model, loss_fn, batches)``: the points split into ``num_batches`` batches of ``(x, y)``.
    """
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 5))
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(num_points, 20, generator=generator)
    y = torch.randint(0, 5, (num_points,), generator=generator)
    batches = list(zip(x.chunk(num_batches), y.chunk(num_batches), strict=True))
    return model, cross_entropy_loss, batches


def trained_tanh_mlp_problem(steps: int = 200, lr: float = 0.5):
    """The tanh MLP of :func:`tanh_mlp_problem` after ``steps`` full-batch SGD steps at ``lr``
    (deterministic), in eval mode.

    Returns:
        ``(model, loss_fn, batches)`` with ``batches = [(x, y)]``.
    """
    model, loss_fn, batches = tanh_mlp_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model, batches[0]).backward()
        optimizer.step()
    model.eval()
    return model, loss_fn, batches


def num_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------- measuring


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``VmHWM``, else ``ru_maxrss``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if platform.system() == "Darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def current_rss_bytes() -> int:
    """Current resident set size of this process (``VmRSS``), or 0 where it cannot be told."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's ``VmHWM`` to the current RSS (Linux >= 4.0); True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Measurement:
    """What one isolated run measured.

    Attributes:
        seconds: Wall time of the measured call (after set-up).
        peak_bytes: Peak RSS of the whole child process (interpreter, torch, set-up included).
        baseline_bytes: RSS just before the measured call started.
        result: Whatever ``post`` returned (small, picklable), or the call's return value if no
            ``post`` was given.
        error: Traceback text if the call failed, else None.
    """

    seconds: float = float("nan")
    peak_bytes: int = 0
    baseline_bytes: int = 0
    result: Any = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def peak_increment_bytes(self) -> int:
        """Peak RSS above the RSS at the start of the measured call."""
        return max(0, self.peak_bytes - self.baseline_bytes)


def _child(
    queue: Any,
    setup: Callable[..., Any] | None,
    fn: Callable[..., Any],
    post: Callable[..., Any] | None,
    args: Sequence[Any],
    threads: int | None,
) -> None:
    out = Measurement()
    try:
        if threads:
            torch.set_num_threads(threads)
        state = setup(*args) if setup is not None else args
        state = state if isinstance(state, tuple) else (state,)
        reset_peak_rss()
        out.baseline_bytes = current_rss_bytes()
        start = time.perf_counter()
        value = fn(*state)
        out.seconds = time.perf_counter() - start
        out.peak_bytes = peak_rss_bytes()  # before `post` touches any reference data
        out.result = post(value, *state) if post is not None else value
    except BaseException:  # noqa: BLE001 - reported to the parent
        out.error = traceback.format_exc()
    queue.put(out)


def run_isolated(
    fn: Callable[..., Any],
    *args: Any,
    setup: Callable[..., Any] | None = None,
    post: Callable[..., Any] | None = None,
    threads: int | None = None,
    timeout: float | None = None,
) -> Measurement:
    """Run ``fn`` in a fresh spawned process and measure its wall time and the process's peak RSS.

    ``setup(*args)`` runs first in the child (building the model and data; not timed), its return
    value (a tuple, or one object) is passed to ``fn``, which is timed; then
    ``post(fn_result, *setup_result)`` runs (not timed, after the peak RSS was read) to reduce the
    result to something small to send back (e.g. an error against a reference). All three must be
    importable module-level functions (the child is spawned, not forked).

    Args:
        fn: The function to measure.
        *args: Arguments of ``setup`` (or of ``fn`` when there is no ``setup``).
        setup: Untimed set-up in the child.
        post: Untimed post-processing in the child.
        threads: ``torch.set_num_threads`` in the child (default: torch's default).
        timeout: Seconds to wait before killing the child.

    Returns:
        A :class:`Measurement`; ``error`` is set if the child failed, died or timed out.
    """
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, setup, fn, post, args, threads))
    process.start()
    try:
        out = queue.get(timeout=timeout)
    except Exception:  # noqa: BLE001 - timeout or a dead child
        process.kill()
        process.join()
        return Measurement(error=f"child died or timed out (exit code {process.exitcode})")
    process.join()
    return out


def free_memory_bytes() -> int:
    """Memory available to this process on the CPU (0 where it cannot be told)."""
    from lightning_hessian.memory import available_memory

    return available_memory("cpu") or 0


def median_of(times: Sequence[float]) -> float:
    """Median of a list of times (NaN when empty)."""
    return statistics.median(times) if times else float("nan")


def machine_line() -> str:
    """One line describing the machine and software, for benchmark output."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}, load average {load:.2f}"
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
