"""saelab: train, evaluate and read sparse autoencoders on language-model activations."""

from saelab.version import __version__
from saelab.compat import LanguageModelSAERunnerConfig, SAETrainingRunner
from saelab.evals import evaluate, splice
from saelab.models import load_model, resolve_hook
from saelab.sae import SAE, Architecture, SAEConfig, Settings, register_architecture
from saelab import training
from saelab.training import RunSummary, TrainConfig, Trainer


def train(cfg: TrainConfig | None = None, resume: bool = False, overwrite: bool = False, **overrides) -> RunSummary:
    """Train one SAE end to end (what ``saelab train`` does); returns its RunSummary. Several SAEs on one data
    source: ``saelab.training.train([cfg1, cfg2, ...])``."""
    return training.train([cfg or TrainConfig(**overrides)], resume=resume, overwrite=overwrite)[0]


def __getattr__(name: str):
    # HookedSAETransformer subclasses TransformerLens's HookedTransformer: imported on first use, so that
    # `import saelab` works (and stays fast) without the optional transformer_lens.
    if name == "HookedSAETransformer":
        try:
            from saelab.compat.hooked_sae_transformer import HookedSAETransformer
        except ModuleNotFoundError as err:
            if err.name != "transformer_lens":
                raise
            raise ImportError("HookedSAETransformer needs TransformerLens: pip install 'saelab[tl]' "
                              "(transformer_lens>=2,<4)") from err
        return HookedSAETransformer
    raise AttributeError(f"module 'saelab' has no attribute {name!r}")


__all__ = ["SAE", "Architecture", "HookedSAETransformer", "LanguageModelSAERunnerConfig", "RunSummary", "SAEConfig",
           "SAETrainingRunner", "Settings", "TrainConfig", "Trainer", "__version__", "evaluate", "load_model",
           "register_architecture", "resolve_hook", "splice", "train"]
