"""The Krylov basis (lightning_hessian.krylov): in-place projections, the Krylov relation, thick restart."""

from __future__ import annotations

import torch

from lightning_hessian.krylov import KrylovBasis
from lightning_hessian.linear_operator import MatrixOperator
from lightning_hessian.probes import make_generator
from tests.spectra import uniform_spectrum, with_spectrum


def relation_error(krylov: KrylovBasis, matrix: torch.Tensor) -> float:
    """``max |A Q - Q H - P C|`` for the basis ``Q``, projection ``H``, pending ``P`` and couplings ``C``."""
    q = krylov.basis[:, : krylov.m]
    h = krylov.proj[: krylov.m, : krylov.m]
    rest = matrix @ q - q @ h
    for item in krylov.pending:
        rest = rest - torch.outer(item.vec, item.coupling[: krylov.m])
    return float(rest.abs().max())


def grown(matrix: torch.Tensor, capacity: int, block: int, steps: int) -> KrylovBasis:
    krylov = KrylovBasis(MatrixOperator(matrix), matrix.shape[0], capacity, make_generator("cpu", 0))
    krylov.start(
        torch.randn(matrix.shape[0], block, generator=torch.Generator().manual_seed(1), dtype=matrix.dtype)
    )
    for _ in range(steps):
        krylov.step(list(range(len(krylov.pending))))
    return krylov


def test_start_projects_a_copy_and_leaves_the_callers_vectors_alone():
    matrix = with_spectrum(uniform_spectrum(40, -1.0, 1.0), 0)
    krylov = grown(matrix, 20, 3, 2)
    vectors = torch.randn(40, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    before = vectors.clone()
    assert krylov.start(vectors) == 2
    assert torch.equal(vectors, before)  # projected in place, but a copy of each column
    q = torch.cat([krylov.basis[:, : krylov.m], torch.stack([p.vec for p in krylov.pending], 1)], 1)
    torch.testing.assert_close(q.T @ q, torch.eye(q.shape[1], dtype=torch.float64), rtol=0, atol=1e-13)


class ReturnsItsInput:
    """The identity, returning the very tensor it is given (as an operator may for a view)."""

    shape, dtype, device = (4, 4), torch.float64, torch.device("cpu")

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return other


def test_a_product_that_aliases_the_basis_is_projected_as_a_copy():
    # Four start vectors in a basis of four: the new columns are the whole (contiguous) basis, so the
    # operator gets the basis itself and hands it back; projecting that in place would zero the basis.
    krylov = KrylovBasis(ReturnsItsInput(), 4, 4, make_generator("cpu", 0))
    krylov.start(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    krylov.step([0, 1, 2, 3])
    q = krylov.basis
    torch.testing.assert_close(q.T @ q, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(krylov.proj, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-14)
    assert not krylov.pending  # the identity's Krylov space is invariant


def test_steps_keep_the_krylov_relation():
    matrix = with_spectrum(uniform_spectrum(60, -1.0, 2.0), 1)
    krylov = grown(matrix, 40, 4, 6)
    assert krylov.m == 24 and len(krylov.pending) == 4
    assert relation_error(krylov, matrix) < 1e-12


def test_thick_restart_in_row_slabs_keeps_the_ritz_vectors_and_the_krylov_schur_relation():
    matrix = with_spectrum(uniform_spectrum(60, -1.0, 2.0), 1)
    krylov = grown(matrix, 40, 4, 6)
    ritz = krylov.ritz()
    keep = torch.tensor([0, 1, 20, 21, 22, 23])
    expected = krylov.basis[:, : krylov.m] @ ritz.coords[:, keep]
    krylov.restart(keep, ritz, workspace_columns=1)  # 60 rows in slabs of 10
    assert krylov.m == 6 and krylov.num_restarts == 1
    torch.testing.assert_close(krylov.basis[:, :6], expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(krylov.proj[:6, :6], torch.diag(ritz.values[keep]), rtol=0, atol=0)
    assert relation_error(krylov, matrix) < 1e-12
    for _ in range(3):  # the block steps go on from the compressed basis
        krylov.step(list(range(len(krylov.pending))))
    q = krylov.basis[:, : krylov.m]
    torch.testing.assert_close(q.T @ q, torch.eye(krylov.m, dtype=torch.float64), rtol=0, atol=1e-13)
    torch.testing.assert_close(krylov.proj[: krylov.m, : krylov.m], q.T @ matrix @ q, rtol=0, atol=1e-12)
    assert relation_error(krylov, matrix) < 1e-12
