"""A fresh plugin manager per app (no module-level global), built-ins registered through the
same hooks third-party packages use (entry-point group ``lora_gateway``)."""

from __future__ import annotations

import importlib
from typing import Any, Iterable

import pluggy

from plugins import hookspecs

DEFAULT_PLUGINS = (
    "plugins.storage.local",
    "plugins.captioners.template",
    "plugins.captioners.openai_compat",
    "providers.sandbox",
    "providers.wavespeed",
    "providers.vimmerse",
    "providers.local",  # imports neither torch nor diffusers until it is configured and used
)


class PluginError(Exception):
    pass


def make_plugin_manager(*, load_entrypoints: bool = True, extra: Iterable[Any] = ()) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    for plugin in extra:
        pm.register(plugin)
    if load_entrypoints:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    pm.check_pending()
    return pm


def _collect(hook: Any, kind: str) -> dict[str, type]:
    found: dict[str, type] = {}

    def register(cls: type) -> None:
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"{kind} {cls!r} has no `name`")
        if name in found and found[name] is not cls:
            raise PluginError(f"two {kind}s are registered as {name!r}: {found[name]!r} and {cls!r}")
        found[name] = cls

    hook(register=register)
    return found


def providers(pm: pluggy.PluginManager) -> dict[str, type]:
    return _collect(pm.hook.register_providers, "provider")


def captioners(pm: pluggy.PluginManager) -> dict[str, type]:
    return _collect(pm.hook.register_captioners, "captioner")


def storages(pm: pluggy.PluginManager) -> dict[str, type]:
    return _collect(pm.hook.register_storage, "storage backend")
