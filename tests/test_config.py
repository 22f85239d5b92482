"""Config: the example documents every key, ${ENV} references, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import yaml

from gateway.config import ConfigError, Settings, load_settings, settings_from_mapping
from gateway.context import open_gateway
from plugins.captioners.openai_compat import OpenAICaptionerConfig
from plugins.captioners.template import TemplateCaptionerConfig
from plugins.manager import make_plugin_manager
from providers.sandbox import SandboxConfig

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.yaml"


def struct_keys(t: type, prefix: str = "") -> set[str]:
    keys = set()
    for field in msgspec.structs.fields(t):
        path = f"{prefix}{field.name}"
        keys.add(path)
        inner = field.type
        if isinstance(inner, type) and issubclass(inner, msgspec.Struct):
            keys |= struct_keys(inner, path + ".")
    return keys


def test_example_loads_and_equals_the_defaults() -> None:
    example, defaults = load_settings(EXAMPLE, env={}), load_settings(None, env={})
    # plugin sections are free-form dicts: compare them through their own config types
    assert msgspec.convert(example.providers["sandbox"], SandboxConfig) == SandboxConfig()
    assert msgspec.convert(example.captioners["template"], TemplateCaptionerConfig) == TemplateCaptionerConfig()
    plain = msgspec.structs.replace(example, providers=defaults.providers, captioners=defaults.captioners)
    assert plain == defaults


def test_example_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    raw = yaml.safe_load(text)

    def flat(d: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict) and prefix + k not in ("storage.options",):
                out |= flat(v, prefix + k + ".")
        return out

    present = flat(raw)
    missing = struct_keys(Settings) - present
    assert not missing, f"config.example.yaml lacks {sorted(missing)}"
    for name in SandboxConfig.__struct_fields__:
        assert f"providers.sandbox.{name}" in present
    for name in TemplateCaptionerConfig.__struct_fields__:
        assert f"captioners.template.{name}" in present
    for name in OpenAICaptionerConfig.__struct_fields__:  # documented in comments
        assert f"#   {name}:" in text
    from providers.wavespeed import WaveSpeedConfig

    for name in WaveSpeedConfig.__struct_fields__:
        assert f"#   {name}:" in text, name
    from providers.vimmerse import VimmerseConfig

    for name in VimmerseConfig.__struct_fields__:
        assert f"#   {name}:" in text, name
    from providers.local.config import LocalConfig

    for name in LocalConfig.__struct_fields__:
        assert f"#   {name}:" in text, name
    # every value line carries a comment on it or on the line above (sections are headings)
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            above = lines[i - 1].lstrip() if i else ""
            assert "#" in line or above.startswith("#") or line.strip().startswith(("person", "style", "object")), line


def test_env_references_are_expanded() -> None:
    s = settings_from_mapping(
        {"server": {"port": "${PORT}", "public_base_url": "${BASE:-http://gw.example}"}}, env={"PORT": "9001"}
    )
    assert s.server.port == 9001
    assert s.server.public_base_url == "http://gw.example"


def test_missing_env_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"server\.url_signing_secret.*\$\{SECRET\}"):
        settings_from_mapping({"server": {"url_signing_secret": "${SECRET}"}}, env={})


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"server": {"port": "eighty"}}, "server.port"),
        ({"server": {"port": 70000}}, "server.port"),
        ({"uploads": {"max_images": 0}}, "uploads.max_images"),
        ({"engine": {"strategy": 1}}, "engine"),
        ({"routing": {"training": {"strategy": "random"}}}, "routing.training.strategy"),
        ({"bogus": 1}, "(top level)"),
    ],
)
def test_bad_values_name_the_key(raw: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        settings_from_mapping(raw, env={})
    assert f"`{key}`" in str(e.value)


def test_routing_must_name_configured_providers() -> None:
    with pytest.raises(ConfigError, match=r"routing\.training\.providers.*wavespeed"):
        settings_from_mapping({"routing": {"training": {"providers": ["wavespeed"]}}}, env={})


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)


async def test_provider_options_are_checked_at_start(tmp_path: Path) -> None:
    s = settings_from_mapping({"data_dir": str(tmp_path), "providers": {"sandbox": {"training_seconds": "slow"}}}, env={})
    with pytest.raises(ConfigError, match=r"providers\.sandbox\.training_seconds"):
        async with open_gateway(s, pm=make_plugin_manager(load_entrypoints=False)):
            pass


async def test_unknown_provider_or_captioner_fails_at_start(tmp_path: Path) -> None:
    s = settings_from_mapping(
        {"data_dir": str(tmp_path), "providers": {"sandbox": {}, "acme": {}},
         "routing": {"training": {"providers": ["sandbox"]}}}, env={}
    )
    with pytest.raises(ConfigError, match=r"providers\.acme"):
        async with open_gateway(s, pm=make_plugin_manager(load_entrypoints=False)):
            pass
    s = settings_from_mapping({"data_dir": str(tmp_path), "datasets": {"captioner": "gpt9"}}, env={})
    with pytest.raises(ConfigError, match=r"datasets\.captioner"):
        async with open_gateway(s, pm=make_plugin_manager(load_entrypoints=False)):
            pass


def test_nothing_is_read_at_import_time() -> None:
    import importlib

    import gateway.app
    import gateway.config

    importlib.reload(gateway.config)
    importlib.reload(gateway.app)  # no settings, files or environment consulted on import
