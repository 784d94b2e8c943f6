"""ComfyUI's `server` module and V3 nodes for custom node packs, through the real server: pack HTTP routes
(bare and under /api, aiohttp handlers bridged), PromptServer messages, and V3 packs (comfy_entrypoint and V3
classes in NODE_CLASS_MAPPINGS) with ComfyUI 0.3.64's /object_info shape (docs/comfy-api-contract.md §1.1,
§1.7, §2.3, §2.4)."""

import io
import json
import struct
from pathlib import Path

import pytest
import websocket
from PIL import Image

from conftest import Server, types_of, wait_until

FIXTURE = Path(__file__).parent / "fixtures" / "comfyui_0.3.64_v3_object_info.json"
# Keys the recorded ComfyUI dump leaves out of every entry (tests/fixtures/..._v3_object_info.json says so).
STRIPPED = {"description", "output_tooltips"}
# Replicas of ComfyUI core nodes this server now has built in run under another id (a built-in name is never
# overridden by a pack).
REPLICA_IDS = {"CaseConverter": "V3CaseConverter", "CFGNorm": "V3CFGNorm"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """Background warm-up (the default): packs are imported right after the server listens."""
    server = Server(tmp_path_factory.mktemp("pack-server"), ("--warmup", "background"),
                    packs=("comfy_style_server", "v3_extension_pack.py", "v3_in_v1_mappings.py"))
    wait_until(lambda: server.get("/system_stats").json()["comfy_serverless"]["warmup"]["state"] == "done",
               timeout=120, what="warm-up")
    yield server
    server.stop()


def show(value, label=""):
    return {"class_type": "V3Show", "inputs": {"value": value, "label": label}}


# -- pack routes --------------------------------------------------------------------------------------------

def test_pack_routes_are_served_bare_and_under_api(srv):
    for prefix in ("", "/api"):
        hello = srv.get(prefix + "/my_pack/hello?x=1&y=two")
        assert hello.status_code == 200, hello.text
        assert hello.headers["content-type"].startswith("application/json")
        assert hello.json() == {"hello": "world", "query": {"x": "1", "y": "two"}, "remote": "127.0.0.1"}
        echo = srv.post(prefix + "/my_pack/echo", {"a": [1, 2], "b": None})
        assert echo.status_code == 201 and echo.json()["got"] == {"a": [1, 2], "b": None}
        item = srv.get(prefix + "/my_pack/items/apple%20pie")
        assert item.text == "item apple pie" and item.headers["x-pack"] == "yes"
    assert srv.http.head(srv.url + "/my_pack/hello").status_code == 200


def test_pack_route_request_bodies(srv):
    form = srv.http.post(srv.url + "/my_pack/form", data={"name": "cat"}, files={"file": ("cat.txt", b"meow!")})
    assert form.json() == {"name": "cat", "file": "cat.txt", "size": 5}
    raw = srv.http.put(srv.url + "/api/my_pack/raw", data="abcé".encode())
    assert raw.content == "abcé".encode()[::-1] and raw.headers["x-text-length"] == "4"
    assert raw.headers["content-type"] == "application/octet-stream"


def test_pack_route_responses_errors_and_files(srv):
    missing = srv.get("/my_pack/missing")
    assert missing.status_code == 404 and missing.text == "no such thing"
    broken = srv.get("/my_pack/broken")
    assert broken.status_code == 500 and broken.json()["error"]["type"] == "server_error"
    assert "this handler is broken" in srv.log()  # logged with its traceback, and the server goes on
    assert srv.get("/my_pack/hello").status_code == 200
    the_file = srv.get("/my_pack/file")
    assert the_file.text == "hello from a pack\n" and the_file.headers["content-type"].startswith("text/plain")
    part = srv.get("/my_pack/file", headers={"Range": "bytes=0-4"})
    assert part.status_code == 206 and part.text == "hello"
    assert srv.get("/my_pack/stream").text == "one two three"


def test_pack_static_folders_and_direct_app_routes(srv):
    asset = srv.get("/my_pack/static/app.js")
    assert asset.status_code == 200 and asset.text == 'console.log("pack asset");\n'
    assert srv.get("/my_pack/static/nothing.js").status_code == 404
    assert srv.get("/my_pack/static/%2e%2e/__init__.py").status_code == 404  # never outside the folder
    assert srv.get("/api/my_pack/static/app.js").status_code == 404  # static folders: not under /api
    assert srv.get("/my_pack_direct").text == "direct"  # app.add_routes: its own path only, as in ComfyUI
    assert srv.get("/api/my_pack_direct").status_code == 404


def test_a_pack_cannot_replace_the_servers_routes(srv):
    for path in ("/system_stats", "/api/system_stats"):
        stats = srv.get(path).json()
        assert "system" in stats and "hijacked" not in stats


def test_on_prompt_handlers_see_each_prompt(srv):
    srv.run({"1": {"class_type": "V3Widgets", "inputs": {"count": 1, "scale": 0.5, "text": "x", "mode": "first"}},
             "9": show(["1", 0])})
    assert ["1", "9"] in srv.get("/my_pack/prompts_seen").json()


# -- PromptServer messages ----------------------------------------------------------------------------------

def test_send_sync_reaches_the_prompts_client_only(srv):
    ws, bystander = srv.ws(), srv.ws()
    ws.until(lambda m: m["type"] == "status")
    queued = srv.queue_prompt({"5": {"class_type": "PackMessenger", "inputs": {"text": "hey"}}},
                              client_id=ws.client_id)
    messages = ws.until_done(queued["prompt_id"])
    event = next(m for m in messages if not isinstance(m, bytes) and m["type"] == "my_pack.event")
    assert event["data"] == {"node": "5", "text": "hey", "last_node": "5"}
    frames = [m for m in ws.messages if isinstance(m, bytes)]
    assert struct.pack(">II", 3, 1) + b"5" + b"working on hey" in frames  # send_progress_text: a TEXT frame
    assert struct.pack(">I", 9) + json.dumps({"raw": "hey"}).encode() in frames  # bytes go as they are
    png = next(f for f in frames if f[:8] == struct.pack(">II", 1, 2))  # an unencoded preview, as PNG
    assert Image.open(io.BytesIO(png[8:])).size == (600, 300)  # max size None: as it is (ComfyUI's send_image)
    # event 4 as the pack asked, negotiated or not (ComfyUI checks the flag only for its own latent previews)
    framed = next(f for f in frames if f[:4] == struct.pack(">I", 4))
    length = struct.unpack(">I", framed[4:8])[0]
    assert json.loads(framed[8:8 + length]) == {"node_id": "5", "prompt_id": queued["prompt_id"],
                                               "image_type": "image/jpeg"}
    assert Image.open(io.BytesIO(framed[8 + length:])).size == (64, 32)
    # the custom message comes while its node runs: after `executing` for it, before `executed`
    kinds = types_of(messages)
    assert kinds.index("executing") < kinds.index("my_pack.event") < kinds.index("executed")
    assert srv.wait_history(queued["prompt_id"])["outputs"]["5"] == {"sent_to": [ws.client_id]}
    bystander.sock.settimeout(0.5)
    with pytest.raises(websocket.WebSocketTimeoutException):
        bystander.until(lambda m: m["type"] == "my_pack.event", timeout=2)
    assert not [m for m in bystander.messages if isinstance(m, bytes)]
    ws.close()
    bystander.close()


# -- V3 nodes ----------------------------------------------------------------------------------------------

def test_v3_extension_nodes_run_through_post_prompt(srv):
    ws = srv.ws()
    prompt = {"1": {"class_type": "V3Widgets", "inputs": {"count": 4, "scale": 0.25, "text": "abc", "mode": "second",
                                                          "flag": True}},
              "2": show(["1", 2], "upper"), "3": show(["1", 0]), "4": show(["1", 3]),
              "5": {"class_type": "V3Text", "inputs": {"text": ["1", 2]}}}
    queued = srv.queue_prompt(prompt, client_id=ws.client_id, extra_data={"extra_pnginfo": {"workflow": {"n": 1}}})
    messages = ws.until_done(queued["prompt_id"])
    outputs = srv.wait_history(queued["prompt_id"])["outputs"]
    assert outputs["2"] == {"values": ["ABC"], "label": ["upper"], "unique_id": ["2"],
                            "prompt_nodes": [["1", "2", "3", "4", "5"]], "pnginfo": [{"workflow": {"n": 1}}]}
    assert outputs["3"]["values"] == [4] and outputs["4"]["values"] == ["second"]
    assert outputs["5"] == {"text": ["ABC"]}
    executed = {m["data"]["node"]: m["data"]["output"] for m in messages if m["type"] == "executed"}
    assert executed["5"] == {"text": ["ABC"]} and executed["2"] == outputs["2"]
    ws.close()


def test_v3_combos_are_not_checked_but_numbers_are(srv):
    def widgets(**inputs):
        values = {"count": 1, "scale": 0.5, "text": "x", "mode": "first", **inputs}
        return {"1": {"class_type": "V3Widgets", "inputs": values}, "2": show(["1", 3])}

    accepted = srv.post("/prompt", {"prompt": widgets(mode="not an option")})
    assert accepted.status_code == 200  # "COMBO" inputs are not checked for membership (as in ComfyUI)
    assert srv.wait_history(accepted.json()["prompt_id"])["outputs"]["2"]["values"] == ["not an option"]
    too_big = srv.post("/prompt", {"prompt": widgets(count=101)})
    assert too_big.status_code == 400
    assert too_big.json()["node_errors"]["1"]["errors"][0]["type"] == "value_bigger_than_max"
    bad_type = srv.post("/prompt", {"prompt": widgets(scale="wide")})
    assert bad_type.json()["node_errors"]["1"]["errors"][0]["type"] == "invalid_input_type"
    missing = srv.post("/prompt", {"prompt": {"1": {"class_type": "V3Widgets", "inputs": {"count": 1}},
                                              "2": show(["1", 0])}})
    assert {e["type"] for e in missing.json()["node_errors"]["1"]["errors"]} == {"required_input_missing"}


def test_v3_validate_inputs_failure_is_comfyuis_400(srv):
    bad = srv.post("/prompt", {"prompt": {"1": {"class_type": "V3Even", "inputs": {"value": 3}}, "2": show(["1", 0])}})
    assert bad.status_code == 400
    body = bad.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["1"]["errors"] == [{
        "type": "custom_validation_failed", "message": "Custom validation failed for node",
        "details": "value - 3 is odd", "extra_info": {"input_name": "value"}}]
    good = srv.run({"1": {"class_type": "V3Even", "inputs": {"value": 4}}, "2": show(["1", 0])})
    assert good["outputs"]["2"]["values"] == [4]


def test_v3_fingerprint_inputs_controls_caching(srv):
    def counted(policy):
        entry = srv.run({"1": {"class_type": "V3Counter", "inputs": {"policy": policy}}, "2": show(["1", 0])})
        return entry["outputs"]["2"]["values"][0], entry["status"]["messages"][1][1]["nodes"]

    first, _ = counted("cache")
    again, cached = counted("cache")
    assert again == first and cached == ["1", "2"]  # same fingerprint: nothing runs again
    changed, _ = counted("always")
    changed_again, cached = counted("always")
    assert changed_again == changed + 1 and "1" not in cached  # a new fingerprint every time: it runs


def test_v3_lazy_inputs_follow_check_lazy_status(srv):
    def switch(use_a):
        prompt = {"1": {"class_type": "V3Source", "inputs": {"tag": "A"}},
                  "2": {"class_type": "V3Source", "inputs": {"tag": "B"}},
                  "3": {"class_type": "V3Switch", "inputs": {"use_a": use_a, "a": ["1", 0], "b": ["2", 0]}},
                  "4": {"class_type": "V3RunLog", "inputs": {"after": ["3", 0]}}}
        return srv.run(prompt)["outputs"]["4"]

    picked = switch(True)
    assert picked["after"] == ["A"] and "source:A" in picked["log"] and "source:B" not in picked["log"]
    picked = switch(False)
    assert picked["after"] == ["B"] and "source:B" in picked["log"] and "source:A" not in picked["log"]


def test_v3_async_nodes_and_blocked_execution(srv):
    ws = srv.ws()
    queued = srv.queue_prompt({"1": {"class_type": "V3AsyncDouble", "inputs": {"value": 21}}, "2": show(["1", 0])},
                              client_id=ws.client_id)
    messages = ws.until_done(queued["prompt_id"])
    assert srv.wait_history(queued["prompt_id"])["outputs"]["2"]["values"] == [42]
    progress = next(m for m in messages if m["type"] == "progress")  # ComfyAPI().execution.set_progress
    assert progress["data"] == {"value": 1, "max": 2, "prompt_id": queued["prompt_id"], "node": "1"}
    prompt = {"1": {"class_type": "V3Gate", "inputs": {"value": "through", "open": False}}, "2": show(["1", 0])}
    queued = srv.queue_prompt(prompt, client_id=ws.client_id)
    messages = ws.until_done(queued["prompt_id"])
    entry = srv.wait_history(queued["prompt_id"])
    assert entry["status"]["status_str"] == "success" and "2" not in entry["outputs"]
    blocked = next(m for m in messages if m["type"] == "execution_error")
    assert blocked["data"]["exception_message"] == "Execution Blocked: the gate is closed"
    ws.close()


def test_v3_image_node_previews_through_ui_helpers(srv):
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 6, "batch_size": 2, "color": 255}},
              "2": {"class_type": "V3Preview", "inputs": {"images": ["1", 0]}}}
    shown = srv.run(prompt)["outputs"]["2"]
    assert shown["animated"] == [False] and len(shown["images"]) == 2
    first = shown["images"][0]
    assert first["type"] == "temp" and first["subfolder"] == "" and first["filename"].endswith("_00001_.png")
    image = srv.get("/view", params=first)
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


def test_v3_multi_typed_and_matched_inputs(srv):
    info = srv.get("/object_info/V3Fancy").json()["V3Fancy"]["input"]["required"]
    assert info["tags"] == ["COMBO", {"multiselect": True, "options": ["a", "b", "c"],
                                      "multi_select": {"placeholder": "pick"}}]
    assert info["num"] == ["INT,FLOAT", {"default": 1, "min": 0, "widgetType": "INT"}]
    assert info["thing"] == ["COMFY_MATCHTYPE_V3", {"template": {"template_id": "thing", "allowed_types": "*"}}]
    prompt = {"1": {"class_type": "V3Widgets", "inputs": {"count": 1, "scale": 0.5, "text": "x", "mode": "first"}},
              "2": {"class_type": "V3Fancy", "inputs": {"tags": {"__value__": ["c", "a"]}, "num": 2.5,
                                                        "thing": ["1", 2]}},
              "3": show(["2", 0])}
    assert srv.run(prompt)["outputs"]["3"]["values"] == [["x", ["a", "c"], 2.5]]


def test_v3_classes_in_v1_mappings_run(srv):
    prompt = {"1": {"class_type": "V3CaseConverter", "inputs": {"string": "hello world", "mode": "Title Case"}},
              "2": {"class_type": "OldStyleJoin", "inputs": {"a": ["1", 0], "b": "!"}}, "3": show(["2", 0])}
    assert srv.run(prompt)["outputs"]["3"]["values"] == ["Hello World!"]


def test_object_info_of_v3_nodes_has_comfyuis_shape(srv):
    """The replicas in tests/packs/v3_in_v1_mappings.py declare the schemas of five of ComfyUI 0.3.64's V3 core
    nodes; their /object_info entries must equal ComfyUI's, key for key (python_module aside)."""
    recorded = json.loads(FIXTURE.read_text())["nodes"]
    for name, theirs in recorded.items():
        node_id = REPLICA_IDS.get(name, name)
        ours = srv.get(f"/api/object_info/{node_id}").json()[node_id]
        assert set(ours) == set(theirs) | STRIPPED, name
        assert ours["python_module"] == "custom_nodes.v3_in_v1_mappings"
        assert ours["name"] == node_id
        for key in set(theirs) - {"python_module", "name"}:
            assert ours[key] == theirs[key], (name, key)
    assert srv.get("/object_info/V3CaseConverter").json()["V3CaseConverter"]["display_name"] == "Case Converter"
    assert srv.get("/object_info/V3CFGNorm").json()["V3CFGNorm"]["display_name"] is None  # V3: null, not the id
    v1 = srv.get("/object_info/OldStyleJoin").json()["OldStyleJoin"]
    assert "deprecated" not in v1 and v1["display_name"] == "Old Style Join"  # V1 keeps the V1 shape


def test_object_info_of_a_v3_extension_node(srv):
    info = srv.get("/object_info/V3Widgets").json()["V3Widgets"]
    shape = set(next(iter(json.loads(FIXTURE.read_text())["nodes"].values()))) | STRIPPED
    assert set(info) == shape
    assert info["input"]["required"]["mode"] == ["COMBO", {"default": "first", "multiselect": False,
                                                           "options": ["first", "second"]}]
    assert info["input"]["required"]["count"] == ["INT", {"default": 3, "min": 0, "max": 100, "step": 1}]
    assert info["input"]["optional"]["flag"] == ["BOOLEAN", {"default": True, "label_on": "yes", "label_off": "no"}]
    assert info["input_order"] == {"required": ["count", "scale", "text", "mode"], "optional": ["flag"]}
    assert info["output"] == ["INT", "FLOAT", "STRING", "COMBO"]
    assert info["output_name"] == ["count", "FLOAT", "STRING", "mode"]
    assert info["output_tooltips"] == [None, None, "the text, upper-cased", None]
    assert info["description"] == "Passes its widget values through."
    assert info["python_module"] == "custom_nodes.v3_extension_pack"
    output_node = srv.get("/object_info/V3Show").json()["V3Show"]
    assert output_node["output_node"] is True and output_node["output"] == []
    assert output_node["input"]["hidden"] == {"unique_id": ["UNIQUE_ID"], "prompt": ["PROMPT"],
                                              "extra_pnginfo": ["EXTRA_PNGINFO"]}
    assert output_node["input_order"]["hidden"] == ["unique_id", "prompt", "extra_pnginfo"]
    # a node built on an io type of a later ComfyUI is left out, with the missing name in the log
    assert srv.get("/object_info/V3FromTheFuture").json() == {}
    assert "V3 node V3FromTheFuture of pack" in srv.log()
    assert "comfy_api.latest._io.Autogrow" in srv.log()


# -- routes of packs imported later, and aiohttp on demand --------------------------------------------------

def test_routes_of_a_pack_imported_after_start_work_without_aiohttp_up_front(start_server):
    """Lazy warm-up: the pack is imported by its first prompt, long after the server listens; neither that nor
    registering its route imports aiohttp, which comes with the route's first call."""
    srv = start_server("--warmup", "lazy", packs=("lazy_route_pack.py",))
    probe = {"1": {"class_type": "AiohttpProbe", "inputs": {}}}
    assert srv.run(probe)["outputs"]["1"] == {"aiohttp_loaded": [False]}
    ping = wait_until(lambda: (r := srv.get("/lazy_pack/ping?name=late")).status_code == 200 and r, what="route")
    assert ping.json() == {"pong": True, "name": "late"}
    assert srv.get("/api/lazy_pack/ping").json() == {"pong": True, "name": None}
    assert srv.run(probe)["outputs"]["1"] == {"aiohttp_loaded": [True]}


def test_a_lazy_server_imports_a_pack_for_its_first_route_call(start_server):
    """The catalogue snapshot knows which pack serves which path: the first request to it imports the pack
    (nothing else does in lazy mode), other unknown paths stay plain 404s."""
    srv = start_server("--warmup", "lazy", packs=("comfy_style_server",))
    assert srv.get("/no/such/route").status_code == 404
    assert "importing node pack" not in srv.log()
    assert srv.get("/api/my_pack/items/first").text == "item first"
    assert "importing node pack" in srv.log()
    assert srv.get("/my_pack/static/hello.txt").text == "hello from a pack\n"
    assert srv.post("/my_pack/echo", {"n": 1}).json()["got"] == {"n": 1}
    stats = srv.get("/system_stats").json()["comfy_serverless"]
    assert stats["heavy_modules_loaded"] == [] and "packs_imported" not in stats["startup"]


def test_routes_registered_before_listening_are_served(start_server):
    """Eager warm-up imports packs before the server has a router: their routes are put on it at start."""
    srv = start_server("--warmup", "eager", packs=("comfy_style_server",))
    assert srv.get("/api/my_pack/items/early").text == "item early"


def test_prompt_server_instance_is_the_running_servers_own():
    """Each server (its ServerContext) has its own PromptServer and routes; without a running server the
    messages go nowhere and the routes are only collected (what the snapshot command sees)."""
    from comfy_serverless.catalog import comfy_modules
    from comfy_serverless.server import pack_routes
    from conftest import server_context

    comfy_modules.install()
    import server

    with server_context() as first:
        one = server.PromptServer.instance
        one.routes.get("/only/first")(lambda request: None)
        one.send_sync("nobody.listens", {"x": 1})  # no server: dropped without error
        assert one.client_id is None and one.last_node_id is None and one.sockets == {}
    with server_context() as second:
        other = server.PromptServer.instance
        assert other is not one and server.PromptServer.instance is other
    assert [e.path for e, _ in pack_routes.registry(first).entries] == ["/only/first"]
    assert pack_routes.registry(second).entries == []
    assert (server.BinaryEventTypes.PREVIEW_IMAGE, server.BinaryEventTypes.UNENCODED_PREVIEW_IMAGE,
            server.BinaryEventTypes.TEXT, server.BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA) == (1, 2, 3, 4)


def test_v3_ui_helpers_write_images_like_save_image(tmp_path):
    """ui.ImageSaveHelper and ui.PreviewMask write into the current server's folders (here a test context)."""
    import torch

    from comfy_serverless.catalog import comfy_modules
    from conftest import server_context

    comfy_modules.install()
    from comfy_api.latest import io, ui

    frames = torch.rand(3, 4, 6, 3)
    with server_context(base_directory=str(tmp_path)) as own:
        saved = ui.ImageSaveHelper.get_save_images_ui(frames, "still/ComfyUI", cls=None).as_dict()
        animated = ui.ImageSaveHelper.get_save_animated_png_ui(frames, "anim", cls=None, fps=8, compress_level=1)
        webp = ui.ImageSaveHelper.get_save_animated_webp_ui(frames, "anim", cls=None, fps=8, lossless=False,
                                                            quality=80, method=0)
        mask = ui.PreviewMask(torch.ones(2, 4, 6)).as_dict()
        output, temp = own.folders.output, own.folders.temp
    assert [r["filename"] for r in saved["images"]] == ["ComfyUI_00001_.png", "ComfyUI_00002_.png",
                                                        "ComfyUI_00003_.png"]
    assert saved["images"][0]["subfolder"] == "still" and saved["images"][0]["type"] == "output"
    assert Image.open(Path(output) / "still" / "ComfyUI_00002_.png").size == (6, 4)
    assert animated.as_dict() == {"images": [{"filename": "anim_00001_.png", "subfolder": "", "type": "output"}],
                                  "animated": [True]}
    assert Image.open(Path(output) / "anim_00001_.png").n_frames == 3
    assert webp.results[0]["filename"] == "anim_00002_.webp"
    assert len(mask["images"]) == 2 and mask["animated"] == [False]
    assert (Path(temp) / mask["images"][0]["filename"]).exists()
    assert io.FolderType("temp") is io.FolderType.temp


def test_every_send_variant_frames_messages_as_comfyui_does(start_server):
    srv = start_server("--warmup", "background", packs=("comfy_style/messenger_variants.py",))
    wait_until(lambda: srv.get("/system_stats").json()["comfy_serverless"]["warmup"]["state"] == "done",
               timeout=120, what="warm-up")
    ws = srv.ws()
    ws.until(lambda m: m["type"] == "status")
    queued = srv.queue_prompt({"3": {"class_type": "MessengerVariants", "inputs": {"text": "yo"}}},
                              client_id=ws.client_id)
    messages = ws.until_done(queued["prompt_id"])
    frames = [m for m in messages if isinstance(m, bytes)]
    png = next(f for f in frames if f[:8] == struct.pack(">II", 1, 2))
    assert Image.open(io.BytesIO(png[8:])).size == (80, 40)  # fitted to the max size, upwards too (ImageOps.contain)
    framed = next(f for f in frames if f[:4] == struct.pack(">I", 4))
    length = struct.unpack(">I", framed[4:8])[0]
    assert json.loads(framed[8:8 + length]) == {"node_id": "3", "image_type": "image/jpeg"}
    assert Image.open(io.BytesIO(framed[8 + length:])).size == (40, 20)
    done = next(m for m in messages if not isinstance(m, bytes) and m["type"] == "messenger.done")
    assert done["data"] == {"text": "yo", "metadata_after": {"node_id": "3", "image_type": "image/jpeg"}}
    assert "Binary event types must be integers, got not a number" in srv.log()  # dropped, the node went on
    assert srv.wait_history(queued["prompt_id"])["outputs"]["3"]["encoded"] == [[0, 0, 0, 7, 97, 98]]

    answer = srv.post("/messenger/send", {"sid": ws.client_id})
    assert answer.json() == {"refused": "Binary event types must be integers, got text event",
                             "encoded": "bytearray"}
    got = ws.until(lambda m: m["type"] == "messenger.last")
    texts = [m for m in got if not isinstance(m, bytes)]
    assert texts == [{"type": "messenger.plain", "data": {"n": 1}}, {"type": 7, "data": {"json": "always"}},
                     {"type": "messenger.raw", "data": {}}, {"type": "messenger.last", "data": {"closed": False}}]
    binary = [m for m in got if isinstance(m, bytes)]
    assert binary[0] == struct.pack(">I", 2) + b"raw" and binary[1] == struct.pack(">I", 12) + b"\x00\x01"
    assert binary[2][:8] == struct.pack(">II", 1, 1) and Image.open(io.BytesIO(binary[2][8:])).size == (10, 20)
    length = struct.unpack(">I", binary[3][4:8])[0]
    assert binary[3][:4] == struct.pack(">I", 4)
    assert json.loads(binary[3][8:8 + length]) == {"k": "v", "image_type": "image/png"}
    ws.close()
