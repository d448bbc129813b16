"""Sparse probing (as SAEBench defines it): how much of a labelled distinction a few SAE latents carry.

For a binary task, each example (a text, mean-pooled over its tokens; or one token) gives the model's
activation at the hook and the SAE's latents. On the training split the latents are ranked by the absolute
difference of their class means; a logistic-regression probe on the top k (k = 1, 2, 5, 10, 20) is fit and
its accuracy taken on the test split, beside a probe on the full activation (``llm_test_accuracy``) and on
all latents (``sae_test_accuracy``). Keys follow SAEBench's (``sae_top_1_test_accuracy``, ...).

Built-in tasks, all from text every Python install has (no download):
- ``corpus``: is a 64-token passage from Python's language reference (0) or from the standard library's
  docstrings (1)? (the two halves of the ``python-docs`` corpus; one label per passage)
- ``digits``: is a token a number (contains a digit) or a word (letters only)? (tokens of ``python-docs``;
  one label per token, classes balanced)
Any labelled dataset works too: a local .jsonl/.parquet file, saved dataset or hub id with a text and a
label column; each distinct label is probed against the rest.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import islice

import torch

PROBE_KS = (1, 2, 5, 10, 20)
PASSAGE_TOKENS = 64
BUILTIN_TASKS = {
    "corpus": "Python language reference (0) vs standard-library docstrings (1), one 64-token passage each",
    "digits": "number tokens (contain a digit, 1) vs word tokens (letters only, 0)",
}


def probe_accuracies(activations: torch.Tensor, latents: torch.Tensor, labels: torch.Tensor,
                     ks=PROBE_KS, test_fraction: float = 0.2, seed: int = 0) -> dict:
    """The probes above on examples ``activations`` [n, d_in], ``latents`` [n, d_sae] with 0/1 ``labels`` [n]."""
    labels = labels.long()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    n_test = max(1, int(round(test_fraction * len(labels))))
    test, train = order[:n_test], order[n_test:]
    if len(labels[train].unique()) < 2 or len(labels[test].unique()) < 2:
        raise ValueError(f"a probing task needs both classes in its train and test splits ({len(labels)} examples, "
                         f"{int(labels.sum())} positive): give more examples")
    difference = latents[train][labels[train] == 1].mean(0) - latents[train][labels[train] == 0].mean(0)
    ranked = difference.abs().argsort(descending=True)
    result = {"examples": len(labels), "positives": int(labels.sum()),
              "llm_test_accuracy": _probe(activations, labels, train, test),
              "sae_test_accuracy": _probe(latents, labels, train, test)}
    for k in ks:
        if k <= latents.shape[1]:
            result[f"sae_top_{k}_test_accuracy"] = _probe(latents[:, ranked[:k]], labels, train, test)
    result["top_latents"] = ranked[:max(ks)].tolist()
    return result


def _probe(features: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, test: torch.Tensor,
           weight_decay: float = 1e-3, steps: int = 100) -> float:
    """Test accuracy of an L2-regularised logistic regression fit (L-BFGS) on standardised features."""
    x = features.double()
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-8)
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    y = labels[train].double()
    optimizer = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(x[train] @ w + b, y) + weight_decay * w.pow(2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    with torch.no_grad():
        predicted = (x[test] @ w + b) > 0
    return float((predicted == labels[test].bool()).double().mean())


# --- examples --------------------------------------------------------------------------------------------
def corpus_passages(tokenizer, per_class: int) -> tuple[list[list[int]], list[int]]:
    """The ``corpus`` task: ``per_class`` passages of PASSAGE_TOKENS tokens from each half of python-docs."""
    from saelab.data.text import iter_documents

    passages, labels = [], []
    for label, corpus in enumerate(("python-reference", "python-docstrings")):
        taken = 0
        for document in iter_documents(corpus):
            ids = tokenizer(document, add_special_tokens=False)["input_ids"]
            for start in range(0, len(ids) - PASSAGE_TOKENS + 1, PASSAGE_TOKENS):
                passages.append(ids[start:start + PASSAGE_TOKENS])
                labels.append(label)
                taken += 1
                if taken >= per_class:
                    break
            if taken >= per_class:
                break
    return passages, labels


def token_labels(tokenizer, token_ids: torch.Tensor) -> torch.Tensor:
    """The ``digits`` task's label of each token id: 1 number, 0 word, -1 neither (left out)."""
    labels = torch.full(token_ids.shape, -1, dtype=torch.long)
    cache: dict[int, int] = {}
    for index, token in enumerate(token_ids.tolist()):
        if token not in cache:
            text = tokenizer.decode([token]).strip()
            cache[token] = 1 if text.replace(",", "").replace(".", "").isdigit() else 0 if text.isalpha() else -1
        labels[index] = cache[token]
    return labels


def labelled_texts(dataset: str, split: str, text_column: str | None, label_column: str,
                   limit: int) -> Iterator[tuple[str, object]]:
    """``(text, label)`` rows of a labelled dataset (at most ``limit``)."""
    from saelab.data.text import iter_rows

    for count, (row, where) in enumerate(iter_rows(dataset, split)):
        if count >= limit:
            return
        if label_column not in row:
            raise ValueError(f"{where}: no label column {label_column!r}; columns are {sorted(row)} (choose one "
                             "with --probe-label-column)")
        column = text_column or next((c for c in ("text", "sentence", "content", "document") if c in row), None)
        if column is None or column not in row:
            raise ValueError(f"{where}: no text column among {sorted(row)}; pass --text-column NAME")
        yield row[column], row[label_column]


def balanced(labels: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    """Indices of at most ``per_class`` examples of each of the labels 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for label in (0, 1):
        where = (labels == label).nonzero().squeeze(1)
        chosen.append(where[torch.randperm(len(where), generator=g)[:per_class]])
    return torch.cat(chosen)


def mean_or_nan(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


# --- running the tasks through a model and an SAE ------------------------------------------------------------
@torch.no_grad()
def probing_metrics(model, tokenizer, hook, sae, tasks: list[str], examples: int = 1000,
                    dataset: str | None = None, split: str = "train", text_column: str | None = None,
                    label_column: str = "label", prepend_bos: bool = True, progress=None) -> dict:
    """Every task's probe accuracies (``tasks``: built-in names; ``dataset``: a labelled dataset, each label
    against the rest), and their means over the tasks (``mean``)."""
    from saelab.data.tokens import bos_id, special_ids

    say = progress or (lambda message: None)
    bos = [bos_id(tokenizer)] if prepend_bos else []
    special = special_ids(tokenizer)
    results: dict[str, dict] = {}
    for task in tasks:
        say(f"probing: {task} ({BUILTIN_TASKS[task]})")
        if task == "corpus":
            passages, labels = corpus_passages(tokenizer, examples // 2)
            acts, latents = _pooled(model, hook, sae, [bos + p for p in passages], len(bos))
            results[task] = probe_accuracies(acts, latents, torch.tensor(labels))
        elif task == "digits":
            acts, latents, labels = _digit_tokens(model, tokenizer, hook, sae, examples // 2, bos, special)
            results[task] = probe_accuracies(acts, latents, labels)
    if dataset is not None:
        rows = list(labelled_texts(dataset, split, text_column, label_column, examples))
        classes = sorted({str(label) for _, label in rows})
        if len(classes) < 2:
            raise ValueError(f"--probe-dataset {dataset}: column {label_column!r} holds {len(classes)} distinct "
                             "label(s); probing needs two or more")
        say(f"probing: {dataset} ({len(rows)} texts, labels {', '.join(classes[:10])})")
        ids = [bos + tokenizer(text, add_special_tokens=False)["input_ids"][:PASSAGE_TOKENS * 2] for text, _ in rows]
        acts, latents = _pooled(model, hook, sae, ids, len(bos))
        for name in classes[:10]:
            labels = torch.tensor([int(str(label) == name) for _, label in rows])
            results[f"{label_column}={name}"] = probe_accuracies(acts, latents, labels)
    summary_keys = ["llm_test_accuracy", "sae_test_accuracy", *(f"sae_top_{k}_test_accuracy" for k in PROBE_KS)]
    return {"tasks": results,
            "mean": {key: mean_or_nan(r.get(key) for r in results.values()) for key in summary_keys}}


def _activations(model, hook, token_ids: torch.Tensor) -> torch.Tensor:
    from saelab.models.hooks import capture

    device = next(model.parameters()).device
    return capture(model, token_ids.to(device), [hook])[hook.name].float().cpu()


def _pooled(model, hook, sae, sequences: list[list[int]], skip: int, batch: int = 16):
    """Mean over each sequence's tokens (after the first ``skip``, the BOS) of the activation and of the
    SAE's latents; sequences of equal length run in batches, the others one at a time."""
    acts, latents = [], []
    by_length: dict[int, list[int]] = {}
    for index, sequence in enumerate(sequences):
        by_length.setdefault(len(sequence), []).append(index)
    pooled: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for length, indices in by_length.items():
        if length <= skip:
            raise ValueError("a probing text gave no token after BOS; drop empty texts")
        for start in range(0, len(indices), batch):
            chosen = indices[start:start + batch]
            x = _activations(model, hook, torch.tensor([sequences[i] for i in chosen]))[:, skip:]
            codes = sae.encode(x)
            for row, i in enumerate(chosen):
                pooled[i] = (x[row].mean(0), codes[row].mean(0))
    for index in range(len(sequences)):
        acts.append(pooled[index][0])
        latents.append(pooled[index][1])
    return torch.stack(acts), torch.stack(latents)


def _digit_tokens(model, tokenizer, hook, sae, per_class: int, bos: list[int], special: torch.Tensor,
                  batch: int = 16, most: int = 400):
    """Token rows of python-docs passages labelled number (1) or word (0), balanced, until each class has
    ``per_class`` (or ``most`` passages are read); the passages run through the model ``batch`` at a time."""
    from saelab.data.text import iter_documents

    def passages():
        for document in iter_documents("python-docs"):
            ids = tokenizer(document, add_special_tokens=False)["input_ids"]
            for start in range(0, len(ids) - PASSAGE_TOKENS + 1, PASSAGE_TOKENS):
                yield bos + ids[start:start + PASSAGE_TOKENS]

    acts, latents, labels, counts = [], [], [], torch.zeros(2, dtype=torch.long)
    stream = islice(passages(), most)
    while min(counts) < per_class and (chunk := list(islice(stream, batch))):
        tokens = torch.tensor(chunk)[:, len(bos):]
        x = _activations(model, hook, torch.tensor(chunk))[:, len(bos):]
        label = token_labels(tokenizer, tokens.flatten())
        keep = (label >= 0) & ~torch.isin(tokens.flatten(), special)
        rows = x.reshape(-1, x.shape[-1])[keep]
        acts.append(rows)
        latents.append(sae.encode(rows))
        labels.append(label[keep])
        counts += torch.bincount(label[keep], minlength=2)
    labels = torch.cat(labels)
    chosen = balanced(labels, per_class)
    return torch.cat(acts)[chosen], torch.cat(latents)[chosen], labels[chosen]
