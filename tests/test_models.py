"""Hook points and model loading, on tiny randomly initialised models built from configs (no downloads)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
import transformers
from torch import nn

from saelab.models import hooks as H
from saelab.models.hooks import (HookNameError, HookPoint, capture, hook_layer, hook_names, hooked, n_layers,
                                 resolve_hook)
from saelab.models.loading import ModelLoadError, load_model, resolve_model_location

N_LAYERS = 3
VOCAB = 128
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
_NEOX = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
             num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)


def _gemma3():
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**_DECODER, head_dim=8, sliding_window=4))


# family -> (builder, attention-out submodule, mlp-out submodule, blocks are sequential (have resid_mid))
FAMILIES = {
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**_DECODER)),
              "self_attn", "mlp", True),
    "qwen2": (lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_DECODER)),
              "self_attn", "mlp", True),
    "mistral": (lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**_DECODER, sliding_window=4)),
                "self_attn", "mlp", True),
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
                 vocab_size=VOCAB, n_embd=32, n_layer=N_LAYERS, n_head=4, n_positions=64,
                 bos_token_id=1, eos_token_id=2)),
             "attn", "mlp", True),
    "gpt_neox": (lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**_NEOX)),
                 "attention", "mlp", False),  # use_parallel_residual=True (Pythia)
    "gpt_neox_sequential": (lambda: transformers.GPTNeoXForCausalLM(
                                transformers.GPTNeoXConfig(**_NEOX, use_parallel_residual=False)),
                            "attention", "mlp", True),
    "gemma": (lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(**_DECODER, head_dim=8)),
              "self_attn", "mlp", True),
    "gemma2": (lambda: transformers.Gemma2ForCausalLM(
                   transformers.Gemma2Config(**_DECODER, head_dim=8, sliding_window=4)),
               "post_attention_layernorm", "post_feedforward_layernorm", True),
    "gemma3": (_gemma3, "post_attention_layernorm", "post_feedforward_layernorm", True),
}
SEQUENTIAL = [name for name, spec in FAMILIES.items() if spec[3]]
_MODELS: dict[str, nn.Module] = {}


def tiny(family: str) -> nn.Module:
    if family not in _MODELS:
        torch.manual_seed(0)
        _MODELS[family] = FAMILIES[family][0]().eval()
    return _MODELS[family]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: thread start-up and contention on a busy machine cost ~30x their compute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def ids():
    return torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))


def blocks(model) -> nn.ModuleList:
    return model.get_submodule(H.block_list_path(model))


def first(output):
    return output[0] if isinstance(output, tuple) else output


def outputs_of(model, ids, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Outputs of ``modules`` over a full, plain forward pass, read with ordinary forward hooks."""
    seen = {}
    handles = [m.register_forward_hook(lambda _m, _a, out, key=key: seen.__setitem__(key, first(out).detach()))
               for key, m in modules.items()]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return seen


def count_calls(module: nn.Module, counter: list):
    return module.register_forward_hook(lambda *_: counter.append(1))


def hook_counts(model) -> tuple[int, int]:
    return (sum(len(m._forward_hooks) for m in model.modules()),
            sum(len(m._forward_pre_hooks) for m in model.modules()))


def tl(model, layer: int, kind: str) -> HookPoint:
    return resolve_hook(model, f"blocks.{layer}.{kind}")


# --- reading activations ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_resid_pre_and_post_match_hidden_states(family, ids):
    model = tiny(family)
    assert n_layers(model) == N_LAYERS
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    assert len(hidden) == N_LAYERS + 1
    last_block = outputs_of(model, ids, {"last": blocks(model)[-1]})["last"]
    for layer in range(N_LAYERS):
        pre = capture(model, ids, [tl(model, layer, "hook_resid_pre")])[f"blocks.{layer}.hook_resid_pre"]
        post = capture(model, ids, [tl(model, layer, "hook_resid_post")])[f"blocks.{layer}.hook_resid_post"]
        assert pre.shape == post.shape == (2, 8, 32)
        torch.testing.assert_close(pre, hidden[layer])
        # HF's last hidden state has the final norm applied: compare the last block with its plain output.
        torch.testing.assert_close(post, hidden[layer + 1] if layer < N_LAYERS - 1 else last_block)
    # the final norm really is applied to hidden_states[-1], so the last block had to be checked separately
    assert not torch.allclose(last_block, hidden[-1])


@pytest.mark.parametrize("family", FAMILIES)
def test_attn_and_mlp_out_match_their_submodules(family, ids):
    model = tiny(family)
    _, attn_name, mlp_name, _ = FAMILIES[family]
    modules = {}
    for layer, block in enumerate(blocks(model)):
        modules[f"blocks.{layer}.hook_attn_out"] = getattr(block, attn_name)
        modules[f"blocks.{layer}.hook_mlp_out"] = getattr(block, mlp_name)
    expected = outputs_of(model, ids, modules)
    got = capture(model, ids, [resolve_hook(model, name) for name in modules])
    assert set(got) == set(expected)
    for name in modules:
        torch.testing.assert_close(got[name], expected[name], msg=name)


@pytest.mark.parametrize("family", SEQUENTIAL)
def test_resid_mid_is_resid_pre_plus_attn_out(family, ids):
    model = tiny(family)
    names = [f"blocks.{layer}.{kind}" for layer in range(N_LAYERS)
             for kind in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")]
    mlp_names = [f"blocks.{layer}.{kind}" for layer in range(N_LAYERS)
                 for kind in ("hook_mlp_in", "ln2.hook_normalized", "mlp.hook_post")]
    assert sorted(hook_names(model)) == sorted(names + mlp_names)
    acts = capture(model, ids, [resolve_hook(model, n) for n in names])
    for layer in range(N_LAYERS):
        a = {kind: acts[f"blocks.{layer}.hook_{kind}"] for kind in ("resid_pre", "resid_mid", "resid_post",
                                                                      "attn_out", "mlp_out")}
        torch.testing.assert_close(a["resid_mid"], a["resid_pre"] + a["attn_out"])
        torch.testing.assert_close(a["resid_post"], a["resid_mid"] + a["mlp_out"])


def _mlp_norm_and_projection(model, block):
    sandwich = hasattr(block, "pre_feedforward_layernorm")
    norm = next(getattr(block, n) for n in ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2")
                if hasattr(block, n))
    projection = next(getattr(block.mlp, n) for n in H.MLP_OUTPUT_PROJECTIONS if hasattr(block.mlp, n))
    return norm, projection, (block.post_feedforward_layernorm if sandwich else None)


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_hooks_match_a_direct_computation(family, ids):
    """hook_mlp_in -> the norm -> ln2.hook_normalized -> the MLP -> (Gemma 2/3: its post-norm) -> hook_mlp_out, and
    the MLP's output projection applied to mlp.hook_post gives the MLP's output: each step computed by hand."""
    model = tiny(family)
    kinds = ("hook_resid_pre", "hook_resid_post", "hook_mlp_out", "hook_mlp_in", "ln2.hook_normalized", "mlp.hook_post")
    acts = capture(model, ids, [tl(model, layer, kind) for layer in range(N_LAYERS) for kind in kinds])
    sequential = FAMILIES[family][3]
    for layer, block in enumerate(blocks(model)):
        a = {kind: acts[f"blocks.{layer}.{kind}"] for kind in kinds}
        norm, projection, post_norm = _mlp_norm_and_projection(model, block)
        with torch.no_grad():
            torch.testing.assert_close(a["ln2.hook_normalized"], norm(a["hook_mlp_in"]))
            raw = block.mlp(a["ln2.hook_normalized"])
            torch.testing.assert_close(projection(a["mlp.hook_post"]), raw)
            torch.testing.assert_close(a["hook_mlp_out"], raw if post_norm is None else post_norm(raw))
        assert a["mlp.hook_post"].shape[-1] == projection.weight.shape[1 if isinstance(projection, nn.Linear) else 0]
        if sequential:  # the MLP reads the residual after attention; parallel blocks read the block's input
            torch.testing.assert_close(a["hook_mlp_in"] + a["hook_mlp_out"], a["hook_resid_post"])
        else:
            torch.testing.assert_close(a["hook_mlp_in"], a["hook_resid_pre"])


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gemma2"])
def test_replacing_the_mlp_input_changes_only_the_mlp_branch(family, ids):
    model = tiny(family)
    clean = capture(model, ids, [tl(model, 1, k) for k in ("hook_resid_post", "hook_mlp_out")])
    for kind in ("hook_mlp_in", "ln2.hook_normalized"):
        with hooked(model, tl(model, 1, kind), lambda act: act * 0.5):
            edited = capture(model, ids, [tl(model, 1, k) for k in ("hook_resid_post", "hook_mlp_out")])
        assert not torch.allclose(edited["blocks.1.hook_mlp_out"], clean["blocks.1.hook_mlp_out"])
        # the residual stream carries on unchanged but for the MLP's new output
        torch.testing.assert_close(edited["blocks.1.hook_resid_post"] - edited["blocks.1.hook_mlp_out"],
                                   clean["blocks.1.hook_resid_post"] - clean["blocks.1.hook_mlp_out"])


def test_parallel_neox_has_no_resid_mid_but_adds_both_branches(ids):
    model = tiny("gpt_neox")
    assert model.config.use_parallel_residual
    names = hook_names(model)
    assert len(names) == 7 * N_LAYERS and not any("resid_mid" in n for n in names)
    with pytest.raises(HookNameError) as err:
        resolve_hook(model, "blocks.0.hook_resid_mid")
    assert "hook_resid_post" in str(err.value) and "hook_resid_mid" not in str(err.value).split("Valid names")[1]
    acts = capture(model, ids, [resolve_hook(model, n) for n in names])
    for layer in range(N_LAYERS):
        torch.testing.assert_close(acts[f"blocks.{layer}.hook_resid_post"],
                                   acts[f"blocks.{layer}.hook_resid_pre"] + acts[f"blocks.{layer}.hook_attn_out"]
                                   + acts[f"blocks.{layer}.hook_mlp_out"])


def test_sandwich_norm_hooks_point_at_the_post_norms():
    model = tiny("gemma2")
    assert tl(model, 1, "hook_attn_out").module_path == "model.layers.1.post_attention_layernorm"
    assert tl(model, 1, "hook_mlp_out").module_path == "model.layers.1.post_feedforward_layernorm"
    mid = tl(model, 1, "hook_resid_mid")
    assert mid.module_path == "model.layers.1.pre_feedforward_layernorm" and mid.reads_input


def test_capture_honours_the_attention_mask():
    model = tiny("llama")
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        hidden = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    got = capture(model, ids, [tl(model, 1, "hook_resid_post")], attention_mask=mask)["blocks.1.hook_resid_post"]
    torch.testing.assert_close(got, hidden[2])
    unmasked = capture(model, ids, [tl(model, 1, "hook_resid_post")])["blocks.1.hook_resid_post"]
    assert not torch.allclose(unmasked[1], got[1])


# --- stopping early --------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_capture_stops_after_the_last_wanted_hook(family, ids):
    model = tiny(family)
    calls = {"block0": [], "last_block": [], "lm_head": []}
    before = hook_counts(model)
    handles = [count_calls(blocks(model)[0], calls["block0"]),
               count_calls(blocks(model)[-1], calls["last_block"]),
               count_calls(model.get_output_embeddings(), calls["lm_head"])]
    try:
        capture(model, ids, [tl(model, 0, "hook_resid_post")])
        assert (len(calls["block0"]), len(calls["last_block"]), len(calls["lm_head"])) == (1, 0, 0)
        # the same hook twice is still one activation: no reason to run further
        acts = capture(model, ids, [tl(model, 0, "hook_resid_post"), tl(model, 0, "hook_resid_post")])
        assert list(acts) == ["blocks.0.hook_resid_post"]
        assert (len(calls["last_block"]), len(calls["lm_head"])) == (0, 0)
        # several hooks: runs to the deepest one only
        capture(model, ids, [tl(model, 1, "hook_mlp_out"), tl(model, 0, "hook_resid_pre")])
        assert (len(calls["last_block"]), len(calls["lm_head"])) == (0, 0)
        capture(model, ids, [tl(model, N_LAYERS - 1, "hook_resid_post")])
        assert (len(calls["last_block"]), len(calls["lm_head"])) == (1, 0)
    finally:
        for h in handles:
            h.remove()
    assert hook_counts(model) == before  # capture leaves no hooks behind


def test_resid_mid_capture_stops_before_the_mlp(ids):
    model = tiny("llama")
    mlp_calls = []
    handle = count_calls(model.model.layers[0].mlp, mlp_calls)
    try:
        capture(model, ids, [tl(model, 0, "hook_resid_mid")])
    finally:
        handle.remove()
    assert mlp_calls == []


def test_capture_of_nothing_runs_nothing(ids):
    model = tiny("llama")
    calls = []
    handle = count_calls(model.model.embed_tokens, calls)
    try:
        assert capture(model, ids, []) == {}
    finally:
        handle.remove()
    assert calls == []


def test_capture_of_a_hook_that_never_fires_raises(ids):
    model = tiny("llama")
    model.add_module("spare", nn.Linear(2, 2))  # a module outside the forward pass never runs
    try:
        with pytest.raises(HookNameError, match="never fired"):
            capture(model, ids, [resolve_hook(model, "spare")])
    finally:
        del model.spare


# --- module paths and errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("family,path", [("llama", "model.layers.1.mlp"), ("gpt2", "transformer.h.1.mlp"),
                                         ("gpt2", "transformer.h.1.attn"), ("gpt_neox", "gpt_neox.layers.2"),
                                         ("gemma2", "model.layers.0.pre_feedforward_layernorm")])
def test_module_path_captures_that_modules_output(family, path, ids):
    model = tiny(family)
    hook = resolve_hook(model, path)
    assert hook == HookPoint(name=path, module_path=path, reads_input=False)
    assert hook_layer(model, hook) == int(path.split(".")[2])
    expected = outputs_of(model, ids, {path: model.get_submodule(path)})[path]
    torch.testing.assert_close(capture(model, ids, [hook])[path], expected)


def test_module_paths_outside_the_blocks(ids):
    model = tiny("llama")
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    acts = capture(model, ids, [resolve_hook(model, "lm_head")])
    torch.testing.assert_close(acts["lm_head"], out.logits)
    assert hook_layer(model, resolve_hook(model, "lm_head")) is None
    # a module returning a ModelOutput (the base model) gives its first field, the last hidden state
    acts = capture(model, ids, [resolve_hook(model, "model")])
    torch.testing.assert_close(acts["model"], out.hidden_states[-1])
    assert hook_layer(model, tl(model, 2, "hook_mlp_out")) == 2
    assert hook_layer(model, tl(model, 1, "hook_resid_pre")) == 1


@pytest.mark.parametrize("name", ["blocks.0.hook_resid_postt", "blocks.0.hook_foo", f"blocks.{N_LAYERS}.hook_resid_post",
                                  "blocks.99.hook_mlp_out", "model.layers.7.mlp", "model.layers.0.nothing",
                                  "lm_head.weight", "transformer.h.0", "", "resid_post"])
def test_unknown_hook_names_raise_listing_valid_names(name):
    model = tiny("llama")
    with pytest.raises(HookNameError) as err:
        resolve_hook(model, name)
    message = str(err.value)
    assert repr(name) in message
    assert "hook_resid_post" in message and f"blocks.{{0..{N_LAYERS - 1}}}" in message
    assert "model.layers.6.mlp" in message  # mentions module paths too
    assert isinstance(err.value, ValueError)


def test_unrecognised_model_accepts_module_paths_only():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(HookNameError, match="cannot find the transformer blocks"):
        resolve_hook(model, "blocks.0.hook_resid_post")
    assert resolve_hook(model, "0").module_path == "0"
    with pytest.raises(HookNameError, match="not recognised"):
        resolve_hook(model, "9")


# --- replacing activations --------------------------------------------------------------------------------

def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_hooked_replacement_changes_logits_and_none_does_not(family, ids):
    model = tiny(family)
    clean = _logits(model, ids)
    before = hook_counts(model)
    for kind in ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out"):
        hook = tl(model, 1, kind)
        seen = []
        with hooked(model, hook, lambda act: seen.append(act.shape)):
            torch.testing.assert_close(_logits(model, ids), clean)
        assert seen == [(2, 8, 32)]
        with hooked(model, hook, lambda act: act.clone()):
            torch.testing.assert_close(_logits(model, ids), clean)
        with hooked(model, hook, lambda act: act * 0.5 + 1.0):
            changed = _logits(model, ids)
        assert not torch.allclose(changed, clean, atol=1e-3), kind
        assert hook_counts(model) == before, kind
        torch.testing.assert_close(_logits(model, ids), clean)


def test_hooked_replacement_is_what_downstream_sees(ids):
    model = tiny("llama")
    hook = tl(model, 0, "hook_resid_post")
    with hooked(model, hook, lambda act: torch.zeros_like(act)):
        pre1 = capture(model, ids, [tl(model, 1, "hook_resid_pre")])["blocks.1.hook_resid_pre"]
    assert torch.count_nonzero(pre1) == 0
    # a replaced resid_pre is the block's input for the residual branch too
    with hooked(model, tl(model, 1, "hook_resid_pre"), lambda act: torch.zeros_like(act)):
        acts = capture(model, ids, [tl(model, 1, "hook_resid_post"), tl(model, 1, "hook_mlp_out"),
                                    tl(model, 1, "hook_attn_out")])
    torch.testing.assert_close(acts["blocks.1.hook_resid_post"],
                               acts["blocks.1.hook_attn_out"] + acts["blocks.1.hook_mlp_out"])


@pytest.mark.parametrize("family", SEQUENTIAL)
def test_hooked_resid_mid_replacement_reaches_the_residual_stream(family, ids):
    model = tiny(family)
    clean = _logits(model, ids)
    before = hook_counts(model)
    layer = 1
    hook = tl(model, layer, "hook_resid_mid")
    names = [f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.hook_mlp_out", f"blocks.{layer}.hook_resid_post"]
    with hooked(model, hook, lambda act: act * 0.5 + 1.0):
        acts = capture(model, ids, [resolve_hook(model, n) for n in names])
        changed = _logits(model, ids)
    mid, mlp_out, post = (acts[n] for n in names)
    # the block's output is built on the replaced resid_mid, not on the original one
    torch.testing.assert_close(post, mid + mlp_out)
    assert not torch.allclose(changed, clean, atol=1e-3)
    with hooked(model, hook, torch.zeros_like):
        acts = capture(model, ids, [resolve_hook(model, n) for n in names])
    assert torch.count_nonzero(acts[names[0]]) == 0
    torch.testing.assert_close(acts[names[2]], acts[names[1]])  # zero-ablated resid_mid: only the MLP remains
    with hooked(model, hook, lambda act: act.clone()):
        torch.testing.assert_close(_logits(model, ids), clean)
    assert hook_counts(model) == before
    torch.testing.assert_close(_logits(model, ids), clean)


def test_hooks_are_removed_when_the_body_raises(ids):
    model = tiny("gpt2")
    clean = _logits(model, ids)
    before = hook_counts(model)
    for kind in ("hook_resid_mid", "hook_attn_out"):
        with pytest.raises(RuntimeError, match="boom"):
            with hooked(model, tl(model, 0, kind), torch.zeros_like):
                raise RuntimeError("boom")
        assert hook_counts(model) == before
    torch.testing.assert_close(_logits(model, ids), clean)


def test_hooked_module_path_with_a_model_output(ids):
    model = tiny("llama")
    with torch.no_grad():
        clean = model(ids)
    with hooked(model, resolve_hook(model, "model"), torch.zeros_like):
        with torch.no_grad():
            logits = model(ids).logits
    torch.testing.assert_close(logits, torch.zeros_like(logits))
    torch.testing.assert_close(_logits(model, ids), clean.logits)


# --- loading ----------------------------------------------------------------------------------------------

def _word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


def test_load_model_from_a_saved_folder(tmp_path):
    words = [f"w{i}" for i in range(60)]
    tokenizer = _word_tokenizer(words)
    config = transformers.LlamaConfig(**{**_DECODER, "vocab_size": len(tokenizer), "pad_token_id": None,
                                         "bos_token_id": 1, "eos_token_id": 2})
    torch.manual_seed(0)
    original = transformers.LlamaForCausalLM(config).eval()
    original.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    assert resolve_model_location(str(tmp_path)) == (str(tmp_path), None)
    model, loaded_tok = load_model(str(tmp_path), device="cpu")
    assert type(model) is transformers.LlamaForCausalLM and not model.training
    assert next(model.parameters()).dtype == torch.float32 and next(model.parameters()).device.type == "cpu"
    expected, got = original.state_dict(), model.state_dict()
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    text = "w3 w7 w59 nonsense"
    assert loaded_tok(text).input_ids == tokenizer(text).input_ids
    assert loaded_tok(text).input_ids[-1] == tokenizer.unk_token_id
    assert loaded_tok.pad_token == "</s>"  # no pad token saved: falls back to eos
    ids = torch.tensor([loaded_tok(text).input_ids])
    torch.testing.assert_close(_logits(model, ids), _logits(original, ids))

    half, _ = load_model(str(tmp_path), device="cpu", dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_folder_without_config_is_a_helpful_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path), device="cpu")
    message = str(err.value)
    assert "config.json" in message and str(tmp_path) in message and "smollm2-135m" in message


def test_missing_paths_are_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"), device="cpu")
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_model(str(tmp_path / "not" / "there"), device="cpu")
    with pytest.raises(ModelLoadError, match="no such folder"):
        resolve_model_location("./no-such-model-folder")
    # a plain file that is not a GGUF
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError):
        resolve_model_location(str(tmp_path / "model.bin"))
    # a name shaped like a hub id is passed through to transformers
    assert resolve_model_location("EleutherAI/pythia-70m") == ("EleutherAI/pythia-70m", None)


def test_hub_id_offline_fails_fast_mentioning_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        load_model("saelab-tests/no-such-model-0123456789", device="cpu")
    assert time.monotonic() - start < 10  # honoured at call time: no network retries
    message = str(err.value)
    assert "saelab-tests/no-such-model-0123456789" in message
    assert "cache" in message and "HF_HUB_OFFLINE" in message


# --- GGUF -------------------------------------------------------------------------------------------------

def _write_llama_gguf(path, model, tokens: list[str], merges: list[str], eos_id: int):
    import gguf

    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None)
                              else float(cfg.rope_theta))
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])  # the last one is a control token
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eos_id)
    writer.add_eos_token_id(eos_id)

    def permute(w, n_head):  # llama.cpp's q/k row order, which transformers undoes on load
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for layer in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            w = sd[f"model.layers.{layer}.{hf}.weight"]
            if gg == "attn_q":
                w = permute(w, heads)
            elif gg == "attn_k":
                w = permute(w, kv_heads)
            writer.add_tensor(f"blk.{layer}.{gg}.weight", np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_load_model_from_a_gguf_file(tmp_path):
    pytest.importorskip("gguf")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values()) + ["he", "ll", "Ġt", "Ġthe", "<|endoftext|>"]
    merges = ["h e", "l l", "Ġ t", "Ġt he"]
    eos = len(tokens) - 1
    config = transformers.LlamaConfig(**{**_DECODER, "vocab_size": len(tokens), "num_hidden_layers": 2,
                                         "tie_word_embeddings": False, "pad_token_id": None,
                                         "bos_token_id": eos, "eos_token_id": eos})
    torch.manual_seed(0)
    original = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path / "tiny.gguf"
    _write_llama_gguf(path, original, tokens, merges, eos)

    assert resolve_model_location(str(path)) == (str(tmp_path), "tiny.gguf")
    assert resolve_model_location(str(tmp_path)) == (str(tmp_path), "tiny.gguf")  # a folder with one .gguf
    model, tokenizer = load_model(str(path), device="cpu")
    assert type(model) is transformers.LlamaForCausalLM and not model.training
    assert model.hf_quantizer is None and getattr(model.config, "quantization_config", None) is None
    expected, got = original.state_dict(), model.state_dict()
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    ids = tokenizer("hello the", return_tensors="pt").input_ids
    assert ids[0].tolist()[:2] == [tokens.index("he"), tokens.index("ll")]
    assert tokens.index("Ġthe") in ids[0].tolist()
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|endoftext|>"
    torch.testing.assert_close(_logits(model, ids), _logits(original, ids))

    # the dequantised model saves as a plain checkpoint that loads back the same (the embedded-model cache path)
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    again, _ = load_model(str(folder), device="cpu")
    torch.testing.assert_close(_logits(again, ids), _logits(original, ids))


def test_hf_offline_flag_parsing(monkeypatch):
    from saelab.models.loading import _hub_offline

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    assert not _hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not _hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    assert _hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert _hub_offline()
    assert os.environ["HF_HUB_OFFLINE"] == "0"
