"""trio-gateway: a structured-concurrency gateway between AI-coding IDEs and an Agent Runtime.

The public surface is :data:`__all__`: build an app from :class:`Settings` with
:func:`create_app` and run it with :func:`serve` (or ``trio-gateway serve``). Everything else is
internal. The names are imported on first use (PEP 562), so ``import trio_gateway`` and the
light commands (``trio-gateway token``, ``chat``) do not load the web stack.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ._version import __version__

__all__ = [
    "GatewayApp",
    "Settings",
    "SettingsError",
    "__version__",
    "create_app",
    "load_settings",
    "serve",
]

# Where each public name lives.
_HOMES = {
    "GatewayApp": "app",
    "create_app": "app",
    "Settings": "settings",
    "SettingsError": "settings",
    "load_settings": "settings",
    "serve": "server",
}

if TYPE_CHECKING:
    from .app import GatewayApp, create_app
    from .server import serve
    from .settings import Settings, SettingsError, load_settings


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'trio_gateway' has no attribute {name!r}")
    value = getattr(import_module(f".{home}", __name__), name)
    globals()[name] = value  # once imported, an ordinary module attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
