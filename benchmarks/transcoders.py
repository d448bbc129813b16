"""An SAE on an MLP's output against a transcoder and a skip transcoder of that MLP (not a test: figures for the
README), trained together in one run on one forward pass, at the same L0 and token budget.

    python benchmarks/transcoders.py [--layer 6] [--k 32] [--tokens 300000] [--out runs/transcoders]
                                     [--json benchmarks/results/transcoders.json]

Each dictionary predicts ``blocks.L.hook_mlp_out`` of SmolLM2-135M-Instruct: the SAE from that activation itself,
the transcoders from the MLP's input (``blocks.L.ln2.hook_normalized``). Reported per dictionary: FVU of the MLP
output and CE/KL recovered with its output spliced in place of the MLP's (held-out WikiText-2 tokens), its L0 and
dead latents, and the seconds its own training steps took (the forward pass is shared; the run's wall time is
reported once).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from saelab.training import TrainConfig, train

KINDS = ("sae", "transcoder", "skip_transcoder")
KEYS = ("fvu", "explained_variance", "l0", "ce_loss_score", "kl_score", "ce_with_sae", "ce_clean", "ce_zero_ablation",
        "dead_fraction")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=300_000)
    parser.add_argument("--dataset", default=str(Path(__file__).resolve().parents[2] / "shared/data/wikitext2-valid.txt"))
    parser.add_argument("--out", default="runs/transcoders")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    mlp_in, mlp_out = f"blocks.{args.layer}.ln2.hook_normalized", f"blocks.{args.layer}.hook_mlp_out"
    common = dict(model="smollm2-135m", dataset=args.dataset, architecture="topk", k=args.k, expansion=args.expansion,
                  tokens=args.tokens, batch_size=1024, context_size=128, eval_tokens=8192, seed=0)
    configs = [TrainConfig(**common, kind=kind, hook=mlp_out if kind == "sae" else mlp_in,
                           out=str(Path(args.out) / kind)) for kind in KINDS]
    start = time.perf_counter()
    summaries = train(configs, overwrite=True, root=args.out)
    wall = time.perf_counter() - start
    rows = {}
    for kind, summary in zip(KINDS, summaries):
        rows[kind] = {key: summary.metrics.get(key) for key in KEYS}
        rows[kind]["train_seconds"] = summary.training["train_seconds"]
        rows[kind]["reads"] = summary.sae.cfg.metadata["hook_name"]
    result = {"model": "smollm2-135m", "layer": args.layer, "k": args.k, "expansion": args.expansion,
              "tokens": args.tokens, "dataset": args.dataset, "wall_seconds": round(wall, 1), "dictionaries": rows}
    print("| dictionary | reads | FVU of mlp_out | CE recovered | KL score | L0 | dead | its steps (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, row in rows.items():
        print(f"| {kind} | `{row['reads']}` | {row['fvu']:.3f} | {row['ce_loss_score']:.3f} | {row['kl_score']:.3f} | "
              f"{row['l0']:.1f} | {row['dead_fraction']:.3f} | {row['train_seconds']:.0f} |")
    print(f"one run, one forward pass for all three: {wall:.0f} s wall")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
