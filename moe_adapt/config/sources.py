"""Where Hydra finds our configs: ``conf/`` (groups) and ``recipes/`` (the ``recipe`` group).

Recipes live at the top of the repository in ``recipes/`` but are applied as ``+recipe=NAME``, so
the folder name and the group name differ. :class:`RecipeConfigSource` serves the folder as the
``recipe`` group under the ``moe-adapt-recipes://`` scheme, which ``conf/config.yaml`` puts on the
search path. From a checkout both folders sit beside the package; in an installed wheel they are
inside it (``moe_adapt/_conf`` and ``moe_adapt/_recipes``), so the same command works from any
directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigResult, ConfigSource

_PACKAGE = Path(__file__).resolve().parents[1]
GROUP = "recipe"


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


class RecipeConfigSource(ConfigSource):
    """Serves ``recipes/NAME.yaml`` as config ``recipe/NAME``."""

    def __init__(self, provider: str, path: str) -> None:
        super().__init__(provider=provider, path=path)
        self.root = recipes_dir()

    @staticmethod
    def scheme() -> str:
        return "moe-adapt-recipes"

    def _file(self, config_path: str) -> Path | None:
        head, _, name = config_path.partition("/")
        if head != GROUP or not name:
            return None
        return self.root / (name if name.endswith(".yaml") else f"{name}.yaml")

    def load_config(self, config_path: str) -> ConfigResult:
        from omegaconf import OmegaConf

        path = self._file(config_path)
        assert path is not None and path.is_file(), config_path
        text = path.read_text(encoding="utf-8")
        return ConfigResult(
            config=OmegaConf.create(text) if text.strip() else OmegaConf.create({}),
            path=f"{self.scheme()}://{self.root}",
            provider=self.provider,
            header=ConfigSource._get_header_dict(text[:512]),
        )

    def available(self) -> bool:
        return self.root.is_dir()

    def is_group(self, config_path: str) -> bool:
        return config_path in ("", GROUP) and self.root.is_dir()

    def is_config(self, config_path: str) -> bool:
        path = self._file(config_path)
        return path is not None and path.is_file()

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        if config_path == "":
            return [GROUP] if results_filter in (None, ObjectType.GROUP) and self.available() else []
        if config_path != GROUP or results_filter == ObjectType.GROUP:
            return []
        names = (p.stem for p in self.root.glob("*.yaml") if not p.name.startswith(os.extsep))
        return sorted(names)


def register_sources() -> None:
    """Make the ``moe-adapt-recipes://`` scheme known to Hydra (idempotent)."""
    from hydra._internal.sources_registry import SourcesRegistry
    from hydra.core.config_search_path import ConfigSearchPath  # noqa: F401
    from hydra.core.plugins import Plugins  # noqa: F401  (initialises Hydra's registries first)

    SourcesRegistry.instance().register(RecipeConfigSource)
