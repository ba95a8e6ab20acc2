"""The package's public surface, pinned: what ``trio_gateway`` exports is a decision."""

from __future__ import annotations

import trio_gateway
from trio_gateway.app import GatewayApp, create_app
from trio_gateway.server import serve
from trio_gateway.settings import Settings, SettingsError, load_settings

from ..support.processes import run_python


def test_the_public_names() -> None:
    assert trio_gateway.__all__ == [
        "GatewayApp",
        "Settings",
        "SettingsError",
        "__version__",
        "create_app",
        "load_settings",
        "serve",
    ]


def test_every_public_name_is_the_real_object() -> None:
    assert trio_gateway.create_app is create_app
    assert trio_gateway.GatewayApp is GatewayApp
    assert trio_gateway.Settings is Settings
    assert trio_gateway.SettingsError is SettingsError
    assert trio_gateway.load_settings is load_settings
    assert trio_gateway.serve is serve
    assert isinstance(trio_gateway.__version__, str)
    assert set(trio_gateway.__all__) <= set(dir(trio_gateway))


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        trio_gateway.nothing_here  # noqa: B018
    except AttributeError as error:
        assert "nothing_here" in str(error)
    else:
        raise AssertionError("expected AttributeError")


def test_importing_the_package_does_not_load_the_web_stack() -> None:
    code = "import sys, trio_gateway; print('quart' in sys.modules, 'hypercorn' in sys.modules)"
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
