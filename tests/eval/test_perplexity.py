"""Per-language perplexity against a hand computation on a tiny Llama built in the test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moe_adapt.checkpoint.hf import load_causal_lm
from moe_adapt.errors import CheckpointError, MoEAdaptError
from moe_adapt.eval.perplexity import evaluate_perplexity, sliding_windows

VOCAB = 97


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def hand_nll(model: LlamaForCausalLM, ids_T: torch.Tensor) -> tuple[float, int]:
    """NLL sum of tokens 1..T-1 of one unpadded sequence, by log_softmax + gather."""
    with torch.no_grad():
        logits_TV = model(input_ids=ids_T[None]).logits[0].double()
    logp_TV = torch.log_softmax(logits_TV[:-1], dim=-1)
    return float(-logp_TV.gather(1, ids_T[1:, None]).sum()), ids_T.numel() - 1


def make_docs(lengths: list[int], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]


def test_full_context_matches_hand_computation(model: LlamaForCausalLM) -> None:
    docs = {"ar": make_docs([17, 9, 30, 2], 1), "en": make_docs([25, 12], 2)}
    docs["en"][1] = docs["en"][1].numpy()  # numpy arrays are accepted too
    res = evaluate_perplexity(model, docs, window=32, batch_size=3)
    for lang, seqs in docs.items():
        parts = [hand_nll(model, torch.as_tensor(s)) for s in seqs]
        nll, count = sum(p[0] for p in parts), sum(p[1] for p in parts)
        assert res[lang].tokens == count
        assert res[lang].nll_sum == pytest.approx(nll, rel=1e-5)
        assert res[lang].mean_loss == pytest.approx(nll / count, rel=1e-5)
        assert res[lang].ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert set(res["ar"].to_dict()) == {
        *("tokens", "nll_sum", "mean_loss", "ppl"),
        *("bytes", "chars", "bits_per_byte", "bits_per_char"),  # None: no token sizes were given
    }


def test_batching_and_padding_do_not_change_result(model: LlamaForCausalLM) -> None:
    docs = {"he": make_docs([40, 5, 23, 11, 3], 3)}
    a = evaluate_perplexity(model, docs, window=16, stride=8, batch_size=1)["he"]
    b = evaluate_perplexity(model, docs, window=16, stride=8, batch_size=7)["he"]
    assert a.tokens == b.tokens
    assert a.nll_sum == pytest.approx(b.nll_sum, rel=1e-5)


def test_stride_equal_window_matches_chunked_hand_computation(model: LlamaForCausalLM) -> None:
    (doc,) = make_docs([45], 4)
    res = evaluate_perplexity(model, {"ar": [doc]}, window=10, stride=10, batch_size=2)["ar"]
    parts = [hand_nll(model, doc[i : i + 10]) for i in range(0, 45, 10)]
    assert res.tokens == sum(p[1] for p in parts) == 45 - 5
    assert res.nll_sum == pytest.approx(sum(p[0] for p in parts), rel=1e-5)


def test_overlapping_windows_score_each_token_once_with_context(model: LlamaForCausalLM) -> None:
    (doc,) = make_docs([30], 5)
    window, stride = 12, 5
    res = evaluate_perplexity(model, {"ar": [doc]}, window=window, stride=stride)["ar"]
    assert res.tokens == 29  # every token but the first, once
    # Hand computation: each target t scored in the window that first covers it.
    expected, seen = 0.0, set()
    for w in sliding_windows(30, window, stride):
        with torch.no_grad():
            logits_TV = model(input_ids=doc[None, w.begin : w.end]).logits[0].double()
        logp_TV = torch.log_softmax(logits_TV, dim=-1)
        for t in range(w.score_from, w.end):
            assert t not in seen and t - w.begin >= min(t, window - stride)
            seen.add(t)
            expected -= float(logp_TV[t - w.begin - 1, doc[t]])
    assert seen == set(range(1, 30))
    assert res.nll_sum == pytest.approx(expected, rel=1e-5)


def test_sliding_windows_cover_targets_once() -> None:
    for n in (1, 2, 7, 10, 11, 33):
        for window, stride in ((4, 4), (4, 1), (5, 3), (10, 10)):
            ws = sliding_windows(n, window, stride)
            targets = [t for w in ws for t in range(w.score_from, w.end)]
            assert len(targets) == len(set(targets))
            assert all(w.end - w.begin <= window and w.score_from > w.begin for w in ws)
            if stride < window:
                assert targets == list(range(1, n))


def test_bad_inputs_raise_clear_errors(model: LlamaForCausalLM) -> None:
    with pytest.raises(MoEAdaptError, match="stride=9 must be between 1 and window=8"):
        evaluate_perplexity(model, {"ar": make_docs([10], 0)}, window=8, stride=9)
    with pytest.raises(MoEAdaptError, match=r"vocabulary is 0\.\.96"):
        evaluate_perplexity(model, {"ar": [torch.tensor([1, 2, 200])]}, window=8)
    with pytest.raises(MoEAdaptError, match="1-D"):
        evaluate_perplexity(model, {"ar": [torch.ones(2, 3, dtype=torch.long)]}, window=8)
    with pytest.raises(MoEAdaptError, match="integers"):
        evaluate_perplexity(model, {"ar": [np.array([1.0, 2.0])]}, window=8)
    with pytest.raises(MoEAdaptError, match="'he' has no token to score"):
        evaluate_perplexity(model, {"he": [torch.tensor([3])]}, window=8)


def test_load_causal_lm_round_trip_and_missing_path(model: LlamaForCausalLM, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_causal_lm(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_causal_lm(tmp_path)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = load_causal_lm(tmp_path / "ckpt")
    docs = {"ar": make_docs([20], 6)}
    a = evaluate_perplexity(model, docs, window=32)["ar"]
    b = evaluate_perplexity(loaded, docs, window=32)["ar"]
    assert a.nll_sum == pytest.approx(b.nll_sum, rel=1e-6)


def test_moe_model_matches_hand_computation() -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(1)
    cfg = Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
    )
    moe = Qwen3MoeForCausalLM(cfg).eval()
    docs = make_docs([14, 6, 21], 7)
    res = evaluate_perplexity(moe, {"ar": docs}, window=32, batch_size=2)["ar"]
    parts = [hand_nll(moe, d) for d in docs]
    assert res.tokens == sum(p[1] for p in parts)
    assert res.nll_sum == pytest.approx(sum(p[0] for p in parts), rel=1e-5)
