"""SAELens side of benchmarks/vs_saelens.py. Run with SAELens's interpreter, one job per process (so that
its peak RSS is the job's own); it never imports saelab:

    .venv-saelens/bin/python benchmarks/saelens_jobs.py JOB.json

A job is ``{"kind": ..., ...}`` (see ``JOBS``); the last stdout line is ``RESULT <json>``. The model is
the same safetensors folder saelab caches (``model_dir``), loaded the way SAELens documents for Hugging
Face models (``model_class_name="AutoModelForCausalLM"``, hooks named by module path: ``model.layers.6``
is the residual stream after block 6, saelab's ``blocks.6.hook_resid_post``). The text is a list of
documents (``docs``: the same pieces saelab reads from the .txt file) passed as ``override_dataset``.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import warnings
from pathlib import Path

import torch


def _dataset(docs_file: str):
    from datasets import Dataset

    return Dataset.from_dict({"text": json.loads(Path(docs_file).read_text())})


def _sae_config(job: dict):
    from sae_lens import TopKTrainingSAEConfig

    return TopKTrainingSAEConfig(d_in=job["d_in"], d_sae=job["d_sae"], k=job["k"], dtype="float32", device="cpu")


def _common(job: dict) -> dict:
    """Runner settings shared by every job: SAELens's defaults except the task's own (model, hook, batch,
    context, tokens) and no W&B, no checkpoints; special tokens are left out as saelab does."""
    from sae_lens.config import LoggingConfig

    return dict(model_name=job["model_dir"], model_class_name="AutoModelForCausalLM", context_size=job["context_size"],
                training_tokens=job["tokens"], train_batch_size_tokens=job["batch_size"], device="cpu",
                is_dataset_tokenized=False, streaming=False, prepend_bos=True, exclude_special_tokens=True,
                logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0, checkpoint_path=None,
                output_path=job.get("output_path"), seed=job.get("seed", 42), verbose=False,
                **({"lr": job["lr"]} if job.get("lr") else {}),
                **({"n_batches_in_buffer": job["n_batches_in_buffer"]} if job.get("n_batches_in_buffer") else {}))


def train(job: dict) -> dict:
    """End to end from the model (or from a cache with ``cached``): seconds of ``runner.run()`` and of the
    whole job after imports (model load included); held-out explained variance when asked."""
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner

    t0 = time.perf_counter()
    extra = {"use_cached_activations": True, "cached_activations_path": job["cached"]} if job.get("cached") else {}
    cfg = LanguageModelSAERunnerConfig(sae=_sae_config(job), hook_name=job["hook"], dataset_path="override",
                                       **_common(job), **extra)
    # The dataset is passed with a cache too: SAELens's activation store opens it (for evaluation) either way.
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=_dataset(job["docs"]))
    t1 = time.perf_counter()
    sae = runner.run()
    t2 = time.perf_counter()
    result = {"tokens": job["tokens"], "run_seconds": t2 - t1, "seconds": t2 - t0}
    if job.get("heldout"):
        result["explained_variance"] = explained_variance(runner.model, sae, job)
    return result


def cache(job: dict) -> dict:
    """SAELens's own activation cache (CacheActivationsRunner) of one hook."""
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig

    t0 = time.perf_counter()
    cfg = CacheActivationsRunnerConfig(dataset_path="override", model_name=job["model_dir"],
                                       model_class_name="AutoModelForCausalLM", model_batch_size=32,
                                       hook_name=job["hook"], d_in=job["d_in"], training_tokens=job["tokens"],
                                       context_size=job["context_size"], new_cached_activations_path=job["out"],
                                       device="cpu", streaming=False, prepend_bos=True,
                                       # one shard holding the whole cache: its default (2 GB) would run the
                                       # model over ~870k tokens whatever training_tokens says
                                       buffer_size_gb=1.05 * job["tokens"] * job["d_in"] * 4 / 1e9)
    CacheActivationsRunner(cfg, override_dataset=_dataset(job["docs"])).run()
    return {"tokens": job["tokens"], "seconds": time.perf_counter() - t0}


def multi(job: dict) -> dict:
    """Several SAEs from one forward pass: SAELens's MultiSAETrainingRunner."""
    from sae_lens.multi_sae_training_runner import MultiSAETrainingRunner, MultiSAETrainingRunnerConfig

    t0 = time.perf_counter()
    common = _common(job)
    for name in ("is_dataset_tokenized", "n_checkpoints", "checkpoint_path", "verbose"):
        common.pop(name, None)
    saes = {hook.replace(".", "_"): _sae_config(job) for hook in job["hooks"]}
    cfg = MultiSAETrainingRunnerConfig(saes=saes, hook_names=dict(zip(saes, job["hooks"])), dataset_path="override",
                                       n_checkpoints=0, checkpoint_path=None, **common)
    runner = MultiSAETrainingRunner(cfg, override_dataset=_dataset(job["docs"]))
    t1 = time.perf_counter()
    runner.run()
    t2 = time.perf_counter()
    return {"tokens": job["tokens"], "run_seconds": t2 - t1, "seconds": t2 - t0, "saes": len(saes)}


def step(job: dict) -> dict:
    """SAELens's own trainer (SAETrainer: its training SAE's forward pass and loss, backward, gradient clipping,
    Adam, dead-latent counts) on activations of a saelab cache held in memory (read with numpy: the .npy shards):
    the seconds of each step, from the data provider's calls, after ``warmup`` steps."""
    import glob

    import numpy as np
    import sae_lens
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    shards = sorted(glob.glob(str(Path(job["cache"]) / "hooks" / "*" / "shard_*.npy")))
    data = torch.from_numpy(np.concatenate([np.load(shard) for shard in shards]).astype(np.float32))
    names = {"topk": "TopK", "batchtopk": "BatchTopK", "jumprelu": "JumpReLU", "standard": "Standard",
             "gated": "Gated"}
    name = names[job["architecture"]]
    config = getattr(sae_lens, f"{name}TrainingSAEConfig")(d_in=data.shape[1], d_sae=job["d_sae"], dtype="float32",
                                                            device="cpu", **job.get("settings", {}))
    sae = getattr(sae_lens, f"{name}TrainingSAE")(config)
    batch, steps = job["batch_size"], job["warmup"] + job["steps"]
    stamps = []

    def provider():
        generator = torch.Generator().manual_seed(0)
        while True:
            for rows in torch.randperm(len(data), generator=generator).split(batch):
                if len(rows) == batch:
                    stamps.append(time.perf_counter())
                    yield data[rows]

    trainer_cfg = SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch,
                                   device="cpu", n_checkpoints=0, save_final_checkpoint=False, lr=3e-4, lr_end=3e-5)
    SAETrainer(trainer_cfg, sae, provider()).fit()
    stamps.append(time.perf_counter())
    timed = stamps[job["warmup"]:steps + 1]
    return {"tokens_per_s": batch * (len(timed) - 1) / (timed[-1] - timed[0]), "steps": len(timed) - 1}


@torch.no_grad()
def explained_variance(model, sae, job: dict) -> float:
    """1 - FVU of the SAE on the held-out contexts (BOS positions left out), the field's definition."""
    bos = model.tokenizer.bos_token_id
    contexts = json.loads(Path(job["heldout"]).read_text())  # token ids packed by the driver, BOS first
    rows = []
    for start in range(0, len(contexts), 8):
        tokens = torch.tensor(contexts[start:start + 8])
        _, cache = model.run_with_cache(tokens, names_filter=[job["hook"]])
        acts = cache[job["hook"]]
        rows.append(acts[tokens != bos].float())
    x = torch.cat(rows)
    sae.eval()
    x_hat = sae.decode(sae.encode(x))
    sq_err = (x - x_hat).double().pow(2).sum()
    total = (x - x.mean(0)).double().pow(2).sum()
    return float(1 - sq_err / total)


JOBS = {"train": train, "cache": cache, "multi": multi, "step": step}


def main() -> None:
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    job = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(job.get("threads", torch.get_num_threads()))
    result = JOBS[job["kind"]](job)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
