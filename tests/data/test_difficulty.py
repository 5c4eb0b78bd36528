from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from moe_adapt.data.difficulty import (
    assign_buckets,
    bucket_documents,
    compression_ratio,
    score_documents,
    type_token_ratio,
)
from moe_adapt.data.jsonl import read_documents
from moe_adapt.errors import MoEAdaptConfigError


def test_scorers_order_easy_and_hard() -> None:
    easy = "the cat sat on the mat " * 20
    hard = (
        "Quantum chromodynamics describes strong interactions between quarks mediated by gluons in hadrons."
    )
    assert compression_ratio(easy) < compression_ratio(hard)
    assert type_token_ratio(easy) < type_token_ratio(hard) == 1.0
    assert compression_ratio("") == 0.0 and type_token_ratio("") == 0.0
    scores = score_documents([{"text": easy}, {"text": hard}], {"compression": 1.0, "ttr": 1.0})
    assert scores[0] < scores[1]
    with pytest.raises(MoEAdaptConfigError, match="available"):
        score_documents([{"text": easy}], {"perplexity": 1.0})


def test_buckets_ordered_and_keep_language_ratio(demo_dir: Path) -> None:
    sizes = {"ar": 600, "en": 450, "he": 150}  # an uneven mix
    docs = [d for lang, n in sizes.items() for d in list(read_documents(demo_dir / f"{lang}.jsonl"))[:n]]
    out = bucket_documents(docs, k=3)
    total = Counter(d["lang"] for d in out)
    for b in range(3):
        phase = [d for d in out if d["bucket"] == b]
        counts = Counter(d["lang"] for d in phase)
        for lang, n in total.items():
            assert abs(counts[lang] / len(phase) - n / len(out)) < 0.01
    for lang in total:
        per = [[d["difficulty"] for d in out if d["lang"] == lang and d["bucket"] == b] for b in range(3)]
        assert max(per[0]) <= min(per[1]) and max(per[1]) <= min(per[2])
    assert assign_buckets([{"lang": "ar"}] * 4, [3, 1, 2, 0], 2) == [1, 0, 1, 0]
    with pytest.raises(MoEAdaptConfigError, match="buckets=0"):
        assign_buckets([], [], 0)


def test_perplexity_scorer_batches_like_single_texts(tmp_path) -> None:
    """The reference-model scorer: padded batches give each text's own log-perplexity."""
    import math

    from moe_adapt.data.difficulty import PerplexityScorer, score_documents
    from moe_adapt.demo.dense import build_tokenizer
    from tests.conftest import build_dense

    tok = build_tokenizer()
    model_dir = build_dense(tmp_path / "ref", "llama", vocab_size=len(tok))
    tok.save_pretrained(model_dir)
    scorer = PerplexityScorer(model_dir, batch_size=3)
    texts = ["the model learns", "اللغة العربية لغة غنية بالمفردات", "a", "שפה חדשה " * 5, "x y z w v"]
    batched = scorer.batch(texts)
    single = [scorer(t) for t in texts]
    assert all(math.isfinite(v) for v in batched)
    assert max(abs(a - b) for a, b in zip(batched, single, strict=True)) < 1e-4
    assert single[2] == 0.0  # one token: nothing to predict
    docs = [{"text": t, "lang": "en"} for t in texts]
    combined = score_documents(docs, {"perplexity": 1.0}, extra_scorers={"perplexity": scorer})
    assert combined.shape == (5,)


def test_a_reference_model_of_pickle_weights_is_refused(tmp_path) -> None:
    """data.difficulty.reference_model goes through the one loader: a pytorch_model.bin is never
    unpickled, the error names the setting and the conversion."""
    from moe_adapt.data.difficulty import PerplexityScorer
    from moe_adapt.demo.dense import build_tokenizer
    from moe_adapt.errors import CheckpointError
    from tests.conftest import build_dense, pickle_checkpoint

    tok = build_tokenizer()
    safe = build_dense(tmp_path / "safe", "llama", vocab_size=len(tok))
    tok.save_pretrained(safe)
    pickled = pickle_checkpoint(safe, tmp_path / "pickled")
    assert (pickled / "pytorch_model.bin").is_file() and not list(pickled.glob("*.safetensors"))
    with pytest.raises(CheckpointError) as info:
        PerplexityScorer(pickled)
    line = str(info.value)
    assert f"data.difficulty.reference_model={pickled}" in line and "\n" not in line
    assert "safetensors only" in line and "safe_serialization=True" in line
