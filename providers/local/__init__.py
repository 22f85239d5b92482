"""``local``: train FLUX LoRAs on this machine's GPUs (or CPU) and generate with them.

Register it by adding ``providers.local`` to the plugin modules (its ``register_providers``
hook). Importing this package does not import torch or diffusers: the trainer runs in
``python -m providers.local.worker`` subprocesses and the inference module is imported on the
first generation. Install the heavy dependencies with ``pip install .[local]``.
"""

from __future__ import annotations

from typing import Callable

from plugins.hookspecs import hookimpl
from providers.local.config import LocalConfig, TrainConfig
from providers.local.provider import LocalProvider


@hookimpl
def register_providers(register: Callable[[type], None]) -> None:
    """Register the local GPU provider (``providers.local``)."""
    register(LocalProvider)


__all__ = ["LocalProvider", "LocalConfig", "TrainConfig", "register_providers"]
