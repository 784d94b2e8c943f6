"""ComfyUI's module names for custom node packs (issue #9): folder_paths, nodes, execution, node_helpers,
latent_preview, comfy.*, comfy_extras.*, comfy_execution.*, and placeholders for the ComfyUI internals this
server lacks.

Packs under tests/packs/comfy_style are written the way ComfyUI packs are and run through a real server.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, types_of

SURFACE = "comfy_style/comfy_surface"
REGISTRATIONS = "comfy_style/folder_registrations.py"
MISSING = "comfy_style/missing_internals.py"
ADAPTER_NAMES = ("folder_paths", "nodes", "execution", "node_helpers", "latent_preview", "comfy", "comfy_extras",
                 "comfy_execution", "comfy_serverless.catalog.comfy_modules")
IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$", re.M)


def imported_modules(log: str) -> set[str]:
    """Modules the server's processes imported, from the PYTHONPROFILEIMPORTTIME lines of its log."""
    return set(IMPORT_LINE.findall(log))


def wait_for(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError


def error_of(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error", entry["status"]
    return next(data for name, data in entry["status"]["messages"] if name == "execution_error")


def run_in_pack_process(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter that installed the module names as packs.py does (never in the test
    process, whose sys.path and sys.meta_path other tests share); cwd is the base directory it sees."""
    prelude = "from comfy_serverless.catalog import comfy_modules\ncomfy_modules.install()\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=str(cwd), timeout=120)


# -- through the server ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from comfy_serverless.models.random_checkpoints import make_test_checkpoint

    path = tmp_path_factory.mktemp("comfy-style-models") / "tiny-sd15.safetensors"
    make_test_checkpoint("sd15", "tiny", path, seed=1)
    return path


@pytest.fixture
def surface_server(start_server, tmp_path, tiny_checkpoint):
    base = tmp_path / "surface"
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / tiny_checkpoint.name).hardlink_to(tiny_checkpoint)
    for folder, name in (("comfy_style_added", "a.pt"), ("comfy_style_assigned", "b.bin"),
                         ("comfy_style_assigned", "c.txt")):  # folders folder_registrations.py registers
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        (base / "models" / folder / name).write_bytes(b"x")
    return start_server(packs=(SURFACE, REGISTRATIONS, MISSING), base=base)


def test_module_level_imports_of_every_name_load_and_the_nodes_run(surface_server):
    srv = surface_server
    info = srv.get("/object_info").json()
    for name in ("SurfaceReport", "SaveViaNodes", "ProgressSteps", "WaitForInterrupt", "SurfaceSampler",
                 "ListRegisteredModels", "StillWorks", "NeedsAttention", "NeedsBaseModel"):
        assert name in info, f"{name} missing: the pack failed to load\n{srv.log()[-3000:]}"
    assert info["SurfaceReport"]["python_module"] == "custom_nodes.comfy_surface"
    assert info["SurfaceReport"]["display_name"] == "Surface Report (comfy style)"

    entry = srv.run({"1": {"class_type": "SurfaceReport", "inputs": {"width": 24}}})
    assert entry["status"]["status_str"] == "success", entry["status"]
    facts = entry["outputs"]["1"]["facts"][0]
    base = str(srv.base)
    assert facts["common_upscale"] == [1, 3, 12, 24] and facts["lanczos"] == [1, 3, 4, 4]
    assert facts["bislerp"] == [1, 4, 16, 16] and facts["tiled"] == [1, 3, 16, 16] and facts["tiled_same"]
    assert facts["tiled_steps"] == 9 and facts["repeat"] == [5, 3]
    assert facts["attrs"] == [2.0, 12.0] and facts["torch_file"] == [0.0, 1.0, 2.0]
    assert facts["devices"] == ["cpu"] * 5
    assert facts["cpu"] == [True, True, True, True, False, False, True, False]
    assert facts["memory"] == [True, True] and facts["samplers"] == [True, True, True]
    assert facts["args"] == [True, True, False]  # --preview-method none, always on the CPU, metadata on
    assert facts["io"] == [False, False, True, "LATENT"]
    assert facts["execution"] == [0, "CLASSIC", "ValueError"] and facts["is_link"] == [True, False]
    assert facts["progress_bar"] == [True, True] and facts["conditioning"] == ["a", "strength"]
    assert facts["helpers"] == ["sha256", "torch.bfloat16", [1, 2, 2, 4], 2]
    assert facts["mappings"] == [True, True, True, True, "KSampler (Advanced)", "Surface Report (comfy style)"]
    assert facts["extras"] == ["SolidMask", "InvertMask", "MaskToImage", "ImageToMask", "ImageCompositeMasked",
                               "ImageBlur", "ImageSharpen", "RebatchImages", "PrimitiveInt", "PrimitiveString"]
    folders = facts["folders"]
    assert folders["output"] == folders["output_directory"] == folders["by_type"] == f"{base}/output"
    assert folders["input"] == f"{base}/input" and folders["temp"] == f"{base}/temp"
    assert folders["user"] == f"{base}/user" and folders["base_path"] == base
    assert folders["models_dir"] == f"{base}/models"
    assert folders["checkpoints"] == [f"{base}/models/checkpoints"]
    assert folders["checkpoint_list"] == ["tiny-sd15.safetensors"] == srv.get("/models/checkpoints").json()
    assert folders["search"] == ["tiny-sd15.safetensors"] and folders["full_path"] is None
    assert folders["legacy"] == ["diffusion_models", True]
    assert folders["annotated"] == ["a.png", f"{base}/output"]
    assert folders["annotated_path"] == f"{base}/temp/b.png" and folders["annotated_exists"] is False
    assert folders["extensions"] == ["a.PT", "c.safetensors"] and folders["content"] == ["a.png", "d.wav"]
    assert folders["save"] == ["pic_32", 1, "sub", "sub/pic_32"]
    assert "'checkpoints' with filename 'nothing.safetensors' not found" in facts["raise"]


def test_save_image_from_nodes_writes_to_the_server_output_folder(surface_server):
    srv = surface_server
    entry = srv.run({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                                   "color": 255}},
                     "2": {"class_type": "SaveViaNodes", "inputs": {"images": ["1", 0],
                                                                    "filename_prefix": "packs/comfy_style"}}})
    assert entry["status"]["status_str"] == "success", entry["status"]
    [image] = entry["outputs"]["2"]["images"]
    assert image == {"filename": "comfy_style_00001_.png", "subfolder": "packs", "type": "output"}
    assert (srv.base / "output" / "packs" / "comfy_style_00001_.png").is_file()
    assert srv.get("/view", params=image).status_code == 200


def test_progress_bar_messages_reach_a_websocket_client(surface_server):
    srv = surface_server
    ws = srv.ws()
    queued = srv.queue_prompt({"1": {"class_type": "ProgressSteps", "inputs": {"steps": 5}},
                               "2": {"class_type": "StillWorks", "inputs": {"value": ["1", 0]}}},
                              client_id=ws.client_id)
    messages = ws.until_done(queued["prompt_id"])
    progress = [m["data"] for m in messages if not isinstance(m, bytes) and m["type"] == "progress"]
    assert [(p["value"], p["max"], p["node"]) for p in progress] == [(i, 5, "1") for i in range(1, 6)]
    assert all(p["prompt_id"] == queued["prompt_id"] for p in progress)
    assert srv.wait_history(queued["prompt_id"])["outputs"]["2"]["value"] == [6]
    ws.close()


def test_interrupt_through_comfy_model_management(surface_server):
    srv = surface_server
    ws = srv.ws()
    queued = srv.queue_prompt({"1": {"class_type": "WaitForInterrupt", "inputs": {"value": 3}},
                               "2": {"class_type": "StillWorks", "inputs": {"value": ["1", 0]}}},
                              client_id=ws.client_id)
    ws.until(lambda m: m["type"] == "executing" and m["data"].get("node") == "1")
    time.sleep(0.2)
    assert srv.post("/interrupt", data=b"").status_code == 200
    messages = ws.until_done(queued["prompt_id"])
    interrupted = next(m["data"] for m in messages if m["type"] == "execution_interrupted")
    assert interrupted["node_id"] == "1" and interrupted["node_type"] == "WaitForInterrupt"
    assert "execution_error" not in types_of(messages)
    ws.close()


def test_sampling_through_nodes_common_ksampler_and_comfy_sample(surface_server):
    srv = surface_server
    prompt = {
        "4": {"class_type": "SurfaceCheckpointLoader", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "3": {"class_type": "SurfaceSampler", "inputs": {
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], "seed": 7,
            "steps": 2, "sampler_name": "euler", "scheduler": "karras"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "sampled"}},
    }
    entry = srv.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["3"]["facts"] == [{"same": True, "sigmas": 3, "x0": [1, 4, 8, 8], "previewer": True}]
    assert (srv.base / "output" / "sampled_00001_.png").is_file()
    # A combo built from KSampler.SAMPLERS is checked against the samplers that exist.
    prompt["3"]["inputs"]["sampler_name"] = "no_such_sampler"
    refused = srv.post("/prompt", {"prompt": prompt})
    assert refused.status_code == 400 and refused.json()["node_errors"]["3"]["errors"][0]["type"] == "value_not_in_list"


def test_model_folders_registered_by_a_pack_are_served(surface_server):
    srv = surface_server
    models = srv.base / "models"
    # The pack's combo and the lists its code reads are both read from disk now.
    (models / "comfy_style_assigned" / "d.gguf").write_bytes(b"x")
    entry = srv.run({"1": {"class_type": "ListRegisteredModels", "inputs": {"model_name": "b.bin"}}})
    assert entry["status"]["status_str"] == "success", entry["status"]
    lists = entry["outputs"]["1"]["lists"][0]
    assert lists["assigned"] == ["b.bin", "d.gguf"]  # c.txt: not one of the extensions the pack gave
    assert lists["added"] == ["a.pt"]
    assert lists["checkpoints"] == ["tiny-sd15.safetensors"]
    combo = srv.get("/object_info/ListRegisteredModels").json()["ListRegisteredModels"]["input"]["required"]
    assert combo["model_name"][0] == ["b.bin", "d.gguf"]  # a file added after the catalogue was built
    assert lists["full_path"] == str(models / "comfy_style_assigned" / "b.bin")
    # The registrations are the server's own entries: /models and /models/<folder> list them.
    assert {"comfy_style_added", "comfy_style_assigned", "checkpoints"} <= set(srv.get("/models").json())
    assert srv.get("/models/comfy_style_assigned").json() == ["b.bin", "d.gguf"]
    assert srv.get("/models/comfy_style_added").json() == ["a.pt"]
    assert srv.get("/internal/folder_paths").json()["comfy_style_added"] == [str(models / "comfy_style_added")]


def test_a_pack_importing_missing_internals_loads_and_fails_only_where_it_needs_them(surface_server):
    srv = surface_server
    ok = srv.run({"1": {"class_type": "StillWorks", "inputs": {"value": 41}}})
    assert ok["status"]["status_str"] == "success" and ok["outputs"]["1"]["value"] == [42]

    error = error_of(srv.run({"1": {"class_type": "NeedsAttention", "inputs": {"value": 1}},
                              "2": {"class_type": "StillWorks", "inputs": {"value": ["1", 0]}}}))
    assert error["node_id"] == "1" and error["node_type"] == "NeedsAttention"
    assert error["exception_type"].endswith("MissingComfyInternal")
    assert error["exception_message"].strip() == ("this node needs ComfyUI's comfy.ldm.modules.attention."
                                                  "optimized_attention, which comfy-serverless does not provide")
    error = error_of(srv.run({"1": {"class_type": "NeedsBaseModel", "inputs": {"value": 1}},
                              "2": {"class_type": "StillWorks", "inputs": {"value": ["1", 0]}}}))
    assert "ComfyUI's comfy.model_base.BaseModel, which comfy-serverless does not provide" in \
        error["exception_message"]
    wait_for(lambda: "pack missing_internals uses" in srv.log())
    line = next(x for x in srv.log().splitlines() if "pack missing_internals uses" in x)
    assert line.endswith("pack missing_internals uses ComfyUI names this server lacks: "
                         "comfy.ldm.modules.attention.optimized_attention, comfy.model_base.BaseModel, "
                         "comfy.utils.something_this_server_lacks")
    assert "pack comfy_surface uses ComfyUI names" not in srv.log()  # it uses only what exists


# -- which processes see the names ----------------------------------------------------------------------------

def test_the_names_are_not_importable_outside_a_pack_loading_process(tmp_path):
    for name in ("folder_paths", "nodes", "comfy", "comfy.utils", "execution", "comfy_extras", "latent_preview"):
        result = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True,
                                cwd=str(tmp_path), timeout=60)
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, (name, result.stderr)


def test_the_folder_ships_as_package_data():
    """pyproject.toml's package-data globs cover every module of the folder (checked by building a wheel by hand:
    `pip wheel --no-deps --no-build-isolation .` lists comfy_serverless/comfy_modules/**.py and no top-level
    module)."""
    import glob
    import tomllib

    package = REPO / "comfy_serverless"
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {Path(found) for pattern in patterns["comfy_serverless"]
               for found in glob.glob(str(package / pattern), recursive=True)}
    modules = set((package / "comfy_modules").rglob("*.py"))
    assert modules and modules <= shipped
    assert not (package / "comfy_modules" / "__init__.py").exists()  # a sys.path root, not a package of ours


def test_our_own_code_never_imports_them():
    """Only catalog/packs.py reaches the adapter, through catalog/comfy_modules.install(); nothing outside the
    folder imports a ComfyUI name or the folder as a package."""
    import ast

    package = REPO / "comfy_serverless"
    comfy_names = {"folder_paths", "nodes", "execution", "node_helpers", "latent_preview", "comfy", "comfy_extras",
                   "comfy_execution", "comfy_api", "server"}
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if (package / "comfy_modules") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in comfy_names or name.startswith("comfy_serverless.comfy_modules"):
                    offenders.append(f"{path.relative_to(REPO)}: {name}")
    assert not offenders


def test_a_server_without_custom_packs_never_imports_them(start_server):
    srv = start_server("--warmup", "background", packs=(), env={"PYTHONPROFILEIMPORTTIME": "1"})
    wait_for(lambda: srv.get("/system_stats").json()["comfy_serverless"]["warmup"]["state"] == "done")
    entry = srv.run({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                                   "color": 0}},
                     "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})
    assert entry["status"]["status_str"] == "success"
    imported = imported_modules(srv.log())
    assert {"torch", "PIL.Image"} <= imported  # the log records what the warm-up imported
    assert not imported & set(ADAPTER_NAMES)


def test_lazy_front_imports_them_only_for_the_first_prompt_that_needs_a_pack(start_server, tmp_path):
    base = tmp_path / "lazy"
    first = start_server("--warmup", "lazy", packs=(MISSING,), base=base)
    wait_for(lambda: not first.get("/system_stats").json()["comfy_serverless"]["catalog"]["stale"])
    first.stop()  # the catalogue snapshot is built: the next server starts from it, with no rebuild process
    srv = start_server("--warmup", "lazy", packs=(MISSING,), base=base, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert "StillWorks" in srv.get("/object_info").json()
    invalid = srv.post("/prompt", {"prompt": {"1": {"class_type": "StillWorks", "inputs": {"value": "x"}}}})
    assert invalid.status_code == 400
    before = imported_modules(srv.log())
    assert "comfy_serverless.server.app" in before  # the log does record the front's imports
    assert not before & set(ADAPTER_NAMES)
    entry = srv.run({"1": {"class_type": "StillWorks", "inputs": {"value": 1}}})
    assert entry["status"]["status_str"] == "success"
    after = imported_modules(srv.log())
    assert {"comfy", "comfy.model_management", "comfy.utils", "comfy_serverless.catalog.comfy_modules"} <= after
    assert "comfy_serverless.comfy_modules.folder_paths" not in after


# -- placeholders, in a process of their own -----------------------------------------------------------------

def test_placeholders_import_subclass_and_fail_clearly_when_used(tmp_path):
    result = run_in_pack_process("""
        import pytest
        import comfy.model_base
        import comfy.utils
        from comfy.ldm.modules import attention
        from comfy.ldm.modules.attention import optimized_attention
        from comfy_serverless.catalog.comfy_modules import MissingComfyInternal, recording, summarize

        assert attention is comfy.ldm.modules.attention  # a module path and an attribute are one object
        assert optimized_attention is attention.optimized_attention
        class Model(comfy.model_base.BaseModel):
            def own(self):
                return 1
        assert Model.own and not isinstance(object(), comfy.model_base.BaseModel)
        for use in (lambda: Model(), lambda: optimized_attention(1), lambda: bool(comfy.model_base.SDXL),
                    lambda: len(comfy.model_base.BaseModel), lambda: list(comfy.model_base.ModelType)):
            with pytest.raises(MissingComfyInternal, match="which comfy-serverless does not provide"):
                use()
        assert issubclass(MissingComfyInternal, NotImplementedError)
        # probes see AttributeError, so version checks take their fallback branch
        assert not hasattr(comfy.utils, "not_a_thing") and getattr(comfy.model_base, "x", 7) == 7
        assert not hasattr(Model, "missing_method")
        from comfy.utils import not_a_thing  # a plain import gives a placeholder
        assert "comfy.utils.not_a_thing" in repr(not_a_thing)
        # monkeypatching a missing internal is allowed
        attention.optimized_attention = lambda *a: "patched"
        from comfy.ldm.modules.attention import optimized_attention as again
        assert again() == "patched"
        # while a pack is imported, a missing decorator defers its failure to the call
        with recording() as names:
            @comfy.model_base.register_wrapper
            def wrapped():
                return 1
            hint: comfy.model_base.BaseModel | None = None
            generic = comfy.model_base.Registry[str]
        with pytest.raises(MissingComfyInternal, match="comfy.model_base.register_wrapper"):
            wrapped()
        assert summarize(names) == ["comfy.model_base.BaseModel", "comfy.model_base.Registry",
                                    "comfy.model_base.register_wrapper"]
        import sys
        assert not [m for m in sys.modules if m.startswith("comfy_serverless.comfy_modules")]
        with pytest.raises(ModuleNotFoundError, match="importable only by their own names"):
            import comfy_serverless.comfy_modules.folder_paths  # the adapter exists once, under its ComfyUI name
        print("ok")
    """, tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def test_folder_paths_registry_is_the_servers_model_registry(tmp_path):
    result = run_in_pack_process("""
        import folder_paths
        from comfy_serverless import paths

        folders = paths.current()
        folder_paths.folder_names_and_paths["ipadapter"] = (["/models/ipadapter"], folder_paths.supported_pt_extensions)
        assert folders.models["ipadapter"][0] == ["/models/ipadapter"]
        folder_paths.folder_names_and_paths["ipadapter"][0].append("/more/ipadapter")
        folder_paths.folder_names_and_paths["ipadapter"][1].update({".ONNX"})
        assert folders.model_dirs("ipadapter") == ["/models/ipadapter", "/more/ipadapter"]
        assert ".onnx" in folders.models["ipadapter"][1]
        folder_paths.add_model_folder_path("ipadapter", "/first", is_default=True)
        assert folder_paths.get_folder_paths("ipadapter")[0] == "/first"
        folders.add_model_path("loras", "/extra/loras")
        assert "/extra/loras" in folder_paths.folder_names_and_paths["loras"][0]
        assert "text_encoders" in folder_paths.folder_names_and_paths and "clip" in folder_paths.folder_names_and_paths
        assert folder_paths.get_full_path("no_such_folder", "x") is None
        # every folder's list is disk-backed (live combos): a pack's folders reach the front through the snapshot
        assert type(folder_paths.get_filename_list("checkpoints")) is paths.FileList
        assert folder_paths.get_filename_list("ipadapter").source == "models:ipadapter"
        saved = folder_paths.get_save_image_path("x/%width%_%height%", folders.output, 3, 4)
        assert saved == (folders.output + "/x", "3_4", 1, "x", "x/3_4")
        print("ok")
    """, tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr

