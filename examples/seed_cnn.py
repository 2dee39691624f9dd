"""The seed document's problem, solved: the Hessian of a CNN's loss w.r.t. its parameters.

The seed hand-wrote a flattened forward function for ``torch.autograd.functional.hessian``. With
``lightning_hessian`` the model is used as it is:

    python examples/seed_cnn.py
"""

import time

import torch
import torch.nn.functional as F
from torch import nn

import lightning_hessian as lh


class Net(nn.Module):
    def __init__(self, h: int, w: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, 1, 1)
        self.f2 = nn.Linear(32 * h * w, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c1(x)
        x = x.view(x.size(0), -1)
        return self.f2(x)


def main() -> None:
    torch.manual_seed(0)
    net = Net(12, 12)
    batch = (torch.randn(8, 1, 12, 12), torch.randint(0, 5, (8,)))

    def loss_fn(model: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = b
        return F.cross_entropy(model(x), y)

    start = time.perf_counter()
    H = lh.hessian(net, loss_fn, [batch])  # [23365, 23365], flat order of named_parameters()
    print(f"dense Hessian {tuple(H.shape)} in {time.perf_counter() - start:.1f} s")

    blocks = lh.hessian(net, loss_fn, [batch], blocks="module")  # diagonal blocks only
    print({name: tuple(b.shape) for name, b in blocks.items()})

    op = lh.HessianOperator(net, loss_fn, [batch])  # matrix-free: op @ v
    top = lh.eigenvalues(op, k=3)
    bottom = lh.eigenvalues(op, k=1, which="smallest")
    tr = lh.trace(op, method="hutch++", num_matvecs=99)
    print(f"top eigenvalues {top.values.tolist()} (converged {top.converged.tolist()})")
    print(f"smallest eigenvalue {bottom.values.item():.4g}; exact {torch.linalg.eigvalsh(H.double())[0]:.4g}")
    print(f"trace {tr.value:.4f} ± {tr.stderr:.4f}; exact {H.diagonal().sum():.4f}")


if __name__ == "__main__":
    main()
