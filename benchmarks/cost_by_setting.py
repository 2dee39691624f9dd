"""What one HessianCallback evaluation costs on the digits example, by setting (README, "What it costs").

One epoch of ``examples/train_digits.py``'s CNN per setting, 1 thread. Prints, for the first
evaluation of each setting, the Hessian-vector products of each block by part (the shared Krylov
space, the trace's remainder probes, the training dynamics, dense columns) and the time per product
relative to the median training step of the same run.

    python benchmarks/cost_by_setting.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings

import lightning as L
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from train_digits import DigitsCNN, DigitsDataModule  # noqa: E402

import lightning_hessian as lh  # noqa: E402

SETTINGS = {
    "HessianCallback()": {},
    "HessianCallback(gradient_geometry=False, eigenvector_overlap=False, stability=False)": {
        "gradient_geometry": False,
        "eigenvector_overlap": False,
        "stability": False,
    },
    "HessianCallback(density=False, min_eigenvalue=False, trace=False)": {
        "density": False,
        "min_eigenvalue": False,
        "trace": False,
    },
    'HessianCallback(blocks="module", num_batches=2)': {"blocks": "module", "num_batches": 2},
    "HessianCallback(landscape=True)": {"landscape": True},
}


class StepClock(L.Callback):
    """Wall time of each training step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self.start)


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, 1 thread, load average {load:.1f} on {os.cpu_count()} CPUs\n")
    columns = ["setting", "block (parameters, method)", "Krylov space or dense columns", "trace remainder"]
    columns += ["dynamics", "total", "time per product / training step"]
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|")
    for label, settings in SETTINGS.items():
        L.seed_everything(0, verbose=False)
        clock, hessian = StepClock(), lh.HessianCallback(**settings)
        L.Trainer(
            max_epochs=1,
            callbacks=[clock, hessian],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        ).fit(DigitsCNN(), DigitsDataModule())
        report, step = hessian.last_report, statistics.median(clock.times)
        for name, block in report.blocks.items():
            trace = block.trace.num_matvecs if block.trace is not None and block.method == "iterative" else 0
            dynamics = (block.gradient_geometry.num_matvecs if block.gradient_geometry else 0) + (
                block.stability.num_matvecs if block.stability else 0
            )
            if block.landscape is not None:
                dynamics += len(block.landscape.losses)
            space = block.num_matvecs - trace - dynamics
            per_product = block.seconds / max(1, block.num_matvecs) / step
            print(
                f"| `{label}` | `{name}` ({block.size:,}, {block.method}) | {space:g} | {trace:g} | "
                f"{dynamics:g} | {block.num_matvecs} | {per_product:.1f} |"
            )
        print(f"| `{label}` | all | | | | **{report.num_matvecs}** | |")


if __name__ == "__main__":
    main()
