"""HessianCallback under Lightning DDP: 2 CPU processes (gloo), each training on its own half of a data set.

Each scenario runs ``tests/ddp_scenarios.py`` in a subprocess (``strategy="ddp"`` relaunches the
script for rank 1) and checks what every rank wrote.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_hessian as lh
from lightning_hessian.analysis import analyze_with
from lightning_hessian.reporting import scalar_metrics
from tests import ddp_scenarios

SCRIPT = Path(__file__).with_name("ddp_scenarios.py")
TIMEOUT = 110  # seconds per scenario; a deadlocked rank would exceed it


def _launch(scenario: str, outdir: Path) -> tuple[subprocess.CompletedProcess, list[dict[str, Any] | None]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    env.pop("LOCAL_RANK", None)
    process = subprocess.run(
        [sys.executable, str(SCRIPT), scenario, str(outdir)],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    results = []
    for rank in range(ddp_scenarios.WORLD_SIZE):
        path = outdir / f"rank{rank}.pt"
        results.append(torch.load(path, weights_only=False) if path.exists() else None)
    return process, results


def _event_files(outdir: Path) -> list[Path]:
    return sorted(outdir.rglob("events.out.tfevents.*"))


def _tensorboard_scalars(path: Path) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(path), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}


def test_ddp_logs_the_curvature_of_the_union_of_both_ranks_batches(tmp_path: Path) -> None:
    process, results = _launch("union", tmp_path)
    assert process.returncode == 0, process.stderr[-4000:]
    rank0, rank1 = results
    assert rank0["outcome"] == rank1["outcome"] == "finished"
    assert rank0["world_size"] == 2

    # Single-process reference: the trained model, every rank's evaluation batches at once.
    module = ddp_scenarios.make_module()
    module.load_state_dict(rank0["state_dict"])
    settings = lh.HessianCallback(**ddp_scenarios.callback_kwargs()).settings  # the callback's own
    optimizer = module.configure_optimizers()  # plain SGD: its step sizes need no state
    report = analyze_with(
        module, None, ddp_scenarios.union(), settings, process_group=None, optimizer=optimizer
    )
    expected = {k: v for k, v in scalar_metrics(report).items() if k != "hessian/seconds"}
    assert report.num_samples == 2 * ddp_scenarios.HALF
    assert {"hessian/net.0/eigenvalue_1", "hessian/net.2/trace"} <= set(expected)
    # The training dynamics agree too: batch sharpness over every rank's batches, the gradient and
    # its products all-reduced.
    dynamics = ("stability", "gradient_alignment", "gradient_curvature", "batch_sharpness")
    assert {f"hessian/net.0/{name}" for name in dynamics} <= set(expected)

    for result in results:
        assert [entry["ok"] for entry in result["history"]] == [True]
        assert result["history"][0]["num_batches"] == ddp_scenarios.NUM_BATCHES
        for name, value in expected.items():
            assert math.isclose(result["metrics"][name], value, rel_tol=1e-4, abs_tol=1e-10), name
    # callback_metrics identical on every rank (seconds included: the mean over ranks)
    assert rank0["metrics"] == rank1["metrics"]

    # Only rank 0 writes event files, and they hold the same values.
    events = _event_files(tmp_path)
    assert events, "no TensorBoard event file"
    assert {path.name.split(".")[-2] for path in events} == {str(rank0["pid"])}
    logged = _tensorboard_scalars(events[0].parent)
    for name, value in expected.items():
        assert math.isclose(logged[name], value, rel_tol=1e-4, abs_tol=1e-6), name


def test_ddp_failure_on_one_rank_is_skipped_on_both_and_training_finishes(tmp_path: Path) -> None:
    process, results = _launch("failures", tmp_path)
    assert process.returncode == 0, process.stderr[-4000:]
    steps = ddp_scenarios.TRAIN_STEPS_PER_EPOCH
    for result in results:
        assert result["outcome"] == "finished"
        assert result["global_step"] == 3 * steps
        history = result["history"]
        assert [entry["ok"] for entry in history] == [False, False, True]
        assert [entry["step"] for entry in history] == [steps, 2 * steps, 3 * steps]
        assert "NonFiniteHessianError" in history[0]["error"]
        assert "simulated out of memory on rank 1" in history[1]["error"]
    for first, second in zip(results[0]["history"], results[1]["history"], strict=True):
        assert first["error" if not first["ok"] else "ok"] == second["error" if not second["ok"] else "ok"]
    assert results[0]["metrics"] == results[1]["metrics"]
    assert math.isfinite(results[0]["metrics"]["hessian/model/eigenvalue_1"])
    assert "failed" in process.stderr  # the warning (rank 0)


def test_ddp_on_error_raise_stops_every_rank_without_deadlock(tmp_path: Path) -> None:
    process, results = _launch("raise", tmp_path)
    assert process.returncode != 0
    assert results[0] is not None, process.stderr[-4000:]
    # rank 0 did not fail itself: it raises because rank 1 did, instead of waiting for it
    assert results[0]["outcome"] in ("RankFailedError", "NonFiniteHessianError"), results[0]["outcome"]
    assert "simulated out of memory on rank 1" in process.stderr


class DeepSpeedStrategy:  # stands in for lightning's, which needs the deepspeed package
    pass


@pytest.mark.parametrize(
    "strategy",
    [
        pytest.param(lambda: FSDPStrategy(), id="fsdp"),
        pytest.param(DeepSpeedStrategy, id="deepspeed"),
    ],
)
def test_gpu_sharding_strategies_are_refused_in_setup_pointing_to_model_parallel(strategy) -> None:
    trainer = SimpleNamespace(strategy=strategy())
    module = ddp_scenarios.make_module()
    with pytest.raises(
        MisconfigurationException,
        match=r"shards the parameters.*ModelParallelStrategy\(data_parallel_size=N, "
        r"tensor_parallel_size=1\)",
    ):
        lh.HessianCallback().setup(trainer, module, "fit")


def test_model_parallel_strategy_is_accepted_in_setup() -> None:
    trainer = SimpleNamespace(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    lh.HessianCallback().setup(trainer, ddp_scenarios.make_module(), "fit")


def test_tensor_parallelism_is_refused_in_setup() -> None:
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    sizes = {"data_parallel": 1, "tensor_parallel": 2}

    class Mesh:  # stands in for the device mesh Lightning builds in setup_environment
        mesh_dim_names = ("data_parallel", "tensor_parallel")

        def __getitem__(self, name: str) -> SimpleNamespace:
            return SimpleNamespace(size=lambda: sizes[name])

    strategy._device_mesh = Mesh()
    with pytest.raises(MisconfigurationException, match="tensor_parallel_size=1"):
        lh.HessianCallback().setup(SimpleNamespace(strategy=strategy), ddp_scenarios.make_module(), "fit")


def test_data_parallel_strategy_is_accepted_in_setup() -> None:
    trainer = SimpleNamespace(strategy=DDPStrategy())
    lh.HessianCallback().setup(trainer, ddp_scenarios.make_module(), "fit")
