"""Feature absorption (evals/absorption.py): a planted case with one absorbed word gives exactly the
expected rates, the same dictionary without the absorbing latent gives 0, each rule of the per-word
computation against a hand calculation, the batched Newton probe against L-BFGS, and the prompts."""

import math

import pytest
import torch

from conftest import make_tokenizer
from saelab.evals import probing
from saelab.evals.absorption import (LETTERS, SpellingSet, absorption_metrics, alpha_tokens, letter_probes,
                                     spelling_prompts, word_absorption)
from saelab.sae import SAEConfig, create_sae

D_IN = 40                  # dims 0-25: one direction per first letter; 26-38: token noise; 39: one word's own
S = LETTERS.index("s")
ABSORBED = "sun"           # the one S-word whose S direction a token latent takes


def planted_words(train_per_letter=10, test_per_letter=4, seed=0):
    """Every word = 2 x its letter's direction + a little token noise; the test word ``sun`` also has its
    own direction (dim 39) as strongly."""
    g = torch.Generator().manual_seed(seed)
    words, letters, rows, train = [], [], [], []
    for index, letter in enumerate(LETTERS):
        for j in range(train_per_letter + test_per_letter):
            x = torch.zeros(D_IN)
            x[index] = 2.0
            x[26:39] = 0.3 * torch.randn(13, generator=g)
            is_train = j < train_per_letter
            word = ABSORBED if (letter == "s" and j == train_per_letter) else f"{letter}{j}"
            if word == ABSORBED:
                x[39] = 2.0
            words.append(word)
            letters.append(index)
            rows.append(x)
            train.append(is_train)
    return SpellingSet(words, torch.tensor(letters), torch.stack(rows), torch.tensor(train))


def letter_sae(absorbing: bool):
    """Latent L reads and writes letter L's direction (fires above 0.5). With ``absorbing``, latent 26 fires on
    dim 39 and writes (S + dim 39) / sqrt 2, and the S latent is suppressed by dim 39: on ``sun`` the S
    direction is carried by latent 26 alone."""
    sae = create_sae(SAEConfig(d_in=D_IN, d_sae=27, architecture="standard"))
    with torch.no_grad():
        for index in range(26):
            sae.W_enc[index, index] = 1.0
            sae.W_dec[index, index] = 1.0
        sae.b_enc.fill_(-0.5)
        if absorbing:
            sae.W_enc[39, S] = -2.0
            sae.W_enc[39, 26] = 1.0
            sae.W_dec[26, S] = sae.W_dec[26, 39] = 2 ** -0.5
    return sae


def test_a_planted_absorbing_latent_gives_the_expected_absorption():
    spelling = planted_words()
    probes = letter_probes(spelling)
    assert min(probes.f1) == 1.0  # the letters are plain in the activations
    result = absorption_metrics(letter_sae(absorbing=True), spelling, probes)
    assert result["letters_scored"] == 26
    rows = {row["first_letter"]: row for row in result["letters"]}
    s = rows["s"]
    assert s["main_latents"] == [S] and s["num_probe_true_positives"] == 4
    assert s["num_full_absorption"] == 1 and s["full_absorption_rate"] == pytest.approx(1 / 4)
    assert s["mean_absorption_fraction"] == pytest.approx(1 / 4)  # sun: 1, the other three: 0
    assert s["absorbed_examples"] == [{"word": ABSORBED, "absorbing_latent": 26}]
    for letter, row in rows.items():
        assert row["num_split_features"] == 1
        if letter != "s":
            assert row["full_absorption_rate"] == 0 and row["mean_absorption_fraction"] == 0
    assert result["mean_full_absorption_score"] == pytest.approx(1 / 4 / 26)
    assert result["mean_absorption_fraction_score"] == pytest.approx(1 / 4 / 26)
    assert result["mean_num_split_features"] == 1


def test_a_dictionary_without_absorption_scores_zero():
    spelling = planted_words()
    result = absorption_metrics(letter_sae(absorbing=False), spelling, letter_probes(spelling))
    assert result["letters_scored"] == 26
    assert result["mean_full_absorption_score"] == 0 and result["mean_absorption_fraction_score"] == 0


def test_word_absorption_follows_each_rule_by_hand():
    direction = torch.tensor([1.0, 0, 0, 0])
    r = 2 ** -0.5
    decoder = torch.tensor([[1.0, 0, 0, 0],      # 0: the main latent
                            [r, r, 0, 0],        # 1: aligned (cos 0.71)
                            [r, 0, r, 0],        # 2: aligned (cos 0.71)
                            [0, 0, 0, 1.0],      # 3: orthogonal, fires strongly
                            [0.05, 0.9987, 0, 0]])  # 4: cos 0.05: only full absorption may count it
    x = torch.tensor([[2.0, 0, 0, 0]] * 4)
    latents = torch.tensor([[0.5, 1.0, 0.5, 3.0, 0.0],   # partial: the main latent weak, 1 and 2 supply most
                            [0.0, 2.0, 0.0, 0.0, 0.0],   # full: the main latent silent, 1 supplies 1.41 of 2
                            [1.9, 0.2, 0.0, 0.0, 0.0],   # main latent supplies nearly all: others too little
                            [0.0, 0.0, 0.0, 0.0, 20.0]])  # full by 4 alone (cos 0.05 >= 0.025): 20 * 0.05 = 1
    fraction, full, top = word_absorption(x, latents, decoder, direction, main=[0])
    supplied = 1.0 * r + 0.5 * r
    assert fraction[0].item() == pytest.approx(supplied / (supplied + 0.5))
    assert fraction[1].item() == 1.0 and fraction[2].item() == 0.0
    assert fraction[3].item() == 0.0  # latent 4's cosine is under 0.1: not a partial absorber
    assert full.tolist() == [False, True, False, True]
    assert top.tolist() == [1, 1, 0, 4]


def test_decoder_row_norms_count_in_a_latents_contribution():
    """A latent's share is f * (W_dec[i] . p): a row twice as long with half the activation is the same."""
    direction = torch.tensor([1.0, 0])
    x = torch.tensor([[2.0, 0]])
    unit = word_absorption(x, torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0], [1.0, 0]]), direction, [0])
    long = word_absorption(x, torch.tensor([[0.0, 0.5]]), torch.tensor([[1.0, 0], [2.0, 0]]), direction, [0])
    assert unit[1].tolist() == long[1].tolist() == [True]


def test_batched_newton_probes_equal_lbfgs(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 400, 6, generator=g)
    y = (x[..., 0] - 0.4 * x[..., 1] + 0.5 * torch.randn(3, 400, generator=g) > 0.3).long()
    newton = probing.fit_logistic(x, y, balanced=True)
    monkeypatch.setattr(probing, "NEWTON_FEATURES", 0)
    lbfgs = probing.fit_logistic(x, y, balanced=True)
    for a, b in zip(newton, lbfgs):
        assert torch.allclose(a, b, atol=1e-4)
    monkeypatch.undo()
    alone = probing.fit_logistic(x[1], y[1], balanced=True)  # one problem = its slice of the batch
    assert torch.allclose(alone[0], newton[0][1], atol=1e-8) and torch.allclose(alone[1], newton[1][1], atol=1e-8)
    # a separable problem stays finite (the L2 penalty bounds it) and classifies (nearly) perfectly
    w, b = probing.fit_logistic(x[0], (x[0][:, 0] > 0).long())
    assert torch.isfinite(w).all() and (((x[0].double() @ w + b) > 0) == (x[0][:, 0] > 0)).double().mean() > 0.98


def test_prompts_hold_solved_examples_and_point_at_the_word():
    import random

    tokenizer = make_tokenizer()
    vocabulary = alpha_tokens(tokenizer)
    assert len(vocabulary) >= 52 and all(text.strip().isalpha() for _, text in vocabulary)
    words = vocabulary[:5]
    prompts, positions = spelling_prompts(tokenizer, words, vocabulary, random.Random(0), examples=3, bos=[0])
    for (token_id, text), prompt, position in zip(words, prompts, positions):
        assert prompt[0] == 0 and prompt[position] == token_id
        decoded = tokenizer.decode(prompt[1:])
        assert decoded.endswith(text + " has the first letter:")
        lines = decoded.split("\n")
        assert len(lines) == 4
        for line in lines[:3]:  # each example answered with its own first letter, capitalised
            word, answer = line.split(" has the first letter:")
            assert answer == " " + word.strip()[0].upper() and word != text


def test_a_letter_without_words_is_left_out_of_the_means():
    spelling = planted_words()
    keep = spelling.letters != LETTERS.index("q")
    spelling = SpellingSet([w for w, k in zip(spelling.words, keep) if k], spelling.letters[keep],
                           spelling.activations[keep], spelling.train[keep])
    result = absorption_metrics(letter_sae(absorbing=True), spelling, letter_probes(spelling))
    q = next(row for row in result["letters"] if row["first_letter"] == "q")
    assert not q["scored"] and q["num_probe_true_positives"] == 0 and math.isnan(q["full_absorption_rate"])
    assert result["letters_scored"] == 25
    assert result["mean_full_absorption_score"] == pytest.approx(1 / 4 / 25)
