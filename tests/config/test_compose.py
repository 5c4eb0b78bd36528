"""Every shipped config option and recipe composes and validates."""

from __future__ import annotations

import pytest

from moe_adapt.config import STAGE_ORDER, Config, compose, conf_dir, recipes_dir, required_keys, to_config
from moe_adapt.stages import STAGES

GROUP_OPTIONS = sorted(
    (group.name, option.stem)
    for group in conf_dir().iterdir()
    if group.is_dir()
    for option in group.glob("*.yaml")
    if group.name != "scale"  # scale comes after a recipe: tests/config/test_recipes.py
)
RECIPES = sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def test_there_is_something_to_check():
    assert ("upcycle", "fine_grained") in GROUP_OPTIONS and "tiny" in RECIPES


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_group_option_composes(tmp_path, group, option):
    cfg = to_config(compose([f"run_dir={tmp_path}", "model.dense=/x", f"{group}={option}"]))
    assert isinstance(cfg, Config)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("scale", ["full", "smoke"])
def test_every_recipe_composes(tmp_path, recipe, scale):
    """At full scale a recipe may need the user's paths (tests/config/test_recipes.py); at smoke scale
    it validates as it is."""
    raw = compose([f"+recipe={recipe}", f"run_dir={tmp_path}", f"scale={scale}"])
    if scale == "full" and required_keys(raw):
        return
    cfg = to_config(raw)
    assert cfg.stages and all(s in STAGE_ORDER for s in cfg.stages)


def test_a_recipe_that_is_not_yaml_is_one_line_naming_it(tmp_path, monkeypatch):
    from moe_adapt.config import sources
    from moe_adapt.errors import MoEAdaptConfigError

    (tmp_path / "broken.yaml").write_text("# @package _global_\nstages: [upcycle\n")
    monkeypatch.setattr(sources, "recipes_dir", lambda: tmp_path)
    with pytest.raises(MoEAdaptConfigError, match=r"^recipe broken \(.*broken.yaml\) is not valid YAML: "):
        sources.store_recipes()


def test_no_private_hydra_api():
    """Hydra's ``hydra._internal`` modules may change in any release: the package uses the public API."""
    import ast

    roots = [conf_dir().parent / "moe_adapt", conf_dir().parent / "hydra_plugins"]
    for path in (p for root in roots for p in root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(f"{node.module}.{a.name}" for a in node.names)]
            assert not any(n.startswith("hydra._internal") for n in names), f"{path}: {ast.unparse(node)}"


def test_every_stage_has_an_implementation():
    assert set(STAGES) == set(STAGE_ORDER)
    for stage in STAGES.values():
        assert callable(stage.run)


def test_recipe_overrides_group_and_values(tmp_path):
    cfg = to_config(compose(["+recipe=tiny", f"run_dir={tmp_path}", "upcycle.num_experts=8"]))
    assert cfg.upcycle.method.value == "fine_grained" and cfg.upcycle.num_experts == 8
    assert cfg.model.dense == f"{tmp_path}/init_dense/model"


def test_every_yaml_key_has_a_comment():
    for path in [*conf_dir().rglob("*.yaml"), *recipes_dir().glob("*.yaml")]:
        for line in path.read_text().splitlines():
            stripped = line.strip()
            is_key = stripped and not stripped.startswith(("#", "-")) and ":" in stripped
            if is_key and not stripped.endswith(":"):
                assert "#" in stripped, f"{path.name}: '{stripped}' has no comment"


def test_every_schema_field_has_a_docstring():
    import ast
    import importlib
    import inspect

    modules = [
        "moe_adapt.config.schema",
        "moe_adapt.upcycle.config",
        "moe_adapt.data.config",
        "moe_adapt.data.clean",
        "moe_adapt.data.dedup",
        "moe_adapt.eval.config",
        "moe_adapt.demo.config",
        "moe_adapt.cpt.config",
        "moe_adapt.train.config",
        "moe_adapt.distill.config",
        "moe_adapt.distill.verify.config",
        "moe_adapt.distill.verify.structure",
        "moe_adapt.distill.verify.script",
        "moe_adapt.distill.verify.language",
        "moe_adapt.distill.verify.answer",
        "moe_adapt.distill.verify.norms",
        "moe_adapt.distill.format",
    ]
    classes = []
    for name in modules:
        tree = ast.parse(inspect.getsource(importlib.import_module(name)))
        classes += [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("Config")]
    assert len(classes) > 10
    for cls in classes:
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                nxt = body[i + 1] if i + 1 < len(body) else None
                documented = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                assert documented, f"{cls.name}.{node.target.id} has no docstring"  # type: ignore[union-attr]


def test_every_option_is_documented():
    from dataclasses import fields

    from moe_adapt.config import ModelConfig
    from moe_adapt.demo.config import InitDenseConfig
    from moe_adapt.upcycle.config import UpcycleConfig

    docs = (conf_dir().parent / "docs").glob("*.md")
    text = "\n".join(p.read_text() for p in docs)
    from moe_adapt.data.config import DataConfig
    from moe_adapt.distill.config import DistillConfig, TeacherConfig
    from moe_adapt.eval.config import EvalConfig, ReportConfig
    from moe_adapt.export.config import ExportConfig
    from moe_adapt.train.config import LoggerConfig

    for prefix, cls in (
        ("distill", DistillConfig),
        ("teacher", TeacherConfig),
        ("logger", LoggerConfig),
        ("upcycle", UpcycleConfig),
        ("model", ModelConfig),
        ("init_dense", InitDenseConfig),
        ("data", DataConfig),
        ("eval", EvalConfig),
        ("report", ReportConfig),
        ("export", ExportConfig),
    ):
        for f in fields(cls):
            own = {
                "data": "data.md",
                "eval": "eval.md",
                "report": "eval.md",
                "engine": "cpt.md",
                "distill": "distill.md",
                "teacher": "distill.md",
                "logger": "logging.md",
                "export": "export.md",
            }.get(prefix)
            own_text = (conf_dir().parent / "docs" / own).read_text() if own else ""
            documented = f"`{prefix}.{f.name}`" in text or f"`{f.name}`" in own_text  # or in the group's page
            assert documented, f"{prefix}.{f.name} is not in docs/"
    for f in fields(Config):
        if f.name not in (
            "model",
            "upcycle",
            "init_dense",
            "data",
            "eval",
            "report",
            "export",
            "cpt",
            "mixture",
            "curriculum",
            "engine",
            "distill",
            "teacher",
            "logger",
        ):
            assert f"`{f.name}`" in text, f"{f.name} is not in docs/"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+upcycle.num_expert=8", r"upcycle.num_expert is not a setting; upcycle has: method, num_experts"),
        ("+epochs=3", r"epochs is not a setting; the top level has: stages, force"),
        ("+engine.expert_parallel=2", r"engine.expert_parallel is not a setting; engine has: .*parallel"),
    ],
)
def test_a_key_added_with_plus_that_no_schema_declares_is_refused(tmp_path, override, message):
    """``+key=value`` adds a key even to a typed node; it must fail like any unknown key, not vanish."""
    from moe_adapt.errors import MoEAdaptConfigError

    raw = compose([f"run_dir={tmp_path}", "model.dense=/m", "engine=hf", override])
    with pytest.raises(MoEAdaptConfigError, match=message):
        to_config(raw)


def test_free_form_maps_still_take_new_keys(tmp_path):
    raw = compose([f"run_dir={tmp_path}", "model.dense=/m", "+cpt.forgetting_bound.en=0.2"])
    assert to_config(raw).cpt.forgetting_bound == {"en": 0.2}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["engine.betas=[0.9]"], r"^engine.betas=\[0.9\] is invalid: give exactly two values"),
        (["engine.betas=[1.5,0.9]"], r"^engine.betas=\[1.5, 0.9\] is invalid: .* each in \[0, 1\)"),
        (["engine.betas=[0.9,-0.1]"], r"^engine.betas=\[0.9, -0.1\] is invalid"),
        (
            ["engine=megatron", "engine.betas=[0.9,0.95,0.99]"],
            r"^engine.betas=\[0.9, 0.95, 0.99\] is invalid",
        ),
        (["engine.eps=0"], r"^engine.eps=0.0 is invalid: must be a finite number > 0"),
        (["engine.weight_decay=nan"], r"^engine.weight_decay=nan is invalid: must be a finite number >= 0"),
        (["engine.grad_clip=inf"], r"^engine.grad_clip=inf is invalid"),
        (["engine.lr=-1"], r"^engine.lr=-1.0 is invalid: must be a finite number > 0"),
        (["data.heldout_max_docs=-5"], r"^data.heldout_max_docs=-5 is invalid: must be >= 0"),
        (["data.decontam.max_doc_freq=5"], r"^data.decontam.max_doc_freq=5.0 is invalid: .* in \(0, 1\]"),
        (["data.decontam.min_common_docs=0"], r"^data.decontam.min_common_docs=0 is invalid: must be >= 1"),
        (["data.demo.max_docs=0"], r"^data.demo.max_docs=0 is invalid: must be >= 1, or null"),
        (["teacher.num_heads=0"], r"^teacher.num_heads=0 is invalid: must be >= 1"),
        (["upcycle.verify_tolerance=-1"], r"^upcycle.verify_tolerance=-1.0 is invalid: must be a finite"),
        (["init_dense.max_position_embeddings=0"], r"^init_dense.max_position_embeddings=0 is invalid"),
        (["seed=-1"], r"^seed=-1 is invalid: must be in \[0, 2\*\*32\)$"),
        (["data.demo.seed=-1"], r"^data.demo.seed=-1 is invalid"),
        (["run_name=.."], r"^run_name='..' is invalid: must be a single file name"),
        (
            ["data.decontam.benchmarks=[{name: ../../x, path: /b.jsonl}]"],
            r"^data.decontam.benchmarks\[0\].name='../../x' is invalid: must be a single file name",
        ),
        (
            ["data.decontam.benchmarks=[{name: b, path: /b.jsonl},{name: b, path: /c.jsonl}]"],
            r"^data.decontam.benchmarks\[1\].name='b' is invalid: benchmark names must be unique",
        ),
        (
            ["eval.benchmarks=[{name: ../../x, files: {ar: /a.jsonl}}]"],
            r"^eval.benchmarks\[0\].name='../../x'",
        ),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key_set(tmp_path, overrides, message):
    """Values that used to compose and then crash (or silently do nothing) in a stage fail here."""
    from moe_adapt.errors import MoEAdaptConfigError

    raw = compose([f"run_dir={tmp_path}", "model.dense=/m", *overrides])
    with pytest.raises(MoEAdaptConfigError, match=message) as err:
        to_config(raw)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "data.heldout_fraction=1.5",
            r"^data.heldout_fraction=1.5 is invalid: must be in \[0, 1\) "
            r"\(init_dense.pretrain.heldout_fraction follows it\)$",
        ),
        ("data.demo.benchmark_items=-1", r"^data.demo.benchmark_items=-1 is invalid: must be >= 0"),
        ("init_dense.pretrain.heldout_fraction=2", r"^init_dense.pretrain.heldout_fraction=2.0 is invalid"),
        ("data.sources=[{name: '',path: x}]", r"^data.sources\[0\].name='' is invalid"),
    ],
)
def test_an_error_names_the_key_the_user_set_not_the_one_that_follows_it(tmp_path, override, message):
    """init_dense.pretrain.heldout_fraction is ${data.heldout_fraction}: a bad data.heldout_fraction is
    refused first where it is copied, and the message must still name data.heldout_fraction."""
    from moe_adapt.errors import MoEAdaptConfigError

    raw = compose([f"run_dir={tmp_path}", "+recipe=tiny", override])
    with pytest.raises(MoEAdaptConfigError, match=message):
        to_config(raw)


def test_drop_at_granularity_4_names_every_conflict_at_once(tmp_path):
    """`upcycle=drop upcycle.granularity=4` conflicts with the group's top_k=2 and router_init=random:
    one error names both and the overrides that fix them, which then compose (issue 13)."""
    from moe_adapt.errors import MoEAdaptConfigError

    base = [f"run_dir={tmp_path}", "model.dense=/m", "upcycle=drop", "upcycle.granularity=4"]
    with pytest.raises(MoEAdaptConfigError) as err:
        to_config(compose(base))
    message = str(err.value)
    assert message.startswith("upcycle.top_k=2 is invalid") and "upcycle.router_init='random'" in message
    assert "Set together: upcycle.top_k=4 upcycle.router_init=virtual_group" in message
    assert "\n" not in message
    cfg = to_config(compose([*base, "upcycle.top_k=4", "upcycle.router_init=virtual_group"]))
    assert cfg.upcycle.granularity == 4 and cfg.upcycle.drop_ratio == 0.5
