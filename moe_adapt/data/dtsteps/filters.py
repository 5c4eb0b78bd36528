"""Per-document filters of the data stage: :class:`CleanStep`, :class:`LangIdStep`, :class:`QualityStep`."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from datatrove.data import Document

from moe_adapt.data.clean import clean_text
from moe_adapt.data.config import DataConfig
from moe_adapt.data.dtsteps.base import DocStep
from moe_adapt.data.steps import StepStats
from moe_adapt.errors import MoEAdaptConfigError


class CleanStep(DocStep):
    """Unicode and script normalisation (:func:`moe_adapt.data.clean.clean_text`)."""

    def __init__(self, root: str, cfg: DataConfig):
        super().__init__("clean", root)
        self.cfg = cfg.clean

    def process(self, doc: Document, st: StepStats) -> Document | None:
        text = clean_text(doc.text, self.cfg)
        if not text:
            st.drop(str(doc.metadata["lang"]), "empty_after_cleaning")
            self.stat_update("empty_after_cleaning")
            return None
        doc.text = text
        return doc


class LangIdStep(DocStep):
    """Offline fastText language ID: ``lang: auto`` documents get the detected language; a declared
    language contradicted with confidence >= ``data.langid.min_score`` drops the document."""

    def __init__(self, root: str, cfg: DataConfig):
        super().__init__("langid", root)
        self.min_score = cfg.langid.min_score
        self.model: Any = None

    def start(self, rank: int, world_size: int) -> None:
        from moe_adapt.data.langid import LanguageIdentifier

        self.model = LanguageIdentifier()

    def process(self, doc: Document, st: StepStats) -> Document | None:
        lang, score = self.model.predict_one(doc.text)
        declared = doc.metadata["lang"]
        if declared == "auto":
            if lang == "und":
                st.drop("und", "language_undetermined")
                return None
            doc.metadata["lang"] = lang
        elif lang != declared and score >= self.min_score:
            st.drop(str(declared), f"detected_{lang}")
            self.stat_update(f"detected_{lang}")
            return None
        doc.metadata["lang_score"] = round(score, 4)
        return doc


class QualityStep(DocStep):
    """Per-language quality rules (:mod:`moe_adapt.data.quality`, overridden by
    ``data.quality.thresholds``)."""

    def __init__(self, root: str, cfg: DataConfig):
        super().__init__("quality", root)
        self.overrides: dict[str, dict[str, Any]] = {k: dict(v) for k, v in cfg.quality.thresholds.items()}
        self.table: dict[str, Any] = {}

    def _thresholds(self, lang: str) -> Any:
        from moe_adapt.data.quality import thresholds_for

        if lang not in self.table:
            try:
                base = thresholds_for(lang)
            except MoEAdaptConfigError:
                base = None
            self.table[lang] = replace(base, **self.overrides.get(lang, {})) if base is not None else None
        return self.table[lang]

    def process(self, doc: Document, st: StepStats) -> Document | None:
        from moe_adapt.data.quality import check_quality

        lang = str(doc.metadata["lang"])
        t = self._thresholds(lang)
        if t is None:
            st.drop(lang, "no_thresholds_for_language")
            return None
        result = check_quality(doc.text, lang, t)
        if result.keep:
            return doc
        st.drop(lang, result.reason or "quality")
        self.stat_update(result.reason or "quality")
        return None
