"""SAELens side of the saelab <-> SAELens interop test. Run it with SAELens's interpreter, not saelab's:

    .venv-saelens/bin/python tests/saelens_roundtrip.py JOBS.json

It never imports saelab. JOBS.json is a list of jobs, all run in one process (importing sae_lens takes
~15 s). Each job reads inputs ``x`` ([n, d_in]) and ``f`` ([n, d_sae]) from ``job["inputs"]`` (safetensors)
and writes ``encode`` = sae.encode(x), ``decode`` = sae.decode(f) and ``forward`` = sae.decode(sae.encode(x))
to ``job["out"]`` (safetensors), plus what SAELens made of the config to ``job["out"] + ".json"``.

- ``{"mode": "load", "folder": ...}``: load a folder (e.g. one saelab saved) with ``SAE.load_from_disk``.
- ``{"mode": "create", "folder": ..., "architecture": "standard" | "topk" | "jumprelu" | "gated", "d_in", "d_sae",
  "k", "seed", "rescale_acts_by_decoder_norm": bool, "metadata": {...}}``: build a SAELens SAE with random weights
  (non-trivial biases), save it with SAELens's own ``save_model`` and report its outputs. The transcoder family
  (``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder``, ``jumprelu_skip_transcoder``) takes ``d_out`` too.

Every job also writes ``call`` = sae(x) (a skip transcoder's forward adds its skip term to the decoding).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _create_transcoder(job: dict, common: dict):
    from sae_lens import (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig, JumpReLUTranscoder,
                          JumpReLUTranscoderConfig, SkipTranscoder, SkipTranscoderConfig, Transcoder, TranscoderConfig)

    classes = {"transcoder": (Transcoder, TranscoderConfig), "skip_transcoder": (SkipTranscoder, SkipTranscoderConfig),
               "jumprelu_transcoder": (JumpReLUTranscoder, JumpReLUTranscoderConfig),
               "jumprelu_skip_transcoder": (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig)}
    module, config = classes[job["architecture"]]
    sae = module(config(**{**common, "apply_b_dec_to_input": False}, d_out=job["d_out"]))
    g = torch.Generator().manual_seed(job.get("seed", 0))
    d_in, d_sae, d_out = job["d_in"], job["d_sae"], job["d_out"]
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_out, generator=g) * (0.5 + torch.rand(d_sae, 1, generator=g)))
        sae.b_enc.copy_(0.3 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(torch.randn(d_out, generator=g))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(0.5 * torch.rand(d_sae, generator=g))
        if hasattr(sae, "W_skip"):
            sae.W_skip.copy_(torch.randn(d_out, d_in, generator=g) / d_in**0.5)
    sae.save_model(job["folder"])
    return sae


def _create_newer(job: dict, common: dict):
    """AbsTopK and matching pursuit (SAELens 6.5x)."""
    from sae_lens import AbsTopKSAE, AbsTopKSAEConfig, MatchingPursuitSAE, MatchingPursuitSAEConfig

    g = torch.Generator().manual_seed(job.get("seed", 0))
    d_in, d_sae = job["d_in"], job["d_sae"]
    if job["architecture"] == "abstopk":
        sae = AbsTopKSAE(AbsTopKSAEConfig(**common, k=job["k"]))
        with torch.no_grad():
            sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
            sae.b_enc.copy_(0.3 * torch.randn(d_sae, generator=g))
    else:
        sae = MatchingPursuitSAE(MatchingPursuitSAEConfig(**common, max_iterations=job["max_iterations"],
                                                          residual_threshold=job["residual_threshold"]))
    with torch.no_grad():
        rows = torch.randn(d_sae, d_in, generator=g)
        if job["architecture"] == "matching_pursuit":  # pursuit assumes unit rows
            rows = rows / rows.norm(dim=1, keepdim=True)
        else:
            rows = rows * (0.5 + torch.rand(d_sae, 1, generator=g))
        sae.W_dec.copy_(rows)
        sae.b_dec.copy_(0.3 * torch.randn(d_in, generator=g))
    sae.save_model(job["folder"])
    return sae


def _create(job: dict):
    from sae_lens import (GatedSAE, GatedSAEConfig, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig,
                          TopKSAE, TopKSAEConfig)
    from sae_lens.saes.sae import SAEMetadata

    metadata = SAEMetadata(**job.get("metadata", {}))
    common = {"d_in": job["d_in"], "d_sae": job["d_sae"], "dtype": "float32", "device": "cpu",
              "apply_b_dec_to_input": job.get("apply_b_dec_to_input", True), "metadata": metadata}
    if job["architecture"].endswith("transcoder"):
        return _create_transcoder(job, common)
    if job["architecture"] in ("abstopk", "matching_pursuit"):
        return _create_newer(job, common)
    if job["architecture"] == "standard":
        sae = StandardSAE(StandardSAEConfig(**common))
    elif job["architecture"] == "topk":
        sae = TopKSAE(TopKSAEConfig(**common, k=job["k"],
                                    rescale_acts_by_decoder_norm=job.get("rescale_acts_by_decoder_norm", False)))
    elif job["architecture"] == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(**common))
    elif job["architecture"] == "gated":
        sae = GatedSAE(GatedSAEConfig(**common))
    else:
        raise SystemExit(f"unknown architecture {job['architecture']!r}")
    g = torch.Generator().manual_seed(job.get("seed", 0))
    d_in, d_sae = job["d_in"], job["d_sae"]
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        # Decoder rows of varied, non-unit length, so that a reader that assumed unit rows would differ.
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g) * (0.5 + torch.rand(d_sae, 1, generator=g)))
        if sae.b_enc is not None:  # gated SAEs have none
            sae.b_enc.copy_(0.3 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(torch.randn(d_in, generator=g))
        if job["architecture"] == "jumprelu":  # thresholds that switch off a good part of the positive codes
            sae.threshold.copy_(1.5 * torch.rand(d_sae, generator=g))
        elif job["architecture"] == "gated":
            sae.b_gate.copy_(0.3 * torch.randn(d_sae, generator=g))
            sae.b_mag.copy_(0.3 * torch.randn(d_sae, generator=g))
            sae.r_mag.copy_(0.3 * torch.randn(d_sae, generator=g))
    sae.save_model(job["folder"])
    return sae


def _run(job: dict) -> None:
    from sae_lens import SAE

    if job["mode"] == "load":
        sae = SAE.load_from_disk(job["folder"], device="cpu")
    elif job["mode"] == "create":
        sae = _create(job)
    else:
        raise SystemExit(f"unknown mode {job['mode']!r}")
    sae.eval()
    inputs = load_file(job["inputs"])
    with torch.no_grad():
        encoded = sae.encode(inputs["x"])
        out = {"encode": encoded, "decode": sae.decode(inputs["f"]), "forward": sae.decode(encoded), "call": sae(inputs["x"])}
    save_file({k: v.detach().float().contiguous() for k, v in out.items()}, job["out"])
    cfg = sae.cfg.to_dict()
    info = {"class": type(sae).__name__, "cfg": cfg}
    Path(job["out"] + ".json").write_text(json.dumps(info, default=str))


def main() -> None:
    warnings.filterwarnings("ignore")
    import sae_lens

    jobs = json.loads(Path(sys.argv[1]).read_text())
    for job in jobs:
        _run(job)
    print(json.dumps({"sae_lens_version": sae_lens.__version__, "torch": torch.__version__, "jobs": len(jobs)}))


if __name__ == "__main__":
    main()
