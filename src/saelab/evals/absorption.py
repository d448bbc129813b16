"""Feature absorption on first-letter spelling (Chanin et al. 2024, as SAEBench measures it).

A model knows which letter a word token starts with: a linear probe on the hook's activation at the word
of ``"<word> has the first letter:"`` (after ten solved examples) reads it. An SAE should have latents for
"starts with S"; absorption is when such a latent stays silent on some S-words because a more specific
latent (say "short") has taken the S direction into its own decoder row. The steps:

1. Words: single tokens of the model's vocabulary that are letters only (a leading space allowed), drawn
   with the seed and split 80/20 into train and test words (their in-context examples come from the same
   split).
2. Letter probes: one logistic-regression probe per letter (one against the rest, classes balanced) on
   the train words' activations; its F1 on the test words says whether the model represents the letter.
3. Main latents (k-sparse probing): an L1-penalised logistic regression of the letter on all the SAE's
   latents ranks them; for k = 1..max_k a probe on the top k is fit and scored (F1 on the test words). The
   main latents are the top k while each k raises F1 by more than ``f1_jump`` (0.03); their number is the
   letter's feature splitting (``num_split_features``).
4. Absorption, on each test word of the letter that the letter probe detects (score > 0): the probe
   projection of the activation is ``x . p`` (``p`` the probe's unit direction); latent i contributes
   ``f_i * (W_dec[i] . p)`` of the reconstruction's projection (SAEBench writes ``f_i * cos``, the same for
   unit decoder rows). *Full absorption*: no main latent fires, and the latent contributing most has a
   decoder cosine with ``p`` of at least 0.025 and contributes at least 40% of ``x . p``. *Absorption
   fraction*: the part of ``x . p`` that the main latents miss and up to three other latents aligned with
   ``p`` (cosine >= 0.1) supply, relative to that supplied part plus the main latents' (0 when those
   others supply under 40% of ``x . p`` or the main latents account for all of it).
Per letter the rates are sums over its detected test words divided by their number; the scores are means
over the letters whose probe reaches F1 0.6 and has detected test words (SAEBench's key names).
"""

from __future__ import annotations

import math
import random
import statistics
import warnings
from dataclasses import dataclass, field

import torch

from saelab.evals.probing import encode_rows, fit_logistic

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DEFAULT_WORDS = 3000                      # vocabulary words drawn (saelab eval --absorption-words)
PROMPT_SUFFIX = " has the first letter:"
EXAMPLE_SEPARATOR = "\n"
MIN_PROBE_F1 = 0.6                        # letters whose probe is worse are not scored
FULL_ABSORPTION_COSINE = 0.025            # the top latent's decoder cosine with the probe, at least
FRACTION_ABSORBER_COSINE = 0.1            # a partly absorbing latent's decoder cosine with the probe, at least
PROJECTION_SHARE = 0.4                    # absorbing latents must supply this share of the probe projection
MAX_ABSORBERS = 3                         # latents that may share the absorption (absorption fraction)
FIRING = 1e-8                             # an activation above this is a latent firing


@dataclass
class SpellingSet:
    """The model's activations at the word token of first-letter prompts (what the SAE is not needed for)."""

    words: list[str]
    letters: torch.Tensor        # [n] 0..25: each word's first letter
    activations: torch.Tensor    # [n, d_in] at the hook, at the word's position
    train: torch.Tensor          # [n] bool: a train word (else a test word)

    @property
    def test(self) -> torch.Tensor:
        return ~self.train


@dataclass
class LetterProbes:
    """One probe per letter in activation space: ``score = x @ weights[l] + bias[l]``."""

    weights: torch.Tensor        # [26, d_in]
    bias: torch.Tensor           # [26]
    f1: list[float]              # each probe's F1 on the test words

    def directions(self) -> torch.Tensor:
        return self.weights / self.weights.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return x.double() @ self.weights.T + self.bias


@dataclass
class LetterResult:
    """What step 3 and 4 found for one letter."""

    letter: str
    main_latents: list[int]
    k_sparse_f1: list[float]                                   # F1 of the top-k probe, k = 1..max_k
    fractions: list[float] = field(default_factory=list)       # per detected test word
    full: list[bool] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)          # fully absorbed words and their absorber


def alpha_tokens(tokenizer) -> list[tuple[int, str]]:
    """``(token id, text)`` of the vocabulary's tokens that are ASCII letters only (one leading space allowed)."""
    found = []
    for token_id, text in enumerate(tokenizer.batch_decode([[i] for i in range(len(tokenizer))])):
        word = text[1:] if text.startswith(" ") else text
        if word and word.isascii() and word.isalpha():
            found.append((token_id, text))
    return found


def spelling_prompts(tokenizer, words: list[tuple[int, str]], examples_from: list[tuple[int, str]],
                     rng: random.Random, examples: int = 10, bos: list[int] | None = None
                     ) -> tuple[list[list[int]], list[int]]:
    """Each word's prompt as token ids (``examples`` solved examples from ``examples_from``, never the word
    itself, then ``"<word> has the first letter:"``) and the position of the word in it."""
    suffix = tokenizer(PROMPT_SUFFIX, add_special_tokens=False)["input_ids"]
    separator = tokenizer(EXAMPLE_SEPARATOR, add_special_tokens=False)["input_ids"]
    answers = {letter: tokenizer(" " + letter.upper(), add_special_tokens=False)["input_ids"] for letter in LETTERS}
    prompts, positions = [], []
    for token_id, text in words:
        ids = list(bos or [])
        shown = [pair for pair in rng.sample(examples_from, min(len(examples_from), examples + 1))
                 if pair[0] != token_id][:examples]
        for example_id, example_text in shown:
            ids += [example_id, *suffix, *answers[first_letter(example_text)], *separator]
        positions.append(len(ids))
        prompts.append(ids + [token_id, *suffix])
    return prompts, positions


def first_letter(word: str) -> str:
    return word.strip()[0].lower()


@torch.no_grad()
def spelling_set(model, tokenizer, hook, words: int = DEFAULT_WORDS, seed: int = 0, examples: int = 10,
                 prepend_bos: bool = True, batch: int = 32, progress=None) -> SpellingSet:
    """Step 1: ``words`` vocabulary words (seeded), their prompts run through the model to the hook."""
    from saelab.data.tokens import bos_id
    from saelab.models.hooks import capture

    vocabulary = alpha_tokens(tokenizer)
    if len(vocabulary) < 2 * len(LETTERS):
        raise ValueError(f"absorption suite: the tokenizer has only {len(vocabulary)} tokens made of letters; the "
                         "first-letter task needs a vocabulary of words")
    rng = random.Random(seed)
    chosen = rng.sample(vocabulary, min(words, len(vocabulary)))
    n_train = int(round(0.8 * len(chosen)))
    train_words, test_words = chosen[:n_train], chosen[n_train:]
    bos = [bos_id(tokenizer)] if prepend_bos else []
    prompts, positions = [], []
    for split in (train_words, test_words):
        split_prompts, split_positions = spelling_prompts(tokenizer, split, split, rng, examples, bos)
        prompts += split_prompts
        positions += split_positions
    device = next(model.parameters()).device
    rows = []
    batches = range(0, len(prompts), batch)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="first-letter prompts", unit="batch", leave=False)
    for start in batches:
        chunk = prompts[start:start + batch]
        width = max(map(len, chunk))
        # Right-padded: a causal model's activation at the word does not see what follows it.
        ids = torch.tensor([p + [p[-1]] * (width - len(p)) for p in chunk], device=device)
        acts = capture(model, ids, [hook])[hook.name].float().cpu()
        where = torch.tensor(positions[start:start + batch])
        rows.append(acts[torch.arange(len(chunk)), where])
    texts = [text for _, text in chosen]
    return SpellingSet(texts, torch.tensor([LETTERS.index(first_letter(t)) for t in texts]), torch.cat(rows),
                       torch.arange(len(chosen)) < n_train)


def letter_probes(spelling: SpellingSet) -> LetterProbes:
    """Step 2: a balanced one-against-the-rest probe per letter on the train words; F1 on the test words."""
    x, letters = spelling.activations, spelling.letters
    weights, biases, f1s = [], [], []
    for index in range(len(LETTERS)):
        labels = (letters == index).long()
        if labels[spelling.train].sum() == 0:
            weights.append(torch.zeros(x.shape[1], dtype=torch.float64))
            biases.append(torch.tensor(-1.0, dtype=torch.float64))
        else:
            w, b = fit_logistic(x[spelling.train], labels[spelling.train], balanced=True)
            weights.append(w)
            biases.append(b)
        predicted = (x[spelling.test].double() @ weights[-1] + biases[-1]) > 0
        f1s.append(f1_score(predicted, labels[spelling.test].bool()))
    return LetterProbes(torch.stack(weights), torch.stack(biases), f1s)


def f1_score(predicted: torch.Tensor, actual: torch.Tensor) -> float:
    true_positives = float((predicted & actual).sum())
    denominator = float(predicted.sum() + actual.sum())
    return 2 * true_positives / denominator if denominator else 0.0


def rank_latents(latents: torch.Tensor, letters: torch.Tensor, l1: float = 0.01, steps: int = 300,
                 lr: float = 0.01) -> torch.Tensor:
    """Step 3's ranking: every letter's latents in order of their weight (largest first) in an L1-penalised
    one-against-the-rest logistic regression (positives weighted up to balance the classes) on the latents
    scaled to unit standard deviation; all letters fit together, full batch, Adam, deterministic. The latents
    stay sparse (scaled, not centred) and the gradient is written out, so a step costs what the firing
    latents cost. Returns [26, d_sae] latent indices."""
    scaled = latents.float() / latents.float().std(0).clamp_min(1e-8)
    with warnings.catch_warnings():  # torch calls its sparse CSR support beta; these two products are plain
        warnings.simplefilter("ignore", UserWarning)
        x, x_t = scaled.to_sparse_csr(), scaled.T.contiguous().to_sparse_csr()
    y = torch.nn.functional.one_hot(letters, len(LETTERS)).float()
    positives = y.sum(0).clamp_min(1)
    pos_weight = (len(y) - positives) / positives
    w = torch.zeros(x.shape[1], len(LETTERS))
    b = torch.zeros(len(LETTERS))
    optimizer = torch.optim.Adam([w, b], lr=lr)
    scale = 1.0 / y.numel()
    for _ in range(steps):
        # d/dz of the mean of BCE(z, y) with pos_weight p: (sigmoid(z) (p y + 1 - y) - p y) / (n * 26)
        logits = x @ w + b
        d_logits = (torch.sigmoid(logits) * (pos_weight * y + 1 - y) - pos_weight * y) * scale
        w.grad = x_t @ d_logits + l1 * w.sign() / len(LETTERS)
        b.grad = d_logits.sum(0)
        optimizer.step()
    return w.T.argsort(dim=1, descending=True)


def main_latents(train_latents: torch.Tensor, train_letters: torch.Tensor, test_latents: torch.Tensor,
                 test_letters: torch.Tensor, max_k: int = 10, f1_jump: float = 0.03
                 ) -> list[tuple[list[int], list[float]]]:
    """Step 3 for every letter: ``(main latents, F1 of the top-k probe for k = 1..max_k)``."""
    ranked = rank_latents(train_latents, train_letters)
    letters = torch.arange(len(LETTERS))
    train_labels = (train_letters[None] == letters[:, None]).long()       # [26, n_train]
    test_labels = test_letters[None] == letters[:, None]
    scores = []                                                           # [k][letter]
    for k in range(1, min(max_k, train_latents.shape[1]) + 1):
        chosen = ranked[:, :k]                                            # [26, k]
        w, b = fit_logistic(train_latents.T[chosen].transpose(1, 2), train_labels, balanced=True)
        predicted = (test_latents.T[chosen].transpose(1, 2).double() @ w.unsqueeze(-1)).squeeze(-1) + b[:, None] > 0
        scores.append([f1_score(p, a) for p, a in zip(predicted, test_labels)])
    found = []
    for index in range(len(LETTERS)):
        letter_scores = [score[index] for score in scores]
        best, main = -math.inf, []
        for k, score in enumerate(letter_scores, start=1):
            if score <= best + f1_jump:
                break
            best, main = score, ranked[index, :k].tolist()
        found.append((main, letter_scores))
    return found


def word_absorption(x: torch.Tensor, latents: torch.Tensor, decoder: torch.Tensor, direction: torch.Tensor,
                    main: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 4 for the rows ``x`` [n, d_in] (their latents [n, d_sae]) against the unit probe ``direction``:
    ``(absorption fraction [n], full absorption [n] bool, the latent contributing most [n])``."""
    direction = direction.double() / direction.double().norm()
    decoder = decoder.double()
    along = decoder @ direction                                          # [d_sae] W_dec[i] . p
    cosine = along / decoder.norm(dim=1).clamp_min(1e-12)
    contribution = latents.double() * along                              # [n, d_sae]
    projection = x.double() @ direction                                  # [n]
    is_main = torch.zeros(decoder.shape[0], dtype=torch.bool)
    is_main[main] = True
    main_part = contribution[:, is_main].sum(1)
    candidates = torch.where((~is_main & (cosine >= FRACTION_ABSORBER_COSINE))[None] & (contribution > 0),
                             contribution, torch.zeros_like(contribution))
    absorbers = candidates.topk(min(MAX_ABSORBERS, candidates.shape[1]), dim=1).values.sum(1)
    unaccounted = projection - main_part
    absorbed = torch.minimum(absorbers, unaccounted)
    fraction = (absorbed / (absorbed + main_part)).clamp(0, 1)
    fraction = torch.where(main_part <= 0, torch.ones_like(fraction), fraction)
    too_little = (main_part >= projection) | (absorbers < PROJECTION_SHARE * projection)
    fraction = torch.where(too_little, torch.zeros_like(fraction), fraction)

    top = contribution.argmax(1)
    top_part = contribution.gather(1, top[:, None]).squeeze(1)
    full = ((latents[:, is_main] <= FIRING).all(1) & (cosine[top] >= FULL_ABSORPTION_COSINE) & (projection > 0)
            & (top_part >= PROJECTION_SHARE * projection))
    return fraction, full, top


@torch.no_grad()
def absorption_metrics(sae, spelling: SpellingSet, probes: LetterProbes, max_k: int = 10,
                       f1_jump: float = 0.03) -> dict:
    """Steps 3 and 4 for ``sae``: SAEBench's mean scores and one row per letter (``letters``)."""
    latents = encode_rows(sae, spelling.activations)
    train, test = spelling.train, spelling.test
    mains = main_latents(latents[train], spelling.letters[train], latents[test], spelling.letters[test], max_k,
                         f1_jump)
    directions = probes.directions()
    detected = probes.scores(spelling.activations) > 0                 # [n, 26]
    decoder = sae.W_dec.detach().float().cpu()
    test_index = test.nonzero().squeeze(1)
    results = []
    for index, letter in enumerate(LETTERS):
        main, scores = mains[index]
        result = LetterResult(letter, main, scores)
        rows = test_index[(spelling.letters[test_index] == index) & detected[test_index, index]]
        if len(rows):
            fraction, full, top = word_absorption(spelling.activations[rows], latents[rows], decoder,
                                                  directions[index], main)
            result.fractions, result.full = fraction.tolist(), full.tolist()
            result.examples = [{"word": spelling.words[int(row)], "absorbing_latent": int(latent)}
                               for row, latent, is_full in zip(rows, top, full) if is_full][:5]
        results.append(result)
    return summarize(results, probes.f1)


def summarize(results: list[LetterResult], probe_f1: list[float]) -> dict:
    """The per-letter rows and their means over the scored letters (SAEBench's keys)."""
    letters, scored = [], []
    for result, f1 in zip(results, probe_f1):
        words = len(result.fractions)
        row = {"first_letter": result.letter, "probe_f1": f1, "num_probe_true_positives": words,
               "num_split_features": len(result.main_latents), "main_latents": result.main_latents,
               "k_sparse_f1": result.k_sparse_f1, "num_full_absorption": int(sum(result.full)),
               "mean_absorption_fraction": sum(result.fractions) / words if words else math.nan,
               "full_absorption_rate": sum(result.full) / words if words else math.nan,
               "absorbed_examples": result.examples, "scored": bool(words and f1 >= MIN_PROBE_F1)}
        letters.append(row)
        if row["scored"]:
            scored.append(row)

    def mean(key):
        return statistics.mean(row[key] for row in scored) if scored else math.nan

    def spread(key):
        return statistics.stdev(row[key] for row in scored) if len(scored) > 1 else math.nan

    return {"mean_absorption_fraction_score": mean("mean_absorption_fraction"),
            "mean_full_absorption_score": mean("full_absorption_rate"),
            "mean_num_split_features": mean("num_split_features"),
            "std_dev_absorption_fraction_score": spread("mean_absorption_fraction"),
            "std_dev_full_absorption_score": spread("full_absorption_rate"),
            "std_dev_num_split_features": spread("num_split_features"),
            "letters_scored": len(scored), "letters": letters}
