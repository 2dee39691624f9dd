"""Lightning's private APIs are touched from one module; an upgrade that removes one is named."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning.pytorch as pl
import pytest

import lightning_hessian
from lightning_hessian import lightning_internals
from lightning_hessian.lightning_internals import LightningAPIError, check_private_apis

PRIVATE_NAMES = ("_on_before_batch_transfer", "_data_source", "_generate_state_key")


def test_the_installed_lightning_has_every_private_api_we_use():
    check_private_apis()
    check_private_apis(pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False))


def test_a_removed_private_api_is_named_with_the_lightning_version(monkeypatch):
    monkeypatch.delattr(pl.LightningModule, "_on_before_batch_transfer")
    with pytest.raises(LightningAPIError, match=r"Lightning \d.*LightningModule._on_before_batch_transfer"):
        check_private_apis()


def test_a_trainer_without_the_validation_source_is_named():
    class Bare:
        pass

    with pytest.raises(LightningAPIError, match="val_loop._data_source"):
        check_private_apis(Bare())


def test_no_other_module_touches_these_private_names():
    package = Path(lightning_hessian.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        if path.name == Path(lightning_internals.__file__).name:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in PRIVATE_NAMES:
                offenders.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert not offenders, offenders
