"""One monitoring evaluation of a ~10M-parameter transformer: peak memory against its formula, and time.

A small decoder-only language model (token and position embeddings, pre-norm transformer encoder layers
with a causal mask, a linear head; about 10M parameters) on random token batches. One shared-Krylov
evaluation at the callback's monitoring defaults (``krylov="shared"``, ``tol=1e-3``, 4 probes, at most
32 block steps, 16 trace probes) runs in a fresh process, which reports:

- products and wall time, and the time in products (seconds / seconds of one bare product);
- its peak RSS above the RSS before the evaluation, against the stated memory formula of
  ``lightning_hessian.shared_space.check_basis_fits``: ``shared_space.peak_bytes`` for the Krylov
  basis and the vectors around it, plus the operator's cached first-order graphs (measured by the
  operator) and the workspace of the widest batched product (columns x (one graph's saved tensors +
  4 N-vectors); the widest product is one block: the trace probes go in chunks of the block).

Run::

    python benchmarks/large_model.py                 # 2 threads
    python benchmarks/large_model.py --threads 1 --layers 4
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from common import GB, machine_line, markdown_table, run_isolated
from torch import nn

import lightning_hessian as lh
from lightning_hessian.analysis import analyze_with
from lightning_hessian.memory import available_memory
from lightning_hessian.settings import AnalysisSettings
from lightning_hessian.shared_space import BASIS_MEMORY_SHARE, basis_capacity, peak_bytes

MONITORING = {"krylov": "shared", "tol": 1e-3, "density_probes": 4, "density_steps": 32, "trace_matvecs": 16}


class TinyLM(nn.Module):
    """Embeddings, ``layers`` pre-norm causal transformer layers, a linear head."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        x = self.tokens(tokens) + self.positions(torch.arange(length, device=tokens.device))
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        return self.head(self.layers(x, mask=mask, is_causal=True))


def lm_loss(module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy."""
    logits = module(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def build(args: dict) -> tuple:
    torch.manual_seed(0)
    model = TinyLM(args["vocab"], args["width"], args["layers"], args["heads"], args["context"]).eval()
    generator = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, args["vocab"], (args["batch"], args["context"]), generator=generator)
        for _ in range(args["batches"])
    ]
    return model, batches


def evaluate(model: nn.Module, batches: list) -> dict:
    warnings.simplefilter("ignore")
    free = available_memory("cpu")
    marks: list[tuple[float, int]] = []
    start = time.perf_counter()
    report = analyze_with(
        model,
        lm_loss,
        batches,
        AnalysisSettings(**MONITORING),
        progress=lambda done, planned: marks.append((time.perf_counter() - start, done)),
    )
    block = report.blocks["model"]
    return {
        "free_bytes": free,
        "first_products": marks[0],
        "last_products": marks[-1],
        "num_matvecs": report.num_matvecs,
        "eigenvalues": block.eigenvalues.values.tolist(),
        "converged": block.eigenvalues.converged.tolist() + block.min_eigenvalue.converged.tolist(),
        "trace": (block.trace.value, block.trace.stderr),
    }


def bare_product(model: nn.Module, batches: list) -> dict:
    op = lh.HessianOperator(model, lm_loss, batches)
    vector = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(2))
    op @ vector  # the method choice
    chunk = op.chunk_columns()
    start = time.perf_counter()
    for _ in range(3):
        op @ vector
    graph_bytes = op._graphs.first_graph_bytes * len(batches)  # noqa: SLF001 - a measurement, not an API
    seconds = (time.perf_counter() - start) / 3
    return {"seconds": seconds, "graph_bytes": graph_bytes, "n": op.shape[0], "chunk": chunk}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=65)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=1)
    args = vars(parser.parse_args())
    print(machine_line())
    product = run_isolated(bare_product, args, setup=build, threads=args["threads"])
    if product.error:
        raise SystemExit(product.error)
    n, graph_bytes, product_seconds = (
        product.result["n"],
        product.result["graph_bytes"],
        product.result["seconds"],
    )
    evaluation = run_isolated(evaluate, args, setup=build, threads=args["threads"])
    if evaluation.error:
        raise SystemExit(evaluation.error)
    block = MONITORING["density_probes"]
    free = evaluation.result["free_bytes"]
    capacity = basis_capacity(
        n, block, MONITORING["density_steps"], torch.float32, int(BASIS_MEMORY_SHARE * free)
    )
    basis = peak_bytes(n, capacity, block, 0, torch.float32)
    columns = min(block, product.result["chunk"])  # most columns multiplied at once
    workspace = columns * (graph_bytes // args["batches"] + 4 * 4 * n)
    formula = basis + graph_bytes + workspace
    (first_seconds, first_done), (last_seconds, last_done) = (
        evaluation.result["first_products"],
        evaluation.result["last_products"],
    )
    rows = [
        ["parameters N", f"{n:,}"],
        ["products per evaluation", evaluation.result["num_matvecs"]],
        ["evaluation wall s", f"{evaluation.seconds:.1f}"],
        ["one bare product s", f"{product_seconds:.2f}"],
        ["evaluation in products (wall / product)", f"{evaluation.seconds / product_seconds:.1f}"],
        ["time to the first product (build, loss, method choice)", f"{first_seconds:.1f} s ({first_done})"],
        [
            "seconds per product after it",
            f"{(last_seconds - first_seconds) / max(1, last_done - first_done):.2f}",
        ],
        ["basis capacity (columns)", capacity],
        ["formula: basis + extra vectors GB", f"{basis / GB:.2f}"],
        ["formula: + cached graphs + batched-product workspace GB", f"{formula / GB:.2f}"],
        ["measured peak RSS above start GB", f"{evaluation.peak_increment_bytes / GB:.2f}"],
        [
            "top eigenvalues (converged)",
            f"{[round(v, 4) for v in evaluation.result['eigenvalues']]} "
            f"({all(evaluation.result['converged'])})",
        ],
        ["trace ± stderr", "{:.4g} ± {:.2g}".format(*evaluation.result["trace"])],
    ]
    print(markdown_table(["measure", "value"], rows))


if __name__ == "__main__":
    main()
