"""LightningCLI entry point for the digits example: configure HessianCallback from YAML.

Run::

    python examples/cli.py fit --config examples/hessian_cli.yaml
    python examples/cli.py fit --config examples/hessian_cli.yaml --trainer.max_epochs=3

The callback sits under ``trainer.callbacks`` with ``class_path: lightning_hessian.HessianCallback``
and its arguments under ``init_args`` (see ``hessian_cli.yaml``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_digits import DigitsCNN, DigitsDataModule  # noqa: E402


def main(args: list[str] | None = None) -> LightningCLI:
    """Build (and by default run) the CLI; ``args`` replaces ``sys.argv[1:]`` (for tests)."""
    return LightningCLI(DigitsCNN, DigitsDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
