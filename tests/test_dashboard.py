"""The feature dashboard: streamed histograms and band examples on planted features, the site built from a tiny
Llama by `saelab dashboard`, and the pages in headless Chromium (Debian's `chromium`, driven by playwright)."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_tokenizer
from saelab.analysis import (ActivationDistributions, DashboardCollector, batched_logit_effects, collect_from_batches,
                             logit_effects, parse_features)
from saelab.analysis import dashboard
from saelab.analysis.dashboard import LogitTable, feature_chunks, summary_metrics
from saelab.sae.neuronpedia import neuronpedia_url
from saelab.cli import main
from saelab.data.activations import LMActivationSource
from saelab.data.tokens import Packing
from saelab.models import capture, load_model, resolve_hook
from test_analysis import HOOK, feature_reader_sae, make_sae, planted_batches

ARTIFACTS = Path(os.environ.get("SAELAB_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))


def collect(batches, features, n_top=3, per_band=2, window=2, seed=0):
    sae = feature_reader_sae()
    collector = DashboardCollector(features, n_top=n_top, per_band=per_band, window=window, seed=seed)
    for acts, tokens, keep in batches:
        collector.add_features(sae.encode(acts), tokens, keep)
    return collector


def direct_bins(values: torch.Tensor, n_bins: int) -> tuple[float, list[int]]:
    """The histogram computed at once from all values: range = smallest power of two above the max."""
    top = 2.0 ** (int(torch.floor(torch.log2(values.max()))) + 1)
    return top, torch.bincount((values * n_bins / top).long(), minlength=n_bins).tolist()


# --- (a) synthetic planted features ----------------------------------------------------------------------
def test_pages_show_the_planted_inputs_and_exact_histograms():
    batches, planted, acts, tokens = planted_batches()
    features = [0, 2, 5, 7]
    collector = collect(batches, features)
    logits = LogitTable(*(torch.zeros(len(features), 3, dtype=dtype) for dtype in (torch.long, torch.float) * 2))
    [(number, chunk)] = feature_chunks(collector, logits, make_tokenizer(), "gpt2-small/8-res-jb")
    assert number == 0 and list(chunk["features"]) == ["0", "2", "5", "7"]
    flat_acts, flat_tokens = acts.reshape(-1, 12, 16), tokens.reshape(-1, 12)
    keep = flat_tokens != 0
    for f in features:
        record = chunk["features"][str(f)]
        assert record["feature"] == f and record["neuronpedia"] == neuronpedia_url("gpt2-small/8-res-jb", f)
        # Top examples: exactly the planted (context, position), strongest first, with their token windows.
        assert [(ex[1], ex[2]) for ex in record["top"]] == [(c, p) for c, p, _ in planted[f]]
        for activation, context, position, center, ids, window_acts in record["top"]:
            start = position - center
            assert ids == flat_tokens[context, start:start + len(ids)].tolist()
            assert window_acts[center] == pytest.approx(activation, abs=1e-3)
        values = flat_acts[..., f][keep]
        values = values[values > 0]
        assert record["count"] == len(values) and record["max"] == pytest.approx(planted[f][0][2], rel=1e-3)
        # The histogram is the one computed from all activations at once, with the final range.
        top, counts = direct_bins(values, 64)
        assert record["histogram"]["bin_width"] == top / 64
        shown = record["histogram"]["counts"]  # up to the last non-empty bin
        assert shown == counts[:len(shown)] and sum(shown) == record["count"] and shown[-1] > 0
        # Band examples: real activations of that feature, from the band they are listed under.
        assert sum(band["count"] for band in record["bands"]) == record["count"]
        for band in record["bands"]:
            in_band = values[(values >= band["low"]) & (values < band["high"])]
            assert band["count"] == len(in_band) and len(band["examples"]) == min(2, len(in_band))
            places = {(ex[1], ex[2]) for ex in band["examples"]}
            assert len(places) == len(band["examples"])  # no token sampled twice
            for activation, context, position, *_ in band["examples"]:
                assert band["low"] <= activation < band["high"]
                assert float(flat_acts[context, position, f]) == pytest.approx(activation, rel=1e-3)
        assert [b["low"] for b in record["bands"]] == sorted((b["low"] for b in record["bands"]), reverse=True)


def test_collector_on_a_subset_agrees_with_the_full_top_examples_collector():
    batches, *_ = planted_batches()
    full = collect_from_batches(feature_reader_sae(), batches, n_top=3, window=2)
    subset = collect(batches, [1, 6])
    for local, f in enumerate([1, 6]):
        assert subset.top.summary(local).examples == full.summary(f).examples
        assert subset.top.summary(local).count == full.summary(f).count


def test_histograms_do_not_depend_on_the_order_of_the_data():
    g = torch.Generator().manual_seed(3)
    batches = [torch.relu(torch.randn(4, 10, 6, generator=g)) * 2.0 ** i for i in range(-3, 4)]
    tokens = torch.randint(0, 50, (4, 10), generator=g)
    forward, backward = ActivationDistributions(6, n_bins=16), ActivationDistributions(6, n_bins=16)
    for feats in batches:
        forward.add_features(feats, tokens)
    for feats in reversed(batches):
        backward.add_features(feats, tokens)
    every = torch.cat(batches)
    for f in range(6):
        values = every[..., f][every[..., f] > 0]
        top, counts = direct_bins(values, 16)
        assert forward.histogram(f).counts == backward.histogram(f).counts == counts[:len(forward.histogram(f).counts)]
        assert forward.histogram(f).bin_width == top / 16
    with pytest.raises(ValueError, match="power of two"):
        ActivationDistributions(4, n_bins=48)


def test_band_samples_are_uniform_across_batches_and_range_doublings():
    # 400 features with the same activations, so 400 independent samples. Each: 20 activations in [0.5, 0.9) in
    # a first batch (range 1), then 20 more in [0.55, 0.95) and a maximum of 3.5 in a second (range 4: the bands
    # merge, [0.5, 1) becomes one band of 40 tokens).
    runs = 400
    first, second = torch.zeros(1, 40, runs), torch.zeros(1, 41, runs)
    first[0, :20] = torch.linspace(0.5, 0.89, 20)[:, None]
    second[0, :20] = torch.linspace(0.55, 0.95, 20)[:, None]
    second[0, 40] = 3.5
    tokens = torch.arange(41)[None]
    dist = ActivationDistributions(runs, n_bins=64, n_bands=8, per_band=4, window=0)
    dist.add_features(first, tokens[:, :40])
    dist.add_features(second, tokens)
    chosen = torch.zeros(2, 20)
    for f in range(runs):
        band = next(b for b in dist.bands(f) if b.low == 0.5)
        assert band.count == 40 and len(band.examples) == 4
        for e in band.examples:
            chosen[e.context, e.position] += 1
    share = chosen / runs  # each of the 40 tokens: 4 / 40 = 0.1 expected; sd of the estimate 0.015
    assert share.min() > 0.04 and share.max() < 0.16, share
    assert 0.4 < float(share[0].sum() / share.sum()) < 0.6  # the first batch's tokens are not favoured or lost


def test_parse_features():
    assert parse_features("0-3, 7,2", 10) == [0, 1, 2, 3, 7]
    assert parse_features(None, 3) == [0, 1, 2]
    for bad, message in (("5-2", "backwards"), ("a", "not a feature index"), ("3-12", "out of range")):
        with pytest.raises(ValueError, match=message):
            parse_features(bad, 10)


def test_batched_logit_effects_match_logit_effects_of_each_feature(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir), "cpu")
    sae = make_sae()
    table = batched_logit_effects(model, sae, [3, 0, 17], n=5, chunk=2)  # two chunks
    for row, f in enumerate([3, 0, 17]):
        single = logit_effects(model, tokenizer, sae, f, n=5)
        assert table.top_ids[row].tolist() == [t for t, _, _ in single.top]
        assert table.bottom_ids[row].tolist() == [t for t, _, _ in single.bottom]
        assert table.top_values[row].tolist() == pytest.approx([v for _, _, v in single.top], rel=1e-5)
        assert table.bottom_values[row].tolist() == pytest.approx([v for _, _, v in single.bottom], rel=1e-5)


# --- (b) the site of `saelab dashboard` on a tiny Llama --------------------------------------------------
D_SAE, DEAD = 64, 9
EVAL = {"l0": 4.0, "explained_variance": 0.5, "ce_loss_score": 0.75, "tokens": 1000, "eval_dataset": "x.txt"}


def read_script(path: Path, function: str) -> dict:
    text = path.read_text(encoding="utf-8")
    assert text.startswith(function + "(") and text.endswith(");\n")
    return json.loads(text[len(function) + 1:-3])


CHUNK = 16  # features per data file in these tests, so that the site has several


@pytest.fixture(scope="module")
def site(tiny_model_dir, tmp_path_factory):
    """A run folder (final/ SAE + eval.json) and `saelab dashboard` of it over a text file, default --out."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("dashboard")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(list(topics.values())[:20]))
    sae = make_sae(metadata={"model_name": str(tiny_model_dir), "neuronpedia_id": "tiny/1-res"})
    with torch.no_grad():
        sae.b_enc[DEAD] = -1e6  # never fires
    sae.save(root / "run" / "final")
    (root / "run" / "eval.json").write_text(json.dumps(EVAL))
    args = ["dashboard", str(root / "run"), "--dataset", str(corpus), "--tokens", "640", "--context-size", "32",
            "--top-examples", "5", "--window", "3"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dashboard, "CHUNK", CHUNK)
        assert main(args) == 0
    return {"root": root, "out": root / "run" / "dashboard", "corpus": corpus, "sae": sae, "args": args}


def test_site_structure(site, capsys):
    out = site["out"]
    assert sorted(p.name for p in out.iterdir()) == ["data", "feature.html", "index.html", "style.css"]
    assert sorted(p.name for p in (out / "data").iterdir()) == ["features-0.js", "features-1.js", "features-2.js",
                                                               "features-3.js", "index.js"]
    index = read_script(out / "data" / "index.js", "saelabIndex")
    assert [row[0] for row in index["rows"]] == list(range(D_SAE))
    assert index["sae"]["hook"] == HOOK and index["sae"]["d_sae"] == D_SAE and index["sae"]["architecture"] == "topk"
    assert index["sae"]["neuronpedia"] == neuronpedia_url("tiny/1-res")
    assert index["metrics"] == {"l0": 4.0, "explained_variance": 0.5, "ce_loss_score": 0.75, "tokens": 1000,
                                "dataset": "x.txt"}
    assert index["metrics_source"] == str(site["root"] / "run" / "eval.json")
    assert index["tokens"] == 20 * 31 and index["contexts"] == 20  # BOS positions left out
    assert index["chunk_size"] == CHUNK
    records, tokenizer = {}, make_tokenizer()
    for number in range(D_SAE // CHUNK):
        chunk = read_script(out / "data" / f"features-{number}.js", "saelabFeatures")
        assert sorted(map(int, chunk["features"])) == list(range(number * CHUNK, (number + 1) * CHUNK))
        for record in chunk["features"].values():  # every token shown is in the file's vocabulary
            shown = [t for ex in record["top"] for t in ex[4]] + [t for t, _ in record["promoted"]]
            assert all(str(t) in chunk["vocab"] for t in shown)
        for key, text in list(chunk["vocab"].items())[:20]:
            assert tokenizer.decode([int(key)]) == text
        records.update(chunk["features"])
    dead = records[str(DEAD)]
    assert dead["count"] == 0 and dead["top"] == [] and dead["bands"] == [] and len(dead["promoted"]) == 10
    assert index["rows"][DEAD][1:4] == [0.0, 0.0, 0.0]
    # The numbers are those of the activations themselves (one forward pass over the same contexts).
    model, _ = load_model(index["sae"]["model"], "cpu")
    hook = resolve_hook(model, HOOK)
    source = LMActivationSource(model, tokenizer, hook, str(site["corpus"]), Packing(32, True), batch_contexts=20,
                                max_contexts=20)
    contexts = next(source.token_batches())
    with torch.no_grad():
        feats = site["sae"].encode(capture(model, contexts, [hook])[HOOK]) * source.keep_mask(contexts)[..., None]
    for f, record in records.items():
        values = feats[..., int(f)]
        assert record["count"] == int((values > 0).sum())
        assert record["max"] == pytest.approx(float(values.max()), rel=1e-3)
        assert len(record["top"]) == min(5, record["count"])
        for ex in record["top"]:
            assert ex[4] == contexts[ex[1], ex[2] - ex[3]:ex[2] - ex[3] + len(ex[4])].tolist()
            assert record["neuronpedia"] == neuronpedia_url("tiny/1-res", int(f))


def test_features_subset_and_rebuilding_in_place(site, tmp_path, capsys):
    out = tmp_path / "subset"
    assert main(site["args"] + ["--features", "0-9,150", "--out", str(out)]) == 2
    assert "out of range" in capsys.readouterr().err and not out.exists()  # checked before the model loads
    shutil.copytree(site["out"], out)
    (out / "data" / "features-7.js").write_text("stale")
    assert main(site["args"] + ["--features", "60-63,5", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "index.html")
    assert sorted(p.name for p in (out / "data").iterdir()) == ["features-0.js", "index.js"]  # 100 a file
    assert [row[0] for row in read_script(out / "data" / "index.js", "saelabIndex")["rows"]] == [5, 60, 61, 62, 63]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(site["args"] + ["--out", str(busy)]) == 2
    assert "not a saelab dashboard" in capsys.readouterr().err and (busy / "notes.txt").exists()


def test_summary_metrics_of_an_eval_report(tmp_path):
    (tmp_path / "sae").mkdir()
    assert summary_metrics(tmp_path / "sae") == (None, {})
    report = tmp_path / "sae-eval-wiki"
    report.mkdir()
    (report / "metrics.json").write_text(json.dumps({"fvu": 0.2, "eval": {"dataset": "wiki.txt"}}))
    assert summary_metrics(tmp_path / "sae") == (str(report / "metrics.json"), {"fvu": 0.2, "dataset": "wiki.txt"})


# --- (c) the pages in headless Chromium ------------------------------------------------------------------
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install "
                                   "playwright; it is in the dev extra)")
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed at /usr/bin/chromium (apt-get install -y chromium)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_page(browser, url):
    """A page at ``url`` and the list its console errors, page errors and failed or non-local requests go to."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed request: {r.url}"))
    page.on("request", lambda r: None if r.url.startswith(("file://", "data:")) else problems.append(
        f"network request: {r.url}"))
    page.goto(url)
    return page, problems


def column(page, n: int) -> list[float]:
    return [float(v) for v in page.eval_on_selector_all(
        f"#features tbody tr td:nth-child({n})", "cells => cells.map(c => c.dataset.value)")]


@pytest.mark.browser
def test_pages_in_chromium(site, browser):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    index = read_script(site["out"] / "data" / "index.js", "saelabIndex")
    page, problems = open_page(browser, (site["out"] / "index.html").as_uri())
    page.wait_for_selector("#features tbody tr")
    assert column(page, 1) == list(range(D_SAE))
    assert "ce_loss_score" in page.inner_text("#summary")
    page.screenshot(path=str(ARTIFACTS / "dashboard_index.png"))

    page.click("th[data-key=max]")  # largest first
    maxima = column(page, 4)
    assert maxima == sorted(maxima, reverse=True) and maxima[0] > maxima[-1]
    assert page.get_attribute("th[data-key=max]", "aria-sort") == "descending"
    page.click("th[data-key=max]")
    assert column(page, 4) == sorted(maxima)
    page.click("th[data-key=frequency]")
    frequencies = column(page, 2)
    assert frequencies == sorted(frequencies, reverse=True)

    # Search by token: the rows left are exactly those showing the token among their top or promoted tokens.
    token = next(text.strip() for row in index["rows"] for t in row[4]
                 if (text := index["vocab"][str(t)]).strip().isalnum())
    page.fill("#search", token)
    expected = sorted(row[0] for row in index["rows"]
                      if any(token.lower() in index["vocab"][str(t)].lower() for t in row[4] + row[5]))
    assert sorted(column(page, 1)) == expected and 0 < len(expected) < D_SAE
    page.fill("#search", str(DEAD))
    assert DEAD in column(page, 1)
    page.fill("#search", "")
    page.check("#hide-dead")
    assert DEAD not in column(page, 1) and 0 not in column(page, 2)
    page.uncheck("#hide-dead")

    # A feature page, reached by its link: tokens shaded by activation, the value on hover.
    active = max(index["rows"], key=lambda row: row[1])[0]
    page.fill("#search", str(active))
    page.click(f"a[href='feature.html#{active}']")
    page.wait_for_selector(".examples.top .example")
    assert page.inner_text("h1") == f"Feature {active}"
    shaded = page.eval_on_selector_all(".examples.top .t", "spans => spans.filter(s => "
                                       "getComputedStyle(s).backgroundColor !== 'rgba(0, 0, 0, 0)').length")
    assert shaded >= len(page.query_selector_all(".examples.top .example")) > 0
    page.hover(".examples.top .t.center")
    assert page.is_visible("#tip") and any(c.isdigit() for c in page.inner_text("#tip"))
    assert page.query_selector("svg.hist rect.bar") is not None and page.query_selector(".examples.band .example")
    assert page.get_attribute("#neuronpedia", "href") == neuronpedia_url("tiny/1-res", active)
    page.screenshot(path=str(ARTIFACTS / "dashboard_feature.png"), full_page=True)

    page.goto((site["out"] / "feature.html").as_uri() + f"#{DEAD}")
    page.wait_for_selector(".notice")
    assert "never fired" in page.inner_text(".notice")
    assert problems == []


@pytest.mark.browser
def test_explanations_and_scores_in_chromium(site, browser, tmp_path):
    """Explanations attached to a copy of the site: a searchable column, a sortable score, the feature page's
    explanation, its scores against the baselines and the snippets scored, and the non-activating examples."""
    from saelab.analysis.dashboard import attach_explanations

    out = tmp_path / "site"
    shutil.copytree(site["out"], out)
    scores = lambda a: {"balanced_accuracy": a, "auc": a, "f1": a}  # noqa: E731
    notes = {f: {"explanation": f"pattern number {f}" + (" zebra" if f == 5 else ""), "explainer": "oracle",
                 "scorer": "rules", "detection": scores(f / 100), "fuzzing": scores(0.5),
                 "baselines": {"shuffled": {"explanation": "other", "detection": scores(0.5), "fuzzing": scores(0.5)}},
                 "tests": [{"scorer": "detection", "kind": "near_miss", "label": 0, "p_yes": 0.25,
                            "text": "a <<b>> c", "activation": 0}]} for f in range(0, 20)}
    summary = {"scorer": "rules", "features": 20, "means": {"explanation": {
        "detection_balanced_accuracy": 0.6, "detection_auc": 0.7, "fuzzing_balanced_accuracy": 0.5,
        "fuzzing_auc": None}}}
    assert attach_explanations(out, notes, summary) == 20
    page, problems = open_page(browser, (out / "index.html").as_uri())
    page.wait_for_selector("#features tbody tr")
    assert "Explanations scored by rules" in page.inner_text("#summary")
    page.fill("#search", "zebra")
    assert column(page, 1) == [5]
    page.fill("#search", "")
    page.click("th[data-key=score]")  # best first, features without a score last
    ranked = column(page, 1)
    assert ranked[:3] == [19, 18, 17] and set(ranked[20:]) == set(range(20, D_SAE))
    page.goto((out / "feature.html").as_uri() + "#19")
    page.wait_for_selector(".explanation")
    assert "pattern number 19" in page.inner_text(".explanation") and "shuffled" in page.inner_text(".explanation")
    assert "near miss" in page.inner_text("table.scored")
    assert page.query_selector(".examples.silent .example") is not None
    page.screenshot(path=str(ARTIFACTS / "dashboard_explained_feature.png"), full_page=True)
    assert problems == []
