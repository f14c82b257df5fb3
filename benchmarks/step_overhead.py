"""The engine's local step against the bare loop's, alternated step by step in one 1-thread process.

A probe for issue 19 (``w2-1thread``): round times on this machine drift by +-10% between
the benchmark's 5-minute blocks, more than the 3% the target allows, so this compares the two
step paths where drift cancels: one engine step (:class:`~fedguard.algorithms.local_sgd.LocalSGD`'s
body: ``functional_call`` loss, ``torch.autograd.grad``, the SGD-momentum rule) and one bare step
(:func:`bare_loop.train_client`'s body: module forward, ``F.cross_entropy``, ``backward``,
``torch.optim.SGD``) on the same batch, in alternating order, each timed in thread CPU time
(time stolen by other processes or the hypervisor does not count). Reports the median paired
difference with an approximate 95% interval of the median (order statistics).

    python benchmarks/step_overhead.py --data-dir DATA [--workload w2] [--batch 32] [--pairs 400]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--workload", default="w2")
    parser.add_argument("--batch", type=int, default=0, help="examples per step (0: the workload's batch size)")
    parser.add_argument("--pairs", type=int, default=400)
    args = parser.parse_args()
    print(json.dumps(measure(args.workload, args.data_dir, args.batch, args.pairs)))


def measure(
    workload: str, data_dir: str, batch: int, pairs: int, extra: dict[str, object] | None = None
) -> dict[str, object]:
    """Median paired CPU milliseconds of an engine step minus a bare step, on client 0's examples.

    Both paths start from the same parameters and take the same batches in the same order, so
    ``same_parameters`` (bitwise equal at the end) checks that they computed the same training."""
    from bare_loop import warm_up
    from bench_core import overrides

    from fedguard import Config, Experiment
    from fedguard.algorithms.local_sgd import mean_loss_gradient
    from fedguard.algorithms.update_rules import SGDRule

    torch.set_num_threads(1)
    settings = {"run.workers": "1", "run.threads": 1, **(extra or {})}
    exp = Experiment(Config.load(None, overrides(workload, data_dir, settings)))
    setup = exp.assemble()
    t, task, trainer, model = exp.config.train, setup.task, setup.trainer, setup.model
    warm_up()
    data = setup.client_data(0)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randperm(len(data), generator=gen)[: batch or t.batch_size] for _ in range(64)]
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    current = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    tensors = list(current.values())
    step = SGDRule(t.momentum).begin(tensors, t.lr)
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum)

    def engine(idx: torch.Tensor) -> None:
        grads, _ = mean_loss_gradient(lambda p, b: task.loss(model, p, b), current, (data.x[idx], data.y[idx]), gen)
        with torch.no_grad():
            step(trainer._regularise(grads, tensors, start))

    def bare(idx: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(data.x[idx]), data.y[idx]).backward()
        opt.step()

    for i in range(20):
        engine(batches[i % 64])
        bare(batches[i % 64])
    eng, bar = [], []
    for i in range(pairs):
        first, second = (engine, bare) if i % 2 == 0 else (bare, engine)
        a = time.thread_time_ns()
        first(batches[i % 64])
        b = time.thread_time_ns()
        second(batches[i % 64])
        c = time.thread_time_ns()
        e, r = (b - a, c - b) if first is engine else (c - b, b - a)
        eng.append(e / 1e6)
        bar.append(r / 1e6)
    with torch.no_grad():
        same = all(torch.equal(current[k], v) for k, v in model.named_parameters())
    diff = sorted(e - r for e, r in zip(eng, bar, strict=True))
    k = int(0.98 * len(diff) ** 0.5)
    mid = len(diff) // 2
    return {
        "workload": workload,
        "batch": batch or t.batch_size,
        "pairs": pairs,
        "engine_step_ms": round(statistics.median(eng), 3),
        "bare_step_ms": round(statistics.median(bar), 3),
        "diff_ms": round(statistics.median(diff), 3),
        "diff_ms_ci95": [round(diff[max(mid - k, 0)], 3), round(diff[min(mid + k, len(diff) - 1)], 3)],
        "ratio": round(statistics.median(e / r for e, r in zip(eng, bar, strict=True)), 4),
        "same_parameters": same,
    }


if __name__ == "__main__":
    main()
