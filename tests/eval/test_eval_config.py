"""EvalConfig / ReportConfig: documented fields, one-line errors, and the shipped YAML composes."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moe_adapt.errors import MoEAdaptConfigError
from moe_adapt.eval import config as config_module
from moe_adapt.eval.config import BenchmarkEntry, EvalConfig, ModelEntry, ReportConfig

CONF = Path(__file__).resolve().parents[2] / "conf"


def test_every_field_has_a_docstring() -> None:
    tree = ast.parse(inspect.getsource(config_module))
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                nxt = body[i + 1] if i + 1 < len(body) else None
                assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), (
                    f"{cls.name}.{ast.unparse(node.target)} has no docstring"
                )


@pytest.mark.parametrize("group", ["eval", "report"])
def test_every_yaml_key_has_a_comment(group: str) -> None:
    for line in (CONF / group / "default.yaml").read_text().splitlines():
        if re.match(r"^\s*(- )?[A-Za-z_]+:", line):
            assert "#" in line, f"conf/{group}/default.yaml: no comment on {line!r}"


def test_yaml_composes_into_the_schema() -> None:
    ev = OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.load(CONF / "eval" / "default.yaml"))
    rep = OmegaConf.merge(
        OmegaConf.structured(ReportConfig), OmegaConf.load(CONF / "report" / "default.yaml")
    )
    root = OmegaConf.create({"run_dir": "/runs/tiny", "eval": ev, "report": rep})
    obj = OmegaConf.to_object(root)
    ecfg, rcfg = obj["eval"], obj["report"]
    assert isinstance(ecfg, EvalConfig) and isinstance(rcfg, ReportConfig)
    assert ecfg.models == []  # the eval stage picks model.dense and the run's newest model
    assert ecfg.heldout == "/runs/tiny/data/heldout"
    assert ecfg.benchmarks[0].files["ar"] == "/runs/tiny/data/benchmarks/hadith_qa_ar.jsonl"
    assert ecfg.contamination == "/runs/tiny/data/contamination.json"
    assert rcfg.sweep_dir is None and rcfg.metrics_path == "eval/metrics.json"


def test_dataclass_defaults_are_valid() -> None:
    assert EvalConfig().heldout is None and EvalConfig().models == []
    ReportConfig()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"models": [ModelEntry("a b", "/x")]}, r"eval\.models\[0\]\.name='a b' is invalid"),
        ({"models": [ModelEntry("m", "/x"), ModelEntry("m", "/y")]}, r"eval\.models\[1\]\.name='m'.*unique"),
        ({"models": [ModelEntry("m", "???")]}, r"eval\.models\[0\]\.path='\?\?\?' is invalid"),
        ({"window": 8, "stride": 16}, r"eval\.stride=16 is invalid: must be <= eval\.window=8"),
        ({"window": 1}, r"eval\.window=1 is invalid"),
        ({"batch_size": 0}, r"eval\.batch_size=0 is invalid"),
        ({"dtype": "int8"}, r"eval\.dtype='int8' is invalid: choose one of auto"),
        ({"device": "tpu"}, r"eval\.device='tpu' is invalid"),
        ({"specialization_threshold": 0.5}, r"eval\.specialization_threshold=0\.5 is invalid"),
        ({"max_docs_per_language": 0}, r"eval\.max_docs_per_language=0 is invalid"),
        ({"benchmarks": [BenchmarkEntry("b", {})]}, r"eval\.benchmarks\[0\]\.files=\{\} is invalid"),
        (
            {"benchmarks": [BenchmarkEntry("b", {"ar": "a", "he": "h"})]},
            r"eval\.benchmarks\[0\]\.source_lang='en' is invalid: must be one of its languages "
            r"\['ar', 'he'\]",
        ),
        ({"harness_limit": 0}, r"eval\.harness_limit=0 is invalid"),
    ],
)
def test_bad_eval_values(kwargs: dict, message: str) -> None:
    with pytest.raises(MoEAdaptConfigError, match=message):
        EvalConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"confidence": 1.0}, r"report\.confidence=1\.0 is invalid"),
        ({"n_resamples": 0}, r"report\.n_resamples=0 is invalid"),
        ({"metrics_path": "/abs/metrics.json"}, r"report\.metrics_path='/abs/metrics.json' is invalid"),
    ],
)
def test_bad_report_values(kwargs: dict, message: str) -> None:
    with pytest.raises(MoEAdaptConfigError, match=message):
        ReportConfig(**kwargs)
