"""Explanations and their scores: planted features with an oracle explainer and a rule-following scorer, the
metric's behaviour under random and constant answers, the OpenAI-compatible backend against a fake server on
127.0.0.1, the cache, and `saelab explain` / `score` / `dashboard` end to end on a tiny random model."""

import json
import random
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from saelab.analysis.autointerp import (Backend, CachedBackend, CallCache, ChatServer, LocalModel, Prompt, ServerError,
                                        Snippet, binary_scores, parse_explanation, split_examples)
from saelab.analysis.autointerp.backends import shared_prefix
from saelab.analysis.autointerp.prompts import explainer_prompt
from saelab.analysis.autointerp.score import explanation_sets, feature_tests, score_feature, summarize
from saelab.analysis.dashboard import DashboardCollector, feature_chunks
from saelab.cli import main

# --- planted features -------------------------------------------------------------------------------------
N_FEATURES, VOCAB, SEQ = 16, 300, 32


class WordTokenizer:
    """Token i is the word " t{i:03d}": no token's text is part of another's."""

    def decode(self, ids):
        return "".join(f" t{int(i):03d}" for i in ids)


def planted_token_sets():
    return {f: [10 + 3 * f, 11 + 3 * f, 12 + 3 * f] for f in range(N_FEATURES)}


def planted_records(n_contexts=240, seed=0):
    """Dashboard records of features that fire exactly on their own three tokens (activation 1 to 2)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, VOCAB, (n_contexts, SEQ), generator=g)
    feats = torch.zeros(n_contexts, SEQ, N_FEATURES)
    for f, ids in planted_token_sets().items():
        on = torch.isin(tokens, torch.tensor(ids))
        feats[..., f] = on * (1 + torch.rand(n_contexts, SEQ, generator=g))
    neighbours = torch.stack([torch.tensor([(f + 1) % N_FEATURES, (f + 2) % N_FEATURES]) for f in range(N_FEATURES)])
    collector = DashboardCollector(list(range(N_FEATURES)), n_top=20, per_band=3, window=6, seed=seed,
                                   neighbours=neighbours, non_activating=10)
    for start in range(0, n_contexts, 16):
        collector.add_features(feats[start:start + 16], tokens[start:start + 16])
    records, vocab = [], {}
    for _, chunk in feature_chunks(collector, None, WordTokenizer()):
        vocab.update(chunk["vocab"])
        records += chunk["features"].values()
    return records, vocab, feats, tokens


def quoted(text):
    return re.findall(r'"([^"]+)"', text)


class OracleExplainer(Backend):
    """Names the planted token set of the feature whose marked tokens the prompt shows."""

    name = "oracle"

    def complete(self, prompts, max_tokens):
        sets = {f: [f"t{i:03d}" for i in ids] for f, ids in planted_token_sets().items()}
        replies = []
        for prompt in prompts:
            marked = re.findall(r"<<([^>]+)>>", prompt.messages[-1][1])
            words = [w for span in marked for w in span.split()]
            best = max(sets, key=lambda f: sum(w in sets[f] for w in words))
            replies.append("Explanation: the tokens " + ", ".join(f'"{t}"' for t in sets[best]))
        return replies


class RuleScorer(Backend):
    """A scorer that follows an explanation of the form 'the tokens "a", "b"' to the letter."""

    name = "rules"

    def yes_probability(self, prompts):
        out = []
        for prompt in prompts:
            user = prompt.messages[-1][1]
            named = set(quoted(user.split("\n\n")[0]))
            text = user.split("Text: ", 1)[1].rsplit("\n\n", 1)[0]
            marked = [w for span in re.findall(r"<<([^>]+)>>", text) for w in span.split()]
            if marked:  # fuzzing: right when every marked token is a named one
                out.append(1.0 if all(w in named for w in marked) else 0.0)
            else:       # detection: fires when a named token is in the text
                out.append(1.0 if named & set(text.replace("<<", " ").replace(">>", " ").split()) else 0.0)
        return out


class RandomScorer(Backend):
    name = "random"

    def __init__(self, value=None, seed=0):
        self.value, self.rng = value, random.Random(seed)

    def yes_probability(self, prompts):
        return [self.value if self.value is not None else self.rng.random() for _ in prompts]


def explain_and_score(records, vocab, scorer):
    items = [split_examples(r, vocab, 10, 10) for r in records]
    items = [i for i in items if i is not None]
    prompts = [explainer_prompt([Snippet.from_dict(s) for s in i["explain"]], i["max"]) for i in items]
    explained = {i["feature"]: parse_explanation(reply)
                 for i, reply in zip(items, OracleExplainer().complete(prompts, 32))}
    sets = explanation_sets(items, explained, seed=0)
    rows = []
    for k, item in enumerate(items):
        result = score_feature(scorer, item, {name: texts[k] for name, texts in sets.items()}, seed=0)
        rows.append({"feature": item["feature"], **{s: result["explanation"][s] for s in ("detection", "fuzzing")},
                     "baselines": {n: result[n] for n in ("shuffled", "top_tokens")}})
    return items, explained, summarize(rows, scorer.name)["means"]


def test_the_split_keeps_explainer_and_scorer_examples_apart_and_negatives_silent():
    records, vocab, feats, tokens = planted_records()
    for record in records:
        item = split_examples(record, vocab, 10, 10)
        seen = {(s["context"], s["position"]) for s in item["explain"]}
        tested = {(s["context"], s["position"]) for s in item["activating"]}
        assert len(item["explain"]) == 10 and len(item["activating"]) == 10 and not seen & tested
        assert len(item["non_activating"]) == 10
        assert {s["kind"] for s in item["non_activating"]} == {"near_miss", "random"}
        f = record["feature"]
        for snippet in item["non_activating"]:
            # Silent on the whole window: none of the feature's tokens in it, in the true activations.
            c, p = snippet["context"], snippet["position"]
            assert feats[c, max(0, p - 6):p + 7, f].max() == 0
            assert not set(planted_token_sets()[f]) & set(tokens[c, max(0, p - 6):p + 7].tolist())
        for snippet in item["activating"] + item["explain"]:
            assert snippet["activation"] == pytest.approx(float(feats[snippet["context"], snippet["position"], f]),
                                                          abs=1e-3)


def test_near_misses_are_where_the_neighbours_fire():
    records, vocab, feats, tokens = planted_records()
    for record in records:
        f = record["feature"]
        neighbours = [(f + 1) % N_FEATURES, (f + 2) % N_FEATURES]
        for ex in record["near_misses"]:
            assert feats[ex[1], ex[2], neighbours].max() > 0


def test_an_oracle_explanation_scores_high_and_the_baselines_do_not():
    records, vocab, _, _ = planted_records()
    items, explained, means = explain_and_score(records, vocab, RuleScorer())
    assert explained[3] == 'the tokens "t019", "t020", "t021"'
    assert means["explanation"]["detection_balanced_accuracy"] >= 0.9
    assert means["explanation"]["fuzzing_balanced_accuracy"] >= 0.9
    assert 0.35 <= means["shuffled"]["detection_balanced_accuracy"] <= 0.65
    assert means["shuffled"]["fuzzing_balanced_accuracy"] <= 0.65


def test_random_and_constant_answers_score_chance_whatever_the_class_balance():
    records, vocab, _, _ = planted_records()
    _, _, means = explain_and_score(records, vocab, RandomScorer())
    for name in ("explanation", "shuffled", "top_tokens"):
        assert 0.35 <= means[name]["detection_balanced_accuracy"] <= 0.65
        assert 0.35 <= means[name]["detection_auc"] <= 0.65
    _, _, means = explain_and_score(records, vocab, RandomScorer(value=0.9))
    assert means["explanation"]["detection_balanced_accuracy"] == 0.5
    # 9 of 10 positives: always yes gets accuracy 0.9, balanced accuracy still 0.5.
    unbalanced = binary_scores([1] * 9 + [0], [0.9] * 10)
    assert unbalanced["accuracy"] == pytest.approx(0.9) and unbalanced["balanced_accuracy"] == 0.5
    assert binary_scores([1, 1, 0, 0], [0.9, 0.6, 0.7, 0.1])["auc"] == 0.75


def test_fuzzing_marks_half_the_snippets_wrongly_on_silent_tokens():
    records, vocab, _, _ = planted_records()
    item = split_examples(records[0], vocab, 10, 10)
    tests = [t for t in feature_tests(item, seed=0) if t.scorer == "fuzzing"]
    assert sum(t.label for t in tests) == 5 and len(tests) == 10
    for t in tests:
        acts = [t.snippet.acts[i] for i in t.marked]
        assert t.marked and (all(a > 0 for a in acts) if t.label else all(a == 0 for a in acts))


# --- prompts and parsing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("reply, expected", [
    (' "Explanation: names of cities."', "names of cities"),
    ("\n\n**Explanation:** the word *the* \nmore", "the word *the"),
    ("names of months", "names of months"),
    ("", ""), ("\x00\ufffd<<>>", "\x00\ufffd<<>>"), ("Explanation:", ""),
    ('Explanation: the tokens "a", "b"', 'the tokens "a", "b"'),
])
def test_explanations_are_parsed_from_any_reply(reply, expected):
    assert parse_explanation(reply) == expected


def test_the_explainer_prompt_marks_runs_of_active_tokens():
    snippet = Snippet([" the", " New", " York", " times", "\n"], [0.0, 2.0, 4.0, 0.0, 0.0], 4.0)
    text = explainer_prompt([snippet], 4.0).messages[-1][1]
    assert "1.  the <<New York>> times\\n" in text and "(New 5, York 10)" in text


# --- the cache ----------------------------------------------------------------------------------------------
class CountingBackend(Backend):
    name = "counting"

    def __init__(self):
        self.calls = 0

    def complete(self, prompts, max_tokens):
        self.calls += len(prompts)
        return [f"reply {p.messages[-1][1]}" for p in prompts]


def test_the_cache_answers_repeated_prompts_and_survives_a_cut_last_line(tmp_path):
    inner = CountingBackend()
    prompts = [Prompt((("user", f"q{i}"),)) for i in range(4)]
    first = CachedBackend(inner, CallCache(tmp_path / "calls.jsonl")).complete(prompts, 8)
    with open(tmp_path / "calls.jsonl", "a") as f:
        f.write('{"key": "cut sho')  # a kill in the middle of a write
    again = CachedBackend(inner, CallCache(tmp_path / "calls.jsonl"))
    assert again.complete(prompts + [Prompt((("user", "new"),))], 8)[:4] == first
    assert inner.calls == 5 and again.asked == 1 and again.reused == 4


# --- an OpenAI-compatible server ------------------------------------------------------------------------------
class FakeServer:
    """Chat completions on 127.0.0.1: answers "Explanation: <the user message's last word>" and, asked for
    log-probabilities, P(yes) = 0.8; the first ``failures`` requests get HTTP 503."""

    def __init__(self, failures=0, logprobs=True):
        self.failures, self.logprobs, self.requests, self.headers = failures, logprobs, [], []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, data):
                body = json.dumps(data).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send(200, {"data": [{"id": "fake-model"}]})

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append(request)
                owner.headers.append(dict(self.headers))
                if len(owner.requests) <= owner.failures:
                    return self._send(503, {"error": "busy"})
                word = request["messages"][-1]["content"].split()[-1]
                choice = {"message": {"role": "assistant", "content": f"Explanation: {word}" if request.get(
                    "max_tokens", 9) > 1 else "Yes"}}
                if request.get("logprobs") and owner.logprobs:
                    import math
                    choice["logprobs"] = {"content": [{"token": "Yes", "top_logprobs": [
                        {"token": "Yes", "logprob": math.log(0.8)}, {"token": "No", "logprob": math.log(0.2)}]}]}
                self._send(200, {"choices": [choice]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_server():
    servers = []

    def start(**kwargs):
        servers.append(FakeServer(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_the_server_backend_retries_and_reads_log_probabilities(fake_server, monkeypatch):
    monkeypatch.setenv("SAELAB_API_KEY", "secret")
    server = fake_server(failures=2)
    backend = ChatServer(server.url)  # the model name from /models
    assert backend.model == "fake-model"
    prompts = [Prompt((("user", f"what is word{i}"),)) for i in range(3)]
    assert backend.complete(prompts, 16) == [f"Explanation: word{i}" for i in range(3)]
    assert len(server.requests) == 5  # two refused, retried
    assert server.headers[0]["Authorization"] == "Bearer secret"
    assert server.requests[-1]["model"] == "fake-model" and server.requests[-1]["temperature"] == 0
    assert backend.yes_probability(prompts[:1]) == [pytest.approx(0.8)]
    assert backend.gives_probabilities


def test_a_server_without_log_probabilities_is_read_from_its_text(fake_server):
    backend = ChatServer(fake_server(logprobs=False).url, model="m")
    assert backend.yes_probability([Prompt((("user", "q"),))]) == [1.0]
    assert not backend.gives_probabilities


def test_a_dead_server_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    with pytest.raises(ServerError, match=r"no answer from http://127.0.0.1:\d+/v1/chat/completions after 2 tries.*"
                                          r"start the server.*--scorer"):
        ChatServer(f"http://127.0.0.1:{port}/v1", model="m", option="--scorer", retries=1, timeout=2).complete(
            [Prompt((("user", "q"),))], 4)


# --- a local model ------------------------------------------------------------------------------------------
def test_the_shared_beginning_gives_the_probabilities_of_whole_prompts(tiny_model_dir):
    from saelab.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir), "cpu")
    local = LocalModel("tiny", model=model, tokenizer=tokenizer, batch_size=4)
    prompts = [Prompt((("user", f"A long shared question about the text, then snippet {i} {'x ' * i}"),),
                      prefill="Answer:") for i in range(6)]
    texts = [local.render(p) for p in prompts]
    assert shared_prefix(texts).endswith("snippet")
    shared = local.yes_probability(prompts)
    alone = [local.yes_probability([p])[0] for p in prompts]  # one prompt: nothing shared
    assert shared == pytest.approx(alone, abs=1e-5)
    assert all(0 < p < 1 for p in shared)


@pytest.fixture(scope="module")
def sae_run(tiny_model_dir, tmp_path_factory):
    from test_analysis import make_sae

    run = tmp_path_factory.mktemp("explained")
    sae = make_sae(metadata={"model_name": str(tiny_model_dir), "hook_name": "blocks.1.hook_resid_post"})
    sae.save(run / "final")
    return run


def test_explain_score_and_dashboard_on_a_tiny_model(sae_run, tiny_model_dir, text_file, capsys):
    common = ["--dataset", str(text_file), "--tokens", "2048", "--max-features", "4", "--examples", "4",
              "--test-examples", "4", "--window", "4", "--max-tokens", "8"]
    assert main(["explain", str(sae_run), *common, "--explainer", str(tiny_model_dir)]) == 0
    rows = [json.loads(line) for line in (sae_run / "explanations.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(isinstance(r["explanation"], str) for r in rows)
    assert main(["score", str(sae_run), "--batch-size", "5"]) == 0
    out = capsys.readouterr()
    assert "| explanation |" in out.out and "| shuffled |" in out.out and "| top tokens |" in out.out
    scores = [json.loads(line) for line in (sae_run / "scores.jsonl").read_text().splitlines()]
    assert [s["feature"] for s in scores] == [r["feature"] for r in rows]
    for s in scores:
        for result in (s, *s["baselines"].values()):
            assert 0 <= result["detection"]["balanced_accuracy"] <= 1 and 0 <= result["detection"]["auc"] <= 1
        assert {t["scorer"] for t in s["tests"]} == {"detection", "fuzzing"}
    # Everything again: examples reused, every answer from the cache.
    assert main(["explain", str(sae_run), *common, "--explainer", str(tiny_model_dir)]) == 0
    assert main(["score", str(sae_run)]) == 0
    err = capsys.readouterr().err
    assert "reusing the examples" in err and "0 written now" in err and "0 questions asked" in err
    # The dashboard shows them: index rows and feature pages.
    assert main(["dashboard", str(sae_run), "--dataset", str(text_file), "--tokens", "2048"]) == 0
    data = (sae_run / "dashboard" / "data")
    index = json.loads(data.joinpath("index.js").read_text()[len("saelabIndex("):-3])
    explained = {r[0]: r for r in index["rows"] if r[6]}
    assert set(explained) <= {r["feature"] for r in rows} and index["autointerp"]["features"] == 4
    chunk = json.loads(data.joinpath("features-0.js").read_text()[len("saelabFeatures("):-3])
    page = chunk["features"][str(rows[0]["feature"])]
    assert page["explanation"]["explanation"] == rows[0]["explanation"] and page["explanation"]["tests"]
    assert page["near_misses"] and page["random"]
    # The Neuronpedia export carries them as Neuronpedia's explanation records.
    assert main(["neuronpedia-export", str(sae_run), "--dataset", str(text_file), "--tokens", "1024", "--out",
                 str(sae_run / "np"), "--model-id", "tiny", "--layer", "1", "--sae-set", "res-test"]) == 0
    records = json.loads((sae_run / "np" / "explanations.json").read_text())
    assert [r["index"] for r in records] == [str(r["feature"]) for r in rows if r["explanation"]]
    assert all(r["modelId"] == "tiny" and r["layer"] == "1-res-test" and r["scores"]["detection"] for r in records)


def test_explaining_from_a_dashboard_folder_needs_its_non_activating_examples(sae_run, text_file, tmp_path, capsys):
    out = tmp_path / "dash"
    assert main(["dashboard", str(sae_run), "--dataset", str(text_file), "--tokens", "1024", "--non-activating", "0",
                 "--out", str(out)]) == 0
    assert main(["explain", str(sae_run), "--from-dashboard", str(out), "--out", str(tmp_path / "res")]) == 2
    assert "has no non-activating examples" in capsys.readouterr().err
    assert main(["score", str(sae_run), "--out", str(tmp_path / "nothing")]) == 2
    assert "run `saelab explain" in capsys.readouterr().err


def test_explain_reads_a_dashboard_folder(sae_run, text_file, tmp_path):
    out = tmp_path / "dash"
    assert main(["dashboard", str(sae_run), "--dataset", str(text_file), "--tokens", "2048", "--out", str(out)]) == 0
    from saelab.analysis.autointerp import ExplainConfig, explain

    cfg = ExplainConfig(sae=str(sae_run), from_dashboard=str(out), max_features=3, out=str(tmp_path / "res"))
    explain(cfg, backend=OracleExplainer())
    rows = (tmp_path / "res" / "explanations.jsonl").read_text().splitlines()
    assert len(rows) == 3 and all(json.loads(r)["explainer"] == "oracle" for r in rows)


@pytest.mark.slow
def test_smollm2_explains_and_scores_a_few_features(tmp_path, capsys):
    """The default model as explainer and scorer, on a random TopK SAE over its block-6 residual."""
    from test_analysis import make_sae

    sae = make_sae(hook="blocks.6.hook_resid_post", d_in=576, d_sae=64, k=8, metadata={"model_name": "smollm2-135m"})
    sae.save(tmp_path / "final")
    assert main(["explain", str(tmp_path), "--tokens", "4096", "--max-features", "3", "--test-examples", "4"]) == 0
    assert main(["score", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "explanations.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["explanation"] and r["explainer"] == "smollm2-135m" for r in rows)
    summary = json.loads((tmp_path / "scores_summary.json").read_text())
    assert summary["features"] == 3 and 0 <= summary["means"]["explanation"]["detection_auc"] <= 1
    assert "| explanation |" in capsys.readouterr().out
