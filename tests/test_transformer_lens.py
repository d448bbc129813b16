"""TransformerLens as a backend: saelab's hooks on a HookedTransformer, HookedSAETransformer (run with SAEs
spliced in, cache their activations), and training and analysis on a small HookedTransformer built from a
config (no download)."""

import pytest
import torch

pytest.importorskip("transformer_lens")

from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from saelab import HookedSAETransformer, LanguageModelSAERunnerConfig, SAETrainingRunner  # noqa: E402
from saelab.analysis import Loaded, collect_top_examples, logit_effects  # noqa: E402
from saelab.evals import evaluate  # noqa: E402
from saelab.models import capture, hook_names, hooked, lm_logits, n_layers, resolve_hook  # noqa: E402
from saelab.models.hooks import HookNameError  # noqa: E402
from saelab.sae import SAEConfig, create_sae  # noqa: E402

D_MODEL, D_SAE = 32, 64
HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    # TransformerLens reloads the tokenizer by its name_or_path, so it must come from a folder.
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def tl_config(tokenizer, seed=0):
    return HookedTransformerConfig(n_layers=2, d_model=D_MODEL, n_ctx=64, d_head=8, n_heads=4, d_mlp=64,
                                   d_vocab=len(tokenizer), act_fn="gelu", normalization_type="LN", seed=seed)


@pytest.fixture(scope="module")
def tl_model(tokenizer):
    model = HookedSAETransformer(tl_config(tokenizer), tokenizer=tokenizer).eval()
    with torch.no_grad():  # a final-norm weight far from ones, so the logit linearisation is really tested
        model.ln_final.w.copy_(0.5 + torch.rand(D_MODEL, generator=torch.Generator().manual_seed(1)))
    return model


def make_sae(hook=HOOK, seed=0, k=6):
    sae = create_sae(SAEConfig(d_in=D_MODEL, d_sae=D_SAE, architecture="topk", k=k,
                               metadata={"hook_name": hook, "context_size": 16, "prepend_bos": True}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / 4)
    return sae.eval()


def tokens(n=3, seq=12, vocab=250, seed=0):
    return torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


# --- saelab's hooks on TransformerLens hook points ---------------------------------------------------------
def test_capture_and_hooked_use_transformer_lens_hook_points(tl_model):
    ids = tokens()
    _, cache = tl_model.run_with_cache(ids)
    names = ["blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_mid"]
    captured = capture(tl_model, ids, [resolve_hook(tl_model, name) for name in names])
    for name in names:
        torch.testing.assert_close(captured[name], cache[name])
    assert n_layers(tl_model) == 2 and "blocks.1.attn.hook_z" in hook_names(tl_model)

    # capture stops after the deepest hook: blocks.1 never runs
    ran = []
    tl_model.blocks[1].hook_resid_post.add_hook(lambda act, hook: ran.append(hook.name))
    try:
        capture(tl_model, ids, [resolve_hook(tl_model, "blocks.0.hook_resid_post")])
    finally:
        tl_model.reset_hooks()
    assert ran == []

    # a replacement through hooked() reaches the logits as TransformerLens's own hooks would
    zero = lambda act: torch.zeros_like(act)  # noqa: E731
    with hooked(tl_model, resolve_hook(tl_model, "blocks.0.hook_attn_out"), zero):
        ours = lm_logits(tl_model, ids)
    theirs = tl_model.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_attn_out", lambda act, hook: zero(act))])
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours, tl_model(ids))

    with pytest.raises(HookNameError, match="blocks.0.hook_resid_prost"):
        resolve_hook(tl_model, "blocks.0.hook_resid_prost")


# --- HookedSAETransformer ------------------------------------------------------------------------------------
def test_run_with_saes_splices_the_reconstruction(tl_model):
    ids, sae = tokens(), make_sae()
    clean, cache = tl_model.run_with_cache(ids)
    x = cache[HOOK]
    expected = tl_model.run_with_hooks(ids, fwd_hooks=[(HOOK, lambda act, hook: sae(act))])
    torch.testing.assert_close(tl_model.run_with_saes(ids, saes=[sae]), expected)
    assert not torch.allclose(expected, clean, atol=1e-3)
    # with the error term the model computes what it computes without the SAE
    torch.testing.assert_close(tl_model.run_with_saes(ids, saes=[sae], use_error_term=True), clean,
                               atol=1e-5, rtol=1e-5)
    # afterwards the model is plain again
    assert tl_model.acts_to_saes == {} and HOOK in tl_model.hook_dict
    torch.testing.assert_close(tl_model(ids), clean)

    _, sae_cache = tl_model.run_with_cache_with_saes(ids, saes=[sae])
    torch.testing.assert_close(sae_cache[f"{HOOK}.hook_sae_acts_post"], sae.encode(x))
    torch.testing.assert_close(sae_cache[f"{HOOK}.hook_sae_recons"], sae(x))
    torch.testing.assert_close(sae_cache[f"{HOOK}.hook_sae_input"], x)


def test_add_sae_and_hooks_on_its_latents(tl_model):
    ids, sae, other = tokens(seed=1), make_sae(), make_sae("blocks.1.hook_resid_pre", seed=4)
    tl_model.add_sae(sae)
    try:
        assert tl_model.acts_to_saes[HOOK] is sae and f"{HOOK}.hook_sae_acts_post" in tl_model.hook_dict
        spliced = tl_model(ids)
        # zeroing the latents leaves only b_dec: the same as replacing the activation by b_dec
        zeroed = tl_model.run_with_hooks(ids, fwd_hooks=[(f"{HOOK}.hook_sae_acts_post",
                                                          lambda acts, hook: torch.zeros_like(acts))])
        expected = tl_model.run_with_hooks(ids, fwd_hooks=[(f"{HOOK}.hook_sae_recons",
                                                            lambda r, hook: sae.b_dec.expand_as(r))])
        torch.testing.assert_close(zeroed, expected)
        # a temporary second SAE, then back to the permanent one
        both = tl_model.run_with_saes(ids, saes=[other])
        assert not torch.allclose(both, spliced)
        assert set(tl_model.acts_to_saes) == {HOOK}
        torch.testing.assert_close(tl_model(ids), spliced)
    finally:
        tl_model.reset_saes()
    assert tl_model.acts_to_saes == {}
    with pytest.raises(ValueError, match="no hook point"):
        tl_model.add_sae(make_sae("blocks.7.hook_resid_post"))


# --- training and analysis on a HookedTransformer --------------------------------------------------------------
def test_training_and_evaluation_on_a_hooked_transformer(tl_model, text_file, tmp_path):
    cfg = LanguageModelSAERunnerConfig(
        model_name="tiny-tl", hook_name="blocks.1.hook_resid_pre", d_in=D_MODEL, architecture="topk",
        activation_fn_kwargs={"k": 4}, d_sae=D_SAE, lr=3e-3, train_batch_size_tokens=64, training_tokens=3200,
        dataset_path=str(text_file), context_size=16, store_batch_size_prompts=8, n_batches_in_buffer=16,
        n_eval_batches=2, checkpoint_path=str(tmp_path / "ckpt"), run_name="tl")
    runner = SAETrainingRunner(cfg, override_model=tl_model)
    sae = runner.run()
    assert sae.cfg.d_in == D_MODEL and sae.cfg.metadata["hook_name"] == "blocks.1.hook_resid_pre"
    assert (runner.run_dir / "final" / "sae_weights.safetensors").exists()

    hook = resolve_hook(tl_model, "blocks.1.hook_resid_pre")
    ids = tokens(n=4, seq=16, seed=7)
    metrics = evaluate(tl_model, sae, hook, [ids])
    assert metrics["explained_variance"] > 0.4  # it learned something on this model's activations
    assert metrics["kl_with_sae"] < metrics["kl_zero_ablation"]


def test_analysis_on_a_hooked_transformer(tl_model, tokenizer, text_file):
    hook_name = "blocks.1.hook_resid_post"  # feeds ln_final directly
    sae = make_sae(hook_name, seed=2)
    loaded = Loaded(sae, tl_model, tokenizer, resolve_hook(tl_model, hook_name), folder=None, model_name="tiny-tl",
                    prepend_bos=True)
    collector = collect_top_examples(loaded, str(text_file), tokens=256, n_top=3, window=2, context_size=16)
    assert collector.tokens_seen > 0 and int(collector.count.sum()) > 0

    # logit effects = the change in logits from adding W_dec[f] before ln_final, its scale held fixed
    feature = 5
    effects = logit_effects(tl_model, tokenizer, sae, feature, n=3)
    ids = tokens(n=1, seq=6, seed=3)
    _, cache = tl_model.run_with_cache(ids)
    scale = cache["ln_final.hook_scale"]
    direction = sae.W_dec[feature].detach()
    shifted = tl_model.run_with_hooks(ids, fwd_hooks=[
        (hook_name, lambda act, hook: act + direction), ("ln_final.hook_scale", lambda s, hook: scale)])
    change = ((shifted - tl_model(ids)) * scale)[0, -1]
    top_id, _, top_value = effects.top[0]
    assert int(change.argmax()) == top_id
    torch.testing.assert_close(torch.tensor(top_value), change.max(), atol=1e-4, rtol=1e-4)


def test_load_model_with_the_tl_prefix(monkeypatch, tokenizer):
    from saelab.models import load_model

    built = {}

    def fake_from_pretrained(name, device=None, dtype=None):
        built["name"] = name
        return HookedTransformer(tl_config(tokenizer, seed=3), tokenizer=tokenizer)

    monkeypatch.setattr(HookedTransformer, "from_pretrained_no_processing", staticmethod(fake_from_pretrained))
    model, tok = load_model("tl:gpt2-small", device="cpu")
    assert built["name"] == "gpt2-small" and tok is model.tokenizer
    assert capture(model, tokens(n=1), [resolve_hook(model, HOOK)])[HOOK].shape == (1, 12, D_MODEL)


@pytest.mark.subprocess
def test_importing_saelab_does_not_import_transformer_lens():
    import subprocess
    import sys

    # (the attribute itself is imported at the top of this file)
    code = "import sys, saelab; assert 'transformer_lens' not in sys.modules, 'saelab imported transformer_lens'"
    subprocess.run([sys.executable, "-c", code], check=True)
