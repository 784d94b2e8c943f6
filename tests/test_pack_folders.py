"""Model folders node packs register at import (folder_paths.add_model_folder_path, folder_names_and_paths
edits) reach a front that has not imported the pack: the catalogue snapshot records them and the front puts
them into its model registry at start, so /models lists them and the packs' combos over them are read from
disk at every request (issue #9)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import wait_until
from test_comfy_modules import ADAPTER_NAMES, imported_modules

PACKS = ("comfy_style/folder_registrations.py", "comfy_style/folder_combos.py")


def combo(object_info: dict, node: str, name: str) -> list:
    return object_info[node]["input"]["required"][name][0]


@pytest.fixture
def base(tmp_path):
    base = tmp_path / "folders"
    for folder, name in (("models/comfy_style_assigned", "b.bin"), ("models/comfy_style_assigned", "c.txt"),
                         ("models/comfy_style_added", "a.pt"), ("models/comfy_style_upscalers", "x4.pth"),
                         ("models/loras", "own.safetensors"), ("more_loras", "extra.safetensors")):
        (base / folder).mkdir(parents=True, exist_ok=True)
        (base / folder / name).write_bytes(b"x")
    return base


def check_front_knows_the_pack_folders(srv) -> None:
    models = srv.base / "models"
    assert {"comfy_style_added", "comfy_style_assigned", "comfy_style_upscalers"} <= set(srv.get("/models").json())
    assert srv.get("/models/comfy_style_assigned").json() == ["b.bin"]  # the pack's extensions: .bin, .gguf
    assert srv.get("/models/comfy_style_upscalers").json() == ["x4.pth"]
    assert srv.get("/models/loras").json() == ["extra.safetensors", "own.safetensors"]  # the appended directory
    folder_paths = srv.get("/internal/folder_paths").json()
    assert folder_paths["comfy_style_added"] == [str(models / "comfy_style_added")]
    assert folder_paths["loras"] == [str(models / "loras"), str(srv.base / "more_loras")]
    info = srv.get("/object_info").json()
    assert combo(info, "ListRegisteredModels", "model_name") == ["b.bin"]
    assert combo(info, "PickPackModels", "upscaler") == ["x4.pth"]
    assert combo(info, "PickPackModels", "lora") == ["extra.safetensors", "own.safetensors"]


def test_a_lazy_front_lists_pack_folders_without_importing_the_pack(start_server, base):
    first = start_server("--warmup", "lazy", packs=PACKS, base=base)  # no snapshot yet: built in a subprocess
    wait_until(lambda: not first.get("/system_stats").json()["comfy_serverless"]["catalog"]["stale"], timeout=120,
               what="catalogue rebuild")
    check_front_knows_the_pack_folders(first)  # the rebuilt catalogue brought them into this front
    first.stop()

    srv = start_server("--warmup", "lazy", packs=PACKS, base=base, env={"PYTHONPROFILEIMPORTTIME": "1"})
    check_front_knows_the_pack_folders(srv)
    # Files dropped in after start: listed, offered by the combos and accepted by validation.
    (base / "models" / "comfy_style_assigned" / "d.gguf").write_bytes(b"x")
    (base / "models" / "comfy_style_upscalers" / "x2.pth").write_bytes(b"x")
    (base / "more_loras" / "new.safetensors").write_bytes(b"x")
    info = srv.get("/object_info").json()
    assert combo(info, "ListRegisteredModels", "model_name") == ["b.bin", "d.gguf"]
    assert combo(info, "PickPackModels", "upscaler") == ["x2.pth", "x4.pth"]
    assert "new.safetensors" in combo(info, "PickPackModels", "lora")
    assert srv.get("/models/comfy_style_assigned").json() == ["b.bin", "d.gguf"]
    refused = srv.post("/prompt", {"prompt": {"1": {"class_type": "PickPackModels",
                                                    "inputs": {"upscaler": "x8.pth", "lora": "new.safetensors"}}}})
    assert refused.status_code == 400
    assert refused.json()["node_errors"]["1"]["errors"][0]["type"] == "value_not_in_list"
    assert not imported_modules(srv.log()) & set(ADAPTER_NAMES)  # all of that without importing a pack
    entry = srv.run({"1": {"class_type": "PickPackModels", "inputs": {"upscaler": "x2.pth",
                                                                     "lora": "new.safetensors"}},
                     "2": {"class_type": "ListRegisteredModels", "inputs": {"model_name": "d.gguf"}}})
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["1"]["picked"] == [{"upscaler": str(base / "models" / "comfy_style_upscalers" / "x2.pth"),
                                                "lora": str(base / "more_loras" / "new.safetensors")}]
    assert entry["outputs"]["2"]["lists"][0]["assigned"] == ["b.bin", "d.gguf"]
    # the pack, now imported, registered the same folders again: nothing doubled
    assert srv.get("/internal/folder_paths").json()["comfy_style_upscalers"] == [
        str(base / "models" / "comfy_style_upscalers")]


def test_a_background_server_saves_the_folders_its_packs_registered(start_server, base):
    srv = start_server("--warmup", "background", packs=PACKS, base=base)
    wait_until(lambda: srv.get("/system_stats").json()["comfy_serverless"]["warmup"]["state"] == "done",
               timeout=120, what="warm-up")
    check_front_knows_the_pack_folders(srv)
    srv.stop()
    lazy = start_server("--warmup", "lazy", packs=PACKS, base=base)  # from the snapshot the warm-up saved
    check_front_knows_the_pack_folders(lazy)


def run_in_pack_process(code: str, cwd) -> subprocess.CompletedProcess:
    prelude = "from comfy_serverless.catalog import comfy_modules\ncomfy_modules.install()\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=str(cwd), timeout=120)


def test_snapshot_records_what_packs_changed_and_a_catalogue_applies_it(tmp_path):
    result = run_in_pack_process("""
        import json
        import folder_paths
        from comfy_serverless import paths
        from comfy_serverless.catalog import snapshot
        from comfy_serverless.catalog.catalog import Catalog

        folders = paths.current()
        assert snapshot.pack_model_folders() == {}
        folder_paths.add_model_folder_path("ipadapter", "/m/ipadapter")
        folder_paths.folder_names_and_paths["loras"][0].insert(0, "/first/loras")
        folder_paths.folder_names_and_paths["vae"][1].add(".onnx")
        folder_paths.folder_names_and_paths["old"] = (["/m/old"], {".x"})
        del folder_paths.folder_names_and_paths["old"]
        recorded = snapshot.pack_model_folders()
        assert sorted(recorded) == ["ipadapter", "loras", "old", "vae"], recorded
        assert recorded["ipadapter"] == [["/m/ipadapter"], []]  # a new folder lists every file, as in ComfyUI
        assert recorded["loras"][0][0] == "/first/loras" and recorded["old"] is None
        assert ".onnx" in recorded["vae"][1]
        # lists of pack folders are disk-backed like the built-in ones: the snapshot keeps the folder, not files
        assert type(folder_paths.get_filename_list("ipadapter")) is paths.FileList
        assert folder_paths.get_filename_list("ipadapter").source == "models:ipadapter"

        fresh = paths.Folders("/b", "/i", "/o", "/t", "/u")
        fresh.models["old"] = (["/m/old"], (".x",))
        stored = json.loads(json.dumps(recorded))  # as it comes back from the snapshot file
        catalog = Catalog({"nodes": {}, "model_folders": stored}, folders=fresh)
        assert fresh.models["ipadapter"] == (["/m/ipadapter"], ())
        assert fresh.model_dirs("loras") == ["/first/loras", str(folders.base) + "/models/loras"]  # whole entries
        assert ".onnx" in fresh.models["vae"][1] and "old" not in fresh.models
        assert catalog.model_folders == stored
        print("ok")
    """, tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr
