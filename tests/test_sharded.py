"""The sharded Hessian's pieces on one process: shard layout, probes, contractions, the operator on a
one-rank FSDP2 mesh, and what it refuses. Two ranks: ``tests/test_sharded_callback.py``."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import lightning_hessian as lh
from lightning_hessian import contractions
from lightning_hessian.linear_operator import MatrixOperator
from lightning_hessian.operator.differences import difference_step
from lightning_hessian.probes import make_generator, rademacher
from lightning_hessian.sharded import ShardedHessianOperator
from lightning_hessian.shards import ShardedVectors, ShardLayout, has_sharded_parameters, shard_rows

SHAPES = {"a.weight": torch.Size([7, 5]), "a.bias": torch.Size([7]), "b.weight": torch.Size([1, 7])}


# ---------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_every_global_entry_is_held_by_exactly_one_rank(world: int) -> None:
    layouts = [ShardLayout(SHAPES, rank, world) for rank in range(world)]
    held = torch.cat([layout.global_indices() for layout in layouts])
    assert sorted(held.tolist()) == list(range(layouts[0].global_size))
    assert [layout.local_size for layout in layouts] == layouts[0].local_sizes()


def test_rows_are_torch_chunks_of_dimension_zero_with_empty_shards_at_the_end() -> None:
    assert [shard_rows(7, r, 2) for r in range(2)] == [(0, 4), (4, 7)]
    assert [shard_rows(1, r, 3) for r in range(3)] == [(0, 1), (1, 1), (1, 1)]
    for rows, world in [(7, 2), (10, 4), (3, 8)]:
        chunks = torch.arange(rows).chunk(world)
        expected = [(int(c[0]), int(c[-1]) + 1) for c in chunks]
        assert [shard_rows(rows, r, world) for r in range(len(chunks))] == expected


def test_split_gives_local_shard_views() -> None:
    layout = ShardLayout(SHAPES, 1, 2)
    vector = torch.arange(float(layout.local_size))
    parts = layout.split(vector)
    assert {n: tuple(t.shape) for n, t in parts.items()} == {
        "a.weight": (3, 5),
        "a.bias": (3,),
        "b.weight": (0, 7),
    }
    assert torch.equal(torch.cat([t.reshape(-1) for t in parts.values()]), vector)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("world", [2, 3])
def test_probes_are_the_same_global_vectors_for_any_number_of_ranks(kind: str, world: int) -> None:
    whole = ShardLayout(SHAPES, 0, 1)
    reference = whole.random(kind, 3, make_generator("cpu", 7), torch.float64, torch.device("cpu"))
    assembled = torch.empty_like(reference)
    states = set()
    for rank in range(world):
        layout = ShardLayout(SHAPES, rank, world)
        generator = make_generator("cpu", 7)
        rows = layout.random(kind, 3, generator, torch.float64, torch.device("cpu"))
        assembled[layout.global_indices()] = rows
        states.add(bytes(generator.get_state().numpy()))
    assert torch.equal(assembled, reference)
    assert len(states) == 1  # every rank's generator advanced alike


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_sharded_probes_are_those_of_the_unsharded_operator_with_the_same_seed(kind, dtype) -> None:
    layout = ShardLayout(SHAPES, 0, 1)
    n = layout.global_size
    draw = contractions.random_signs if kind == "rademacher" else contractions.random_normal
    whole = draw(MatrixOperator(torch.eye(n, dtype=dtype)), n, 3, make_generator("cpu", 5), dtype, "cpu")
    sharded = layout.random(kind, 3, make_generator("cpu", 5), dtype, torch.device("cpu"))
    assert torch.equal(sharded, whole)
    if kind == "gaussian":  # standard normal: no infinite entries, mean 0 and variance 1
        many = draw(
            MatrixOperator(torch.eye(1, dtype=dtype)), 200_000, 1, make_generator("cpu", 6), dtype, "cpu"
        )
        assert bool(torch.isfinite(many).all())
        assert abs(float(many.mean())) < 0.01 and abs(float(many.var()) - 1) < 0.01


def test_unit_columns_are_the_rows_of_the_identity() -> None:
    layout = ShardLayout(SHAPES, 1, 2)
    eye = torch.eye(layout.global_size, dtype=torch.float64)
    columns = layout.unit_columns(3, 40, torch.float64, torch.device("cpu"))
    assert torch.equal(columns, eye[layout.global_indices()][:, 3:40])


def test_single_process_vectors_contract_and_factor_like_torch() -> None:
    vectors = ShardedVectors(ShardLayout({"w": torch.Size([6, 2])}, 0, 1), None, torch.device("cpu"))
    y = torch.randn(12, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    q, r = vectors.qr(y)
    assert torch.allclose(q.T @ q, torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(q @ r, y, atol=1e-12)
    assert torch.equal(vectors.inner(y, y), y.T @ y)
    assert vectors.all_true(True) and not vectors.all_true(False)


# ---------------------------------------------------------------------------------- contractions
def test_contractions_of_an_ordinary_operator_are_the_plain_expressions_bit_for_bit() -> None:
    op = MatrixOperator(torch.eye(5, dtype=torch.float32))
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g)
    assert not contractions.is_sharded(op) and contractions.local_rows(op) == 5
    assert torch.equal(contractions.inner(op, a, b), a.T @ b)
    assert torch.equal(contractions.dot(op, a[:, 0], b[:, 0]), torch.dot(a[:, 0], b[:, 0]))
    assert torch.equal(contractions.column_dots(op, a, a), (a * a).sum(0))
    assert torch.equal(contractions.norm(op, a), a.norm())
    assert torch.equal(contractions.column_norms(op, a, keepdim=True), a.norm(dim=0, keepdim=True))
    assert torch.equal(contractions.total(op, a), a.sum())
    signs = contractions.random_signs(op, 5, 2, make_generator("cpu", 3), torch.float32, torch.device("cpu"))
    assert torch.equal(signs, rademacher(5, 2, make_generator("cpu", 3), torch.float32, torch.device("cpu")))
    q, r = contractions.orthonormalize(op, a)
    expected = torch.linalg.qr(a, mode="reduced")
    assert torch.equal(q, expected.Q) and torch.equal(r, expected.R)


def test_difference_step_is_the_shared_central_difference_rule() -> None:
    u = torch.finfo(torch.float64).eps / 2
    step = difference_step(torch.float64, [2.0, 5.0], [4.0, 0.5])
    assert step == pytest.approx((3 * u) ** (1 / 3) / 2 * min(2.0 / 4.0, 5.0 / 0.5))
    with pytest.raises(ValueError, match="direction is zero"):
        difference_step(torch.float64, [1.0], [0.0])


# ---------------------------------------------------------------------- one-rank FSDP2 operator
@contextlib.contextmanager
def one_rank_group() -> Iterator[None]:
    """A gloo process group of one rank in this process (FSDP2 needs one), destroyed afterwards."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def network() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1)).double()


def shard(model: nn.Sequential) -> nn.Sequential:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    x, y = (
        torch.randn(10, 5, generator=g, dtype=torch.float64),
        torch.randn(10, 1, generator=g, dtype=torch.float64),
    )
    return [(x[:6], y[:6]), (x[6:], y[6:])]  # sizes 6 and 4: the mean is size-weighted


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


@pytest.fixture(scope="module")
def sharded_pair() -> Iterator[tuple[nn.Module, lh.HessianOperator]]:
    with one_rank_group():
        yield shard(network()), lh.HessianOperator(network(), mse, batches(), process_group=None)


def test_one_rank_sharded_operator_matches_the_unsharded_one(sharded_pair) -> None:
    model, reference = sharded_pair
    assert has_sharded_parameters(model)
    op = ShardedHessianOperator(model, mse, batches())
    assert op.shape == reference.shape and op.local_size == reference.shape[0]
    assert op.loss() == pytest.approx(reference.loss(), rel=1e-14)
    assert torch.allclose(op.gradient(), reference.gradient(), rtol=0, atol=1e-15)
    v = torch.randn(op.local_size, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    exact = reference @ v
    assert float((op @ v - exact).abs().max() / exact.abs().max()) < 1e-8  # gradient differences
    assert op.num_matvecs == 2
    top = lh.eigenvalues(op, 2, tol=1e-10).values
    assert torch.allclose(top, lh.eigenvalues(reference, 2, tol=1e-10).values, rtol=1e-8)
    assert lh.trace(op, "exact").value == pytest.approx(lh.trace(reference, "exact").value, rel=1e-8)


def test_products_leave_shards_gradients_buffers_and_rng_exactly_as_they_were(sharded_pair) -> None:
    model, _ = sharded_pair
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)  # a DTensor gradient, like FSDP's
    before = {n: p.to_local().clone() for n, p in model.named_parameters()}
    grads = [p.grad for p in model.parameters()]
    model.train()
    rng = torch.get_rng_state()
    op = ShardedHessianOperator(model, mse, batches(), mode="eval")
    op @ torch.ones(op.local_size, dtype=torch.float64)
    op.loss(torch.full((op.local_size,), 0.1, dtype=torch.float64))
    assert all(torch.equal(p.to_local(), before[n]) for n, p in model.named_parameters())
    assert [p.grad for p in model.parameters()] == grads  # the same objects
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    for p in model.parameters():
        p.grad = None


def test_blocks_of_a_sharded_model_are_iterative_and_match_the_dense_ones(sharded_pair) -> None:
    model, _ = sharded_pair
    settings = {"blocks": "module", "top_k": 1, "tol": 1e-10, "trace_method": "exact", "density": False}
    report = lh.analyze(model, mse, batches(), **settings)
    expected = lh.analyze(network(), mse, batches(), process_group=None, **settings)
    assert {b.method for b in report.blocks.values()} == {"iterative"}
    assert {b.method for b in expected.blocks.values()} == {"dense"}
    for name, block in expected.blocks.items():
        got = report.blocks[name]
        assert float(got.eigenvalues.values[0]) == pytest.approx(float(block.eigenvalues.values[0]), rel=1e-7)
        assert got.trace.value == pytest.approx(block.trace.value, rel=1e-7, abs=1e-12)


def test_dense_hessians_of_a_sharded_model_are_refused_with_the_alternative(sharded_pair) -> None:
    model, _ = sharded_pair
    with pytest.raises(ValueError, match="method='dense'` is refused for a sharded model.*'iterative'"):
        lh.analyze(model, mse, batches(), method="dense")
    with pytest.raises(ValueError, match="parameters are sharded.*lh.ShardedHessianOperator"):
        lh.hessian(model, mse, batches())
    op = ShardedHessianOperator(model, mse, batches())
    with pytest.raises(ValueError, match="dense Hessian of a sharded model is not computed"):
        op.to_dense()


def test_sharded_operator_refuses_another_dtype_and_exact_products(sharded_pair) -> None:
    model, _ = sharded_pair
    with pytest.raises(ValueError, match="`dtype` must be None or that dtype"):
        ShardedHessianOperator(model, mse, batches(), dtype=torch.float32)
    with pytest.raises(ValueError, match="gradient differences"):
        ShardedHessianOperator(model, mse, batches(), hvp="reverse-over-reverse")


@pytest.mark.parametrize("kept", [True, False])
def test_sharded_products_freeze_kinks_like_the_exact_products(sharded_pair, kept, monkeypatch):
    """Sample 0 sits within 1e-9 of every ReLU's kink (tests/test_kinks.py): the steps cross them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tests.helpers import cross_entropy_loss
    from tests.test_kinks import problem

    model, data = problem("relu")
    exact = lh.HessianOperator(
        model, cross_entropy_loss, data, hvp="reverse-over-reverse", process_group=None
    )
    mesh = init_device_mesh("cpu", (1,))
    for layer in (model.inner, model.outer, model):
        fully_shard(layer, mesh=mesh)
    if not kept:  # too big to keep: recorded again, in a forward pass at θ, for each product
        monkeypatch.setattr("lightning_hessian.sharded.PATTERN_MEMORY_SHARE", 0.0)
    op = ShardedHessianOperator(model, cross_entropy_loss, data)
    V = torch.randn(op.local_size, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    expected = exact @ V
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float((op @ V - expected).norm() / expected.norm()) < 1e-7
    assert op._kinks_off is None and (op._patterns is not None) == kept
    op._kinks_off = "switched off by the test"
    assert float((op @ V - expected).norm() / expected.norm()) > 1e-2
