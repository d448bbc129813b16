"""Reading features: top examples on planted features, logit effects, steering, attribution, and the
`saelab features / steer / attribute` commands on a tiny local model."""

import pytest
import torch

from conftest import make_tiny_llama, make_tokenizer
from saelab.analysis import (TopExamplesCollector, attribute, collect_from_batches, collect_top_examples,
                             final_norm, greedy_generate, logit_effects, steer, token_features)
from saelab.analysis.loading import Loaded, tokenize
from saelab.cli import build_parser, main
from saelab.models import capture, hooked, resolve_hook
from saelab.sae import SAEConfig, create_sae

HOOK = "blocks.1.hook_resid_post"
LAST_HOOK = "blocks.2.hook_resid_post"  # the tiny model has 3 blocks: this one feeds the final norm
D_IN, D_SAE = 32, 64


def make_sae(hook=HOOK, d_in=D_IN, d_sae=D_SAE, k=4, seed=0, metadata=None):
    sae = create_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k,
                               metadata={"hook_name": hook, "context_size": 32, "prepend_bos": True,
                                         **(metadata or {})}))
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(d_sae, d_in, generator=g)
    with torch.no_grad():
        sae.W_dec.copy_(directions / directions.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.copy_(0.01 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(0.05 * torch.randn(d_in, generator=g))
    return sae.eval()


@pytest.fixture(scope="module")
def lm():
    tokenizer = make_tokenizer()
    model = make_tiny_llama(len(tokenizer))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a final norm weight far from all-ones, so the linearisation is really tested
        model.model.norm.weight.copy_(0.5 + torch.rand(D_IN, generator=g))
    return model, tokenizer


def loaded_for(lm, hook=HOOK, **kwargs):
    model, tokenizer = lm
    sae = make_sae(hook=hook, **kwargs)
    return Loaded(sae, model, tokenizer, resolve_hook(model, hook), folder=None, model_name="tiny", prepend_bos=True)


# --- top-activating examples ------------------------------------------------------------------------------
def planted_batches(n_batches=3, batch=4, seq=12, d_feat=8, d_in=16, n_top=3, seed=0):
    """Activation batches whose first d_feat dimensions are feature activations: each feature is planted
    strongly (5..9) at n_top known places spread over all batches, and weakly (< 1) at many others."""
    g = torch.Generator().manual_seed(seed)
    acts = torch.zeros(n_batches, batch, seq, d_in)
    acts[..., d_feat:] = torch.randn(n_batches, batch, seq, d_in - d_feat, generator=g)  # dims no feature reads
    weak = torch.rand(n_batches, batch, seq, d_feat, generator=g) < 0.3
    acts[..., :d_feat] = weak * torch.rand(n_batches, batch, seq, d_feat, generator=g) * 0.9
    tokens = torch.randint(3, 300, (n_batches, batch, seq), generator=g)
    tokens[:, :, 0] = 0  # BOS
    planted = {}
    slots = torch.randperm(n_batches * batch * (seq - 1), generator=g)
    for f in range(d_feat):
        places = []
        for j in range(n_top):
            slot = int(slots[f * n_top + j])
            b, rest = divmod(slot, batch * (seq - 1))
            c, p = divmod(rest, seq - 1)
            p += 1  # never the BOS position
            value = 5.0 + f * 0.1 + j  # distinct values: a known order
            acts[b, c, p, f] = value
            places.append((b * batch + c, p, value))
        planted[f] = sorted(places, key=lambda t: -t[2])
    # A huge activation at BOS, which the keep mask excludes: it must never be an example.
    acts[1, 2, 0, :d_feat] = 100.0
    batches = [(acts[i], tokens[i], tokens[i] != 0) for i in range(n_batches)]
    return batches, planted, acts, tokens


def feature_reader_sae(d_in=16, d_feat=8):
    """A ReLU SAE whose feature f is exactly input dimension f."""
    sae = create_sae(SAEConfig(d_in=d_in, d_sae=d_feat, architecture="standard"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d_in)[:, :d_feat])
        sae.W_dec.copy_(torch.eye(d_in)[:d_feat])
    return sae.eval()


def test_top_examples_are_exactly_the_planted_inputs():
    batches, planted, acts, tokens = planted_batches()
    window = 2
    collector = collect_from_batches(feature_reader_sae(), batches, n_top=3, window=window)
    assert collector.values.shape == (8, 3) and collector.window_acts.shape == (8, 3, 2 * window + 1)  # O(d_sae*N)
    flat_acts, flat_tokens = acts.reshape(-1, 12, 16), tokens.reshape(-1, 12)
    keep = flat_tokens != 0
    for f, places in planted.items():
        summary = collector.summary(f)
        assert [(e.context, e.position) for e in summary.examples] == [(c, p) for c, p, _ in places]
        assert [e.activation for e in summary.examples] == pytest.approx([v for _, _, v in places])
        for e in summary.examples:  # the window around the maximum, with the feature's activation on each token
            lo, hi = max(e.position - window, 0), min(e.position + window + 1, 12)
            assert e.window_start == lo and e.tokens == flat_tokens[e.context, lo:hi].tolist()
            expected = flat_acts[e.context, lo:hi, f].clamp_min(0) * keep[e.context, lo:hi]
            assert e.activations == pytest.approx(expected.tolist())
            assert e.activations[e.center] == pytest.approx(e.activation)
        values = flat_acts[..., f][keep]
        assert summary.count == int((values > 0).sum())
        assert summary.max == pytest.approx(places[0][2])  # not the excluded 100 at BOS
        assert summary.mean_when_active == pytest.approx(float(values[values > 0].mean()), rel=1e-5)
        assert summary.frequency == pytest.approx(summary.count / int(keep.sum()))
    assert collector.tokens_seen == int(keep.sum()) and collector.contexts_seen == 12


def test_a_feature_firing_fewer_times_than_n_has_fewer_examples():
    collector = TopExamplesCollector(d_sae=3, n_top=5, window=1)
    feats = torch.zeros(2, 4, 3)
    feats[1, 2, 0] = 2.0
    feats[0, 0, 1] = 1.0
    collector.add_features(feats, torch.arange(8).reshape(2, 4))
    assert [(e.context, e.position, e.tokens, e.activations) for e in collector.summary(0).examples] == \
        [(1, 2, [5, 6, 7], [0.0, 2.0, 0.0])]
    assert collector.summary(1).examples[0].tokens == [0, 1] and collector.summary(1).examples[0].center == 0
    assert collector.summary(2).examples == [] and collector.summary(2).count == 0
    with pytest.raises(ValueError, match="out of range"):
        collector.summary(3)


def test_collect_top_examples_on_a_model_matches_the_activations(lm, tmp_path):
    from pydoc_data.topics import topics

    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(list(topics.values())[:10]))
    loaded = loaded_for(lm)
    collector = collect_top_examples(loaded, str(text), tokens=256, n_top=4, window=3, context_size=32,
                                     batch_contexts=4)
    assert collector.contexts_seen == 8 and collector.tokens_seen == 8 * 31  # BOS left out
    from saelab.data.activations import LMActivationSource
    from saelab.data.tokens import Packing

    source = LMActivationSource(loaded.model, loaded.tokenizer, loaded.hook, str(text), Packing(32, True),
                                batch_contexts=8, max_contexts=8)
    contexts = next(source.token_batches())
    with torch.no_grad():
        feats = loaded.sae.encode(capture(loaded.model, contexts, [loaded.hook])[HOOK])
    feats = feats * source.keep_mask(contexts)[..., None]
    best = feats.detach().amax((0, 1))
    for f in range(D_SAE):
        summary = collector.summary(f)
        assert summary.max == pytest.approx(float(best[f]), abs=1e-5)
        for e in summary.examples:
            assert float(feats[e.context, e.position, f]) == pytest.approx(e.activation, abs=1e-5)
            assert e.tokens == contexts[e.context, e.window_start:e.window_start + len(e.tokens)].tolist()


# --- logit effects ----------------------------------------------------------------------------------------
def test_logit_effects_go_through_the_norm_weight_and_the_unembedding(lm):
    loaded = loaded_for(lm)
    model, tokenizer, sae = loaded.model, loaded.tokenizer, loaded.sae
    effects = logit_effects(model, tokenizer, sae, 7, n=10)
    expected = model.lm_head.weight @ (model.model.norm.weight * sae.W_dec[7])
    assert [t for t, _, _ in effects.top] == expected.topk(10).indices.tolist()
    assert [t for t, _, _ in effects.bottom] == (-expected).topk(10).indices.tolist()
    assert [v for _, _, v in effects.top] == pytest.approx(expected.topk(10).values.tolist(), rel=1e-5)
    assert effects.top[0][1] == tokenizer.decode([effects.top[0][0]])
    assert effects.bottom[0][2] == pytest.approx(float(expected.detach().min()), rel=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        logit_effects(model, tokenizer, sae, D_SAE)


# --- steering ---------------------------------------------------------------------------------------------
def test_steering_with_strength_zero_is_plain_generation_and_a_large_one_changes_it(lm):
    loaded = loaded_for(lm)
    ids = tokenize(loaded.tokenizer, "The value of", True)
    plain = greedy_generate(loaded.model, ids, 12)
    assert len(plain) == 12
    # The KV-cached loop gives what full forward passes give.
    full = ids
    for _ in range(12):
        full = torch.cat([full, loaded.model(full).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert full[0, ids.shape[1]:].tolist() == plain
    zero = steer(loaded, "The value of", feature=5, strength=0.0, max_new_tokens=12)
    assert zero.plain_ids == plain and zero.steered_ids == plain
    strong = steer(loaded, "The value of", feature=5, strength=200.0, max_new_tokens=12)
    assert strong.plain_ids == plain and strong.steered_ids != plain
    # Clamp mode: the SAE spliced in with its error term, the feature's activation set at every position.
    clamped = steer(loaded, "The value of", feature=5, clamp=200.0, max_new_tokens=12)
    assert clamped.steered_ids != plain
    # Clamping a feature to what it already is everywhere would change nothing: check on a dead feature.
    with torch.no_grad():
        loaded.sae.b_enc[9] = -1e6  # feature 9 never fires; clamping it to 0 is a no-op
    try:
        assert steer(loaded, "The value of", feature=9, clamp=0.0, max_new_tokens=12).steered_ids == plain
    finally:
        with torch.no_grad():
            loaded.sae.b_enc[9] = 0.0
    with pytest.raises(ValueError, match="out of range"):
        steer(loaded, "The value of", feature=-1, strength=1.0)


# --- attribution ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hook", [HOOK, LAST_HOOK])
def test_attribution_parts_sum_to_the_direct_contribution(lm, hook):
    loaded = loaded_for(lm, hook=hook)
    result = attribute(loaded, "The value of the", " name")
    assert result.target_id == loaded.tokenizer(" name", add_special_tokens=False)["input_ids"][0]
    parts = result.feature_sum + result.error + result.bias
    assert parts == pytest.approx(result.total, abs=1e-4 * max(1.0, abs(result.total)))
    assert int((result.features != 0).sum()) <= 4  # only the k active features contribute
    # The total is what it says: the hook activation's direct path through the frozen-scale norm and unembedding.
    model = loaded.model
    ids = tokenize(loaded.tokenizer, "The value of the", True)
    seen = {}
    handle = model.model.norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("final_in", a[0][0, -1]))
    try:
        with hooked(model, loaded.hook, lambda a: seen.__setitem__("x", a[0, -1])):
            model(ids)
    finally:
        handle.remove()
    x, final_in = seen["x"], seen["final_in"]
    rms = final_in.pow(2).mean().add(model.model.norm.variance_epsilon).rsqrt()
    expected = float((x * rms * model.model.norm.weight).detach() @ model.lm_head.weight[result.target_id].detach())
    assert result.total == pytest.approx(expected, rel=1e-4, abs=1e-5)
    if hook == LAST_HOOK:  # the last block's output is the norm's input: the total is the logit itself
        assert result.total == pytest.approx(result.logit, rel=1e-4, abs=1e-5)
    assert final_norm(model).centers is False


# --- the commands -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sae_folder(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    make_sae(metadata={"model_name": str(tiny_model_dir)}).save(root / "sae")
    wrong = make_sae(d_in=16, metadata={"model_name": str(tiny_model_dir)})
    wrong.save(root / "narrow")
    return root


def cli(args, capsys):
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_features_command_prints_a_table_and_logit_effects(sae_folder, capsys):
    rc, out, err = cli(["features", str(sae_folder / "sae"), "--text", "The value of x", "--top", "3",
                        "--logits", "3", "--logit-tokens", "4"], capsys)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["pos", "token", "top"] and "'<s>'" in lines[1] and "special" in lines[1]
    n_tokens = len(make_tokenizer()("The value of x", add_special_tokens=False)["input_ids"])
    assert [line.split()[0] for line in lines[1:n_tokens + 2]] == [str(i) for i in range(n_tokens + 1)]
    assert "feature 3" in out and "promotes" in out and "suppresses" in out
    assert len([line for line in lines if line.startswith("  '") or line.startswith("  \"")]) == 4


def test_steer_and_attribute_commands(sae_folder, capsys):
    rc, out, err = cli(["steer", str(sae_folder / "sae"), "--feature", "5", "--strength", "200", "--prompt",
                        "The value of", "--max-new-tokens", "6"], capsys)
    assert rc == 0, err
    assert "plain" in out and "200 x W_dec[5]" in out and "identical" not in out
    rc, out, err = cli(["steer", str(sae_folder / "sae"), "--feature", "5", "--clamp", "0", "--prompt", "Hi",
                        "--max-new-tokens", "3"], capsys)
    assert rc == 0 and "clamped to 0" in out, err
    rc, out, err = cli(["attribute", str(sae_folder / "sae"), "--prompt", "The value of the", "--target", " name",
                        "--top", "3"], capsys)
    assert rc == 0, err
    for needle in ("total", "features", "SAE error", "b_dec", "pushes up", "pushes down"):
        assert needle in out, needle


def test_bad_input_is_a_clear_error(sae_folder, capsys):
    sae = str(sae_folder / "sae")
    rc, _, err = cli(["steer", sae, "--feature", str(D_SAE), "--prompt", "Hi"], capsys)
    assert rc == 2 and "out of range" in err and f"0 to {D_SAE - 1}" in err
    rc, _, err = cli(["features", sae, "--logits", "-3"], capsys)
    assert rc == 2 and "out of range" in err
    rc, _, err = cli(["features", str(sae_folder / "narrow"), "--text", "Hi"], capsys)
    assert rc == 2 and "width 32" in err and "d_in is 16" in err
    rc, _, err = cli(["attribute", str(sae_folder / "narrow"), "--prompt", "Hi", "--target", " x"], capsys)
    assert rc == 2 and "d_in is 16" in err
    rc, _, err = cli(["features", sae], capsys)
    assert rc == 2 and "--text" in err
    rc, _, err = cli(["attribute", sae, "--prompt", "Hi", "--target", ""], capsys)
    assert rc == 2 and "empty" in err
    with pytest.raises(SystemExit):  # --strength and --clamp exclude each other (argparse: exit 2)
        build_parser().parse_args(["steer", sae, "--feature", "1", "--prompt", "x", "--strength", "1", "--clamp", "2"])


def test_token_features_in_python(lm):
    loaded = loaded_for(lm)
    rows = token_features(loaded, "The value", top=2)
    assert rows[0].special and rows[0].token_id == 0 and not rows[1].special
    for row in rows[1:]:
        assert 1 <= len(row.features) <= 2
        assert [v for _, v in row.features] == sorted((v for _, v in row.features), reverse=True)
