"""Shared fixtures: tiny offline models and tokenizers, synthetic activations with known features, and the
SAELens interpreter that the cross-loading tests run ``tests/saelens_roundtrip.py`` under."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


def make_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained in a moment on Python's bundled docs (no download)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(topics.values())[:20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_tiny_llama(vocab_size: int, hidden: int = 32, layers: int = 3, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama and its tokenizer saved as a local transformers folder."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = make_tokenizer()
    model = make_tiny_llama(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def synthetic_activations(n: int, d_in: int, n_features: int, active: int, seed: int = 1000):
    """Rows that are sparse non-negative combinations of ``n_features`` known unit directions. The default seed is
    not a trainer's (0): with the same seed the directions would be the very numbers an SAE starts from."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_features, d_in, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    chosen = torch.rand(n, n_features, generator=g).argsort(dim=1)[:, :active]
    weights = torch.zeros(n, n_features).scatter_(1, chosen, 0.5 + torch.rand(n, active, generator=g))
    return weights @ directions, directions


def assert_resumes_exactly(make, tmp_path, stop_at: int = 23):
    """Train with the Trainer ``make(folder)`` gives, once whole and once stopped after step ``stop_at`` then
    resumed from its checkpoint: both must end with bit-identical weights. Returns the whole run's result."""
    full = make(tmp_path / "full").run()

    def stop(trainer):
        if trainer.step == stop_at:
            trainer.request_stop()

    assert not make(tmp_path / "split").run(on_step=stop).completed
    resumed = make(tmp_path / "split").run(resume=True)
    for name, tensor in full.sae.state_dict().items():
        assert torch.equal(tensor, resumed.sae.state_dict()[name]), name
    return full


def mean_max_cosine(true_directions: torch.Tensor, learned_rows: torch.Tensor) -> float:
    learned = learned_rows / learned_rows.norm(dim=1, keepdim=True)
    return (true_directions @ learned.T).max(dim=1).values.mean().item()


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A small English text file (40 topics of Python's bundled documentation), shared read-only."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("text") / "docs.txt"
    path.write_text("\n\n".join(list(topics.values())[:40]))
    return path


# --- SAELens, in its own interpreter ------------------------------------------------------------------

SAELENS_HELPER = Path(__file__).with_name("saelens_roundtrip.py")


def saelens_python() -> Path:
    """``$SAELAB_SAELENS_PYTHON``, else ``<repo>/.venv-saelens/bin/python`` (``bash scripts/install_saelens.sh``)."""
    return Path(os.environ.get("SAELAB_SAELENS_PYTHON") or REPO / ".venv-saelens" / "bin" / "python")


class SAELensRun:
    """``tests/saelens_roundtrip.py`` running in the background on one list of jobs."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self._summary = None

    def result(self, timeout: float = 900) -> dict:
        """Wait for the helper; its summary line (``{"sae_lens_version": ..., ...}``). Fails the test when the
        helper failed."""
        if self._summary is None:
            try:
                out, err = self.proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
            assert self.proc.returncode == 0, f"SAELens helper failed ({self.proc.returncode}):\n{err[-4000:]}"
            self._summary = json.loads(out.strip().splitlines()[-1])
        return self._summary

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class SAELens:
    """The interpreter that has sae-lens 6.x. ``start(jobs, root)`` writes ``root/jobs.json`` and runs every job
    (see ``tests/saelens_roundtrip.py``) in one background process, since importing sae_lens takes ~15 s;
    ``run(jobs, root)`` also waits for it and returns the summary."""

    def __init__(self, python: Path):
        self.python = python

    def start(self, jobs: list[dict], root: Path) -> SAELensRun:
        (root / "jobs.json").write_text(json.dumps(jobs))
        return SAELensRun(subprocess.Popen([str(self.python), str(SAELENS_HELPER), str(root / "jobs.json")],
                                           cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))

    def run(self, jobs: list[dict], root: Path, timeout: float = 900) -> dict:
        return self.start(jobs, root).result(timeout)


def find_saelens() -> SAELens | None:
    """The SAELens interpreter, or None where it is not installed (for code that must not skip)."""
    python = saelens_python()
    return SAELens(python) if python.exists() else None


@pytest.fixture(scope="session")
def saelens() -> SAELens:
    """The SAELens interpreter; skips the test where it is absent. Mark its tests ``saelens`` (and
    ``subprocess``), so that ``-m "not saelens"`` leaves them out."""
    found = find_saelens()
    if found is None:
        pytest.skip(f"SAELens interpreter {saelens_python()} not found: run `bash scripts/install_saelens.sh` "
                    "or set SAELAB_SAELENS_PYTHON to a python that has sae-lens 6.x")
    return found


def step_for(sae, remedy: str = "none", dead_mask=None, dead_latents=None, **settings):
    """Give ``sae`` those of these training settings its architecture declares (as a run does: each architecture
    reads its own) and return the ``TrainStep`` to call ``training_forward`` with."""
    import dataclasses

    from saelab.sae import TrainStep, architecture

    current = sae.settings or architecture(sae.architecture).settings()
    own = {f.name for f in dataclasses.fields(current)}
    sae.settings = dataclasses.replace(current, **{name: value for name, value in settings.items() if name in own})
    return TrainStep(remedy=remedy, dead_mask=dead_mask, dead_latents=dead_latents)
