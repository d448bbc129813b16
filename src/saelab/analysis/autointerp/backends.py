"""The language models that write and score explanations, and the disk cache of what they answered.

A backend is asked two things: to complete chat prompts (the explanation), and the probability that
the answer to a yes/no question is yes (the scores). Two kinds exist: a local transformers model (any
name ``saelab.models.load_model`` takes: embedded alias, folder, GGUF, hub id) and any server speaking
OpenAI's chat-completions API (vLLM, llama.cpp's ``llama-server``, Ollama all do). No key is needed; one
in ``SAELAB_API_KEY`` or ``OPENAI_API_KEY`` is sent when set.

``CachedBackend`` keeps every answer in a JSON-lines file keyed by the model and the whole prompt: an
interrupted run continues where it stopped, and scoring the same explanations again costs nothing.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

YES_WORDS, NO_WORDS = ("Yes", " Yes", "yes", " yes", "YES"), ("No", " No", "no", " no", "NO")


@dataclass(frozen=True)
class Prompt:
    """A chat: ``(role, content)`` messages, and the start of the reply (``prefill``) written for the model
    where the backend allows it (a local model; a server writes its reply from the start)."""

    messages: tuple[tuple[str, str], ...]
    prefill: str = ""

    def chat(self) -> list[dict]:
        return [{"role": role, "content": content} for role, content in self.messages]


class Backend:
    """What the explainer and the scorer call. ``name`` identifies the model in the cache's keys;
    ``gives_probabilities``: whether ``yes_probability`` returns real probabilities (else 0, 0.5 or 1 read
    from the answer's text, and no AUC can be computed)."""

    name: str = "backend"
    gives_probabilities: bool = True

    def complete(self, prompts: list[Prompt], max_tokens: int) -> list[str]:
        raise NotImplementedError

    def yes_probability(self, prompts: list[Prompt]) -> list[float]:
        raise NotImplementedError


def answer_probability(text: str) -> float:
    """1 for an answer starting with yes, 0 for no, 0.5 for anything else."""
    word = text.strip().lstrip("*\"'([").lower()
    return 1.0 if word.startswith("yes") else 0.0 if word.startswith("no") else 0.5


# --- a local transformers model -----------------------------------------------------------------------------
class LocalModel(Backend):
    """A causal LM run here: its chat template when it has one, greedy generation, batches sorted by length.
    ``yes_probability``: P(yes) / (P(yes) + P(no)) of the first reply token, over the spellings in YES_WORDS
    and NO_WORDS that are one token."""

    def __init__(self, name: str, device: str | None = None, batch_size: int = 8, model=None, tokenizer=None):
        if model is None:
            from saelab.models import load_model

            model, tokenizer = load_model(name, device)
        self.name, self.model, self.tokenizer, self.batch_size = name, model.eval(), tokenizer, batch_size
        self.device = next(model.parameters()).device
        self.yes_ids, self.no_ids = self._word_ids(YES_WORDS), self._word_ids(NO_WORDS)
        # transformers >= 5.24 names the cache argument and output `cache`, earlier versions `past_key_values`.
        self.cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def _word_ids(self, words) -> list[int]:
        pieces = [self.tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
        single = sorted({ids[0] for ids in pieces if len(ids) == 1})
        return single or sorted({ids[0] for ids in pieces if ids})

    def render(self, prompt: Prompt) -> str:
        """The prompt as the text the model reads."""
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(prompt.chat(), tokenize=False, add_generation_prompt=True)
        else:  # a base model: a plain transcript
            text = "".join(f"{role.capitalize()}: {content}\n\n" for role, content in prompt.messages) + "Assistant:"
            text += " " if prompt.prefill else ""
        return text + prompt.prefill

    def _batches(self, prompts: list[Prompt]):
        return self._encoded([self.tokenizer(self.render(p), add_special_tokens=False)["input_ids"] for p in prompts])

    def _encoded(self, ids: list[list[int]]):
        """(indices, input ids, attention mask, position ids) per batch, similar lengths together."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), self.batch_size):
            chosen = order[start:start + self.batch_size]
            yield (chosen, *self._left_padded([ids[i] for i in chosen]))

    def _left_padded(self, ids: list[list[int]]):
        """Input ids, attention mask and position ids of the rows ``ids``, left-padded to one width."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(row) for row in ids)
        tokens = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for i, row in enumerate(ids):
            tokens[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        positions = (mask.cumsum(1) - 1).clamp_min(0)  # each prompt starts at position 0 whatever its padding
        return tokens.to(self.device), mask.to(self.device), positions.to(self.device)

    @torch.no_grad()
    def complete(self, prompts: list[Prompt], max_tokens: int) -> list[str]:
        out = [""] * len(prompts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for chosen, tokens, mask, _ in self._batches(prompts):
            generated = self.model.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=max_tokens,
                                            do_sample=False, pad_token_id=pad)
            for row, i in enumerate(chosen):
                out[i] = self.tokenizer.decode(generated[row, tokens.shape[1]:], skip_special_tokens=True)
        return out

    @torch.no_grad()
    def yes_probability(self, prompts: list[Prompt]) -> list[float]:
        # Prompts sorted by their text: those with one explanation and one question are neighbours, and a batch
        # of them runs its common beginning once (a key-value cache repeated over the batch), then each ending.
        texts = [self.render(p) for p in prompts]
        order = sorted(range(len(texts)), key=lambda i: texts[i])
        out = [0.5] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            chosen = order[start:start + self.batch_size]
            logits = self._last_logits([texts[i] for i in chosen])
            logp = logits.float().log_softmax(-1)
            yes, no = logp[:, self.yes_ids].logsumexp(-1), logp[:, self.no_ids].logsumexp(-1)
            for row, i in enumerate(chosen):
                out[i] = float(torch.sigmoid(yes[row] - no[row]))
        return out

    def _last_logits(self, texts: list[str]) -> torch.Tensor:
        """``[len(texts), vocab]``: the next-token logits after each text."""
        prefix = shared_prefix(texts)
        encode = lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        prefix_ids = encode(prefix) if prefix else []
        if len(prefix_ids) < 8:  # too little in common to be worth a cache
            tokens, mask, positions = self._left_padded([encode(t) for t in texts])
            return self.model(input_ids=tokens, attention_mask=mask, position_ids=positions,
                              logits_to_keep=1).logits[:, -1]
        endings = [encode(t[len(prefix):]) or [self.tokenizer.pad_token_id or 0] for t in texts]
        shared = self.model(input_ids=torch.tensor([prefix_ids], device=self.device), use_cache=True)
        cache = getattr(shared, self.cache_name, None) or shared.past_key_values
        cache.batch_repeat_interleave(len(texts))
        width, start = max(len(e) for e in endings), len(prefix_ids)
        tokens = torch.zeros(len(texts), width, dtype=torch.long)
        mask = torch.zeros(len(texts), start + width, dtype=torch.long)
        mask[:, :start] = 1
        for row, ending in enumerate(endings):  # right-padded: what follows an ending is never attended to
            tokens[row, :len(ending)] = torch.tensor(ending)
            mask[row, start:start + len(ending)] = 1
        positions = torch.arange(start, start + width).expand(len(texts), -1)
        logits = self.model(input_ids=tokens.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=positions.to(self.device), **{self.cache_name: cache}).logits
        last = torch.tensor([len(e) - 1 for e in endings], device=logits.device)
        return logits[torch.arange(len(texts), device=logits.device), last]


def shared_prefix(texts: list[str]) -> str:
    """The longest beginning all ``texts`` share, cut before its last whitespace (so that tokenizing the
    beginning and each ending apart splits them as tokenizing the whole would, at the cut)."""
    first, last = min(texts), max(texts)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    if n == len(first):  # one text is the beginning of all the others: keep its last token out of it
        n -= 1
    cut = max(first.rfind(" ", 0, n), first.rfind("\n", 0, n))
    return first[:cut] if cut > 0 else ""


# --- an OpenAI-compatible server ----------------------------------------------------------------------------
class ServerError(RuntimeError):
    pass


class ChatServer(Backend):
    """A chat-completions endpoint at ``url`` (``http://localhost:8000/v1``): ``concurrency`` requests at
    once, each given ``timeout`` seconds and retried ``retries`` times (with doubling waits) on a refused
    connection, a timeout, HTTP 429 or 5xx. ``model``: the name the server serves (default: the first its
    ``/models`` lists)."""

    def __init__(self, url: str, model: str | None = None, option: str = "--explainer", concurrency: int = 4,
                 timeout: float = 60.0, retries: int = 3, api_key: str | None = None, seed: int = 0):
        self.url, self.option = url.rstrip("/").removesuffix("/chat/completions"), option
        self.concurrency, self.timeout, self.retries, self.seed = concurrency, timeout, retries, seed
        self.api_key = api_key or os.environ.get("SAELAB_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.model = model or self._first_model()
        self.name = f"{self.url}#{self.model}"
        self.gives_probabilities = True  # until a reply comes without log-probabilities

    def _request(self, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(0.25 * 2 ** (attempt - 1))
            try:
                request = urllib.request.Request(self.url + path, data=data, headers=headers)
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read().decode())
            except urllib.error.HTTPError as err:
                last = f"HTTP {err.code}: {err.read().decode(errors='replace')[:200]}"
                if err.code != 429 and err.code < 500:
                    raise ServerError(f"{self.url + path} refused the request ({last}); check {self.option} and "
                                      "the model name") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                last = str(getattr(err, "reason", err))
            except json.JSONDecodeError:
                raise ServerError(f"{self.url + path} did not answer in JSON: is {self.option} an OpenAI-compatible "
                                  "server's URL (ending in /v1)?") from None
        raise ServerError(f"no answer from {self.url + path} after {self.retries + 1} tries ({last}): start the "
                          "server (vLLM: vllm serve MODEL; llama.cpp: llama-server -m MODEL.gguf --port 8000; Ollama: "
                          f"ollama serve, at http://localhost:11434/v1) or correct {self.option}")

    def _first_model(self) -> str:
        try:
            listed = self._request("/models").get("data") or []
        except ServerError as err:
            raise ServerError(f"{err} (or name the model with {self.option}-model)") from None
        if not listed or "id" not in listed[0]:
            raise ServerError(f"{self.url}/models lists no model; name one with {self.option}-model")
        return listed[0]["id"]

    def _chat(self, prompt: Prompt, **options) -> dict:
        body = {"model": self.model, "messages": prompt.chat(), "temperature": 0, "seed": self.seed, **options}
        reply = self._request("/chat/completions", body)
        try:
            return reply["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise ServerError(f"{self.url}/chat/completions answered without choices: {str(reply)[:200]}") from None

    def _map(self, work, prompts):
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(work, prompts))

    def complete(self, prompts: list[Prompt], max_tokens: int) -> list[str]:
        return self._map(lambda p: (self._chat(p, max_tokens=max_tokens).get("message") or {}).get("content") or "",
                         prompts)

    def yes_probability(self, prompts: list[Prompt]) -> list[float]:
        return self._map(self._one_yes_probability, prompts)

    def _one_yes_probability(self, prompt: Prompt) -> float:
        choice = self._chat(prompt, max_tokens=1, logprobs=True, top_logprobs=10)
        content = ((choice.get("logprobs") or {}).get("content") or [{}])[0].get("top_logprobs")
        if content:
            yes = sum(math.exp(t["logprob"]) for t in content if t.get("token") in YES_WORDS)
            no = sum(math.exp(t["logprob"]) for t in content if t.get("token") in NO_WORDS)
            if yes + no > 0:
                return yes / (yes + no)
        self.gives_probabilities = False
        return answer_probability((choice.get("message") or {}).get("content") or "")


def make_backend(spec: str, model: str | None = None, option: str = "--explainer", device: str | None = None,
                 batch_size: int = 8, concurrency: int = 4, timeout: float = 60.0, seed: int = 0) -> Backend:
    """A ``ChatServer`` for an http(s) URL, else a ``LocalModel`` of that model name."""
    if spec.startswith(("http://", "https://")):
        return ChatServer(spec, model, option, concurrency=concurrency, timeout=timeout, seed=seed)
    return LocalModel(spec, device, batch_size)


# --- the cache of answers -----------------------------------------------------------------------------------
class CallCache:
    """Answers by key, in a JSON-lines file appended one answer at a time (a line cut short by a kill is
    skipped when read back)."""

    def __init__(self, path):
        self.path = Path(path)
        self.values: dict[str, object] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.values[row["key"]] = row["value"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()

    def put_all(self, items: dict[str, object]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as out:
            for key, value in items.items():
                out.write(json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
        self.values.update(items)


class CachedBackend(Backend):
    """``backend`` with its answers kept in ``cache``: only prompts never asked before reach the model.
    ``asked`` / ``reused`` count the prompts of each kind."""

    def __init__(self, backend: Backend, cache: CallCache):
        self.backend, self.cache, self.name = backend, cache, backend.name
        self.asked = self.reused = 0

    @property
    def gives_probabilities(self) -> bool:
        return self.backend.gives_probabilities

    def _through(self, kind: str, prompts: list[Prompt], call, *options):
        keys = [self.cache.key(kind, self.name, *options, p.messages, p.prefill) for p in prompts]
        missing = sorted({k: i for i, k in enumerate(keys) if k not in self.cache.values}.values())
        if missing:
            answers = call([prompts[i] for i in missing], *options)
            self.cache.put_all({keys[i]: answer for i, answer in zip(missing, answers)})
        self.asked += len(missing)
        self.reused += len(prompts) - len(missing)
        return [self.cache.values[k] for k in keys]

    def complete(self, prompts: list[Prompt], max_tokens: int) -> list[str]:
        return self._through("complete", prompts, self.backend.complete, max_tokens)

    def yes_probability(self, prompts: list[Prompt]) -> list[float]:
        return self._through("yes", prompts, self.backend.yes_probability)
