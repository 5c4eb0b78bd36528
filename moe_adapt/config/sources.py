"""Where Hydra finds our configs: ``conf/`` (the primary config and its groups) and ``recipes/`` (the
``recipe`` group, applied as ``+recipe=NAME``).

From a checkout both folders sit beside the package; an installed wheel carries them inside it
(``moe_adapt/_conf`` and ``moe_adapt/_recipes``, see ``pyproject.toml``), so the same command works
from any directory.

Recipes live at the top of the repository, so the folder name (``recipes``) and the group name
(``recipe``) differ, and Hydra's search path can only serve a folder as the group of the same name.
:func:`store_recipes` therefore puts each ``recipes/NAME.yaml`` into Hydra's ``ConfigStore`` (its
public repository for configs made in code) as config ``recipe/NAME``, with the package its
``# @package`` header names. Hydra then lists, picks and merges recipes like any other group option:
``+recipe=nope`` fails with the available names, ``- override /data: demo`` in a recipe works.

Every recipe ends with the ``scale`` group: :func:`store_recipes` appends ``/scale: full`` to its
defaults list, after the recipe's own keys (``_self_``), unless the recipe names ``/scale`` itself.
So ``+recipe=NAME scale=smoke`` applies ``conf/scale/smoke.yaml`` *after* the recipe and can shrink
it; a ``scale`` in the primary config's defaults would be merged before the recipe and lose to it.
(Without a recipe there is no ``scale`` to override: scale is a property of a recipe.)

Weighed and left: ``conf/recipe/`` as the group's real folder (moves recipes out of the top-level
``recipes/``); a git symlink ``conf/recipe -> ../recipes`` (a plain text file in Windows checkouts
without ``core.symlinks``); ``pkg://`` or ``file://`` search-path entries (the folder must be named
``recipe``); a ``ConfigSource`` plugin (needs a top-level ``hydra_plugins`` package, or Hydra's
private registry, which this module used before).
"""

from __future__ import annotations

import re
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

from moe_adapt.errors import MoEAdaptConfigError

_PACKAGE = Path(__file__).resolve().parents[1]
GROUP = "recipe"
"""The config group recipes are served as (``+recipe=NAME``)."""

_HEADER = re.compile(r"#\s*@package\s+(\S+)")


def _locate(packaged: str, checkout: str) -> Path:
    inside = _PACKAGE / packaged
    if inside.is_dir():
        return inside
    return _PACKAGE.parent / checkout


def conf_dir() -> Path:
    """The primary config directory (``conf/``)."""
    return _locate("_conf", "conf")


def recipes_dir() -> Path:
    """The recipes directory (``recipes/``)."""
    return _locate("_recipes", "recipes")


def _package(text: str) -> str | None:
    """The ``# @package`` header among the leading comment lines, as Hydra reads it from a file."""
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            break
        found = _HEADER.match(line.strip())
        if found:
            return found.group(1)
    return None


def store_recipes() -> None:
    """Store every ``recipes/NAME.yaml`` in Hydra's ConfigStore as ``recipe/NAME`` (idempotent: a second
    call stores the files again, as they are now)."""
    store = ConfigStore.instance()
    for path in sorted(recipes_dir().glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        try:
            node = OmegaConf.create(text) if text.strip() else OmegaConf.create({})
        except (YAMLError, OmegaConfBaseException) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MoEAdaptConfigError(f"recipe {path.stem} ({path}) is not valid YAML: {first}") from None
        _end_with_scale(node)
        store.store(name=path.stem, node=node, group=GROUP, package=_package(text), provider="moe_adapt")


SCALE_GROUP = "scale"
"""The config group that shrinks a recipe (``scale=smoke``); every recipe's defaults end with it."""


def _end_with_scale(node: object) -> None:
    """Add ``_self_`` (where the recipe's defaults list has none: Hydra's default place, last) and then
    ``/scale: full`` to a recipe's defaults list (before its ``override`` entries, which Hydra wants at
    the end), so that ``scale=smoke`` is merged after the recipe."""
    if not isinstance(node, DictConfig):
        return
    defaults = list(node.get("defaults") or [])
    keys = [str(next(iter(d))) if isinstance(d, dict | DictConfig) else str(d) for d in defaults]
    if any(k.lstrip("/").removeprefix("override ").lstrip("/") == SCALE_GROUP for k in keys):
        return
    overrides = [d for d, k in zip(defaults, keys, strict=True) if k.startswith("override ")]
    plain = [d for d, k in zip(defaults, keys, strict=True) if not k.startswith("override ")]
    if "_self_" not in keys:
        plain.append("_self_")
    # Hydra wants a list's overrides at its end
    node.defaults = [*plain, {f"/{SCALE_GROUP}": "full"}, *overrides]
