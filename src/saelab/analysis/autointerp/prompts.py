"""What the explainer and the scorer read, and how their answers are read back.

Examples are short snippets of text (a window of tokens around a position). The explainer sees its
feature's activating snippets with the active tokens marked ``<<like this>>`` and their activation on a
1-10 scale; it is asked for one short phrase. The scorer answers one yes/no question per snippet:
detection (does the feature fire anywhere in this unmarked text?) and fuzzing (are the marked tokens the
ones the explanation says it fires on?).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from saelab.analysis.autointerp.backends import Prompt

MARK_FRACTION = 0.1  # a token counts as active in a snippet when its activation is >= this x the feature's max
MAX_EXPLANATION_CHARS = 200

EXPLAINER_SYSTEM = "You are a helpful assistant."
SCORER_SYSTEM = "You check explanations of neurons of a language model. You answer Yes or No."


@dataclass
class Snippet:
    tokens: list[str]            # the text of each token
    acts: list[float]            # the feature's activation on each token (0 in a non-activating snippet)
    activation: float = 0.0      # the snippet's largest activation (what it was chosen by, for activating ones)
    context: int = -1            # where it came from in the corpus pass
    position: int = -1

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "acts": self.acts, "activation": self.activation, "context": self.context,
                "position": self.position}

    @classmethod
    def from_dict(cls, data: dict) -> "Snippet":
        return cls(**{key: data[key] for key in ("tokens", "acts", "activation", "context", "position")})


def active_positions(snippet: Snippet, feature_max: float) -> list[int]:
    """The snippet's active tokens: activation >= MARK_FRACTION x the feature's max (its strongest token
    when none is that strong)."""
    if not any(a > 0 for a in snippet.acts):
        return []
    chosen = [i for i, a in enumerate(snippet.acts) if a > 0 and a >= MARK_FRACTION * feature_max]
    return chosen or [max(range(len(snippet.acts)), key=lambda i: snippet.acts[i])]


def shown(token: str) -> str:
    return token.replace("\n", "\\n")


def marked_text(tokens: list[str], marked) -> str:
    """The text with each run of marked tokens wrapped in << >> (leading spaces kept outside the marks)."""
    marked, parts, i = set(marked), [], 0
    while i < len(tokens):
        if i not in marked:
            parts.append(shown(tokens[i]))
            i += 1
            continue
        j = i
        while j < len(tokens) and j in marked:
            j += 1
        span = "".join(shown(t) for t in tokens[i:j])
        stripped = span.lstrip()
        parts.append(f"{span[:len(span) - len(stripped)]}<<{stripped}>>")
        i = j
    return "".join(parts)


def level(activation: float, feature_max: float) -> int:
    """An activation on a 1-10 scale of the feature's largest (10 = as strong as its strongest)."""
    return max(1, min(10, math.ceil(10 * activation / feature_max))) if feature_max > 0 else 1


def explainer_prompt(snippets: list[Snippet], feature_max: float) -> Prompt:
    """The marked snippets and the question, kept short: small local models lose track of long instructions
    (and copy their wording into the answer). A local model's reply completes "The marked tokens are"."""
    lines = ["Each text below has some tokens marked <<like this>>, followed by how strongly each marked token is "
             "marked (1 to 10).", ""]
    for number, snippet in enumerate(snippets, 1):
        active = active_positions(snippet, feature_max)
        listed = ", ".join(f"{shown(snippet.tokens[i]).strip()} {level(snippet.acts[i], feature_max)}" for i in active)
        lines += [f"{number}. {marked_text(snippet.tokens, active)}", f"   ({listed})"]
    lines += ["", "What do the marked tokens have in common? Answer in a few words."]
    return Prompt((("system", EXPLAINER_SYSTEM), ("user", "\n".join(lines))), prefill="The marked tokens are")


def parse_explanation(reply: str) -> str:
    """The explanation in a reply: the text after its last "Explanation:" (or the whole reply), first
    non-empty line, without quotes, markdown emphasis or a final full stop; "" when there is none."""
    found = re.split(r"(?i)explanation\s*:", reply)
    text = found[-1] if len(found) > 1 else reply
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    line = line.strip(" \t*_`")
    for quote in "\"'":  # a quote left open by the cut: the reply quoted "Explanation: ..." as a whole
        if line.count(quote) % 2 and (line.endswith(quote) or line.startswith(quote)):
            line = line[:-1] if line.endswith(quote) else line[1:]
    line = line.strip().rstrip(".").strip()
    if len(line) > 1 and line[0] == line[-1] and line[0] in "\"'":  # the whole phrase quoted
        line = line[1:-1].strip()
    return line[:MAX_EXPLANATION_CHARS]


def detection_prompt(explanation: str, snippet: Snippet) -> Prompt:
    text = "".join(shown(t) for t in snippet.tokens)
    question = (f"A neuron of a language model is explained as: {explanation}\n\nText: {text}\n\nDoes the neuron "
                "fire on some token of this text? Answer Yes or No.")
    return Prompt((("system", SCORER_SYSTEM), ("user", question)), prefill="Answer:")


def fuzzing_prompt(explanation: str, snippet: Snippet, marked) -> Prompt:
    question = (f"A neuron of a language model is explained as: {explanation}\n\nIn this text, the tokens marked "
                "<<like this>> are said to be where the neuron fires.\n\n"
                f"Text: {marked_text(snippet.tokens, marked)}\n\nIs the marking right for the explanation? Answer "
                "Yes or No.")
    return Prompt((("system", SCORER_SYSTEM), ("user", question)), prefill="Answer:")


def top_tokens_explanation(snippets: list[Snippet], feature_max: float, n: int = 3) -> str:
    """The mechanical baseline: the tokens most often active in the explainer's snippets."""
    counts: dict[str, int] = {}
    for snippet in snippets:
        for i in active_positions(snippet, feature_max):
            token = shown(snippet.tokens[i]).strip() or shown(snippet.tokens[i])
            counts[token] = counts.get(token, 0) + 1
    best = sorted(counts, key=lambda t: -counts[t])[:n]
    return "the tokens " + ", ".join(f'"{t}"' for t in best) if best else ""
