"""What HessianCallback costs a training run, and what it pays per Hessian-vector product.

Trains the digits CNN of ``examples/train_digits.py`` (1,898 parameters, scikit-learn's bundled 8x8
digits) twice with the same seed: without the callback and with the default ``HessianCallback()``
(every epoch, the first 4 training batches of 64, whole model: Lanczos top-3 and smallest eigenvalue,
Hutch++ trace, SLQ density; TensorBoard scalars, histogram and figure). Then it times bare
``HessianOperator`` products on the final model and the same batches.

Reported, as ratios measured in this one process:

- the callback's share of the wall time of training;
- seconds per Hessian-vector product of one evaluation (the callback's whole wall time, and
  ``analyze`` alone) relative to one bare ``op @ v`` (and to one column of a batched ``op @ V``).

Run::

    python benchmarks/callback_overhead.py             # 5 epochs, 1 torch thread
    python benchmarks/callback_overhead.py --epochs 3 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch

import lightning_hessian as lh

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from train_digits import DigitsCNN, DigitsDataModule  # noqa: E402


def fit(epochs: int, callbacks: list, root: str) -> tuple[float, DigitsCNN, L.Trainer]:
    L.seed_everything(0, verbose=False)
    model = DigitsCNN()
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=5,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, DigitsDataModule())
    return time.perf_counter() - start, model, trainer


def bare_products(model: DigitsCNN, batches: list, repeats: int, columns: int) -> tuple[float, float, float]:
    """Seconds to build the operator (incl. its first product) and per product: single, batched."""
    start = time.perf_counter()
    op = lh.HessianOperator(model, None, batches)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0))
    op @ v  # the first product chooses the method
    build = time.perf_counter() - start
    singles = []
    for _ in range(repeats):
        start = time.perf_counter()
        op @ v
        singles.append(time.perf_counter() - start)
    block = torch.randn(op.shape[0], columns, generator=torch.Generator().manual_seed(1))
    op @ block  # the first matrix product chooses the batched method
    start = time.perf_counter()
    op @ block
    batched = (time.perf_counter() - start) / columns
    return build, statistics.median(singles), batched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30, help="timed single products")
    parser.add_argument("--columns", type=int, default=32, help="columns of the batched product")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    with tempfile.TemporaryDirectory() as root:
        plain_seconds, plain_model, _ = fit(args.epochs, [], root)
        hessian = lh.HessianCallback()
        with_seconds, model, _ = fit(args.epochs, [hessian], root)
    identical = all(
        torch.equal(a, b)
        for a, b in zip(plain_model.state_dict().values(), model.state_dict().values(), strict=True)
    )
    build, single, batched = bare_products(model, hessian.batches, args.repeats, args.columns)

    evaluations = [h for h in hessian.history if h.get("ok")]
    matvecs = sum(h["hessian/num_matvecs"] for h in evaluations)
    callback_seconds = sum(h["wall_seconds"] for h in evaluations)
    analyze_seconds = sum(h["hessian/seconds"] for h in evaluations)
    per_hvp = callback_seconds / matvecs
    per_hvp_analyze = analyze_seconds / matvecs

    print(
        f"\nHessianCallback overhead: digits CNN ({sum(p.numel() for p in model.parameters())} parameters), "
    )
    print(
        f"{args.epochs} epochs, {len(evaluations)} evaluations on {len(hessian.batches)} batches of 64, "
        f"torch {torch.__version__}, {args.threads} thread(s), load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n"
    )
    print("| measure | value |")
    print("|---|---|")
    print(f"| training wall time without callback | {plain_seconds:.1f} s |")
    print(f"| training wall time with `HessianCallback()` | {with_seconds:.1f} s |")
    share = (with_seconds - plain_seconds) / with_seconds
    print(f"| callback share of wall time (difference / with) | {share:.0%} |")
    print(f"| time inside the callback's evaluations / with | {callback_seconds / with_seconds:.0%} |")
    print(f"| weights bit-identical with and without | {'yes' if identical else 'NO'} |")
    print(f"| Hessian-vector products per evaluation | {matvecs / len(evaluations):.0f} |")
    print(f"| callback seconds per HVP (whole evaluation, incl. logging) | {per_hvp * 1e3:.2f} ms |")
    print(f"| analyze seconds per HVP | {per_hvp_analyze * 1e3:.2f} ms |")
    print(f"| bare `HessianOperator` `op @ v` (median of {args.repeats}) | {single * 1e3:.2f} ms |")
    print(f"| bare `op @ V`, per column ({args.columns} columns) | {batched * 1e3:.2f} ms |")
    print(f"| bare operator build + first product (method choice) | {build:.2f} s |")
    print(f"| **callback per HVP / bare `op @ v`** (target <= 1.1x) | **{per_hvp / single:.2f}x** |")
    print(f"| analyze per HVP / bare `op @ v` | {per_hvp_analyze / single:.2f}x |")
    print(f"| callback per HVP / bare batched column | {per_hvp / batched:.2f}x |")


if __name__ == "__main__":
    main()
