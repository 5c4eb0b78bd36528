"""Exact and MinHash near-duplicate removal (moe_adapt.data.dedup) on small planted corpora."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from moe_adapt.data.dedup import DedupConfig, FastWordTokenizer, deduplicate, exact_key
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError

# A chain of narrators (isnad) as it opens thousands of hadiths, with diacritics and the closing formula.
CHAIN = "حَدَّثَنَا قُتَيْبَةُ بْنُ سَعِيدٍ حَدَّثَنَا اللَّيْثُ عَنْ نَافِعٍ عَنِ ابْنِ عُمَرَ قَالَ قَالَ رَسُولُ اللَّهِ صلى الله عليه وسلم"
AR_LETTERS = "ابتثجحخدذرزسشصضطظعغفقكلمنهوي"
HE_LETTERS = "אבגדהוזחטיכלמנסעפצקרשת"
EN_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _words(rng: random.Random, letters: str, n: int) -> list[str]:
    """``n`` random 3-7 letter words: unrelated texts share no 5-gram by chance."""
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 7))) for _ in range(n)]


def _change_words(rng: random.Random, text: str, letters: str, k: int) -> str:
    """Replace ``k`` words of ``text`` (spread over it) with other random words."""
    words = text.split()
    for pos in rng.sample(range(len(words)), k):
        words[pos] = _words(rng, letters, 1)[0]
    return " ".join(words)


def _corpus(seed: int = 0) -> tuple[list[dict[str, Any]], set[str], set[str], set[str]]:
    """Distinct docs in ar/he/en (+ 40 Arabic docs sharing CHAIN), planted near and exact duplicates.

    Returns ``(docs, near_ids, exact_ids, chain_ids)``; the planted copies come after their originals.
    """
    rng = random.Random(seed)
    docs: list[dict[str, Any]] = []
    for lang, letters in (("ar", AR_LETTERS), ("he", HE_LETTERS), ("en", EN_LETTERS)):
        for i in range(12):
            text = " ".join(_words(rng, letters, 300))
            docs.append(
                {"id": f"{lang}{i}", "text": text, "lang": lang, "source": "synthetic", "meta": {"i": i}}
            )
    chain_ids = set()
    for i in range(40):  # same long formulaic opening, different hadith after it
        text = CHAIN + " " + " ".join(_words(rng, AR_LETTERS, rng.randint(20, 40)))
        docs.append({"id": f"chain{i}", "text": text, "lang": "ar", "source": "hadith"})
        chain_ids.add(f"chain{i}")
    near_ids, exact_ids = set(), set()
    for lang, letters, k in (("ar", AR_LETTERS, 3), ("he", HE_LETTERS, 3), ("en", EN_LETTERS, 2)):
        orig = next(d for d in docs if d["id"] == f"{lang}1")
        docs.append(
            {
                "id": f"near-{lang}",
                "text": _change_words(rng, orig["text"], letters, k),
                "lang": lang,
                "source": "copy",
            }
        )
        near_ids.add(f"near-{lang}")
    en2, ar3 = docs[26], docs[3]
    assert en2["id"] == "en2" and ar3["id"] == "ar3"
    docs.append(
        {
            "id": "exact-en",
            "text": "  " + en2["text"].upper().replace(" ", " \n\t "),
            "lang": "en",
            "source": "c",
        }
    )
    docs.append(
        {"id": "exact-ar", "text": ar3["text"].replace(" ", "   ") + "\n", "lang": "ar", "source": "c"}
    )
    exact_ids |= {"exact-en", "exact-ar"}
    # Interleave the copies with the rest (after their originals) to check that order is preserved.
    docs.insert(30, docs.pop(docs.index(next(d for d in docs if d["id"] == "near-en"))))
    return docs, near_ids, exact_ids, chain_ids


def test_removes_planted_duplicates_keeps_distinct_and_formulaic(tmp_path: Path) -> None:
    docs, near_ids, exact_ids, chain_ids = _corpus()
    kept, stats = deduplicate(docs, DedupConfig(), tmp_path / "work")
    kept_ids = [d["id"] for d in kept]
    expected = [d["id"] for d in docs if d["id"] not in near_ids | exact_ids]
    assert kept_ids == expected  # all distinct docs kept (incl. every chain doc), in input order
    assert chain_ids <= set(kept_ids)
    for d in kept:  # the same dicts, fields untouched
        assert any(d is orig for orig in docs)
    assert kept[0]["meta"] == {"i": 0} and kept[0]["source"] == "synthetic"
    assert stats["exact_removed"] == {"ar": 1, "he": 0, "en": 1}
    assert stats["near_removed"] == {"ar": 1, "he": 1, "en": 1}
    assert stats["docs_in"] == len(docs) and stats["docs_out"] == len(docs) - 5
    pairs = {(e["kind"], e["removed_id"], e["kept_id"]) for e in stats["examples"]}
    assert pairs == {
        ("exact", "exact-en", "en2"),
        ("exact", "exact-ar", "ar3"),
        ("near", "near-ar", "ar1"),
        ("near", "near-he", "he1"),
        ("near", "near-en", "en1"),
    }
    assert not list((tmp_path / "work").iterdir())  # the MinHash run folder is cleaned up


def test_switches_and_no_files_outside_work_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs, near_ids, exact_ids, _ = _corpus(seed=1)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    kept, stats = deduplicate(docs, DedupConfig(minhash=False), tmp_path / "w1")
    assert {d["id"] for d in docs} - {d["id"] for d in kept} == exact_ids
    assert sum(stats["near_removed"].values()) == 0
    # Without the exact pass, MinHash catches the exact copies too (identical after its own normalisation).
    kept, stats = deduplicate(docs, DedupConfig(exact=False, workers=2), tmp_path / "w2")
    assert {d["id"] for d in docs} - {d["id"] for d in kept} == near_ids | exact_ids
    assert sum(stats["exact_removed"].values()) == 0 and sum(stats["near_removed"].values()) == 5
    assert not list(cwd.iterdir())  # datatrove wrote no logs in the working directory


def test_empty_input_and_bad_documents(tmp_path: Path) -> None:
    kept, stats = deduplicate([], DedupConfig(), tmp_path)
    assert kept == [] and stats["docs_out"] == 0 and stats["examples"] == []
    with pytest.raises(MoEAdaptError, match="document 1"):
        deduplicate([{"id": "a", "text": "x"}, {"id": "b"}], DedupConfig(), tmp_path)


def test_short_documents_only_exact(tmp_path: Path) -> None:
    docs = [
        {"id": "a", "text": "Hello   World"},
        {"id": "b", "text": "hello world"},
        {"id": "c", "text": "hello there world"},
    ]
    kept, stats = deduplicate(docs, DedupConfig(), tmp_path)
    assert [d["id"] for d in kept] == ["a", "c"]  # fewer words than an n-gram: no MinHash signature
    assert stats["exact_removed"] == {"und": 1}


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"n_grams": 0}, "data.dedup.n_grams=0"),
        ({"num_buckets": -1}, "data.dedup.num_buckets=-1"),
        ({"hashes_per_bucket": 2.5}, "data.dedup.hashes_per_bucket=2.5"),
        ({"workers": 0}, "data.dedup.workers=0"),
        ({"seed": -3}, "data.dedup.seed=-3"),
        ({"exact": "yes"}, "data.dedup.exact='yes'"),
        ({"max_examples": True}, "data.dedup.max_examples=True"),
    ],
)
def test_bad_config_names_key_and_allowed(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(MoEAdaptConfigError, match="must be") as err:
        DedupConfig(**overrides)
    assert key in str(err.value)


def test_config_is_omegaconf_structured() -> None:
    cfg = OmegaConf.structured(DedupConfig)
    cfg.merge_with({"n_grams": 7, "workers": 2})
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, DedupConfig) and obj.n_grams == 7
    mh = obj.minhash_config()
    assert (mh.n_grams, mh.num_buckets, mh.hashes_per_bucket, mh.seed) == (7, 14, 8, 1)


def test_fast_word_tokenizer_arabic_hebrew() -> None:
    tok = FastWordTokenizer()
    assert tok.word_tokenize("قــال رَسُولُ، اللَّهِ") == ["قال", "رَسُولُ", "اللَّهِ"]
    assert tok.word_tokenize("אמר רמב״ם: שלום-עולם") == ["אמר", "רמב״ם", "שלום", "עולם"]
    assert tok.word_tokenize("It's 2 o'clock.") == ["It's", "2", "o'clock"]
    assert tok.sent_tokenize("أين؟ هنا. Yes!\nNo") == ["أين؟", "هنا.", "Yes!", "No"]
    assert FastWordTokenizer(strip_marks=True).word_tokenize("رَسُولُ שָׁלוֹם café") == ["رسول", "שלום", "cafe"]
    text = "a b. c d"
    assert [text[a:b].strip() for a, b in tok.span_tokenize(text)] == ["a b.", "c d"]


def test_exact_key_is_stable() -> None:
    assert exact_key(" A\tb\n") == exact_key("a b")
    assert exact_key("a b").hex() == exact_key("a b").hex() and len(exact_key("x")) == 16
