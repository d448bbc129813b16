"""Which features fire on each token of a text, and how strongly."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelab.analysis.loading import Loaded, show_token, token_strings
from saelab.options import option


@dataclass
class TokenFeatures:
    position: int
    token_id: int
    token: str
    special: bool                         # BOS/EOS/pad: the SAE was not trained on these positions
    features: list[tuple[int, float]]     # (feature index, activation), strongest first, active ones only


@dataclass
class FeaturesConfig:
    """``saelab features``: the features of a text, and/or the tokens some features promote."""

    text: str | None = option(None, "Text to read the features of, e.g. \"The capital of France is Paris\".")
    top: int = option(5, "Features shown per token.")
    logits: list[int] | None = option(None, "Feature index(es) whose promoted and suppressed tokens to print "
                                      "(decoder direction -> final norm weight -> unembedding).", nargs="+",
                                      metavar="F")
    logit_tokens: int = option(10, "Tokens shown on each side with --logits.")
    include_special_tokens: bool = option(False, "Also show features on BOS/EOS/pad positions (default: hidden; "
                                          "the SAE is not trained on them).")

    def __post_init__(self):
        if self.text is None and not self.logits:
            raise ValueError("give --text (features per token) and/or --logits F (a feature's promoted tokens)")
        if self.top <= 0 or self.logit_tokens <= 0:
            raise ValueError("--top and --logit-tokens must be positive")


@torch.no_grad()
def token_features(loaded: Loaded, text: str, top: int = 5) -> list[TokenFeatures]:
    """The ``top`` most active features at every token of ``text`` (BOS first when the SAE uses it)."""
    if top <= 0:
        raise ValueError(f"--top must be positive, got {top}")
    tokens = loaded.tokenize(text)
    act = loaded.input_activations(tokens)[0]
    feats = loaded.sae.encode(act)
    values, indices = feats.topk(min(top, feats.shape[-1]), dim=-1)
    special = loaded.special_mask(tokens)[0]
    ids = tokens[0].tolist()
    rows = []
    for pos, (token_id, text_piece) in enumerate(zip(ids, token_strings(loaded.tokenizer, ids))):
        pairs = [(int(i), float(v)) for v, i in zip(values[pos].tolist(), indices[pos].tolist()) if v > 0]
        rows.append(TokenFeatures(pos, token_id, text_piece, bool(special[pos]), pairs))
    return rows


def format_token_features(rows: list[TokenFeatures], include_special: bool = False) -> str:
    """A table: position, token, then ``feature:activation`` for the strongest features."""
    shown = [show_token(r.token) for r in rows]
    width = max([len("token"), *(len(s) for s in shown)])
    lines = [f"{'pos':>4}  {'token':<{width}}  top features (index: activation)"]
    for row, token in zip(rows, shown):
        if row.special and not include_special:
            cells = "(special token: not an SAE input)"
        elif not row.features:
            cells = "(no active feature)"
        else:
            cells = "  ".join(f"{i:>6}: {v:<7.3f}" for i, v in row.features).rstrip()
        lines.append(f"{row.position:>4}  {token:<{width}}  {cells}")
    return "\n".join(lines)
