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
- ``code``: is a token inside Python code (an interactive line after its ``>>> `` or ``... `` prompt, the
  prompt itself left out) or in prose (a line of running text)? (the python-docs documents holding such
  examples; one label per token, classes balanced)
Any labelled dataset works too: a local .jsonl/.parquet file, saved dataset or hub id with a text and a
label column; each distinct label is probed against the rest.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import islice

import torch

PROBE_KS = (1, 2, 5, 10, 20)
DEFAULT_EXAMPLES = 1000     # examples per task (saelab eval --probe-examples)
PASSAGE_TOKENS = 64
BUILTIN_TASKS = {
    "corpus": "Python language reference (0) vs standard-library docstrings (1), one 64-token passage each",
    "digits": "number tokens (contain a digit, 1) vs word tokens (letters only, 0)",
    "code": "tokens of interactive Python lines after the >>> / ... prompt (1) vs tokens of prose lines (0)",
}
CODE_PROMPTS = (">>> ", "... ")


RANKINGS = {
    "difference": "by the absolute difference of the class means (SAEBench's)",
    "standardized": "by that difference over the latent's standard deviation (large-magnitude latents that "
                    "fire on both classes do not crowd out the informative ones)",
}


def probe_accuracies(activations: torch.Tensor, latents: torch.Tensor, labels: torch.Tensor,
                     ks=PROBE_KS, test_fraction: float = 0.2, seed: int = 0, ranking: str = "difference") -> dict:
    """The probes above on examples ``activations`` [n, d_in], ``latents`` [n, d_sae] with 0/1 ``labels`` [n];
    the latents ranked as ``ranking`` (a key of RANKINGS) says."""
    labels = labels.long()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    n_test = max(1, int(round(test_fraction * len(labels))))
    test, train = order[:n_test], order[n_test:]
    if len(labels[train].unique()) < 2 or len(labels[test].unique()) < 2:
        raise ValueError(f"a probing task needs both classes in its train and test splits ({len(labels)} examples, "
                         f"{int(labels.sum())} positive): give more examples")
    difference = (latents[train][labels[train] == 1].mean(0) - latents[train][labels[train] == 0].mean(0)).abs()
    if ranking == "standardized":
        difference = difference / latents[train].std(0).clamp_min(1e-8)
    ranked = difference.argsort(descending=True)
    result = {"examples": len(labels), "positives": int(labels.sum()),
              "llm_test_accuracy": _probe(activations, labels, train, test),
              "sae_test_accuracy": _probe(latents, labels, train, test)}
    for k in ks:
        if k <= latents.shape[1]:
            result[f"sae_top_{k}_test_accuracy"] = _probe(latents[:, ranked[:k]], labels, train, test)
    result["top_latents"] = ranked[:max(ks)].tolist()
    return result


def _probe(features: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, test: torch.Tensor) -> float:
    """Test accuracy of a logistic-regression probe fit on the train rows."""
    weights, bias = fit_logistic(features[train], labels[train])
    predicted = (features[test].double() @ weights + bias) > 0
    return float((predicted == labels[test].bool()).double().mean())


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, weight_decay: float = 1e-3, balanced: bool = False,
                 steps: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """An L2-regularised logistic regression of 0/1 ``labels`` [..., n] on ``features`` [..., n, m], fit
    (L-BFGS) on standardised features and returned as ``(weights [..., m], bias [...])`` of the raw features
    (float64): a row's score is ``row @ weights + bias``. Leading dimensions are independent problems fit
    together (their losses summed). ``balanced`` weighs each class by the inverse of its share."""
    x = features.detach().double()
    mean = x.mean(-2, keepdim=True)
    std = x.std(-2, keepdim=True).clamp_min(1e-8) if x.shape[-2] > 1 else torch.ones_like(mean)
    x = (x - mean) / std
    y = labels.double()
    positives = y.mean(-1, keepdim=True).clamp(1e-6, 1 - 1e-6)
    sample_weight = torch.where(y > 0, 0.5 / positives, 0.5 / (1 - positives)) if balanced else torch.ones_like(y)
    if x.shape[-1] <= NEWTON_FEATURES:
        w, b = _newton(x, y, sample_weight, weight_decay, steps)
    else:
        w, b = _lbfgs(x, y, sample_weight, weight_decay, steps)
    weights = w / std.squeeze(-2)
    return weights, b - (mean.squeeze(-2) * weights).sum(-1)


NEWTON_FEATURES = 64     # up to this many features the exact Hessian is cheap: Newton's method, else L-BFGS


def _logistic_loss(x, y, sample_weight, weight_decay, w, b):
    """The objective of every problem ([...]): weighted mean cross-entropy plus the L2 penalty on w."""
    logits = (x @ w.unsqueeze(-1)).squeeze(-1) + b.unsqueeze(-1)
    per_row = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * sample_weight
    return per_row.mean(-1) + weight_decay * w.pow(2).sum(-1)


def _lbfgs(x, y, sample_weight, weight_decay, steps):
    w = torch.zeros(x.shape[:-2] + x.shape[-1:], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(x.shape[:-2], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = _logistic_loss(x, y, sample_weight, weight_decay, w, b).sum()
        value.backward()
        return value

    with torch.enable_grad():  # callers may be under no_grad
        optimizer.step(loss)
    return w.detach(), b.detach()


def _newton(x, y, sample_weight, weight_decay, steps, tolerance=1e-10):
    """Newton's method on all problems at once, each step halved (up to five times) until its loss falls."""
    n, m = x.shape[-2], x.shape[-1]
    with_bias = torch.cat([x, torch.ones_like(x[..., :1])], -1)                  # [..., n, m + 1]
    penalty = torch.full((m + 1,), 2 * weight_decay, dtype=x.dtype)
    penalty[-1] = 1e-9                                                           # keeps the bias row regular
    theta = torch.zeros(x.shape[:-2] + (m + 1,), dtype=x.dtype)
    loss = _logistic_loss(x, y, sample_weight, weight_decay, theta[..., :m], theta[..., m])
    for _ in range(steps):
        p = torch.sigmoid((with_bias @ theta.unsqueeze(-1)).squeeze(-1))
        gradient = (with_bias.transpose(-1, -2) @ (sample_weight * (p - y)).unsqueeze(-1)).squeeze(-1) / n
        gradient = gradient + penalty * theta
        curvature = sample_weight * p * (1 - p) / n
        hessian = with_bias.transpose(-1, -2) @ (with_bias * curvature.unsqueeze(-1)) + torch.diag(penalty)
        step = torch.linalg.solve(hessian, gradient.unsqueeze(-1)).squeeze(-1)
        best, best_loss = theta, loss
        for size in (1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125):
            candidate = theta - size * step
            candidate_loss = _logistic_loss(x, y, sample_weight, weight_decay, candidate[..., :m], candidate[..., m])
            better = candidate_loss < best_loss
            best = torch.where(better.unsqueeze(-1), candidate, best)
            best_loss = torch.where(better, candidate_loss, best_loss)
        moved = (best - theta).abs().max()
        theta, loss = best, best_loss
        if moved < tolerance:
            break
    return theta[..., :m], theta[..., m]


# --- examples --------------------------------------------------------------------------------------------
def windows(items: list) -> Iterator[list]:
    """Consecutive whole PASSAGE_TOKENS-long slices of ``items`` (a shorter tail is left out)."""
    for start in range(0, len(items) - PASSAGE_TOKENS + 1, PASSAGE_TOKENS):
        yield items[start:start + PASSAGE_TOKENS]


def corpus_passages(tokenizer, per_class: int) -> tuple[list[list[int]], list[int]]:
    """The ``corpus`` task: ``per_class`` passages of PASSAGE_TOKENS tokens from each half of python-docs."""
    from saelab.data.text import iter_documents

    passages, labels = [], []
    for label, corpus in enumerate(("python-reference", "python-docstrings")):
        taken = 0
        for document in iter_documents(corpus):
            for passage in windows(tokenizer(document, add_special_tokens=False)["input_ids"]):
                passages.append(passage)
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


def code_labels(document: str) -> list[int]:
    """The ``code`` task's label of each character of ``document``: 1 in an interactive Python line after its
    prompt, 0 in a prose line (not indented, not blank), -1 elsewhere (prompts, other indented lines)."""
    labels = []
    for line in document.splitlines(keepends=True):
        stripped = line.lstrip(" ")
        if stripped.startswith(CODE_PROMPTS):
            prompt = len(line) - len(stripped) + len(CODE_PROMPTS[0])
            labels += [-1] * prompt + [1] * (len(line) - prompt)
        elif line.strip() and not line[0].isspace():
            labels += [0] * len(line)
        else:
            labels += [-1] * len(line)
    return labels


def code_passages(tokenizer):
    """``(token ids, labels)`` passages of PASSAGE_TOKENS tokens of the python-docs documents with interactive
    examples; a token's label is that of its first non-space character (``code_labels``)."""
    from saelab.data.text import iter_documents

    for document in iter_documents("python-docs"):
        if not any(prompt in document for prompt in CODE_PROMPTS):
            continue
        characters = code_labels(document)
        encoded = tokenizer(document, add_special_tokens=False, return_offsets_mapping=True)
        labels = []
        for start, end in encoded["offset_mapping"]:
            inside = [i for i in range(start, end) if not document[i].isspace()]
            labels.append(characters[inside[0]] if inside else -1)
        yield from zip(windows(encoded["input_ids"]), windows(labels))


def digit_passages(tokenizer):
    """``(token ids, labels)`` passages of PASSAGE_TOKENS tokens of python-docs, labelled by ``token_labels``."""
    from saelab.data.text import iter_documents

    for document in iter_documents("python-docs"):
        for passage in windows(tokenizer(document, add_special_tokens=False)["input_ids"]):
            yield passage, token_labels(tokenizer, torch.tensor(passage)).tolist()


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


# --- running the tasks through a model and its SAEs ------------------------------------------------------------
@torch.no_grad()
def probing_metrics(model, tokenizer, hook, saes: list, tasks: list[str], examples: int = DEFAULT_EXAMPLES,
                    dataset: str | None = None, split: str = "train", text_column: str | None = None,
                    label_column: str = "label", prepend_bos: bool = True, progress=None, seed: int = 0,
                    ranking: str = "difference") -> list[dict]:
    """For each SAE of ``saes`` (all reading ``hook``; the model runs once for all of them): every task's
    probe accuracies (``tasks``: built-in names; ``dataset``: a labelled dataset, each label against the
    rest) and their means over the tasks (``mean``)."""
    from saelab.data.tokens import bos_id, special_ids

    say = progress or (lambda message: None)
    bos = [bos_id(tokenizer)] if prepend_bos else []
    special = special_ids(tokenizer)
    results: list[dict[str, dict]] = [{} for _ in saes]

    def probe_all(name, acts, latents, labels):
        for result, sae_latents in zip(results, latents):
            result[name] = probe_accuracies(acts, sae_latents, labels, seed=seed, ranking=ranking)

    for task in tasks:
        say(f"probing: {task} ({BUILTIN_TASKS[task]})")
        if task == "corpus":
            passages, labels = corpus_passages(tokenizer, examples // 2)
            acts, latents = _pooled(model, hook, saes, [bos + p for p in passages], len(bos))
            probe_all(task, acts, latents, torch.tensor(labels))
        else:  # a label per token
            passages = digit_passages(tokenizer) if task == "digits" else code_passages(tokenizer)
            acts, latents, labels = _labelled_tokens(model, hook, saes, passages, examples // 2, bos, special,
                                                     seed=seed)
            probe_all(task, acts, latents, labels)
    if dataset is not None:
        rows = list(labelled_texts(dataset, split, text_column, label_column, examples))
        classes = sorted({str(label) for _, label in rows})
        if len(classes) < 2:
            raise ValueError(f"--probe-dataset {dataset}: column {label_column!r} holds {len(classes)} distinct "
                             "label(s); probing needs two or more")
        say(f"probing: {dataset} ({len(rows)} texts, labels {', '.join(classes[:10])})")
        ids = [bos + tokenizer(text, add_special_tokens=False)["input_ids"][:PASSAGE_TOKENS * 2] for text, _ in rows]
        acts, latents = _pooled(model, hook, saes, ids, len(bos))
        for name in classes[:10]:
            probe_all(f"{label_column}={name}", acts, latents, torch.tensor([int(str(label) == name) for _, label in rows]))
    summary_keys = ["llm_test_accuracy", "sae_test_accuracy", *(f"sae_top_{k}_test_accuracy" for k in PROBE_KS)]
    return [{"tasks": result, "mean": {key: mean_or_nan(r.get(key) for r in result.values()) for key in summary_keys}}
            for result in results]


def _activations(model, hook, token_ids: torch.Tensor) -> torch.Tensor:
    from saelab.models.hooks import capture

    device = next(model.parameters()).device
    return capture(model, token_ids.to(device), [hook])[hook.name].float().cpu()


def encode_rows(sae, x: torch.Tensor) -> torch.Tensor:
    """The SAE's latents of activation rows ``x`` (moved to the SAE's device and dtype), as float32 on the CPU."""
    return sae.encode(x.to(sae.W_dec.device, sae.W_dec.dtype)).float().cpu()


def _pooled(model, hook, saes: list, sequences: list[list[int]], skip: int, batch: int = 16):
    """Mean over each sequence's tokens (after the first ``skip``, the BOS) of the activation and of each
    SAE's latents (``[n, d_in]`` and one ``[n, d_sae]`` per SAE); sequences of equal length run in batches."""
    by_length: dict[int, list[int]] = {}
    for index, sequence in enumerate(sequences):
        by_length.setdefault(len(sequence), []).append(index)
    pooled: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}
    for length, indices in by_length.items():
        if length <= skip:
            raise ValueError("a probing text gave no token after BOS; drop empty texts")
        for start in range(0, len(indices), batch):
            chosen = indices[start:start + batch]
            x = _activations(model, hook, torch.tensor([sequences[i] for i in chosen]))[:, skip:]
            codes = [encode_rows(sae, x) for sae in saes]
            for row, i in enumerate(chosen):
                pooled[i] = (x[row].mean(0), [c[row].mean(0) for c in codes])
    order = range(len(sequences))
    return (torch.stack([pooled[i][0] for i in order]),
            [torch.stack([pooled[i][1][s] for i in order]) for s in range(len(saes))])


def _labelled_tokens(model, hook, saes: list, passages, per_class: int, bos: list[int], special: torch.Tensor,
                     batch: int = 16, most: int = 400, seed: int = 0):
    """Token rows of ``(ids, labels)`` passages labelled 1 or 0 (-1: left out), balanced, until each class has
    ``per_class`` (or ``most`` passages are read); the passages run through the model ``batch`` at a time."""
    acts, latents, labels, counts = [], [[] for _ in saes], [], torch.zeros(2, dtype=torch.long)
    stream = islice(passages, most)
    while min(counts) < per_class and (chunk := list(islice(stream, batch))):
        tokens = torch.tensor([ids for ids, _ in chunk])
        label = torch.tensor([passage_labels for _, passage_labels in chunk]).flatten()
        x = _activations(model, hook, torch.cat([torch.tensor([bos] * len(chunk), dtype=torch.long), tokens], 1)
                         )[:, len(bos):]
        keep = (label >= 0) & ~torch.isin(tokens.flatten(), special)
        rows = x.reshape(-1, x.shape[-1])[keep]
        acts.append(rows)
        for codes, sae in zip(latents, saes):
            codes.append(encode_rows(sae, rows))
        labels.append(label[keep])
        counts += torch.bincount(label[keep], minlength=2)
    labels = torch.cat(labels)
    chosen = balanced(labels, per_class, seed)
    return torch.cat(acts)[chosen], [torch.cat(codes)[chosen] for codes in latents], labels[chosen]
