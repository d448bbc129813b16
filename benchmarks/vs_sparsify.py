"""saelab against EleutherAI's sparsify on transcoders, in one run (not a test): writes
benchmarks/results/vs_sparsify.json.

    python benchmarks/vs_sparsify.py [--tokens 409600] [--quick]

Task: a TopK transcoder of SmolLM2-135M's block-6 MLP (its input, after the norm, to its output: saelab's
blocks.6.ln2.hook_normalized -> blocks.6.hook_mlp_out, sparsify's ``layers.6.mlp`` with ``transcode=True``), k 32,
8 x 576 latents, batches of 4096 tokens (32 contexts of 128), --tokens of the first nine tenths of
../shared/data/wikitext2-valid.txt, each read once; each side's defaults otherwise (sparsify: its signum optimiser
and learning rate; saelab: Adam, the fitted start). Each side trains end to end from the model in its own
process (sparsify in .venv-sparsify, made by scripts/install_sparsify.sh, through benchmarks/sparsify_jobs.py):
tokens/s of its training (sparsify's ``fit()``; saelab's ``train()``, its model load included), both with the
model's forward pass,
peak RSS, and the FVU of the MLP output on the same held-out contexts (the last tenth, BOS left out), computed by
the same function (``sparsify_jobs.heldout_fvu``) on the Hugging Face model in each process.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
LAYER, K, EXPANSION, CONTEXT, BATCH = 6, 32, 8, 128, 4096


def saelab_job(job: dict) -> dict:
    import torch
    from transformers import AutoModel

    from saelab.training import TrainConfig, train
    from sparsify_jobs import heldout_fvu

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(model="smollm2-135m", dataset=job["train_text"], kind="transcoder",
                          hook=f"blocks.{LAYER}.ln2.hook_normalized", hook_out=f"blocks.{LAYER}.hook_mlp_out",
                          architecture="topk", k=K, expansion=EXPANSION, batch_size=BATCH, context_size=CONTEXT,
                          tokens=job["tokens"], eval_tokens=0, progress=False, out=out)
        summary = train(cfg, evaluate=False)[0]
    seconds = time.perf_counter() - start  # the model's load, the forward passes and the steps
    model = AutoModel.from_pretrained(job["model_dir"], torch_dtype=torch.float32)
    sae = summary.sae.eval()
    with torch.no_grad():
        fvu = heldout_fvu(model, sae, json.loads(Path(job["heldout"]).read_text()), LAYER)
    return {"tokens": summary.training["train_tokens"], "seconds": seconds, "fvu": fvu}


def run(command: list[str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{command[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=245_760,
                        help="training tokens (default: 60 batches, all that the nine tenths of the text give sparsify)")
    parser.add_argument("--update", action="store_true",
                        help="re-measure saelab only, at sparsify's token count, keeping sparsify's figures from --json")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: checks that everything runs")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "vs_sparsify.json"))
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        result = saelab_job(json.loads(Path(args.job).read_text()))
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(result), flush=True)
        return
    from vs_saelens import prepare_data

    tokens = 8_192 if args.quick else args.tokens
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare_data(work, heldout_contexts=8 if args.quick else 64)
        job = {"kind": "train", "tokens": tokens, "layer": LAYER, "k": K, "expansion": EXPANSION, "batch_size": BATCH,
               "context_size": CONTEXT, **data}
        (work / "job.json").write_text(json.dumps(job))
        if args.update:
            theirs = json.loads(Path(args.json).read_text())["sparsify"]
            job["tokens"] = tokens = theirs["tokens"]
            (work / "job.json").write_text(json.dumps(job))
        else:
            theirs = run([str(ROOT / ".venv-sparsify" / "bin" / "python"),
                          str(ROOT / "benchmarks" / "sparsify_jobs.py"), str(work / "job.json")])
        ours = run([sys.executable, __file__, "--job", str(work / "job.json")])
    report = {"task": {"model": "smollm2-135m", "layer": LAYER, "k": K, "d_sae": EXPANSION * 576, "batch": BATCH,
                       "context": CONTEXT, "tokens": tokens},
              "saelab": ours, "sparsify": theirs,
              "speedup": (ours["tokens"] / ours["seconds"]) / (theirs["tokens"] / theirs["seconds"]),
              "fvu_ratio": ours["fvu"] / theirs["fvu"]}
    for side in ("saelab", "sparsify"):
        report[side]["tokens_per_s"] = report[side]["tokens"] / report[side]["seconds"]
    print(json.dumps(report, indent=2))
    if not args.quick:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
