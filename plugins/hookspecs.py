"""The hooks a lora-gateway plugin can implement.

Hooks only *register* objects at start-up (pluggy calls are synchronous); the registered
classes carry the async behaviour. Built-ins register through these same hooks.
"""

from __future__ import annotations

from typing import Callable

import pluggy

PROJECT = "lora_gateway"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_providers(register: Callable[[type], None]) -> None:
    """Register provider classes (subclasses of ``providers.base.Provider``).

    :param register: call ``register(ProviderClass)``; the class's ``name`` is its config key
        under ``providers:`` and in routing lists. A name registered twice is a start-up error.
    """


@hookspec
def register_captioners(register: Callable[[type], None]) -> None:
    """Register captioner classes (subclasses of ``plugins.captioners.base.Captioner``).

    :param register: call ``register(CaptionerClass)``; ``datasets.captioner`` picks one by name.
    """


@hookspec
def register_storage(register: Callable[[type], None]) -> None:
    """Register blob storage classes (subclasses of ``plugins.storage.base.Storage``).

    :param register: call ``register(StorageClass)``; ``storage.backend`` picks one by name.
    """
