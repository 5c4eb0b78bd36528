"""Packing for fine-tuning: masks and positions by hand, no attention across examples, exact resume."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_adapt.distill.sft_data import Example, PackedSampler, chat_prompt_ids, pack_examples, response_ids
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError

PAD = 0


def test_packing_by_hand() -> None:
    a = Example([11, 12], [13, 14, 15], "ar")  # 5 tokens
    b = Example([21], [22, 23], "en")  # 3 tokens
    c = Example([31, 32, 33], [34, 35], "ar")  # 5 tokens: does not fit after a + b in a row of 9
    rows = pack_examples([a, b, c], seq_len=8, pad_id=PAD, langs=["ar", "en"])
    assert rows.tokens.tolist() == [
        [11, 12, 13, 14, 15, 21, 22, 23, PAD],
        [31, 32, 33, 34, 35, PAD, PAD, PAD, PAD],
    ]
    # label t is token t+1: counted only for response tokens of the same example
    assert rows.loss_mask.astype(int).tolist() == [
        [0, 1, 1, 1, 0, 1, 1, 0],
        [0, 0, 1, 1, 0, 0, 0, 0],
    ]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 4, 0, 1, 2]]
    assert rows.lang_ids[0].tolist()[:7] == [0, 0, 0, 0, 1, 1, 1]
    assert rows.truncated == 0 and rows.topk_ids is None


def test_long_response_is_cut_and_counted() -> None:
    rows = pack_examples([Example([1, 2], list(range(10, 30)), "en")], seq_len=8, pad_id=PAD, langs=["en"])
    assert rows.truncated == 1
    assert rows.tokens.tolist() == [[1, 2, 10, 11, 12, 13, 14, 15, 16]]
    with pytest.raises(MoEAdaptConfigError, match="raise the phase's seq_len"):
        pack_examples([Example(list(range(1, 9)), [5], "en")], seq_len=8, pad_id=PAD, langs=["en"])
    with pytest.raises(MoEAdaptError, match="not one of"):
        pack_examples([Example([1], [2], "he")], seq_len=8, pad_id=PAD, langs=["en"])


def test_topk_follows_response_tokens() -> None:
    k = 2
    a = Example(
        [5, 6], [7, 8], "en", np.array([[7, 1], [8, 2]]), np.array([[-0.1, -3], [-0.2, -4]], dtype=np.float32)
    )
    rows = pack_examples([a], seq_len=4, pad_id=PAD, langs=["en"])
    assert rows.topk_ids is not None and rows.topk_logp is not None
    # label positions 1 and 2 predict response tokens 7 and 8: their top-k rows line up
    assert rows.topk_ids[0, 1].tolist() == [7, 1] and rows.topk_ids[0, 2].tolist() == [8, 2]
    assert rows.loss_mask[0].tolist() == [False, True, True, False]
    assert rows.topk_ids.shape == (1, 4, k)


def test_packed_examples_do_not_see_each_other(lm_factory: Callable[..., Path]) -> None:
    """Logits of an example packed after another equal its logits alone (block-diagonal attention)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lm_factory("llama")).eval()
    first, second = [5, 9, 40, 41, 42], [7, 8, 100, 101]
    rows = pack_examples(
        [Example(first[:2], first[2:], "en"), Example(second[:2], second[2:], "en")], 9, PAD, ["en"]
    )
    with torch.no_grad():
        # use_cache=False as in the engine: transformers reads packing from position_ids only with no cache
        packed = model(
            input_ids=torch.as_tensor(rows.tokens[:, :-1]),
            position_ids=torch.as_tensor(rows.position_ids),
            use_cache=False,
        ).logits[0]
        alone = model(input_ids=torch.tensor([second])).logits[0]
    torch.testing.assert_close(packed[5:9], alone, rtol=1e-5, atol=1e-5)


def test_sampler_is_deterministic_and_resumes_exactly() -> None:
    examples = [Example([i], [i + 100, i + 200], "en") for i in range(1, 40)]
    rows = pack_examples(examples, seq_len=5, pad_id=PAD, langs=["en"])
    a, b = PackedSampler(rows, seed=3), PackedSampler(rows, seed=3)
    stream = [a.next_batch(4).tokens for _ in range(12)]  # crosses epochs (20 rows)
    for _ in range(5):
        b.next_batch(4)
    resumed = PackedSampler(rows, seed=3)
    resumed.load_state_dict(b.state_dict())
    for i in range(5, 12):
        assert np.array_equal(resumed.next_batch(4).tokens, stream[i])
    assert not np.array_equal(PackedSampler(rows, seed=4).next_batch(4).tokens, stream[0])
    with pytest.raises(MoEAdaptError, match="training data changed"):
        PackedSampler(pack_examples(examples[:10], 5, PAD, ["en"]), seed=3).load_state_dict(b.state_dict())


def test_chat_prompt_and_response_ids(lm_factory: Callable[..., Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm_factory("llama"))
    ids = chat_prompt_ids(tok, "كم؟")
    assert tok.decode(ids) == "<|user|>\nكم؟\n<|assistant|>\n"
    assert response_ids(tok, "8")[-1] == tok.eos_token_id
    tok.chat_template = None
    with pytest.raises(MoEAdaptConfigError, match="distill.chat_template"):
        chat_prompt_ids(tok, "hi")
    assert (
        chat_prompt_ids(tok, "hi", "{{ messages[0]['content'] }}")
        == tok("hi", add_special_tokens=False)["input_ids"]
    )
