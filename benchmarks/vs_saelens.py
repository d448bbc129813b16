"""saelab against SAELens 6.54 on the same machine, in one run: prints ratios and writes
benchmarks/results/vs_saelens.json. Not a test.

    python benchmarks/vs_saelens.py --quick      # tiny budgets, a few minutes: checks that everything runs
    python benchmarks/vs_saelens.py              # the measurement (~50 min on 2 CPU cores)

Task: the embedded SmolLM2-135M (SAELens loads the same dequantised safetensors folder saelab caches,
as an AutoModelForCausalLM), the residual stream after block 6 (saelab blocks.6.hook_resid_post, SAELens
model.layers.6), TopK k=32, d_sae = 8 x 576, context 128, batches of 4096 tokens, text from
../shared/data/wikitext2-valid.txt (its last tenth held out for the explained-variance checks).

Every measurement runs in its own subprocess (saelab in this interpreter, SAELens in .venv-saelens via
benchmarks/saelens_jobs.py, installed by scripts/install_saelens.sh), so that each peak RSS is its own;
saelab and SAELens runs alternate and the median of --repeats is kept.

(a) end-to-end training tokens/s from the model, both; saelab's cap = 1 / (bare forward-to-layer-6 time
    per token + SAE step time per token) and saelab as a fraction of it. Each token is read once (the
    budget is below the corpus size) and saelab's buffer is SAELens's size (20 x 32 x 128 tokens).
(b) training tokens/s from cached activations: saelab from `saelab cache` (saelab.data.cache), SAELens
    from its CacheActivationsRunner output.
(c) four SAEs on blocks 3, 6, 9, 12 from one forward pass: saelab.training.train with a list vs SAELens's
    MultiSAETrainingRunner (its documented way of training several SAEs on one model's forward).
(d) wall time to explained variance 0.8 on the held-out text at L0 32: saelab's defaults vs SAELens's
    config defaults, each trained at doubling token budgets until one reaches 0.8 (the time of that run).
(e) peak RSS of the (a) runs.
(f) the SAE step's executed FLOP/s (dense encoder product + sparse decode and backward) as a fraction of
    this machine's fp32 matmul FLOP/s at the encoder's shape.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "wikitext2-valid.txt"
RESULTS = ROOT / "benchmarks" / "results" / "vs_saelens.json"
SAELENS_JOBS = ROOT / "benchmarks" / "saelens_jobs.py"
MODEL = "smollm2-135m"
LAYER, K, EXPANSION, CONTEXT, BATCH = 6, 32, 8, 128, 4096
D_IN = 576
SAELENS_TUTORIAL_BUFFER = 64  # n_batches_in_buffer of SAELens's training tutorial (its default, 20, holds
                              # 20 x 128 tokens: less than one 4096-token batch, which it refuses)
MULTI_LAYERS = (3, 6, 9, 12)
TARGET_EV = 0.8
TARGET_TIME_RATIO = 0.5  # (d)'s target: saelab's time to TARGET_EV at most this fraction of SAELens's
# Token budgets. buffer: the shuffling buffer of both sides in (a)-(c), in tokens (SAELens's holds
# n_batches_in_buffer x context tokens). Full (a), (b): two buffers' worth, below the ~225k-token training
# text, so every training token costs one forward pass on both sides.
BUDGETS = {
    "quick": dict(buffer=8_192, train=8_192, cached=8_192, multi=8_192, ev=[8_192, 16_384], heldout_contexts=8,
                  repeats=1, forward_contexts=16, sae_steps=4),
    "full": dict(buffer=81_920, train=163_840, cached=163_840, multi=81_920,
                 ev=[131_072, 262_144, 524_288, 1_048_576, 2_097_152], heldout_contexts=64, repeats=2,
                 forward_contexts=128, sae_steps=30),
}


# --- saelab jobs (run in a subprocess of this file) ---------------------------------------------------------
def saelab_train(job: dict) -> dict:
    from saelab.training import TrainConfig, train

    t0 = time.perf_counter()
    cfg = TrainConfig(**job["config"])
    summary = train([cfg], overwrite=True)[0]
    seconds = time.perf_counter() - t0
    result = {"tokens": cfg.tokens, "seconds": seconds}
    if job.get("heldout"):
        result["explained_variance"] = saelab_explained_variance(summary.sae, cfg.hook, job["heldout"])
    return result


def saelab_cache(job: dict) -> dict:
    from saelab.data.cache import CacheConfig, write_cache

    t0 = time.perf_counter()
    write_cache(CacheConfig(**job["config"]), overwrite=True)
    return {"tokens": job["config"]["tokens"], "seconds": time.perf_counter() - t0}


def saelab_multi(job: dict) -> dict:
    from saelab.training import TrainConfig, train

    t0 = time.perf_counter()
    configs = [TrainConfig(**{**job["config"], "hook": hook, "out": str(Path(job["config"]["out"]) / hook)})
               for hook in job["hooks"]]
    train(configs, overwrite=True)
    return {"tokens": configs[0].tokens, "seconds": time.perf_counter() - t0, "saes": len(configs)}


def saelab_forward(job: dict) -> dict:
    """Bare forward to the hook on pre-tokenised contexts: the model's share of the end-to-end cost."""
    import torch

    from saelab.data.activations import LMActivationSource
    from saelab.data.tokens import Packing
    from saelab.models import capture, load_model, resolve_hook

    model, tokenizer = load_model(MODEL, "cpu")
    hook = resolve_hook(model, job["hook"])
    source = LMActivationSource(model, tokenizer, hook, job["text"], Packing(CONTEXT), batch_contexts=32,
                                max_contexts=job["contexts"])
    batches = list(source.token_batches())
    capture(model, batches[0][:2], [hook])  # warm-up
    t0 = time.perf_counter()
    for tokens in batches:
        capture(model, tokens, [hook])
    seconds = time.perf_counter() - t0
    return {"tokens": sum(b.numel() for b in batches), "seconds": seconds, "threads": torch.get_num_threads()}


def saelab_sae_step(job: dict) -> dict:
    """SAE steps alone on activations in memory, and the matmul rate at the encoder's shape."""
    import torch

    from saelab.data.activations import TensorSource
    from saelab.training import TrainConfig, Trainer

    d_sae, steps = EXPANSION * D_IN, job["steps"]
    a, b = torch.randn(BATCH, D_IN), torch.randn(D_IN, d_sae)
    a @ b
    t0 = time.perf_counter()
    for _ in range(5):
        a @ b
    matmul_flops = 5 * 2 * BATCH * D_IN * d_sae / (time.perf_counter() - t0)
    data = torch.randn(BATCH * 4, D_IN)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(k=K, expansion=EXPANSION, batch_size=BATCH, tokens=BATCH * (steps + 2), buffer_tokens=len(data),
                          checkpoint_every_tokens=10**12, progress=False, out=tmp, log_every=10**6)
        trainer = Trainer(cfg, TensorSource(data), tmp)
        trainer.open()
        for _ in range(2):  # warm-up
            trainer.advance()
        t0 = time.perf_counter()
        while not trainer.done:
            trainer.advance()
        seconds = time.perf_counter() - t0
        trainer.close()
    # Executed work per token: the dense encoder product; top-k decode; sparse gradients of decoder
    # values and rows, encoder columns and b_dec (each 2 * k * d_in multiply-adds), AuxK aside.
    flops_per_token = 2 * D_IN * d_sae + 2 * K * D_IN + 4 * 2 * K * D_IN
    return {"tokens_per_s": BATCH * steps / seconds, "step_flops": flops_per_token * BATCH * steps / seconds,
            "matmul_flops": matmul_flops, "dense_equivalent_flops": 6 * D_IN * d_sae * BATCH * steps / seconds}


def saelab_explained_variance(sae, hook_name: str, heldout: str) -> float:
    import torch

    from saelab.models import capture, load_model, resolve_hook

    model, tokenizer = load_model(MODEL, "cpu")
    hook = resolve_hook(model, hook_name)
    contexts = torch.tensor(json.loads(Path(heldout).read_text()))
    x = torch.cat([capture(model, tokens, [hook])[hook.name][tokens != tokenizer.bos_token_id].float()
                   for tokens in contexts.split(8)])
    with torch.no_grad():
        x_hat = sae(x)
    return float(1 - (x - x_hat).double().pow(2).sum() / (x - x.mean(0)).double().pow(2).sum())


SAELAB_JOBS = {"train": saelab_train, "cache": saelab_cache, "multi": saelab_multi, "forward": saelab_forward,
               "sae_step": saelab_sae_step}


def run_job_here(path: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    job = json.loads(Path(path).read_text())
    result = SAELAB_JOBS[job["kind"]](job)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


# --- the driver ---------------------------------------------------------------------------------------------
class Runner:
    """Runs one job in a fresh process of saelab's or SAELens's interpreter and returns its RESULT."""

    def __init__(self, work: Path, saelens_python: str, log):
        self.work, self.saelens_python, self.log, self.count = work, saelens_python, log, 0

    def __call__(self, side: str, job: dict) -> dict:
        self.count += 1
        path = self.work / f"job{self.count:03d}-{side}-{job['kind']}.json"
        path.write_text(json.dumps(job))
        cmd = ([sys.executable, __file__, "--job", str(path)] if side == "saelab"
               else [self.saelens_python, str(SAELENS_JOBS), str(path)])
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=self.work)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"{side} {job['kind']} job failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        result = json.loads(lines[-1][len("RESULT "):])
        result["process_seconds"] = time.perf_counter() - t0
        self.log(f"  {side:7s} {job['kind']:9s} {json.dumps({k: _round(v) for k, v in result.items()})}")
        return result


def alternate(run: Runner, jobs: dict, repeats: int) -> dict[str, list[dict]]:
    """Each side's job ``repeats`` times, alternating which goes first."""
    results: dict[str, list[dict]] = {"saelab": [], "saelens": []}
    for repeat in range(repeats):
        order = ("saelab", "saelens") if repeat % 2 == 0 else ("saelens", "saelab")
        for side in order:
            results[side].append(run(side, jobs[side]))
    return results


def median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def prepare_data(work: Path, heldout_contexts: int) -> dict:
    """train.txt (the first nine tenths of the lines) and heldout.txt; SAELens gets train.txt as the same
    documents saelab reads from it; the held-out contexts are packed once, BOS first, for both."""
    from saelab.data.activations import LMActivationSource
    from saelab.data.text import iter_documents
    from saelab.data.tokens import Packing
    from saelab.models import load_model, resolve_hook

    lines = TEXT.read_text(encoding="utf-8").splitlines(keepends=True)
    cut = len(lines) * 9 // 10
    (work / "train.txt").write_text("".join(lines[:cut]), encoding="utf-8")
    (work / "heldout.txt").write_text("".join(lines[cut:]), encoding="utf-8")
    (work / "docs.json").write_text(json.dumps(list(iter_documents(str(work / "train.txt")))))
    model, tokenizer = load_model(MODEL, "cpu")
    source = LMActivationSource(model, tokenizer, resolve_hook(model, f"blocks.{LAYER}.hook_resid_post"),
                                str(work / "heldout.txt"), Packing(CONTEXT), max_contexts=heldout_contexts)
    contexts = [row for batch in source.token_batches() for row in batch.tolist()]
    (work / "heldout.json").write_text(json.dumps(contexts))
    from saelab.models.loading import ensure_embedded_model

    return {"model_dir": str(ensure_embedded_model(MODEL)), "train_text": str(work / "train.txt"),
            "docs": str(work / "docs.json"), "heldout": str(work / "heldout.json")}


def saelab_config(work: Path, name: str, data: dict, tokens: int, buffer: int, **overrides) -> dict:
    """The task's settings for saelab: k, width, context, batch, the buffer size given, no evaluation."""
    return {"model": MODEL, "hook": f"blocks.{LAYER}.hook_resid_post", "dataset": data["train_text"],
            "tokens": tokens, "k": K, "expansion": EXPANSION, "context_size": CONTEXT, "batch_size": BATCH,
            "buffer_tokens": buffer, "eval_tokens": 0, "progress": False, "out": str(work / name),
            "checkpoint_every_tokens": 10**12, **overrides}


def saelens_job(kind: str, data: dict, tokens: int, buffer: int | None = None, **extra) -> dict:
    """``buffer``: its shuffling buffer in tokens (default: its tutorial's n_batches_in_buffer)."""
    return {"kind": kind, "model_dir": data["model_dir"], "docs": data["docs"], "hook": f"model.layers.{LAYER}",
            "d_in": D_IN, "d_sae": EXPANSION * D_IN, "k": K, "context_size": CONTEXT, "batch_size": BATCH,
            "tokens": tokens, "n_batches_in_buffer": buffer // CONTEXT if buffer else SAELENS_TUTORIAL_BUFFER, **extra}


def measure(args, budgets: dict, work: Path, log) -> dict:
    run = Runner(work, args.saelens_python, log)
    log("preparing the text (train.txt, heldout.txt) and the model cache")
    data = prepare_data(work, budgets["heldout_contexts"])
    report: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                    "task": {"model": MODEL, "hook": f"blocks.{LAYER}.hook_resid_post", "k": K,
                             "d_sae": EXPANSION * D_IN, "context": CONTEXT, "batch_tokens": BATCH,
                             "text": str(TEXT.name)}, "budgets": budgets}
    wanted = set(args.only or "abcdef")

    if wanted & {"a", "f"}:
        try:
            log("(f) and the cap: bare forward to the hook, SAE step alone, matmul rate")
            forward = run("saelab", {"kind": "forward", "hook": f"blocks.{LAYER}.hook_resid_post",
                                     "text": data["train_text"], "contexts": budgets["forward_contexts"]})
            step = run("saelab", {"kind": "sae_step", "steps": budgets["sae_steps"]})
            per_token = forward["seconds"] / forward["tokens"] + 1 / step["tokens_per_s"]
            report["f_sae_step"] = {"sae_step_tokens_per_s": step["tokens_per_s"],
                                    "forward_to_layer_tokens_per_s": forward["tokens"] / forward["seconds"],
                                    "executed_gflops": step["step_flops"] / 1e9,
                                    "fp32_matmul_gflops": step["matmul_flops"] / 1e9,
                                    "fraction_of_matmul": step["step_flops"] / step["matmul_flops"],
                                    "dense_equivalent_fraction": step["dense_equivalent_flops"] / step["matmul_flops"]}
            report["cap_tokens_per_s"] = 1 / per_token
        except RuntimeError as err:  # one failed measurement does not lose the others
            report["f_sae_step"] = {"error": str(err)[-2000:]}
            log(str(err))

    if "a" in wanted or "e" in wanted:
        try:
            log("(a) end to end from the model; (e) peak RSS")
            tokens = budgets["train"]
            results = alternate(run, {
                "saelab": {"kind": "train", "config": saelab_config(work, "a-saelab", data, tokens, budgets["buffer"])},
                "saelens": saelens_job("train", data, tokens, budgets["buffer"])}, budgets["repeats"])
            ours = tokens / median(results["saelab"], "seconds")
            theirs = tokens / median(results["saelens"], "seconds")
            report["a_end_to_end"] = {"saelab_tokens_per_s": ours, "saelens_tokens_per_s": theirs, "ratio": ours / theirs,
                                      "saelens_run_only_tokens_per_s": tokens / median(results["saelens"], "run_seconds"),
                                      "runs": results}
            if "cap_tokens_per_s" in report:
                report["a_end_to_end"]["saelab_fraction_of_cap"] = ours / report["cap_tokens_per_s"]
            report["e_peak_rss_mib"] = {"saelab": max(r["peak_rss_mib"] for r in results["saelab"]),
                                        "saelens": max(r["peak_rss_mib"] for r in results["saelens"])}
            report["e_peak_rss_mib"]["ratio"] = report["e_peak_rss_mib"]["saelab"] / report["e_peak_rss_mib"]["saelens"]
        except RuntimeError as err:  # one failed measurement does not lose the others
            report["a_end_to_end"] = {"error": str(err)[-2000:]}
            log(str(err))

    if "b" in wanted:
        try:
            log("(b) training from cached activations")
            tokens = budgets["cached"]
            ours_cache, theirs_cache = work / "b-saelab-cache", work / "b-saelens-cache"
            wrote = {"saelab": run("saelab", {"kind": "cache", "config": {
                         "model": MODEL, "hooks": f"blocks.{LAYER}.hook_resid_post", "dataset": data["train_text"],
                         "tokens": tokens + CONTEXT * 32, "out": str(ours_cache), "progress": False}}),
                     "saelens": run("saelens", saelens_job("cache", data, tokens + CONTEXT * 32, out=str(theirs_cache)))}
            results = alternate(run, {
                "saelab": {"kind": "train", "config": {**saelab_config(work, "b-saelab", data, tokens, budgets["buffer"]),
                                                       "activations": str(ours_cache)}},
                "saelens": saelens_job("train", data, tokens, budgets["buffer"], cached=str(theirs_cache))}, budgets["repeats"])
            ours = tokens / median(results["saelab"], "seconds")
            theirs = tokens / median(results["saelens"], "run_seconds")
            report["b_cached"] = {"saelab_tokens_per_s": ours, "saelens_tokens_per_s": theirs, "ratio": ours / theirs,
                                  "note": "saelab: the whole train() call (no model is loaded); SAELens: runner.run() "
                                          "(it loads the model before, not counted)",
                                  "cache_write_seconds": {side: r["seconds"] for side, r in wrote.items()},
                                  "runs": results}
        except RuntimeError as err:  # one failed measurement does not lose the others
            report["b_cached"] = {"error": str(err)[-2000:]}
            log(str(err))

    if "c" in wanted:
        try:
            log(f"(c) {len(MULTI_LAYERS)} SAEs on layers {MULTI_LAYERS} from one forward pass")
            tokens = budgets["multi"]
            results = alternate(run, {
                "saelab": {"kind": "multi", "hooks": [f"blocks.{layer}.hook_resid_post" for layer in MULTI_LAYERS],
                           "config": saelab_config(work, "c-saelab", data, tokens, budgets["buffer"])},
                "saelens": {**saelens_job("multi", data, tokens, budgets["buffer"]), "hooks": [f"model.layers.{layer}" for layer in MULTI_LAYERS]}},
                budgets["repeats"])
            ours, theirs = median(results["saelab"], "seconds"), median(results["saelens"], "seconds")
            report["c_four_saes"] = {"saelab_seconds": ours, "saelens_seconds": theirs, "speedup": theirs / ours,
                                     "runs": results}
        except RuntimeError as err:  # one failed measurement does not lose the others
            report["c_four_saes"] = {"error": str(err)[-2000:]}
            log(str(err))

    if "d" in wanted:
        try:
            log(f"(d) wall time to explained variance {TARGET_EV} on held-out text (defaults, doubling budgets)")
            report["d_time_to_ev"] = time_to_ev(run, work, data, budgets["ev"])
        except RuntimeError as err:  # one failed measurement does not lose the others
            report["d_time_to_ev"] = {"error": str(err)[-2000:]}
            log(str(err))

    return report


def time_to_ev(run: Runner, work: Path, data: dict, ev_budgets: list[int]) -> dict:
    jobs = {"saelab": lambda tokens: {"kind": "train", "heldout": data["heldout"], "config": {
                "model": MODEL, "hook": f"blocks.{LAYER}.hook_resid_post", "dataset": data["train_text"],
                "tokens": tokens, "eval_tokens": 0, "progress": False, "out": str(work / f"d-saelab-{tokens}")}},
            "saelens": lambda tokens: {**saelens_job("train", data, tokens, heldout=data["heldout"]),
                                       "batch_size": 4096, "lr": None}}
    curves: dict[str, list] = {"saelab": [], "saelens": []}
    reached: dict[str, dict | None] = {"saelab": None, "saelens": None}
    def proven_below_target() -> bool:
        # SAELens has not reached the target in a run that took longer than saelab's time / TARGET_TIME_RATIO:
        # its time to the target is longer still, so the ratio is already below the target; stop there.
        return (reached["saelab"] is not None and reached["saelens"] is None and bool(curves["saelens"])
                and curves["saelens"][-1]["seconds"] * TARGET_TIME_RATIO > reached["saelab"]["seconds"])

    for tokens in ev_budgets:
        if proven_below_target():
            break
        for side in ("saelab", "saelens"):
            if reached[side] is None:
                result = run(side, jobs[side](tokens))
                curves[side].append({"tokens": tokens, "seconds": result["seconds"],
                                     "explained_variance": result["explained_variance"]})
                if result["explained_variance"] >= TARGET_EV:
                    reached[side] = curves[side][-1]
        if all(reached.values()):
            break
    out = {"target": TARGET_EV, "curves": curves, "reached": reached,
           "settings": {"saelab": "TrainConfig defaults (batch 1024, lr 1e-3, buffer 524288) but tokens",
                        "saelens": "LanguageModelSAERunnerConfig and TopKTrainingSAEConfig defaults (lr 3e-4 "
                                   "constant, batch 4096) but tokens and n_batches_in_buffer 64 (its tutorial's; "
                                   "the default 20 is refused at batch 4096); special tokens excluded"}}
    if all(reached.values()):
        out["ratio"] = reached["saelab"]["seconds"] / reached["saelens"]["seconds"]
    elif proven_below_target():
        out["ratio_below"] = reached["saelab"]["seconds"] / curves["saelens"][-1]["seconds"]
    return out


def summary_lines(report: dict) -> list[str]:
    failed = {key: entry["error"] for key, entry in report.items() if isinstance(entry, dict) and "error" in entry}
    report = {key: entry for key, entry in report.items() if key not in failed}
    lines = [f"({key[0]}) failed: {error.strip().splitlines()[-1] if error.strip() else error}"
             for key, error in failed.items()]
    if "a_end_to_end" in report:
        a = report["a_end_to_end"]
        lines.append(f"(a) end to end: saelab {a['saelab_tokens_per_s']:.0f} tok/s, SAELens "
                     f"{a['saelens_tokens_per_s']:.0f} tok/s: {a['ratio']:.2f}x (target >= 1.3x)"
                     + (f"; saelab at {a['saelab_fraction_of_cap']:.0%} of its cap "
                        f"{report['cap_tokens_per_s']:.0f} tok/s" if "saelab_fraction_of_cap" in a else ""))
    if "b_cached" in report:
        b = report["b_cached"]
        lines.append(f"(b) from cached activations: saelab {b['saelab_tokens_per_s']:.0f} tok/s, SAELens "
                     f"{b['saelens_tokens_per_s']:.0f} tok/s: {b['ratio']:.2f}x (target >= 3x)")
    if "c_four_saes" in report:
        c = report["c_four_saes"]
        lines.append(f"(c) four SAEs, one forward pass: saelab {c['saelab_seconds']:.0f} s, SAELens "
                     f"{c['saelens_seconds']:.0f} s: {c['speedup']:.2f}x faster (target >= 2x)")
    if "d_time_to_ev" in report:
        d = report["d_time_to_ev"]
        reached = {side: (f"{r['seconds']:.0f} s at {r['tokens']:,} tokens" if r else "not reached")
                   for side, r in d["reached"].items()}
        lines.append(f"(d) to explained variance {d['target']}: saelab {reached['saelab']}, SAELens "
                     f"{reached['saelens']}" + (f": {d['ratio']:.2f}x the time (target <= 0.5x)" if "ratio" in d else "")
                     + (f" (its last run took {d['curves']['saelens'][-1]['seconds']:.0f} s): below "
                        f"{d['ratio_below']:.2f}x the time (target <= 0.5x)" if "ratio_below" in d else ""))
    if "e_peak_rss_mib" in report:
        e = report["e_peak_rss_mib"]
        lines.append(f"(e) peak RSS: saelab {e['saelab']:.0f} MiB, SAELens {e['saelens']:.0f} MiB: "
                     f"{e['ratio']:.2f}x (target <= 1x)")
    if "f_sae_step" in report:
        f = report["f_sae_step"]
        lines.append(f"(f) SAE step: {f['sae_step_tokens_per_s']:.0f} tok/s, {f['executed_gflops']:.1f} GFLOP/s executed "
                     f"= {f['fraction_of_matmul']:.0%} of the fp32 matmul rate ({f['fp32_matmul_gflops']:.1f} GFLOP/s); "
                     f"dense-equivalent {f['dense_equivalent_fraction']:.0%}")
    return lines


def _round(value):
    return round(value, 3) if isinstance(value, float) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets (minutes): checks the script runs")
    parser.add_argument("--only", help="a subset of the measurements, e.g. 'ae' or 'bc' (default: abcdef)")
    parser.add_argument("--repeats", type=int, help="runs per side of (a), (b), (c) (default: 1 quick, 2 full)")
    parser.add_argument("--saelens-python", default=str(ROOT / ".venv-saelens" / "bin" / "python"),
                        help="SAELens's interpreter (default: .venv-saelens, made by scripts/install_saelens.sh)")
    parser.add_argument("--out", default=None, help=f"results file (default: {RESULTS.relative_to(ROOT)}; "
                        "--quick writes beside it, vs_saelens_quick.json)")
    parser.add_argument("--work", help="folder for text, caches and runs (default: a temporary one, removed)")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        run_job_here(args.job)
        return
    if not Path(args.saelens_python).exists():
        sys.exit(f"no SAELens interpreter at {args.saelens_python}: run `bash scripts/install_saelens.sh` first")
    if not TEXT.exists():
        sys.exit(f"{TEXT} is missing: the benchmark reads ../shared/data/wikitext2-valid.txt")
    mode = "quick" if args.quick else "full"
    budgets = dict(BUDGETS[mode])
    if args.repeats:
        budgets["repeats"] = args.repeats
    out = Path(args.out) if args.out else RESULTS.with_name("vs_saelens_quick.json") if args.quick else RESULTS
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="saelab-vs-saelens-"))
    work.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    try:
        report = measure(args, budgets, work, log)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    report["mode"], report["wall_seconds"] = mode, time.perf_counter() - t0
    report["date"] = time.strftime("%Y-%m-%d")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print("\n".join(summary_lines(report)))
    print(f"results written to {out}" + (" (quick mode: budgets too small for real ratios)" if args.quick else ""))


if __name__ == "__main__":
    main()
