"""A crosscoder against separate SAEs, and a cross-layer transcoder against per-block transcoders, each pair trained
together in one run on one forward pass of SmolLM2-135M-Instruct (not a test: figures for the README).

    python benchmarks/crosscoders_and_clts.py crosscoder [--tokens 300000] [--out runs/crosscoder]
    python benchmarks/crosscoders_and_clts.py clt [--tokens 300000] [--out runs/clt]
        [--json benchmarks/results/crosscoder.json]

crosscoder: the residual stream after blocks 3, 6 and 9; three TopK SAEs (k 32, 4608 latents each) against one
TopK crosscoder with as many latents in all (13,824) and as many active in all (k 96).
clt: blocks 0-5, each MLP's input to its output; six TopK transcoders (k 32, 1152 latents each: 2x) against one
TopK cross-layer transcoder with as many latents per block (6 x 1152) and as many active in all (k 192).
Reported per hook: FVU and CE/KL recovered with that hook replaced (held-out WikiText-2), and for the crosscoder
and CLT with all replaced at once; the seconds each dictionary's own steps took.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from saelab.training import TrainConfig, train

DATASET = str(Path(__file__).resolve().parents[2] / "shared/data/wikitext2-valid.txt")
COMMON = dict(model="smollm2-135m", dataset=DATASET, architecture="topk", batch_size=1024, context_size=128,
              eval_tokens=8192, seed=0)


def crosscoder_configs(out: Path, tokens: int) -> tuple[list[TrainConfig], list[str]]:
    hooks = [f"blocks.{block}.hook_resid_post" for block in (3, 6, 9)]
    separate = [TrainConfig(**COMMON, tokens=tokens, hook=hook, k=32, d_sae=4608, out=str(out / hook)) for hook in hooks]
    joint = TrainConfig(**COMMON, tokens=tokens, kind="crosscoder", hook="+".join(hooks), k=96, d_sae=3 * 4608,
                        out=str(out / "crosscoder"))
    return [*separate, joint], hooks


def clt_configs(out: Path, tokens: int) -> tuple[list[TrainConfig], list[str]]:
    reads = [f"blocks.{block}.ln2.hook_normalized" for block in range(6)]
    separate = [TrainConfig(**COMMON, tokens=tokens, kind="transcoder", hook=hook, k=32, d_sae=1152,
                            out=str(out / hook)) for hook in reads]
    joint = TrainConfig(**COMMON, tokens=tokens, kind="clt", hook="+".join(reads), k=192, d_sae=6 * 1152,
                        out=str(out / "clt"))
    # 12 hooks of 576 side by side: a buffer of 131,072 rows holds 3.6 GB (the default 524,288 would hold 14.5)
    separate, joint = [replace(c, buffer_tokens=131_072) for c in separate], replace(joint, buffer_tokens=131_072)
    return [*separate, joint], [f"blocks.{block}.hook_mlp_out" for block in range(6)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=("crosscoder", "clt"))
    parser.add_argument("--tokens", type=int, default=300_000)
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    out = Path(args.out or f"runs/{args.which}")
    configs, written = (crosscoder_configs if args.which == "crosscoder" else clt_configs)(out, args.tokens)
    start = time.perf_counter()
    summaries = train(configs, overwrite=True, root=str(out))
    wall = time.perf_counter() - start
    *separate, joint = summaries
    keys = ("fvu", "ce_loss_score", "kl_score", "l0")
    rows = {hook: {"separate": {key: s.metrics.get(key) for key in keys},
                   args.which: {key: joint.metrics["by_hook"][hook].get(key) for key in keys[:3]}}
            for hook, s in zip(written, separate)}
    result = {"which": args.which, "tokens": args.tokens, "wall_seconds": round(wall, 1), "by_hook": rows,
              "joint_all_replaced": {key: joint.metrics.get(key) for key in (*keys, "dead_fraction")},
              "joint_train_seconds": joint.training["train_seconds"],
              "separate_train_seconds": [s.training["train_seconds"] for s in separate],
              "separate_dead_fraction": [s.metrics.get("dead_fraction") for s in separate]}
    print(f"| hook | separate FVU | {args.which} FVU | separate CE recovered | {args.which} CE recovered |")
    print("|---|---|---|---|---|")
    for hook, row in rows.items():
        print(f"| `{hook}` | {row['separate']['fvu']:.3f} | {row[args.which]['fvu']:.3f} | "
              f"{row['separate']['ce_loss_score']:.3f} | {row[args.which]['ce_loss_score']:.3f} |")
    all_replaced = result["joint_all_replaced"]
    print(f"{args.which} with every hook replaced: FVU {all_replaced['fvu']:.3f}, CE recovered "
          f"{all_replaced['ce_loss_score']:.3f}, L0 {all_replaced['l0']:.1f}; its steps {result['joint_train_seconds']} s, "
          f"the separate dictionaries' {sum(result['separate_train_seconds']):.0f} s in all; {wall:.0f} s wall")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
