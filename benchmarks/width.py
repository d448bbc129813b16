"""The SAE training step at growing widths, saelab against SAELens 6.54's own trainer, on the same cached
activations (not a test: figures for the README and docs/width_scaling.png).

    python benchmarks/width.py [--cache runs/cache-wt] [--architectures topk,batchtopk,jumprelu,standard]
                               [--expansions 8,32,128] [--batch-size 4096] [--json benchmarks/results/width.json]
    python benchmarks/width.py --quick        # tiny budgets: checks that everything runs
    python benchmarks/width.py --update --architectures jumprelu --expansions 128   # saelab again, SAELens kept

The cache is a `saelab cache` folder (made when missing: SmolLM2-135M, blocks.6.hook_resid_post, 204,800 tokens of
../shared/data/wikitext2-valid.txt). Both sides hold its rows in memory and draw shuffled batches of --batch-size
(saelab reads the cache as `saelab train --activations` does, through memory maps into its shuffling buffer;
SAELens's job loads the .npy shards with numpy);
each point runs in its own process (saelab in this interpreter, SAELens in .venv-saelens through
benchmarks/saelens_jobs.py, job "step"), so that its peak RSS is its own. Each trains with its defaults for that
architecture (saelab: fitted start, sparse paths chosen by density; SAELens: its TrainingSAE configs) from the
start, and the steps after --warmup are timed: early steps, where a thresholded SAE's codes are densest.

The physical limit of a point: this machine's measured fp32 matmul rate at the encoder's shape divided by the
FLOPs a step cannot avoid, the dense encoder product (2 d_in d_sae per token) and four sparse products over the
L0 = 32 active latents (decode, its two gradients, the encoder's gradient: 8 d_in L0).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SAELENS_PYTHON = ROOT / ".venv-saelens" / "bin" / "python"
# The sparsity settings, under the same names on both sides (each side's defaults otherwise).
SPARSITY = {"topk": {"k": 32}, "batchtopk": {"k": 32}, "jumprelu": {"target_l0": 32}, "standard": {}, "gated": {}}


def saelab_point(args) -> dict:
    """One saelab point, in this process: a Trainer on the cache as ``saelab train --activations`` reads it (the
    whole cache in its shuffling buffer), ``--warmup`` steps, then timed steps."""
    from saelab.data.cache import ActivationCache
    from saelab.training import TrainConfig, Trainer

    cache = ActivationCache(args.cache)
    source = cache.source(cache.only_hook())
    steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(architecture=args.architecture, expansion=args.expansion, batch_size=args.batch_size,
                          tokens=args.batch_size * steps, buffer_tokens=source.rows(), out=tmp, progress=False,
                          checkpoint_every_tokens=10**12, eval_tokens=0, **SPARSITY[args.architecture])
        trainer = Trainer(cfg, source, tmp)
        trainer.open()
        for _ in range(args.warmup):
            trainer.advance()
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.advance()
        seconds = time.perf_counter() - start
        trainer.close()
    return {"tokens_per_s": args.batch_size * args.steps / seconds, "steps": args.steps}


def run_point(tool: str, architecture: str, expansion: int, d_in: int, args) -> dict:
    steps = max(2, round(args.steps * 8 / expansion)) if not args.quick else 1
    if tool == "saelab":
        command = [sys.executable, __file__, "--point", architecture, str(expansion), "--cache", args.cache,
                   "--batch-size", str(args.batch_size), "--warmup", str(args.warmup), "--steps", str(steps)]
    else:
        job = {"kind": "step", "cache": args.cache, "architecture": architecture, "d_sae": expansion * d_in,
               "batch_size": args.batch_size, "warmup": args.warmup, "steps": steps,
               "settings": SPARSITY[architecture]}
        job_file = Path(tempfile.mkstemp(suffix=".json")[1])
        job_file.write_text(json.dumps(job))
        command = [str(SAELENS_PYTHON), str(ROOT / "benchmarks" / "saelens_jobs.py"), str(job_file)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{tool} {architecture} {expansion}x failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def matmul_rate(d_in: int, d_sae: int, batch: int) -> float:
    """fp32 FLOP/s of the encoder's product on this machine (best of three)."""
    a, b = torch.randn(batch, d_in), torch.randn(d_in, d_sae)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * batch * d_in * d_sae / best


def plot(figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = dict(zip(figures["architectures"], plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for architecture in figures["architectures"]:
        points = [p for p in figures["points"] if p["architecture"] == architecture]
        widths = [p["d_sae"] for p in points]
        colour = colours[architecture]
        ax.plot(widths, [p["saelab_tokens_per_s"] for p in points], "o-", color=colour, label=f"saelab {architecture}")
        ax.plot(widths, [p["saelens_tokens_per_s"] for p in points], "s--", color=colour, alpha=0.6,
                label=f"SAELens {architecture}")
    limits = sorted({(p["d_sae"], p["limit_tokens_per_s"]) for p in figures["points"]})
    ax.plot(*zip(*limits), "k:", label="physical limit (matmul rate / FLOPs)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("latents (d_sae)")
    ax.set_ylabel("training tokens / s (SAE step, from a cache)")
    ax.set_title(f"SAE step speed against width, batch {figures['batch_size']}, {figures['threads']} CPU threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(ROOT / "runs" / "cache-wt"))
    parser.add_argument("--architectures", default="topk,batchtopk,jumprelu,standard")
    parser.add_argument("--expansions", default="8,32,128")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="timed steps at 8x (fewer at wider: x 8 / expansion)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--update", action="store_true",
                        help="re-measure saelab only at these points, keeping SAELens's figures from --json")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "width.json"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "width_scaling.png"))
    parser.add_argument("--point", nargs=2, metavar=("ARCHITECTURE", "EXPANSION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        args.architecture, args.expansion = args.point[0], int(args.point[1])
        result = saelab_point(args)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.quick:
        args.expansions, args.batch_size, args.warmup = "2", 256, 1
    cache = Path(args.cache)
    if not (cache / "metadata.json").exists():
        subprocess.run([sys.executable, "-m", "saelab", "cache", "--dataset",
                        str(ROOT.parent / "shared" / "data" / "wikitext2-valid.txt"), "--hooks",
                        "blocks.6.hook_resid_post", "--tokens", "204800", "--out", str(cache)], check=True)
    d_in = json.loads((cache / "metadata.json").read_text())["hooks"]["blocks.6.hook_resid_post"]["d_in"]
    architectures = args.architectures.split(",")
    figures = {"threads": torch.get_num_threads(), "torch": torch.__version__, "d_in": d_in, "cache": str(cache),
               "batch_size": args.batch_size, "architectures": architectures, "points": []}
    earlier = {}
    if args.update:  # saelab re-measured at these points; SAELens's figures (and the other points) kept
        figures = json.loads(Path(args.json).read_text())
        earlier = {(p["architecture"], p["expansion"]): p for p in figures["points"]}
        figures["points"] = [p for p in figures["points"]
                             if (p["architecture"], p["expansion"]) not in
                             {(a, e) for a in architectures for e in map(int, args.expansions.split(","))}]
    for expansion in map(int, args.expansions.split(",")):
        d_sae = expansion * d_in
        rate = matmul_rate(d_in, d_sae, args.batch_size)
        for architecture in architectures:
            ours = run_point("saelab", architecture, expansion, d_in, args)
            if (architecture, expansion) in earlier:
                kept = earlier[architecture, expansion]
                theirs = {"tokens_per_s": kept["saelens_tokens_per_s"], "peak_rss_mib": kept["saelens_peak_rss_mib"]}
            else:
                theirs = run_point("saelens", architecture, expansion, d_in, args)
            point = {"architecture": architecture, "expansion": expansion, "d_sae": d_sae,
                     "saelab_tokens_per_s": round(ours["tokens_per_s"]),
                     "saelens_tokens_per_s": round(theirs["tokens_per_s"]),
                     "speedup": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2),
                     "saelab_peak_rss_mib": round(ours["peak_rss_mib"]),
                     "saelens_peak_rss_mib": round(theirs["peak_rss_mib"]),
                     "memory_ratio": round(ours["peak_rss_mib"] / theirs["peak_rss_mib"], 2),
                     "matmul_gflops": round(rate / 1e9, 1),
                     "limit_tokens_per_s": round(rate / (2 * d_in * d_sae + 8 * d_in * 32))}
            print(json.dumps(point), flush=True)
            figures["points"].append(point)
    order = {(a, e): i for i, (a, e) in enumerate((a, e) for e in (8, 32, 128) for a in figures["architectures"])}
    figures["points"].sort(key=lambda p: order.get((p["architecture"], p["expansion"]), len(order)))
    if not args.quick:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
        plot(figures, Path(args.plot))


if __name__ == "__main__":
    main()
