"""Data parallelism under torchrun: forward passes per rank and wall time with 1 and 2 processes (not a test).

    .venv/bin/python benchmarks/data_parallel.py [--tokens N] [--json benchmarks/results/data_parallel.json]

Trains the demo SAE (TopK k=32, 8x, SmolLM2-135M block 6, python-docs) as a user would, as whole
processes: `saelab train` on one process, then `torchrun --nproc_per_node 2 -m saelab train` with the same
options, every process on one CPU thread (OMP_NUM_THREADS=1), evaluation off. It reads each process's count
of forward batches from its log and times the processes. Then it measures, on one thread, the two rates a
training step is made of (the model's forward pass to the hook, and the SAE step on activations in memory)
and the time of one gradient all-reduce between the two processes, and projects the scaling to N processes:

    T(N) = T0 + D (f + s) / N + (D / B) c(N)

    T0    what does not split: loading the model, the first buffer's set-up, writing the SAE (measured as the
          one-process wall time minus its forward and SAE-step time);
    D     tokens trained on; B the global batch size;
    f, s  seconds per token of the forward pass and of the SAE step on one process (measured here);
    c(N)  one all-reduce of the gradients (2 d_in d_sae + d_sae + d_in floats) over N processes; a ring
          all-reduce moves 2 (N - 1) / N of them through each link: c(N) = 2 (N-1)/N * 4 P / bandwidth
          (+ latency), taken here from the measured c(2) and scaled by (N-1)/N * 2.

Assumptions: every process has the throughput measured for one (a GPU each, or a core each here); the text
is long enough that no process runs out before the others (each runs the model on every N-th forward batch);
tokenising, which every process does for the whole text, stays far cheaper than the model; the all-reduce
bandwidth does not fall with N (one node; across nodes use the slower link's figure). On this 2-core
machine the first assumption does not hold: two processes running the model at once share its memory
bandwidth, so the benchmark also measures the forward rate of two processes side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

OPTIONS = ["--model", "smollm2-135m", "--hook", "blocks.6.hook_resid_post", "--dataset", "python-docs",
           "--architecture", "topk", "--k", "32", "--expansion", "8", "--batch-size", "4096", "--eval-tokens", "0",
           "--no-progress", "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_training(processes: int, tokens: int, out: Path) -> dict:
    """One whole `saelab train` (under torchrun for 2+ processes); wall seconds and forward batches per rank."""
    launch = [sys.executable, "-m", "saelab"] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
         str(free_port()), "-m", "saelab"]
    command = [*launch, "train", *OPTIONS, "--tokens", str(tokens), "--out", str(out)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    counts = re.findall(r"saelab: (?:rank (\d+) of \d+: )?([\d,]+) forward batches run through the model", done.stderr)
    per_rank = {int(rank or 0): int(n.replace(",", "")) for rank, n in counts}
    return {"processes": processes, "wall_seconds": round(wall, 1),
            "forward_batches_per_rank": [per_rank[r] for r in sorted(per_rank)]}


def step_rates(tokens: int) -> dict:
    """Seconds per token of the forward pass to the hook and of the SAE step, on one thread."""
    from saelab.data import TensorSource
    from saelab.data.activations import text_activations
    from saelab.data.options import DataOptions
    from saelab.models import load_model, resolve_hook
    from saelab.training import TrainConfig, Trainer

    torch.set_num_threads(1)
    cfg = TrainConfig(**{"model": "smollm2-135m", "hook": "blocks.6.hook_resid_post", "dataset": "python-docs",
                         "k": 32, "expansion": 8, "batch_size": 4096, "progress": False, "device": "cpu"})
    model, tokenizer = load_model(cfg.model, "cpu")
    text = DataOptions(dataset=cfg.dataset)
    source = text_activations(model, tokenizer, resolve_hook(model, cfg.hook), text, max_contexts=64)
    start = time.perf_counter()
    rows = torch.cat(list(source.units(0)))
    forward = (time.perf_counter() - start) / len(rows)
    with tempfile.TemporaryDirectory() as tmp:
        steps = max(4, min(24, tokens // cfg.batch_size))
        bench = TrainConfig(**{**cfg.as_dict(), "tokens": steps * cfg.batch_size, "out": tmp,
                               "buffer_tokens": len(rows), "checkpoint_every_tokens": 10**12})
        trainer = Trainer(bench, TensorSource(rows), tmp)
        start = time.perf_counter()
        trainer.run()
        sae = (time.perf_counter() - start) / (steps * cfg.batch_size)
    d_in, d_sae = rows.shape[1], cfg.expansion * rows.shape[1]
    return {"forward_seconds_per_token": forward, "sae_step_seconds_per_token": sae,
            "gradient_floats": 2 * d_in * d_sae + d_sae + d_in}


def forward_rate() -> float:
    """Tokens/s of the forward pass to the hook on one thread (what ``--forward-rate`` prints)."""
    from saelab.data.activations import text_activations
    from saelab.data.options import DataOptions
    from saelab.models import load_model, resolve_hook

    torch.set_num_threads(1)
    model, tokenizer = load_model("smollm2-135m", "cpu")
    source = text_activations(model, tokenizer, resolve_hook(model, "blocks.6.hook_resid_post"),
                              DataOptions(dataset="python-docs"), max_contexts=64)
    start = time.perf_counter()
    rows = sum(len(unit) for unit in source.units(0))
    return rows / (time.perf_counter() - start)


def forward_rates_side_by_side(processes: int = 2) -> list[float]:
    """The forward rate of ``processes`` processes running at once: on one machine they share its memory
    bandwidth and caches, which the projection's first assumption leaves out."""
    command = [sys.executable, __file__, "--forward-rate"]
    running = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(processes)]
    return [round(float(p.communicate()[0].split()[-1]), 1) for p in running]


def _all_reduce_rank(rank: int, port: int, floats: int, result: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    grad = torch.randn(floats)
    dist.all_reduce(grad)  # warm-up
    start = time.perf_counter()
    for _ in range(5):
        dist.all_reduce(grad)
    if rank == 0:
        Path(result).write_text(json.dumps((time.perf_counter() - start) / 5))
    dist.destroy_process_group()


def all_reduce_seconds(floats: int) -> float:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        result = f"{tmp}/seconds.json"
        mp.spawn(_all_reduce_rank, args=(free_port(), floats, result), nprocs=2, join=True)
        return json.loads(Path(result).read_text())


def projection(runs: dict, rates: dict, c2: float, tokens: int, batch: int = 4096) -> list[dict]:
    f, s = rates["forward_seconds_per_token"], rates["sae_step_seconds_per_token"]
    t0 = max(0.0, runs[1]["wall_seconds"] - tokens * (f + s))
    table = []
    for n in (1, 2, 4, 8, 16):
        comm = 0.0 if n == 1 else c2 * 2 * (n - 1) / n  # c(2) moves 1/2 of the gradient per link
        t = t0 + tokens * (f + s) / n + tokens / batch * comm
        table.append({"processes": n, "projected_seconds": round(t, 1),
                      "speedup": round((t0 + tokens * (f + s)) / t, 2)})
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=65_536, help="tokens each run trains on")
    parser.add_argument("--json", default="benchmarks/results/data_parallel.json")
    parser.add_argument("--forward-rate", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.forward_rate:
        print(forward_rate())
        return
    with tempfile.TemporaryDirectory() as tmp:
        runs = {n: run_training(n, args.tokens, Path(tmp) / f"run{n}") for n in (1, 2)}
    for run in runs.values():
        print(f"{run['processes']} process(es): {run['wall_seconds']} s, forward batches per rank "
              f"{run['forward_batches_per_rank']}")
    rates = step_rates(args.tokens)
    c2 = all_reduce_seconds(rates["gradient_floats"])
    table = projection(runs, rates, c2, args.tokens)
    alone = round(1 / rates["forward_seconds_per_token"], 1)
    together = forward_rates_side_by_side(2)
    result = {"tokens": args.tokens, "options": OPTIONS, "runs": list(runs.values()), **rates,
              "forward_tokens_per_second_alone": alone, "forward_tokens_per_second_two_at_once": together,
              "all_reduce_seconds_2_processes": c2, "measured_speedup_2": round(runs[1]["wall_seconds"]
                                                                               / runs[2]["wall_seconds"], 2),
              "projection": table, "torch": torch.__version__}
    print(json.dumps(result, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
