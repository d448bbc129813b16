"""The SAE training step alone, from activations in memory, with and without torch.compile and bf16 autocast (not
a test: figures for the README; on a CUDA machine the same script measures the GPU).

    python benchmarks/step_speed.py [--device cpu|cuda] [--architectures topk,batchtopk,jumprelu]
                                    [--expansions 8,32] [--batch-size 4096] [--steps 30] [--json out.json]
                                    [--modes plain,compile,autocast] [--end-to-end MODEL]
    python benchmarks/step_speed.py --small        # seconds on any machine: checks the script still works
    python benchmarks/step_speed.py --densities 0.002,0.01,0.03,0.05,0.08 --architectures jumprelu,standard
                                                   # a thresholded step's sparse / dense time by code density

For each architecture x expansion x mode (plain, torch.compile, bf16 autocast, both): a Trainer on random
activations (``--d-in`` 576, SmolLM2's width) runs ``--warmup`` steps (compilation, allocator, first AuxK), then
``--steps`` timed steps. Reported per point: tokens/s of the timed steps, the seconds the warm-up took (what
compiling costs), and the peak memory (CUDA: the allocator's peak; CPU: the process's peak RSS so far, a running
maximum over the points). With ``--end-to-end MODEL``, each architecture x expansion also trains from the model on
python-docs text (``--end-to-end-modes``): tokens/s of the whole training loop. benchmarks/gpu.sh runs the GPU set.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

import torch

from saelab.data import TensorSource
from saelab.sae import TrainStep
from saelab.training import TrainConfig, Trainer

SPARSITY = {"topk": {"k": 32}, "batchtopk": {"k": 32}, "jumprelu": {"target_l0": 32}, "standard": {}}


MODES = {"plain": {}, "compile": {"compile": True}, "autocast": {"autocast": True},
         "compile+autocast": {"compile": True, "autocast": True}}


def sparsity(architecture: str, args) -> dict:
    return {key: min(value, args.d_in // 2) for key, value in SPARSITY[architecture].items()}


def measure(architecture: str, expansion: int, mode: str, args) -> dict:
    data = torch.randn(args.batch_size * 4, args.d_in)
    steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(architecture=architecture, expansion=expansion, batch_size=args.batch_size,
                          tokens=args.batch_size * steps, buffer_tokens=len(data), out=tmp, progress=False,
                          checkpoint_every_tokens=10**12, device=args.device, eval_tokens=0, **MODES[mode],
                          **sparsity(architecture, args))
        trainer = Trainer(cfg, TensorSource(data), tmp)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.open()
        start = time.perf_counter()
        for _ in range(args.warmup):
            trainer.advance()
        sync(args.device)
        warm = time.perf_counter()
        for _ in range(args.steps):
            trainer.advance()
        sync(args.device)
        end = time.perf_counter()
        trainer.close()
    return {"architecture": architecture, "expansion": expansion, "d_sae": expansion * args.d_in, "mode": mode,
            "tokens_per_s": round(args.batch_size * args.steps / (end - warm)),
            "warmup_seconds": round(warm - start, 2), "peak_memory_mib": round(peak_memory(args.device) / 2**20)}


def end_to_end(architecture: str, expansion: int, mode: str, args) -> dict:
    """Training from the model (``--end-to-end MODEL``) on the builtin python-docs text: tokens/s of the whole
    ``train()`` (the model's load, its forward passes to the hook, the SAE steps)."""
    from saelab.training import train

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(model=args.end_to_end, hook=args.hook, dataset="python-docs", architecture=architecture,
                          expansion=expansion,
                          batch_size=args.batch_size, tokens=args.end_to_end_tokens, out=tmp, progress=False,
                          checkpoint_every_tokens=10**12, device=args.device, eval_tokens=0, **MODES[mode],
                          **({"lm_batch_size": args.lm_batch_size} if args.lm_batch_size else {}),
                          **sparsity(architecture, args))
        start = time.perf_counter()
        summary = train(cfg, evaluate=False)[0]
        seconds = time.perf_counter() - start  # the model's load, its forward passes and the steps
    return {"architecture": architecture, "expansion": expansion, "mode": mode, "end_to_end": True,
            "tokens_per_s": round(summary.training["train_tokens"] / seconds),
            "peak_memory_mib": round(peak_memory(args.device) / 2**20)}


def peak_memory(device: str) -> int:
    """Bytes: CUDA, the allocator's peak since the last reset; CPU, the process's peak RSS so far."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def density_point(architecture: str, expansion: int, density: float, args) -> dict:
    """Forward + backward of one thresholded training step whose codes have ``density`` (the thresholds or biases
    set at that quantile of the pre-activations), through the dense products and through the sparse kernels."""
    import math

    from saelab.sae import SAEConfig, create_sae

    generator = torch.Generator().manual_seed(0)
    sae = create_sae(SAEConfig(d_in=args.d_in, d_sae=expansion * args.d_in, architecture=architecture),
                     training=True).to(args.device)
    x = torch.randn(args.batch_size, args.d_in, generator=generator).to(args.device)
    sae.initialize(x[:2048].cpu(), "mean", generator)
    bias = "b_gate" if architecture == "gated" else "b_enc"
    with torch.no_grad():
        getattr(sae, bias).zero_()
        pre = sae.encode_pre(x[:512]).flatten()
        level = pre[torch.randperm(len(pre), generator=generator)[:10**6].to(pre.device)].quantile(1 - density).item()
        if architecture == "jumprelu":
            sae.log_threshold_scaled.fill_(math.log(max(level, 1e-3)) / 10)
        else:
            getattr(sae, bias).fill_(-level)
    point = {"architecture": architecture, "expansion": expansion, "density": density}
    for path, below in (("dense", 0.0), ("sparse", 1.01)):
        sae.sparse_below = below
        times = []
        for _ in range(3):
            sae.zero_grad()
            start = time.perf_counter()
            sae.training_forward(x, TrainStep()).loss.backward()
            sync(args.device)
            times.append(time.perf_counter() - start)
        point[f"{path}_seconds"] = round(min(times), 6)  # at --small sizes a step takes under a millisecond
    point["sparse_over_dense"] = round(point["sparse_seconds"] / point["dense_seconds"], 2)
    return point


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--architectures", default="topk,batchtopk,jumprelu")
    parser.add_argument("--expansions", default="8,32")
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--modes", default="plain,compile",
                        help=f"comma list of {', '.join(MODES)} (autocast: bf16, for GPUs)")
    parser.add_argument("--end-to-end", metavar="MODEL", help="also train from this model (hub id or folder)")
    parser.add_argument("--end-to-end-tokens", type=int, default=204_800)
    parser.add_argument("--hook", default="blocks.6.hook_resid_post", help="the end-to-end runs' hook point")
    parser.add_argument("--end-to-end-modes", default="plain,autocast")
    parser.add_argument("--lm-batch-size", type=int, default=None)
    parser.add_argument("--densities", help="instead: sparse vs dense step time at these code densities")
    parser.add_argument("--small", action="store_true", help="tiny sizes: a check that the script runs")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.small:
        args.d_in, args.batch_size, args.warmup, args.steps, args.expansions = 32, 128, 2, 2, "2"
        args.end_to_end_tokens = 1024
    figures = {"device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "d_in": args.d_in, "batch_size": args.batch_size, "steps": args.steps, "points": []}
    for architecture in args.architectures.split(","):
        for expansion in map(int, args.expansions.split(",")):
            if args.densities:
                points = (density_point(architecture, expansion, float(d), args) for d in args.densities.split(","))
            else:
                points = [measure(architecture, expansion, mode, args) for mode in args.modes.split(",")]
                if args.end_to_end:
                    points += [end_to_end(architecture, expansion, mode, args)
                               for mode in args.end_to_end_modes.split(",")]
            for point in points:
                print(json.dumps(point), flush=True)
                figures["points"].append(point)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
