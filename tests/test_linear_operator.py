"""Explicit matrices as operators (lightning_hessian.linear_operator): MatrixOperator, the reference
operator of the estimator tests.
"""

from __future__ import annotations

import pytest
import torch

import lightning_hessian as lh
from tests.spectra import spiked_wigner


def test_matrix_operator_multiplies_and_counts_one_product_per_column():
    matrix = spiked_wigner(6, [2.0], seed=0)
    op = lh.MatrixOperator(matrix)
    assert op.shape == (6, 6) and op.dtype == torch.float64 and op.device == torch.device("cpu")
    assert op.to_dense() is matrix and op.num_matvecs == 0
    v = torch.ones(6, dtype=torch.float64)
    torch.testing.assert_close(op @ v, matrix @ v)
    assert op.num_matvecs == 1
    V = torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(op @ V, matrix @ V)
    assert op.num_matvecs == 5
    assert (op @ torch.ones(6, dtype=torch.float32)).dtype == torch.float64  # in the matrix's dtype


def test_matrix_operator_satisfies_the_operator_protocol():
    op = lh.MatrixOperator(torch.eye(3))
    for member in ("shape", "dtype", "device", "__matmul__"):
        assert hasattr(op, member), member
    assert lh.eigenvalues(op, k=1).values.tolist() == pytest.approx([1.0])


@pytest.mark.parametrize("shape", [(3, 4), (5,), (2, 2, 2)])
def test_a_matrix_that_is_not_square_is_rejected(shape):
    with pytest.raises(ValueError, match=r"`matrix` must be square \[N, N\]"):
        lh.MatrixOperator(torch.zeros(shape))
