"""saelab: train, evaluate and read sparse autoencoders on language-model activations."""

__version__ = "0.1.0"

from saelab.evals import evaluate, splice  # noqa: E402
from saelab.models import load_model, resolve_hook  # noqa: E402
from saelab.runner import LanguageModelSAERunnerConfig, SAETrainingRunner  # noqa: E402
from saelab.sae import SAE, SAEConfig  # noqa: E402
from saelab.training import TrainConfig, Trainer  # noqa: E402


def train(cfg: TrainConfig | None = None, **overrides):
    """Train an SAE end to end (what ``saelab train`` does); returns a RunSummary."""
    from saelab.pipeline import train as run_pipeline

    return run_pipeline(cfg or TrainConfig(**overrides))


def __getattr__(name: str):
    # HookedSAETransformer subclasses TransformerLens's HookedTransformer: imported on first use, so that
    # `import saelab` works (and stays fast) without the optional transformer_lens.
    if name == "HookedSAETransformer":
        try:
            from saelab.models.hooked_sae_transformer import HookedSAETransformer
        except ModuleNotFoundError as err:
            if err.name != "transformer_lens":
                raise
            raise ImportError("HookedSAETransformer needs TransformerLens: pip install 'saelab[tl]' "
                              "(transformer_lens>=2,<4)") from err
        return HookedSAETransformer
    raise AttributeError(f"module 'saelab' has no attribute {name!r}")


__all__ = ["SAE", "HookedSAETransformer", "LanguageModelSAERunnerConfig", "SAEConfig", "SAETrainingRunner",
           "TrainConfig", "Trainer", "__version__", "evaluate", "load_model", "resolve_hook", "splice", "train"]
