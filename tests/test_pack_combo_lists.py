"""Combos a pack builds from a model folder's files plus fixed choices (`["None"] + get_filename_list("loras")`,
`.append(...)`) stay live: files added after the catalogue was built appear and validate, as in ComfyUI."""

from __future__ import annotations

from comfy_serverless.catalog.catalog import fill_file_lists
from comfy_serverless.catalog.describe import to_json_value
from comfy_serverless.paths import FileList


class _Folders:
    def file_list(self, source):
        assert source == "models:loras"
        return ["a.safetensors", "new.safetensors"]


def test_fixed_choices_around_a_file_list_are_kept_in_the_marker():
    files = FileList(["a.safetensors"], "models:loras")
    prefixed = ["None"] + files
    assert prefixed == ["None", "a.safetensors"] and isinstance(prefixed, FileList)
    assert fill_file_lists(to_json_value(prefixed), _Folders()) == ["None", "a.safetensors", "new.safetensors"]
    appended = FileList(["a.safetensors"], "models:loras")
    appended.insert(0, "first")
    appended.append("last")
    assert fill_file_lists(to_json_value(appended), _Folders()) == ["first", "a.safetensors", "new.safetensors",
                                                                     "last"]


def test_other_edits_freeze_the_list():
    files = FileList(["b.safetensors", "a.safetensors"], "models:loras")
    files.sort()
    assert to_json_value(files) == ["a.safetensors", "b.safetensors"]
    removed = FileList(["a.safetensors"], "models:loras")
    removed.remove("a.safetensors")
    assert to_json_value(removed) == []
    assert FileList(["a"], "models:loras") + FileList(["b"], "models:vae") == ["a", "b"]


def test_a_lora_added_after_start_is_listed_and_accepted(start_server, tmp_path):
    base = tmp_path / "combos"
    loras = base / "models" / "loras"
    loras.mkdir(parents=True)
    (loras / "old.safetensors").write_bytes(b"x")
    srv = start_server(packs=("comfy_style/live_combos.py",), base=base)
    (loras / "new.safetensors").write_bytes(b"x")
    required = srv.get("/object_info/LiveLoraChoice").json()["LiveLoraChoice"]["input"]["required"]
    assert required["lora"][0] == ["None", "new.safetensors", "old.safetensors"]
    assert required["other"][0] == ["new.safetensors", "old.safetensors", "Last"]
    entry = srv.run({"1": {"class_type": "LiveLoraChoice", "inputs": {"lora": "new.safetensors", "other": "Last"}}})
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["1"]["text"] == ["new.safetensors|Last"]
