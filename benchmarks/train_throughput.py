"""Throughput and peak memory of the demo configuration (not a test: prints figures for the README).

    python benchmarks/train_throughput.py [--tokens N] [--json out.json]

Measures, on this machine:
- the language model's forward pass to the hook (activation collection), tokens/s;
- the SAE training step alone on activations already in memory, tokens/s, and the rate of its one
  dense product (the encoder's forward) as a share of the machine's measured fp32 matmul rate;
- end to end: `saelab train` with the demo settings (evaluation off), tokens/s over the whole run
  including model loading and activation collection, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from dataclasses import replace

import torch

from saelab.data import LMActivationSource, Packing, TensorSource
from saelab.models import load_model, resolve_hook
from saelab.training import TrainConfig, Trainer, train


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def forward_tokens_per_second(cfg: TrainConfig, contexts: int = 128) -> float:
    model, tokenizer = load_model(cfg.model, device="cpu")
    source = LMActivationSource(model, tokenizer, resolve_hook(model, cfg.hook), cfg.dataset,
                                Packing(cfg.context_size), batch_contexts=cfg.lm_batch_size,
                                max_contexts=contexts, exclude_special_tokens=False)
    start = time.perf_counter()
    rows = sum(len(unit) for unit in source.units(0))
    return rows / (time.perf_counter() - start)


def sae_step_tokens_per_second(cfg: TrainConfig, d_in: int = 576, steps: int = 40) -> tuple[float, float]:
    """SAE steps on random activations; returns (tokens/s, GFLOP/s in the one dense product a step needs)."""
    data = torch.randn(cfg.batch_size * 8, d_in)
    with tempfile.TemporaryDirectory() as tmp:
        bench = replace(cfg, tokens=cfg.batch_size * steps, out=tmp, progress=False, buffer_tokens=len(data),
                        checkpoint_every_tokens=10**12)
        trainer = Trainer(bench, TensorSource(data), tmp)
        start = time.perf_counter()
        trainer.run()
        seconds = time.perf_counter() - start
    d_sae = cfg.d_sae or cfg.expansion * d_in
    # The encoder's forward [batch, d_in] x [d_in, d_sae] product is the only dense one a TopK step needs
    # (backward and decoding are sparse); a dense implementation would do three such products.
    flops = 2 * cfg.batch_size * d_in * d_sae * steps
    return cfg.batch_size * steps / seconds, flops / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=TrainConfig.tokens, help="training tokens end to end")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = TrainConfig(tokens=args.tokens, eval_tokens=0, progress=False)
    figures = {"threads": torch.get_num_threads(), "fp32_matmul_gflops": round(matmul_gflops(), 1)}
    figures["forward_to_hook_tokens_per_s"] = round(forward_tokens_per_second(cfg))
    step_rate, step_gflops = sae_step_tokens_per_second(cfg)
    figures["sae_step_tokens_per_s"] = round(step_rate)
    figures["sae_step_fraction_of_matmul_peak"] = round(step_gflops / figures["fp32_matmul_gflops"], 3)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train([replace(cfg, out=tmp)])
        wall = time.perf_counter() - start
    figures["end_to_end_seconds"] = round(wall, 1)
    figures["end_to_end_tokens_per_s"] = round(args.tokens / wall)
    figures["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
