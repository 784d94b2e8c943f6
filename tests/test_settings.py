"""Settings are a frozen, typed object with one field per flag, filled from the command line, then the
environment, then the defaults."""

import typing

import pytest

from comfy_serverless import cli
from comfy_serverless.settings import FLAGS, Settings, default_settings, field_names

EXTRA_FIELDS = {"explicitly_set", "ignored_arguments"}


def test_one_typed_field_per_flag():
    hints = typing.get_type_hints(Settings)
    fields = set(field_names())
    assert fields - EXTRA_FIELDS == {flag.dest for flag in FLAGS}
    for flag in FLAGS:
        hint = hints[flag.dest]
        allowed = set(typing.get_args(hint)) or {hint}
        if flag.kind == "switch":
            assert hint is bool, flag.name
        elif flag.kind in ("list", "append-list"):
            assert tuple[str, ...] in allowed, flag.name
        else:
            assert flag.type in allowed, flag.name
            assert (type(None) in allowed) == (flag.default is None), flag.name


def test_values_have_their_declared_types():
    settings = cli.parse("serve", ["--port", "9000", "--max-upload-size", "2", "--cache-lru", "3",
                                   "--whitelist-custom-nodes", "a", "b", "--extra-model-paths-config", "x.yaml"],
                         environ={"COMFY_WS_PING_INTERVAL": "5", "COMFY_DISABLE_METADATA": "yes"})
    assert settings.port == 9000 and settings.max_upload_bytes == 2 * 1024 * 1024
    assert settings.cache_lru == 3 and settings.cache_mode == "lru"
    assert settings.whitelist_custom_nodes == ("a", "b") and settings.extra_model_paths_config == ("x.yaml",)
    assert settings.ws_ping_interval == 5.0 and settings.disable_metadata is True
    assert {"port", "ws_ping_interval", "disable_metadata"} <= settings.explicitly_set


def test_settings_are_frozen_and_unknown_names_fail():
    settings = default_settings()
    with pytest.raises(AttributeError, match="frozen"):
        settings.port = 1
    assert settings.replace(port=1).port == 1 and settings.port == 8188
    with pytest.raises(AttributeError):
        settings.no_such_flag


def test_resolved_paths(tmp_path):
    settings = default_settings(base_directory=str(tmp_path), temp_directory=str(tmp_path / "scratch"))
    assert settings.base_dir == str(tmp_path) and settings.output_dir == str(tmp_path / "output")
    assert settings.temp_dir == str(tmp_path / "scratch" / "temp")  # the flag names the parent, as in ComfyUI
    assert settings.catalog_file == str(tmp_path / ".comfy-serverless" / "catalog.json")
