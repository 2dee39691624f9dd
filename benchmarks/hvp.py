"""Cost of one Hessian-vector product against one gradient, per method, and what ``hvp="auto"`` picks.

For each model (the seed CNN and the mid-size CNN; ``--models`` adds the tanh MLP), in a fresh
process, side by side and interleaved (every repeat times every method once, in turn):

- ``gradient``: one forward + backward, ``torch.autograd.grad(loss_fn(model, batch), params)``;
- ``op @ v`` for ``HessianOperator(hvp=...)`` with ``"reverse-over-reverse"`` (first-order graph
  built once and cached), ``"forward-over-reverse"`` and ``"auto"``;
- ``op @ V`` for ``V`` of ``--columns`` columns (the batched forms: ``is_grads_batched`` /
  ``vmap``), per column; and a loop of single products ``op @ V[:, j]``, per column.

Times are medians over ``--repeats`` (the first call of each operator, which builds graphs and, for
``auto``, times the candidates, is not counted). Targets: one HVP (``auto``) at most 2.0x one
gradient on the mid-size CNN; ``auto`` within 10% of the best method on both models.

Run: ``python benchmarks/hvp.py`` (``--repeats 7 --columns 16 --threads 2 --models seed mid mlp``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    machine_line,
    markdown_table,
    median_of,
    mid_cnn_problem,
    num_parameters,
    run_isolated,
    seed_cnn_problem,
    tanh_mlp_problem,
)

REVERSE = "reverse-over-reverse"
FORWARD = "forward-over-reverse"
PROBLEMS = {
    "seed": ("seed CNN (23,365 params, batch 8)", seed_cnn_problem),
    "mid": ("mid-size CNN (141,034 params, batch 64, eval mode)", mid_cnn_problem),
    "mlp": ("tanh MLP 20-40-40-5 (2,685 params, 512 points)", tanh_mlp_problem),
}
SINGLE_TARGET = 2.0  # HVP / gradient on the mid-size CNN (issue "Affordable curvature")
AUTO_SLACK = 1.10  # auto within 10% of the best method


def measure(problem_key: str, repeats: int, columns: int, batched_repeats: int, seed: int = 0) -> dict:
    """In a child: medians of gradient, single and batched products; auto's choice."""
    import lightning_hessian as lh

    model, loss_fn, batches = PROBLEMS[problem_key][1]()
    batch = batches[0]
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    n = num_parameters(model)
    v = torch.randn(n, generator=generator)
    V = torch.randn(n, columns, generator=generator)

    def gradient():
        with torch.enable_grad():
            return torch.autograd.grad(loss_fn(model, batch), params)

    ops = {
        REVERSE: lh.HessianOperator(model, loss_fn, batches, hvp=REVERSE, chunk_size=columns),
        FORWARD: lh.HessianOperator(model, loss_fn, batches, hvp=FORWARD, chunk_size=columns),
        "auto": lh.HessianOperator(model, loss_fn, batches, hvp="auto", chunk_size=columns),
    }
    single = {"gradient": gradient, **{name: (lambda op=op: op @ v) for name, op in ops.items()}}
    batched = {name: (lambda op=op: op @ V) for name, op in ops.items()}
    for name in (REVERSE, FORWARD):  # the other way to multiply a matrix: one column at a time
        batched[f"{name} loop"] = lambda op=ops[name]: [op @ V[:, j] for j in range(columns)]

    for fn in (*single.values(), *batched.values()):
        fn()  # warm-up: graphs, vmap, and auto's own timing of the candidates
    times: dict[str, list[float]] = {name: [] for name in single}
    batch_times: dict[str, list[float]] = {name: [] for name in batched}
    for r in range(repeats):
        for name, fn in single.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        if r < batched_repeats:
            for name, fn in batched.items():
                start = time.perf_counter()
                fn()
                batch_times[name].append((time.perf_counter() - start) / columns)
    auto = ops["auto"]
    return {
        "n": n,
        "single": {k: median_of(t) for k, t in times.items()},
        "batched": {k: median_of(t) for k, t in batch_times.items()},
        "choice_vector": auto.choice.vector,
        "choice_matrix": auto.choice.matrix,
        "choice_seconds": dict(auto.choice.seconds),
        "failures": dict(auto.choice.failures),
    }


def report(key: str, r: dict, columns: int) -> tuple[list[str], list[list[str]], list[str]]:
    single, batched = r["single"], r["batched"]
    grad = single["gradient"]
    rows = [["gradient (forward + backward)", f"{1e3 * grad:.2f}", "1.00", "", ""]]
    for name in (REVERSE, FORWARD, "auto"):
        label = name if name != "auto" else f"auto (picks {r['choice_vector']} / {r['choice_matrix']})"
        if name == REVERSE:
            label += " (cached graph)"
        rows.append(
            [
                label,
                f"{1e3 * single[name]:.2f}",
                f"{single[name] / grad:.2f}",
                f"{1e3 * batched[name]:.2f}",
                f"{batched[name] / grad:.2f}",
            ]
        )
    for name in (REVERSE, FORWARD):
        loop = batched[f"{name} loop"]
        rows.append([f"{name}, loop of single products", "", "", f"{1e3 * loop:.2f}", f"{loop / grad:.2f}"])
    best_single = min(single[REVERSE], single[FORWARD])
    # A loop of single products is a legitimate way to multiply a matrix: count it as a candidate.
    best_batched = min(batched[k] for k in batched if k != "auto")
    notes = []
    auto_single = single["auto"] / best_single
    auto_batched = batched["auto"] / best_batched
    notes.append(
        f"auto vs best single-vector method: {auto_single:.2f}x "
        f"({'met' if auto_single <= AUTO_SLACK else 'NOT met'}, target <= {AUTO_SLACK:.2f}x)"
    )
    notes.append(
        f"auto vs best way to multiply {columns} columns (batched or loop): {auto_batched:.2f}x "
        f"({'met' if auto_batched <= AUTO_SLACK else 'NOT met'}, target <= {AUTO_SLACK:.2f}x)"
    )
    if key == "mid":
        ratio = single["auto"] / grad
        notes.append(
            f"HVP (auto) / gradient: {ratio:.2f} "
            f"({'met' if ratio <= SINGLE_TARGET else 'NOT met'}, target <= {SINGLE_TARGET})"
        )
    if r["failures"]:
        notes.append(f"auto's failures: {r['failures']}")
    header = ["", "one product ms", "x gradient", f"per column of {columns} ms", "x gradient"]
    return header, rows, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["seed", "mid"], choices=list(PROBLEMS))
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats of single products")
    parser.add_argument("--batched-repeats", type=int, default=3, help="timed repeats of op @ V")
    parser.add_argument("--columns", type=int, default=16, help="columns of V for batched products")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each child")
    args = parser.parse_args()
    print(f"# {machine_line()}")
    print(f"# medians of {args.repeats} (single) / {args.batched_repeats} (batched) interleaved repeats")
    for key in args.models:
        m = run_isolated(
            measure,
            key,
            args.repeats,
            args.columns,
            min(args.batched_repeats, args.repeats),
            threads=args.threads,
        )
        print(f"\n## {PROBLEMS[key][0]}\n")
        if m.error:
            print(m.error)
            continue
        header, rows, notes = report(key, m.result, args.columns)
        print(markdown_table(header, rows))
        print()
        for note in notes:
            print(f"- {note}")
        print(
            "- auto's own timings (per product): "
            + ", ".join(f"{k}: {1e3 * s:.2f} ms" for k, s in m.result["choice_seconds"].items())
        )


if __name__ == "__main__":
    main()
