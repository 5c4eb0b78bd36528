"""The verify settings (:class:`VerifyConfig`, ``distill.verify``) and the registry of checks.

:data:`BUILDERS` is the one list of checks: each check's name, in the default order, and how it is
built from its settings in :class:`VerifyConfig`. The checks and their settings live in one module
per family: ``structure`` (format, length, duplicate), ``script`` (orthography, foreign_script,
script), ``language``, ``answer`` and ``norms`` (dialect, regional_norms). Adding a check is adding
such a module (or a class to one), a field here and a line in :data:`BUILDERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from moe_adapt.distill.format import ResponseFormat
from moe_adapt.distill.verify.answer import AnswerCheck, AnswerCheckConfig
from moe_adapt.distill.verify.base import KEY, Check
from moe_adapt.distill.verify.language import LanguageCheck, LanguageCheckConfig
from moe_adapt.distill.verify.norms import (
    DialectCheck,
    DialectCheckConfig,
    RegionalNormsCheck,
    RegionalNormsCheckConfig,
)
from moe_adapt.distill.verify.script import (
    ForeignScriptCheck,
    ForeignScriptCheckConfig,
    OrthographyCheck,
    OrthographyCheckConfig,
    ScriptCheck,
    ScriptCheckConfig,
)
from moe_adapt.distill.verify.structure import (
    DuplicateCheck,
    DuplicateCheckConfig,
    FormatCheck,
    LengthCheck,
    LengthCheckConfig,
)
from moe_adapt.errors import invalid

BUILDERS: dict[str, Callable[[VerifyConfig, ResponseFormat], Check]] = {
    FormatCheck.name: lambda cfg, fmt: FormatCheck(fmt),
    LengthCheck.name: lambda cfg, fmt: LengthCheck(cfg.length, fmt),
    DuplicateCheck.name: lambda cfg, fmt: DuplicateCheck(cfg.duplicate, fmt),
    OrthographyCheck.name: lambda cfg, fmt: OrthographyCheck(cfg.orthography, fmt),
    ForeignScriptCheck.name: lambda cfg, fmt: ForeignScriptCheck(cfg.foreign_script, fmt),
    ScriptCheck.name: lambda cfg, fmt: ScriptCheck(cfg.script, fmt),
    LanguageCheck.name: lambda cfg, fmt: LanguageCheck(cfg.language, fmt),
    AnswerCheck.name: lambda cfg, fmt: AnswerCheck(cfg.answer, fmt),
    DialectCheck.name: lambda cfg, fmt: DialectCheck(cfg.dialect, fmt),
    RegionalNormsCheck.name: lambda cfg, fmt: RegionalNormsCheck(cfg.regional_norms, fmt),
}
"""Every check by name, in the default order, with how it is built from :class:`VerifyConfig`."""

CHECK_NAMES = tuple(BUILDERS)
"""Every check, in the default order: cheap structural checks first, the language model later."""


@dataclass
class VerifyConfig:
    """The verify phase of ``distill``: which checks run and how each is set."""

    checks: list[str] = field(default_factory=lambda: list(CHECK_NAMES))
    """Checks to run, in this order (the report's "first failing check" follows it)."""

    answer: AnswerCheckConfig = field(default_factory=AnswerCheckConfig)
    """Settings of the ``answer`` check."""

    script: ScriptCheckConfig = field(default_factory=ScriptCheckConfig)
    """Settings of the ``script`` check."""

    language: LanguageCheckConfig = field(default_factory=LanguageCheckConfig)
    """Settings of the ``language`` check."""

    foreign_script: ForeignScriptCheckConfig = field(default_factory=ForeignScriptCheckConfig)
    """Settings of the ``foreign_script`` check."""

    orthography: OrthographyCheckConfig = field(default_factory=OrthographyCheckConfig)
    """Settings of the ``orthography`` check."""

    length: LengthCheckConfig = field(default_factory=LengthCheckConfig)
    """Settings of the ``length`` check."""

    duplicate: DuplicateCheckConfig = field(default_factory=DuplicateCheckConfig)
    """Settings of the ``duplicate`` check."""

    dialect: DialectCheckConfig = field(default_factory=DialectCheckConfig)
    """Settings of the ``dialect`` check."""

    regional_norms: RegionalNormsCheckConfig = field(default_factory=RegionalNormsCheckConfig)
    """Settings of the ``regional_norms`` check."""

    def __post_init__(self) -> None:
        _check_check_names(self.checks)


def _check_check_names(names: list[str]) -> None:
    for name in names:
        if name not in CHECK_NAMES:
            invalid(f"{KEY}.checks", name, f"unknown check; known: {', '.join(CHECK_NAMES)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        invalid(f"{KEY}.checks", names, f"each check may appear once (repeated: {', '.join(repeated)})")


def build_checks(cfg: VerifyConfig, fmt: ResponseFormat) -> list[Check]:
    """The checks ``cfg.checks`` names, in order, with fresh state (the duplicate check's memory).

    Raises :class:`MoEAdaptConfigError` for an unknown check name (listing the known ones), a bad
    regex or a classifier hook that cannot be imported.
    """
    _check_check_names(list(cfg.checks))
    return [BUILDERS[name](cfg, fmt) for name in cfg.checks]
