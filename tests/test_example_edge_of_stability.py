"""examples/edge_of_stability.py, shortened: gradient descent sharpens up to its edge, 2 / lr."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "edge_of_stability.py"


def _example():
    spec = importlib.util.spec_from_file_location("edge_of_stability", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gradient_descent_reaches_its_edge_of_stability(tmp_path):
    example = _example()
    history = example.train("gd", "sgd", 0.4, steps=250, every=50, root=str(tmp_path))
    stability = [entry["hessian/model/stability"] for entry in history if entry["ok"]]
    sharpness = [entry["hessian/model/eigenvalue_1"] for entry in history if entry["ok"]]
    assert len(stability) == 5
    assert stability[0] < 0.7  # progressive sharpening starts well below the edge ...
    assert 0.95 < stability[-1] < 1.15  # ... and ends at it: sharpness near 2 / lr = 5
    assert all(abs(s - 0.4 * top / 2) < 1e-6 * s for s, top in zip(stability, sharpness, strict=True))
    assert (tmp_path / "edge_of_stability" / "gd").is_dir()  # the TensorBoard run
