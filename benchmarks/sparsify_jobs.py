"""EleutherAI's sparsify side of benchmarks/vs_sparsify.py. Run with sparsify's interpreter (.venv-sparsify, made by
scripts/install_sparsify.sh); it never imports saelab:

    .venv-sparsify/bin/python benchmarks/sparsify_jobs.py JOB.json

The job trains a sparsify transcoder (``transcode=True``: the MLP's input to its output) on the MLP of block
``layer``, its documented way (``Trainer(TrainConfig(SparseCoderConfig(...)), dataset, model).fit()`` on a dataset
from ``chunk_and_tokenize``), with its defaults except the task's own (k, expansion, batch, context, no W&B). The last
stdout line is ``RESULT <json>``: the seconds of ``fit()`` and the held-out FVU (``heldout_fvu``, which
vs_sparsify.py uses for saelab's transcoder too).
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch


@torch.no_grad()
def heldout_fvu(model, predict, contexts: list[list[int]], layer: int, skip_first: bool = True) -> float:
    """FVU of ``predict(mlp input) -> mlp output`` at block ``layer`` of a Hugging Face Llama-style ``model`` over the
    held-out ``contexts`` (token ids), the first position of each (BOS) left out: squared error over the output's
    variance about its mean, summed over dimensions and tokens."""
    captured = {}
    mlp = model.layers[layer].mlp if hasattr(model, "layers") else model.model.layers[layer].mlp
    handle = mlp.register_forward_hook(lambda module, inputs, output: captured.update(x=inputs[0], y=output))
    xs, ys = [], []
    try:
        for start in range(0, len(contexts), 8):
            model(torch.tensor(contexts[start:start + 8]))
            first = 1 if skip_first else 0
            xs.append(captured["x"][:, first:].reshape(-1, captured["x"].shape[-1]).float())
            ys.append(captured["y"][:, first:].reshape(-1, captured["y"].shape[-1]).float())
    finally:
        handle.remove()
    x, y = torch.cat(xs), torch.cat(ys)
    error = (predict(x) - y).double().pow(2).sum()
    return float(error / (y - y.mean(0)).double().pow(2).sum())


def train(job: dict) -> dict:
    from datasets import Dataset
    from sparsify import SparseCoderConfig, Trainer, TrainConfig
    from sparsify.data import chunk_and_tokenize
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(job["model_dir"], torch_dtype=torch.float32)  # its loader for the fvu loss
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    docs = Dataset.from_dict({"text": json.loads(Path(job["docs"]).read_text())})
    dataset = chunk_and_tokenize(docs, tokenizer, max_seq_len=job["context_size"], num_proc=1)
    dataset = dataset.shuffle(seed=0).with_format("torch")
    sequences = job["tokens"] // job["context_size"]
    dataset = dataset.select(range(min(sequences, len(dataset))))
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(SparseCoderConfig(expansion_factor=job["expansion"], k=job["k"], transcode=True),
                          batch_size=job["batch_size"] // job["context_size"],
                          hookpoints=[f"layers.{job['layer']}.mlp"],
                          log_to_wandb=False, save_dir=out, run_name="transcoder", save_every=10**9)
        trainer = Trainer(cfg, dataset, model)
        start = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - start
    coder = trainer.saes[f"layers.{job['layer']}.mlp"]
    fvu = heldout_fvu(model, lambda x: coder(x.to(coder.dtype)).sae_out.float(),
                      json.loads(Path(job["heldout"]).read_text()), job["layer"])
    return {"tokens": len(dataset) * job["context_size"], "seconds": seconds, "fvu": fvu}


def main() -> None:
    warnings.filterwarnings("ignore")
    job = json.loads(Path(sys.argv[1]).read_text())
    result = {"train": train}[job["kind"]](job)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
