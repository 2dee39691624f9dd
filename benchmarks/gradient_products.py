"""Gradient-difference Hessian-vector products (``hvp="finite-difference"``): accuracy and cost.

Accuracy, on a zoo of models (a tanh MLP, a CNN with BatchNorm in eval mode, a transformer encoder
layer, an LSTM, each on one batch of random data; the CNN and the transformer also with ReLU, whose
kinks gradient differences freeze at θ, NOTE [Frozen kinks]), in float32 and float64, against the
exact products of the same model in the same dtype:

- single products: relative error ``||D v - H v|| / ||H v||`` of central differences and of the
  Richardson form, median and worst over 5 random vectors;
- the top-5 eigenvalues (``lh.eigenvalues``, same seed; tol 1e-5 in float32, 1e-9 in float64): worst
  relative error;
- the trace (Hutch++, 60 products, same seed): relative error.

Cost: time per product in gradients (a plain ``torch.autograd.grad(loss_fn(model, batch), params)``
on the module), each product timed between two gradients and divided by their mean (this machine is
shared, and its speed drifts by 10-20% within a minute), median over ``--repeats``; also on the
141k mid-size CNN of ``benchmarks/common.py``. Products are timed as an analysis runs them (with the
operator's closure held, so the module's state is saved once around all of them): one vector, and a
block of 4 in one ``op @ V`` (as the shared Krylov space multiplies them), per product; central
differences also as a standalone ``op @ v``, which saves and restores that state around itself. What a
central product costs beyond its two gradients, in microseconds, is fixed work (the step's norms, two
writes of ``θ ± h d``, the difference, the finiteness check, the Python around them); a second table
times central differences on each smooth model and two larger ones of its kind, where that fixed work
weighs less.

Compiled modules: ``torch.compile`` (inductor) of the tanh MLP with an MSE loss, where neither exact
method works (aot_autograd has no double backward, and ``jvp(grad(F.mse_loss))`` fails in torch), and
of the SiLU CNN with cross-entropy, where forward-over-reverse does: the method ``auto`` used and its
top-5 eigenvalues and trace against the eager module's. And the once-differentiable tanh MLP (a custom
``autograd.Function`` whose backward is ``@once_differentiable``): what reverse-over-reverse alone would
report, and what ``auto`` reports, against the same weights with ``torch.tanh``.

Run: ``python benchmarks/gradient_products.py`` (``--repeats 7 --threads 1``; ``--skip-compile`` to
leave out the compiled modules, whose inductor compilation takes a minute on 2 cores; ``--cost-only``
for the cost table alone).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning_hessian as lh  # noqa: E402
from benchmarks.common import machine_line, markdown_table, mid_cnn_problem  # noqa: E402
from lightning_hessian.operator import selection  # noqa: E402
from lightning_hessian.operator.differences import FINITE_DIFFERENCE, RICHARDSON  # noqa: E402

REVERSE = "reverse-over-reverse"
TARGETS = {torch.float32: (1e-3, 1e-3), torch.float64: (1e-7, 1e-8)}  # (single product, top-5)
TOL = {torch.float32: 1e-5, torch.float64: 1e-9}
BLOCK = 4  # vectors per block product in the cost tables (the shared Krylov space's default block)


class SmallCNN(nn.Module):
    """Two conv-BatchNorm-activation blocks, pooling, a linear head: 4,117 parameters."""

    def __init__(
        self, activation: type[nn.Module] = nn.SiLU, pool=F.avg_pool2d, channels: int = 16, side: int = 8
    ) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.c2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels * (side // 2) ** 2, 5)
        self.act, self.pool = activation(), pool

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.bn1(self.c1(x)))
        x = self.pool(self.act(self.bn2(self.c2(x))), 2)
        return self.head(x.flatten(1))


class Encoder(nn.Module):
    """Linear embedding, one ``nn.TransformerEncoderLayer`` (d=32, 4 heads), mean pool, head: 8,997."""

    def __init__(self, activation: str = "gelu", width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.layer = nn.TransformerEncoderLayer(
            width, 4, 2 * width, dropout=0.0, batch_first=True, activation=activation
        )
        self.head = nn.Linear(width, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(self.embed(x)).mean(1))


class Recurrent(nn.Module):
    """An LSTM (8 -> 32) and a linear head on the last step: 5,541 parameters."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(8, hidden, batch_first=True), nn.Linear(hidden, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class _OnceTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class FusedTanh(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return _OnceTanh.apply(x)


def tanh_mlp(activation: type[nn.Module] = nn.Tanh, width: int = 64) -> nn.Module:
    return nn.Sequential(
        nn.Linear(20, width), activation(), nn.Linear(width, width), activation(), nn.Linear(width, 5)
    )


MODELS = {
    "tanh MLP": (tanh_mlp, (64, 20)),
    "CNN, BatchNorm eval, SiLU": (SmallCNN, (32, 3, 8, 8)),
    "CNN, BatchNorm eval, ReLU + max-pool": (lambda: SmallCNN(nn.ReLU, F.max_pool2d), (32, 3, 8, 8)),
    "transformer encoder layer, GELU": (Encoder, (32, 6, 8)),
    "transformer encoder layer, ReLU": (lambda: Encoder("relu"), (32, 6, 8)),
    "LSTM": (Recurrent, (32, 6, 8)),
}


def cross_entropy(module: nn.Module, batch) -> Tensor:
    return F.cross_entropy(module(batch[0]), batch[1])


def mse(module: nn.Module, batch) -> Tensor:
    return F.mse_loss(module(batch[0]), F.one_hot(batch[1], 5).to(batch[0].dtype))


# The smooth models of MODELS (the first of each) and larger ones of the same kind, for the cost by
# size: (label, builder, input shape).
SIZES = {
    "tanh MLP": [
        ("width 64, batch 64", tanh_mlp, (64, 20)),
        ("width 256, batch 256", lambda: tanh_mlp(width=256), (256, 20)),
        ("width 1024, batch 512", lambda: tanh_mlp(width=1024), (512, 20)),
    ],
    "CNN, BatchNorm eval, SiLU": [
        ("16 channels, 8x8, batch 32", SmallCNN, (32, 3, 8, 8)),
        ("32 channels, 16x16, batch 32", lambda: SmallCNN(channels=32, side=16), (32, 3, 16, 16)),
        ("64 channels, 32x32, batch 32", lambda: SmallCNN(channels=64, side=32), (32, 3, 32, 32)),
    ],
    "transformer encoder layer, GELU": [
        ("width 32, 6 tokens, batch 32", Encoder, (32, 6, 8)),
        ("width 64, 32 tokens, batch 32", lambda: Encoder(width=64), (32, 32, 8)),
        ("width 128, 64 tokens, batch 32", lambda: Encoder(width=128), (32, 64, 8)),
    ],
    "LSTM": [
        ("hidden 32, 6 steps, batch 32", Recurrent, (32, 6, 8)),
        ("hidden 64, 16 steps, batch 64", lambda: Recurrent(64), (64, 16, 8)),
        ("hidden 128, 32 steps, batch 64", lambda: Recurrent(128), (64, 32, 8)),
    ],
}


def problem(name: str, seed: int = 0, size: int = 0):
    torch.manual_seed(seed)
    make, shape = MODELS[name] if size == 0 else SIZES[name][size][1:]
    model = make()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    model.eval()
    g = torch.Generator().manual_seed(seed + 1)
    return model, [(torch.randn(*shape, generator=g), torch.randint(0, 5, (shape[0],), generator=g))]


def relative(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def worst_relative(a: Tensor, b: Tensor) -> float:
    return float(((a.double() - b.double()).abs() / b.double().abs()).max())


def quiet_operator(*args, **kwargs) -> lh.HessianOperator:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lh.HessianOperator(*args, **kwargs)


def quietly(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def accuracy(name: str, dtype: torch.dtype) -> list:
    model, data = problem(name)
    ops = {
        m: quiet_operator(model, cross_entropy, data, dtype=dtype, hvp=m)
        for m in (REVERSE, FINITE_DIFFERENCE, RICHARDSON)
    }
    n = ops[REVERSE].shape[0]
    g = torch.Generator().manual_seed(0)
    vectors = [torch.randn(n, generator=g, dtype=torch.float64).to(dtype) for _ in range(5)]
    single = {m: [] for m in (FINITE_DIFFERENCE, RICHARDSON)}
    for v in vectors:
        exact = ops[REVERSE] @ v
        for m in single:
            single[m].append(relative(quietly(ops[m].__matmul__, v), exact))
    top = {m: quietly(lh.eigenvalues, ops[m], 5, tol=TOL[dtype]).values for m in (REVERSE, FINITE_DIFFERENCE)}
    traces = {m: quietly(lh.trace, ops[m], "hutch++", 60).value for m in (REVERSE, FINITE_DIFFERENCE)}
    product_target, eigen_target = TARGETS[dtype]
    fd, rich = single[FINITE_DIFFERENCE], single[RICHARDSON]
    eigen = worst_relative(top[FINITE_DIFFERENCE], top[REVERSE])
    trace_error = abs(traces[FINITE_DIFFERENCE] - traces[REVERSE]) / abs(traces[REVERSE])
    selection._MEMORY.clear()
    auto = quiet_operator(model, cross_entropy, data, dtype=dtype)
    quietly(auto.__matmul__, vectors[0])
    verdict = auto.choice.referee.get(auto.choice.vector, "").split(" ")[0]
    mark = lambda value, target: f"{value:.1e}" + ("" if value <= target else " ✗")  # noqa: E731
    return [
        name,
        str(dtype).removeprefix("torch."),
        n,
        f"{mark(statistics.median(fd), product_target)} / {max(fd):.1e}",
        f"{statistics.median(rich):.1e} / {max(rich):.1e}",
        mark(eigen, eigen_target),
        f"{trace_error:.1e}",
        f"{auto.choice.vector.split('-')[0]} ({verdict})",
    ]


def cost(model: nn.Module, data, repeats: int, methods=(FINITE_DIFFERENCE, RICHARDSON, REVERSE)) -> dict:
    """Products of each method in plain gradients, as an analysis runs them (its closure held: the
    module's state saved once, not per product); central differences also for a block of 4 vectors
    in one ``op @ V`` (per product; the shared Krylov space multiplies blocks) and as one standalone
    ``op @ v`` (which saves and restores the module's state itself).

    Each timing of a product sits between two timings of the gradient, and its ratio is taken to
    their mean, so that both see the same state of this shared machine (whose speed drifts by 10-20%
    within a minute); every timing repeats its call to last at least 20 ms. The ratios are the
    medians over ``repeats``; ``"gradient"`` is the median seconds of one gradient.
    """
    batch = data[0]
    params = [p for p in model.parameters() if p.requires_grad]
    ops = {m: quiet_operator(model, cross_entropy, data, hvp=m) for m in methods}
    standalone = quiet_operator(model, cross_entropy, data, hvp=FINITE_DIFFERENCE)
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(standalone.shape[0], generator=generator)
    block = torch.randn(standalone.shape[0], BLOCK, generator=generator)

    def gradient() -> None:
        torch.autograd.grad(cross_entropy(model, batch), params)

    calls = {m: (lambda op=op: op @ v) for m, op in ops.items()}
    calls["block"] = lambda: ops[FINITE_DIFFERENCE] @ block
    calls["standalone"] = lambda: standalone @ v
    for call in (gradient, *calls.values()):  # warm up: graphs, first-product checks
        quietly(call)
    start = time.perf_counter()
    gradient()
    calls_per_timing = max(1, round(0.02 / (time.perf_counter() - start)))

    def timed(call) -> float:
        start = time.perf_counter()
        for _ in range(calls_per_timing):
            call()
        return (time.perf_counter() - start) / calls_per_timing

    ratios: dict[str, list[float]] = {k: [] for k in calls}
    gradients: list[float] = []
    with contextlib.ExitStack() as held:
        for op in ops.values():
            held.enter_context(op.closure.held())
        for _ in range(repeats):
            for key, call in calls.items():
                before, seconds, after = timed(gradient), timed(call), timed(gradient)
                ratios[key].append(seconds / ((before + after) / 2))
                gradients += [before, after]
    result = {k: statistics.median(r) for k, r in ratios.items()}
    result["block"] /= BLOCK
    result["gradient"] = statistics.median(gradients)
    return result


def fixed_work(result: dict, key: str) -> str:
    """What a central product costs beyond its two gradients, in microseconds."""
    return f"{(result[key] - 2) * result['gradient'] * 1e6:.0f}"


def analyze_pair(module: nn.Module, eager: nn.Module, loss_fn, data) -> list:
    settings = {"top_k": 5, "min_eigenvalue": False, "density": False, "method": "iterative", "tol": 1e-5}
    settings |= {"trace_method": "hutch++", "trace_matvecs": 60}
    selection._MEMORY.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        report = lh.analyze(module, loss_fn, data, **settings)
        seconds = time.perf_counter() - start
    fallbacks = [w for w in caught if "No exact" in str(w.message)]
    start = time.perf_counter()
    expected = quietly(lh.analyze, eager, loss_fn, data, **settings)
    eager_seconds = time.perf_counter() - start
    got, want = report.blocks["model"], expected.blocks["model"]
    return [
        got.hvp,
        len(fallbacks),
        f"{worst_relative(got.eigenvalues.values, want.eigenvalues.values):.1e}",
        f"{abs(got.trace.value - want.trace.value) / abs(want.trace.value):.1e}",
        f"{seconds:.1f} s / {eager_seconds:.1f} s ({want.hvp})",
    ]


def compiled_rows() -> list[list]:
    rows = []
    for label, name, loss_fn in (
        ("tanh MLP, MSE loss", "tanh MLP", mse),
        ("CNN, BatchNorm eval, SiLU, cross-entropy", "CNN, BatchNorm eval, SiLU", cross_entropy),
    ):
        eager, data = problem(name)
        compiled = torch.compile(eager)
        start = time.perf_counter()
        with torch.no_grad():
            compiled(data[0][0])  # the compilation itself, not counted in analyze's time
        compile_seconds = time.perf_counter() - start
        rows.append(
            [
                f"`torch.compile` {label}",
                *analyze_pair(compiled, eager, loss_fn, data),
                f"{compile_seconds:.0f} s",
            ]
        )
    return rows


class _ProductsOf:
    """An operator of one method's raw kernel products (no referee): what that method alone reports."""

    def __init__(self, op: lh.HessianOperator, method: str) -> None:
        self.op, self.method = op, method
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device

    def __matmul__(self, other: Tensor) -> Tensor:
        rows = other.reshape(self.shape[0], -1).T.contiguous()
        out = torch.cat([self.op._kernels.products(r[None], self.method, False) for r in rows]).T
        return out.reshape(other.shape)


def once_differentiable_rows() -> list[list]:
    torch.manual_seed(0)
    fused = tanh_mlp(FusedTanh)
    torch.manual_seed(0)
    plain = tanh_mlp()
    data = problem("tanh MLP")[1]
    rows = []
    for dtype in (torch.float32, torch.float64):
        truth = lh.eigenvalues(
            quiet_operator(plain, cross_entropy, data, dtype=dtype), 5, tol=TOL[dtype]
        ).values
        raw = _ProductsOf(quiet_operator(fused, cross_entropy, data, dtype=dtype, hvp=REVERSE), REVERSE)
        alone = quietly(lh.eigenvalues, raw, 5, tol=TOL[dtype]).values
        selection._MEMORY.clear()
        auto = quiet_operator(fused, cross_entropy, data, dtype=dtype)
        found = quietly(lh.eigenvalues, auto, 5, tol=TOL[dtype]).values
        top2 = lambda values: ", ".join(f"{x:.4f}" for x in values[:2].tolist())  # noqa: E731
        rows.append(
            [
                str(dtype).removeprefix("torch."),
                top2(truth),
                f"{top2(alone)} ({worst_relative(alone, truth):.1e} off)",
                f"{auto.choice.vector}: {top2(found)} ({worst_relative(found, truth):.1e} off)",
            ]
        )
    return rows


def print_cost_table(repeats: int) -> None:
    """The cost of a product by method, in plain gradients, on every smooth model and the mid-size CNN."""
    print(f"\nCost per product, in plain gradients (float32, median of {repeats}, between two gradients)")
    problems = [(name, *problem(name)) for name in MODELS if "ReLU" not in name]
    model, _, data = mid_cnn_problem()
    problems.append(("mid-size CNN (141,034 params, batch 64)", model, data))
    rows = []
    for name, model, data in problems:
        ratios = cost(model, data, repeats)
        keys = (FINITE_DIFFERENCE, "block", "standalone", RICHARDSON, REVERSE)
        rows.append(
            [
                name,
                f"{ratios['gradient'] * 1e3:.2f} ms",
                *(f"{ratios[k]:.2f}" for k in keys),
                f"{fixed_work(ratios, FINITE_DIFFERENCE)} / {fixed_work(ratios, 'block')}",
            ]
        )
    header = [
        "model",
        "gradient",
        "central (one vector, in an analysis)",
        f"central (a block of {BLOCK}, per product)",
        "central (standalone `op @ v`)",
        "Richardson",
        "reverse-over-reverse (exact)",
        "central beyond two gradients, µs (one vector / block)",
    ]
    print(markdown_table(header, rows))


def print_size_table(repeats: int) -> None:
    """The cost of central differences on each smooth model and two larger ones of its kind."""
    print(f"\nCentral differences by model size, in plain gradients (float32, median of {repeats})")
    rows = []
    for name, sizes in SIZES.items():
        for size, (label, _, _) in enumerate(sizes):
            model, data = problem(name, size=size)
            ratios = cost(model, data, repeats, methods=(FINITE_DIFFERENCE,))
            rows.append(
                [
                    f"{name}, {label}",
                    f"{sum(p.numel() for p in model.parameters()):,}",
                    f"{ratios['gradient'] * 1e3:.2f} ms",
                    f"{ratios[FINITE_DIFFERENCE]:.2f}",
                    f"{ratios['block']:.2f}",
                    f"{fixed_work(ratios, FINITE_DIFFERENCE)} / {fixed_work(ratios, 'block')}",
                ]
            )
    header = [
        "model",
        "N",
        "gradient",
        "central (one vector)",
        f"central (a block of {BLOCK}, per product)",
        "beyond two gradients, µs (one vector / block)",
    ]
    print(markdown_table(header, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--cost-only", action="store_true", help="only the cost tables")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    if args.cost_only:
        print_cost_table(args.repeats)
        print_size_table(args.repeats)
        return
    print("\nAccuracy of gradient differences vs the exact products of the same model and dtype")
    rows = [accuracy(name, dtype) for name in MODELS for dtype in (torch.float32, torch.float64)]
    print(
        markdown_table(
            [
                "model",
                "dtype",
                "N",
                "product, central (median / worst of 5)",
                "product, Richardson",
                "top-5 eigenvalues (worst)",
                "trace (Hutch++ 60)",
                "auto (referee)",
            ],
            rows,
        )
    )
    print("\n✗: above the target (products 1e-3 / 1e-7, top-5 eigenvalues 1e-3 / 1e-8 in float32 / float64)")
    print_cost_table(args.repeats)
    print_size_table(args.repeats)
    print(
        "\nA once-differentiable tanh (custom autograd.Function, backward @once_differentiable), top-2 of 5"
    )
    print(
        markdown_table(
            ["dtype", "truth (torch.tanh)", "reverse-over-reverse alone", "hvp='auto'"],
            once_differentiable_rows(),
        )
    )
    if not args.skip_compile:
        print("\nCompiled modules vs the eager module (top-5 eigenvalues and Hutch++ trace, float32)")
        header = [
            "module",
            "auto used",
            "fallback warnings",
            "top-5 (worst rel.)",
            "trace (rel.)",
            "analyze: compiled / eager",
            "compile",
        ]
        print(markdown_table(header, compiled_rows()))


if __name__ == "__main__":
    main()
