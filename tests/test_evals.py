"""Evaluation: metrics on SAEs with known answers, agreement with an independent computation and with the
trainer's FVU, splicing with the error term, and `saelab eval` end to end on a tiny local model."""

import json

import pytest
import torch
import torch.nn.functional as F

import saelab
from conftest import make_tiny_llama, make_tokenizer, step_for
from saelab.cli import main
from saelab.data.activations import LMActivationSource
from saelab.data.tokens import Packing
from saelab.evals import DOWNSTREAM_KEYS, METRIC_KEYS, evaluate
from saelab.evals.metrics import evaluate_many
from saelab.models import capture, resolve_hook
from saelab.sae import SAEConfig, create_sae

HOOK = "blocks.1.hook_resid_post"  # = hidden_states[2] of a Llama
D_IN, D_SAE, CONTEXT = 32, 64, 32


@pytest.fixture(scope="module")
def lm():
    tokenizer = make_tokenizer()
    model = make_tiny_llama(len(tokenizer))
    hook = resolve_hook(model, HOOK)
    source = LMActivationSource(model, tokenizer, hook, "python-docs", Packing(CONTEXT, True), batch_contexts=4,
                                max_contexts=8)
    batches = list(source.token_batches())
    assert len(batches) == 2 and batches[0].shape == (4, CONTEXT)
    return {"model": model, "tokenizer": tokenizer, "hook": hook, "source": source, "batches": batches}


def kept_activations(lm) -> torch.Tensor:
    """Every evaluated activation row of the fixture's batches (special-token positions left out)."""
    model, hook, source = lm["model"], lm["hook"], lm["source"]
    return torch.cat([capture(model, tokens, [hook])[hook.name][source.keep_mask(tokens)] for tokens in lm["batches"]])


def run_evaluate(lm, sae, **kwargs) -> dict:
    return evaluate(lm["model"], sae, lm["hook"], lm["batches"], lm["source"].keep_mask, **kwargs)


def make_sae(architecture="standard", d_sae=D_SAE, k=None, seed=None, metadata=None):
    sae = create_sae(SAEConfig(d_in=D_IN, d_sae=d_sae, architecture=architecture, k=k,
                               metadata={"hook_name": HOOK, **(metadata or {})}))
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        directions = torch.randn(d_sae, D_IN, generator=g)
        with torch.no_grad():  # random unit decoder rows, tied encoder, small random biases
            sae.W_dec.copy_(directions / directions.norm(dim=1, keepdim=True))
            sae.W_enc.copy_(sae.W_dec.T)
            sae.b_enc.copy_(0.01 * torch.randn(d_sae, generator=g))
            sae.b_dec.copy_(0.01 * torch.randn(D_IN, generator=g))
    return sae


def identity_sae():
    sae = make_sae(d_sae=2 * D_IN)
    eye = torch.eye(D_IN)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))   # relu(x) - relu(-x) = x
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae


# --- metrics with known answers ----------------------------------------------------------------------

def test_identity_sae_is_perfect(lm):
    m = run_evaluate(lm, identity_sae())
    assert abs(m["fvu"]) < 1e-5 and abs(m["explained_variance"] - 1) < 1e-5
    assert abs(m["ce_loss_score"] - 1) < 1e-5 and abs(m["kl_with_sae"]) < 1e-6
    assert abs(m["kl_score"] - 1) < 1e-5 and m["cossim"] == pytest.approx(1, abs=1e-5)
    assert m["ce_with_sae"] == pytest.approx(m["ce_clean"], abs=1e-6) and m["ce_zero_ablation"] > m["ce_clean"]
    assert m["l2_ratio"] == pytest.approx(1, abs=1e-5)
    assert m["tokens"] == len(kept_activations(lm)) and m["tokens"] == 8 * (CONTEXT - 1)


def test_zero_sae_is_no_better_than_zero_ablation(lm):
    m = run_evaluate(lm, make_sae())  # every weight and bias zero: x_hat = 0
    assert abs(m["ce_loss_score"]) < 1e-5 and abs(m["kl_score"]) < 1e-5
    assert m["ce_with_sae"] == pytest.approx(m["ce_zero_ablation"], abs=1e-6)
    assert m["l0"] == 0 and m["dead_fraction"] == 1 and m["dense_fraction"] == 0
    assert m["fvu"] > 1  # predicting 0 is worse than predicting the mean


def test_mean_sae_explains_no_variance(lm):
    sae = make_sae()
    with torch.no_grad():
        sae.b_dec.copy_(kept_activations(lm).double().mean(0).float())  # W_dec = 0: x_hat = mean
    m = run_evaluate(lm, sae, downstream=False)
    assert abs(m["fvu"] - 1) < 1e-4 and abs(m["explained_variance"]) < 1e-4
    assert not any(key in m for key in DOWNSTREAM_KEYS)


# --- agreement with an independent computation ------------------------------------------------------

def by_hand(lm, sae) -> dict:
    """FVU, L0, CE and KL in plain torch: hidden_states for the activation, a forward hook of our own."""
    model, tokenizer = lm["model"], lm["tokenizer"]
    special = torch.tensor(tokenizer.all_special_ids)
    block = model.model.layers[1]
    W_enc, b_enc, W_dec, b_dec = (p.detach() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))

    def reconstruct(x):  # TopK by the format's formula
        pre = (x - b_dec) @ W_enc + b_enc
        values, indices = pre.topk(sae.cfg.k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, indices, values.relu())
        return f, f @ W_dec + b_dec

    xs, x_hats, l0s, nll, kl, n_pred = [], [], [], {"clean": [], "sae": [], "zero": []}, {"sae": [], "zero": []}, 0
    with torch.no_grad():
        for tokens in lm["batches"]:
            keep = ~torch.isin(tokens, special)
            out = model(input_ids=tokens, output_hidden_states=True, use_cache=False)
            h = out.hidden_states[2]
            f, h_hat = reconstruct(h)
            xs.append(h[keep]), x_hats.append(h_hat[keep]), l0s.append((f[keep] != 0).sum(-1).double())
            logits = {"clean": out.logits}
            for name, new in (("sae", h_hat), ("zero", torch.zeros_like(h))):
                def replace(_module, _args, output, new=new, keep=keep):
                    act = output[0] if isinstance(output, tuple) else output
                    act = torch.where(keep[..., None], new, act)
                    return (act, *output[1:]) if isinstance(output, tuple) else act
                handle = block.register_forward_hook(replace)
                try:
                    logits[name] = model(input_ids=tokens, use_cache=False).logits
                finally:
                    handle.remove()
            mask, targets = keep[:, 1:], tokens[:, 1:]
            logp = {k: F.log_softmax(v[:, :-1].double(), -1) for k, v in logits.items()}
            for name, lp in logp.items():
                nll[name].append(-lp.gather(-1, targets[..., None]).squeeze(-1)[mask])
            for name in ("sae", "zero"):
                kl[name].append((logp["clean"].exp() * (logp["clean"] - logp[name])).sum(-1)[mask])
            n_pred += int(mask.sum())
    x, x_hat = torch.cat(xs).double(), torch.cat(x_hats).double()
    ce = {name: torch.cat(v).sum().item() / n_pred for name, v in nll.items()}
    kls = {name: torch.cat(v).sum().item() / n_pred for name, v in kl.items()}
    return {"fvu": ((x - x_hat) ** 2).sum().item() / ((x - x.mean(0)) ** 2).sum().item(),
            "l0": torch.cat(l0s).mean().item(), "ce_clean": ce["clean"], "ce_with_sae": ce["sae"],
            "ce_zero_ablation": ce["zero"], "kl_with_sae": kls["sae"], "kl_zero_ablation": kls["zero"],
            "ce_loss_score": (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]),
            "kl_score": (kls["zero"] - kls["sae"]) / kls["zero"]}


def test_evaluate_agrees_with_an_independent_computation(lm):
    sae = make_sae("topk", k=4, seed=1)
    got = run_evaluate(lm, sae)
    expected = by_hand(lm, sae)
    for key, value in expected.items():
        # the scores are ratios of small differences on a random tiny model: compare them relatively
        tolerance = {"rel": 1e-4} if key.endswith("score") else {"abs": 1e-4}
        assert got[key] == pytest.approx(value, **tolerance), key
    assert 0 < got["l0"] <= 4 and 0.05 < got["fvu"] < 5 and got["ce_with_sae"] != got["ce_clean"]
    # per-position error: positions 0 (BOS) evaluated nowhere; the FVU contributions add up to the FVU
    by_pos = got["error_by_position"]
    assert len(by_pos["tokens"]) == CONTEXT and by_pos["tokens"][0] == 0 and by_pos["mse"][0] is None
    assert sum(by_pos["tokens"]) == got["tokens"]
    assert sum(v for v in by_pos["fvu_contribution"] if v is not None) == pytest.approx(got["fvu"], rel=1e-6)
    weighted_mse = sum(m * n for m, n in zip(by_pos["mse"], by_pos["tokens"]) if m is not None) / got["tokens"]
    assert weighted_mse == pytest.approx(got["mse"], rel=1e-6)
    # plain lists: the training pipeline writes evaluate's output, less firing_frequency, to eval.json
    assert json.loads(json.dumps({k: v for k, v in got.items() if k != "firing_frequency"}))["error_by_position"]


def test_evaluate_many_equals_each_sae_alone_with_fewer_model_passes(lm):
    model, source = lm["model"], lm["source"]
    other_hook = resolve_hook(model, "blocks.0.hook_resid_post")
    pairs = [(make_sae("topk", k=4, seed=1), lm["hook"]), (make_sae("standard", seed=2), lm["hook"]),
             (make_sae("topk", k=2, seed=3), other_hook)]
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        together = evaluate_many(model, pairs, lm["batches"], source.keep_mask)
        passes_together, calls[:] = len(calls), []
        alone = [evaluate(model, sae, hook, lm["batches"], source.keep_mask) for sae, hook in pairs]
        passes_alone = len(calls)
    finally:
        handle.remove()
    for got, expected in zip(together, alone):
        for key in METRIC_KEYS:
            assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key
        assert torch.equal(got["firing_frequency"], expected["firing_frequency"])
    assert together[0]["l0"] != together[1]["l0"]  # three different SAEs, three different results
    # per batch: 1 clean + 2 zero-ablated (two hooks) + 3 spliced passes, instead of 3 x 3
    assert (passes_together, passes_alone) == (6 * len(lm["batches"]), 9 * len(lm["batches"]))


def test_training_and_evaluation_fvu_agree_on_the_same_tokens(lm):
    sae = make_sae("topk", k=4, seed=2)
    x = kept_activations(lm)  # all evaluated activations of 8 contexts, as one training batch
    out = sae.training_forward(x, step_for(sae))
    with torch.no_grad():
        train_fvu = ((out.x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()  # trainer.py's log
        train_l0 = (out.fired.sum() / len(x)).item()
        train_mse_part = out.parts["mse"].item()  # TopK's loss term: the same normalised error
    m = run_evaluate(lm, sae, downstream=False)
    assert m["tokens"] == len(x)
    assert m["fvu"] == pytest.approx(train_fvu, rel=1e-4, abs=1e-5)
    assert m["fvu"] == pytest.approx(train_mse_part, rel=1e-4, abs=1e-5)
    assert m["l0"] == pytest.approx(train_l0, abs=1e-6)
    assert run_evaluate(lm, sae)["fvu"] == pytest.approx(m["fvu"], abs=1e-9)  # with or without the CE passes


# --- splicing -----------------------------------------------------------------------------------------

def test_splice_with_error_term_leaves_outputs_unchanged_until_a_latent_is_edited(lm):
    model, tokens = lm["model"], lm["batches"][0]
    sae = make_sae("topk", k=4, seed=3)  # hook taken from sae.cfg.metadata["hook_name"]
    with torch.no_grad():
        clean = model(input_ids=tokens).logits
        with saelab.splice(model, sae, error_term=True):
            unchanged = model(input_ids=tokens).logits
        with saelab.splice(model, sae):
            spliced = model(input_ids=tokens).logits
        act = capture(model, tokens, [lm["hook"]])[HOOK]
        latent = int(sae.encode(act).ne(0).sum((0, 1)).argmax())  # the most frequently active latent

        def ablate(f):
            return f.index_fill(-1, torch.tensor([latent]), 0.0)

        with saelab.splice(model, sae, error_term=True, intervene=ablate):
            ablated = model(input_ids=tokens).logits

        def ablate_in_place(f):
            f[..., latent] = 0.0

        with saelab.splice(model, sae, hook=HOOK, error_term=True, intervene=ablate_in_place):
            ablated_in_place = model(input_ids=tokens).logits
        with saelab.splice(model, sae, hook=lm["hook"], keep=torch.zeros_like(tokens, dtype=torch.bool)):
            nowhere = model(input_ids=tokens).logits
    assert torch.allclose(unchanged, clean, atol=1e-6)
    assert not torch.allclose(spliced, clean, atol=1e-3)
    assert (ablated - clean).abs().max() > 1e-3
    assert torch.allclose(ablated_in_place, ablated, atol=1e-6)
    assert torch.allclose(nowhere, clean, atol=1e-6)


def test_splice_without_a_hook_needs_one_in_the_metadata(lm):
    sae = create_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="topk", k=4))
    with pytest.raises(ValueError, match="hook_name"):
        with saelab.splice(lm["model"], sae):
            pass


# --- the command line ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eval_inputs(tiny_model_dir, tmp_path_factory):
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("eval")
    text = root / "heldout.txt"
    text.write_text("\n\n".join(list(topics.values())[40:60]))
    sae = make_sae("topk", k=4, seed=4, metadata={"model_name": str(tiny_model_dir), "context_size": 32})
    sae.save(root / "saes" / "l1")
    return {"root": root, "text": text, "sae": root / "saes" / "l1", "model": str(tiny_model_dir)}


def cli(args, capsys):
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_eval_cli_prints_json_and_writes_the_report(eval_inputs, capsys):
    report = eval_inputs["root"] / "report"
    rc, out, err = cli(["eval", str(eval_inputs["sae"]), "--model", eval_inputs["model"], "--dataset",
                        str(eval_inputs["text"]), "--tokens", "512", "--json", "--out", str(report)], capsys)
    assert rc == 0, err
    data = json.loads(out)
    for key in METRIC_KEYS:
        assert key in data, key
    assert data["tokens"] == 16 * 31 and 0 < data["l0"] <= 4 and isinstance(data["ce_loss_score"], float)
    assert data["eval"]["hook"] == HOOK and data["eval"]["context_size"] == 32  # from the SAE's metadata
    assert sorted(p.name for p in report.iterdir()) == ["density_histogram.png", "error_by_position.png",
                                                        "metrics.json", "summary.md"]
    for png in ("density_histogram.png", "error_by_position.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((report / "metrics.json").read_text()) == data
    summary = (report / "summary.md").read_text()
    for needle in ("heldout.txt", HOOK, eval_inputs["model"], "ce_loss_score", "fraction of variance unexplained",
                   "496"):
        assert needle in summary, needle


def test_eval_cli_table_defaults_and_no_downstream(eval_inputs, capsys):
    # model and hook from the SAE's metadata; report beside the SAE folder
    rc, out, err = cli(["eval", str(eval_inputs["sae"]), "--dataset", str(eval_inputs["text"]), "--tokens", "256",
                        "--no-downstream"], capsys)
    assert rc == 0, err
    assert "fvu" in out and "l0" in out and "ce_" not in out and "kl_" not in out
    report = eval_inputs["root"] / "saes" / "l1-eval-heldout"
    data = json.loads((report / "metrics.json").read_text())
    assert data["tokens"] == 8 * 31 and not any(key.startswith(("ce_", "kl_")) for key in data)
    assert str(report) in err


def test_eval_cli_errors_are_clear(eval_inputs, tmp_path, capsys):
    common = ["--dataset", str(eval_inputs["text"]), "--tokens", "64", "--out", str(tmp_path / "r")]
    rc, _, err = cli(["eval", str(eval_inputs["sae"]), "--hook", "model.layers.1.mlp.gate_proj", *common], capsys)
    assert rc == 2 and "width 64" in err and "d_in is 32" in err and "--hook" in err
    rc, _, err = cli(["eval", str(tmp_path / "missing"), *common], capsys)
    assert rc == 2 and "does not exist" in err
    bare = tmp_path / "bare"
    create_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="topk", k=4)).save(bare)
    rc, _, err = cli(["eval", str(bare), *common], capsys)
    assert rc == 2 and "--model" in err


# --- suites: geometry, synthetic ---------------------------------------------------------------------
def test_decoder_geometry_equals_a_direct_computation():
    from saelab.evals.geometry import decoder_geometry, frequency_buckets

    sae = make_sae(seed=2)
    with torch.no_grad():
        sae.W_dec[3] = sae.W_dec[7] * 2.0  # a near-duplicate pair (same direction, other norm)
        sae.W_enc[:, 5] = -sae.W_dec[5]    # a latent that reads against what it writes
    got = decoder_geometry(sae, chunk=5)   # chunks that do not divide d_sae
    unit = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    gram = (unit @ unit.T).fill_diagonal_(-2)
    torch.testing.assert_close(got["max_decoder_cosine"], gram.max(dim=1).values.detach())
    assert got["near_duplicate_latents"] >= 2 and got["max_decoder_cosine"][3] == pytest.approx(1.0, abs=1e-5)
    assert got["encoder_decoder_cosine"][5] == pytest.approx(-1.0, abs=1e-5)
    assert got["encoder_decoder_cosine"][0] == pytest.approx(1.0, abs=1e-5)  # tied
    buckets = frequency_buckets(torch.tensor([0.0, 0.0, 5e-6, 5e-4, 0.05, 0.5]))
    assert buckets == {"dead": 2, "<=1e-5": 1, "1e-5..1e-4": 0, "1e-4..1e-3": 1, "1e-3..1e-2": 0, "1e-2..1e-1": 1,
                       "dense >0.1": 1}


def test_single_token_latents_are_counted_over_batches():
    from saelab.evals.geometry import TokenDiversity

    diversity = TokenDiversity(4)
    ids = torch.tensor([5, 5, 7, 5, 9, 5])
    codes = torch.zeros(6, 4)
    codes[[0, 1, 3, 5], 0] = 1.0       # latent 0: always on token 5
    codes[[0, 2, 3, 4, 5], 1] = 1.0    # latent 1: tokens 5, 7, 9
    codes[[0], 2] = 1.0                # latent 2: too rare to count; latent 3 never fires
    diversity.add(codes[:3], ids[:3], rows=2)
    diversity.add(codes[3:], ids[3:], rows=2)
    codes2 = torch.zeros(2, 4)
    codes2[:, 0] = 1.0
    diversity.add(codes2, torch.tensor([5, 5]))
    assert diversity.firings.tolist() == [6, 5, 1, 0]
    assert diversity.several.tolist() == [False, True, False, False]
    assert diversity.single_token_fraction() == 0.5  # of latents 0 and 1 (5+ firings), latent 0


def test_eval_suite_geometry_writes_its_section(eval_inputs, capsys):
    report = eval_inputs["root"] / "report-geometry"
    rc, out, err = cli(["eval", str(eval_inputs["sae"]), "--dataset", str(eval_inputs["text"]), "--tokens", "256",
                        "--no-downstream", "--suite", "core,geometry", "--out", str(report)], capsys)
    assert rc == 0, err
    assert "geometry:" in out and "near_duplicate_latents" in out and "latents by firing frequency" in out
    data = json.loads((report / "metrics.json").read_text())
    geometry = data["geometry"]
    assert 0 <= geometry["single_token_fraction"] <= 1 and sum(geometry["frequency_buckets"].values()) == D_SAE
    assert geometry["encoder_decoder_cosine_mean"] == pytest.approx(1.0, abs=1e-5)  # make_sae ties them
    assert (report / "geometry.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Geometry" in (report / "summary.md").read_text()


def test_eval_suite_synthetic_needs_synthetic_data(eval_inputs, capsys):
    rc, _, err = cli(["eval", str(eval_inputs["sae"]), "--suite", "synthetic"], capsys)
    assert rc == 2 and "was not trained on synthetic data" in err and "--synthetic CONFIG.json" in err
    rc, _, err = cli(["eval", str(eval_inputs["sae"]), "--suite", "absorbtion"], capsys)
    assert rc == 2 and "unknown suite absorbtion" in err


def test_a_latent_that_is_the_label_probes_perfectly_at_k_1():
    from saelab.evals.probing import probe_accuracies

    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(400, generator=g) < 0.5).long()
    latents = torch.rand(400, 30, generator=g)
    latents[:, 17] = labels * 3.0 + 0.1 * torch.rand(400, generator=g)  # latent 17 is the label
    activations = torch.randn(400, 8, generator=g)                       # the activation knows nothing
    result = probe_accuracies(activations, latents, labels)
    assert result["top_latents"][0] == 17
    assert result["sae_top_1_test_accuracy"] == 1.0 and result["sae_top_20_test_accuracy"] >= 0.95
    assert 0.3 < result["llm_test_accuracy"] < 0.7  # chance
    with pytest.raises(ValueError, match="both classes"):
        probe_accuracies(activations[:10], latents[:10], torch.zeros(10, dtype=torch.long))


def test_code_labels_mark_interactive_lines_after_their_prompt():
    from saelab.evals.probing import code_labels, code_passages

    document = "Some prose here.\n\n   >>> x = 1\n   ... y\n   output\nMore prose.\n"
    labels = code_labels(document)
    assert len(labels) == len(document)
    by_char = dict(zip(range(len(document)), labels))
    assert {by_char[i] for i in range(len("Some prose here."))} == {0}
    code_start = document.index("x = 1")
    assert {by_char[i] for i in range(document.index(">>>"), code_start)} == {-1}   # indent and prompt
    assert {by_char[i] for i in range(code_start, code_start + 5)} == {1}
    assert by_char[document.index("y\n")] == 1 and by_char[document.index("output")] == -1
    assert by_char[document.index("More")] == 0
    tokenizer = make_tokenizer()
    ids, passage_labels = next(code_passages(tokenizer))
    assert len(ids) == len(passage_labels) == 64 and set(passage_labels) <= {-1, 0, 1}


def test_probing_many_saes_in_one_pass_equals_each_alone(lm):
    from saelab.evals.probing import probing_metrics

    saes = [make_sae("topk", k=4, seed=1), make_sae("standard", seed=2)]
    args = (lm["model"], lm["tokenizer"], lm["hook"])
    together = probing_metrics(*args, saes, ["corpus", "digits", "code"], examples=60)
    for sae, result in zip(saes, together):
        assert probing_metrics(*args, [sae], ["corpus", "digits", "code"], examples=60)[0] == result
        assert {task: r["examples"] for task, r in result["tasks"].items()} == {"corpus": 60, "digits": 60, "code": 60}
    assert together[0]["tasks"]["corpus"]["top_latents"] != together[1]["tasks"]["corpus"]["top_latents"]


def test_standardized_ranking_is_not_crowded_out_by_a_loud_latent():
    from saelab.evals.probing import probe_accuracies

    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(600, generator=g) < 0.5).long()
    latents = torch.zeros(600, 10)
    latents[:, 3] = labels * 1.0                                           # the label, quietly
    loud = torch.rand(600, generator=g) < 0.05                             # rare, huge, a little more on class 1
    latents[:, 7] = loud * (30.0 + 30.0 * labels)
    activations = torch.randn(600, 4, generator=g)
    assert probe_accuracies(activations, latents, labels)["top_latents"][0] == 7          # SAEBench's rule
    standardized = probe_accuracies(activations, latents, labels, ranking="standardized")
    assert standardized["top_latents"][0] == 3 and standardized["sae_top_1_test_accuracy"] == 1.0


def test_eval_suite_probing_on_a_builtin_task_and_a_labelled_file(eval_inputs, capsys):
    from pydoc_data.topics import topics

    labelled = eval_inputs["root"] / "labelled.jsonl"
    texts = list(topics.values())[:60]
    labelled.write_text("\n".join(json.dumps({"text": text[:300], "kind": "a" if i % 2 else "b"})
                                  for i, text in enumerate(texts)))
    report = eval_inputs["root"] / "report-probing"
    rc, out, err = cli(["eval", str(eval_inputs["sae"]), "--dataset", str(eval_inputs["text"]), "--tokens", "128",
                        "--no-downstream", "--suite", "probing", "--probe-tasks", "corpus", "--probe-examples", "80",
                        "--probe-dataset", str(labelled), "--probe-label-column", "kind", "--out", str(report)], capsys)
    assert rc == 0, err
    assert "sparse probing" in out and "| corpus | 80 |" in out
    probing = json.loads((report / "metrics.json").read_text())["probing"]
    assert set(probing["tasks"]) == {"corpus", "kind=a", "kind=b"}
    for result in probing["tasks"].values():
        assert all(0 <= result[key] <= 1 for key in result if key.endswith("accuracy"))
    assert "## Sparse probing" in (report / "summary.md").read_text()
    rc, _, err = cli(["eval", str(eval_inputs["sae"]), "--suite", "probing", "--probe-tasks", "none",
                      "--probe-dataset", str(labelled), "--probe-label-column", "nope"], capsys)
    assert rc == 2 and "no label column 'nope'" in err


def test_eval_suite_absorption_writes_its_section_and_plot(eval_inputs, capsys):
    report = eval_inputs["root"] / "report-absorption"
    rc, out, err = cli(["eval", str(eval_inputs["sae"]), "--dataset", str(eval_inputs["text"]), "--tokens", "128",
                        "--no-downstream", "--suite", "absorption", "--absorption-words", "300",
                        "--out", str(report)], capsys)
    assert rc == 0, err
    assert "first-letter absorption" in out and "letters_scored" in out
    absorption = json.loads((report / "metrics.json").read_text())["absorption"]
    assert [row["first_letter"] for row in absorption["letters"]] == list("abcdefghijklmnopqrstuvwxyz")
    # the tiny random model does not know spelling (its probes detect nothing on test words); the computation
    # itself is checked on planted data in test_absorption.py
    assert absorption["letters_scored"] == sum(row["scored"] for row in absorption["letters"])
    assert sum(row["num_probe_true_positives"] for row in absorption["letters"]) <= 18  # 20% of its 86 words
    for row in absorption["letters"]:
        assert 1 <= row["num_split_features"] <= 10 and len(row["k_sparse_f1"]) == 10
        if row["num_probe_true_positives"]:
            assert 0 <= row["mean_absorption_fraction"] <= 1 and 0 <= row["full_absorption_rate"] <= 1
    assert "## Feature absorption (first letter)" in (report / "summary.md").read_text()
    assert (report / "absorption.png").stat().st_size > 10_000
