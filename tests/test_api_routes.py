"""Every core route of docs/comfy-api-contract.md §1.3 over real HTTP, and the serverless probes."""

import json

import pytest


def test_index_describes_the_server_as_json(server):
    response = server.get("/")
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "comfy-serverless" and body["frontend"] is None
    assert server.get("/api/").json() == body


def test_health_and_ready(server):
    assert server.get("/health").json() == {"status": "ok"}
    ready = server.get("/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True}


def test_system_stats_shape(server):
    stats = server.get("/system_stats").json()
    system = stats["system"]
    for key in ("os", "ram_total", "ram_free", "comfyui_version", "required_frontend_version",
                "installed_templates_version", "required_templates_version", "python_version",
                "pytorch_version", "embedded_python", "argv"):
        assert key in system
    assert system["ram_total"] > system["ram_free"] > 0
    assert system["pytorch_version"].startswith("2.13.0")
    assert len(stats["devices"]) == 1 and stats["devices"][0]["type"] == "cpu"
    startup = stats["comfy_serverless"]["startup"]
    assert 0 < startup["listening"] and "catalog_loaded" in startup


def test_features_and_prompt_info(server):
    assert server.get("/features").json() == {"supports_preview_metadata": True, "max_upload_size": 104857600}
    assert server.get("/prompt").json() == {"exec_info": {"queue_remaining": 0}}


def test_object_info_v1_shape(server):
    info = server.get("/object_info").json()
    add = info["Add"]
    assert list(add) == ["input", "input_order", "output", "output_is_list", "output_name", "name",
                         "display_name", "description", "python_module", "category", "output_node"]
    assert add["input"] == {"required": {"a": ["FLOAT,INT"], "b": ["FLOAT,INT"]}}
    assert add["python_module"] == "custom_nodes.engine_test_nodes"
    assert info["Record"]["display_name"] == "Record Value" and info["Record"]["output_node"] is True
    assert info["MakeList"]["output_is_list"] == [True, False]
    assert server.get("/object_info/Add").json() == {"Add": add}
    unknown = server.get("/object_info/NoSuchNode")
    assert unknown.status_code == 200 and unknown.json() == {}


def test_every_route_is_also_under_api(server):
    for path in ("/system_stats", "/object_info/Add", "/queue", "/history", "/features", "/embeddings",
                 "/models", "/extensions", "/prompt"):
        bare, api = server.get(path), server.get("/api" + path)
        assert bare.status_code == api.status_code == 200, path
        if path != "/system_stats":
            assert bare.json() == api.json(), path


def test_unknown_path_and_wrong_method(server):
    missing = server.get("/no/such/route")
    assert missing.status_code == 404 and missing.text == "404: Not Found"
    assert server.http.delete(server.url + "/prompt").status_code == 405


def test_head_answers_for_get_routes(server):
    response = server.http.head(server.url + "/system_stats")
    assert response.status_code == 200 and response.content == b""


def test_model_folders_and_lists(server):
    folders = server.get("/models").json()
    assert "checkpoints" in folders and "loras" in folders and "embeddings" in folders
    ckpt_dir = server.base / "models" / "checkpoints" / "sub"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "b.safetensors").write_bytes(b"x")
    (server.base / "models" / "checkpoints" / "a.ckpt").write_bytes(b"x")
    (server.base / "models" / "checkpoints" / "notes.txt").write_text("ignored")
    assert server.get("/models/checkpoints").json() == ["a.ckpt", "sub/b.safetensors"]
    assert server.get("/models/unet").status_code == 404  # legacy alias not accepted here
    assert server.get("/models/nope").status_code == 404
    emb = server.base / "models" / "embeddings"
    emb.mkdir(parents=True, exist_ok=True)
    (emb / "style.pt").write_bytes(b"x")
    assert server.get("/embeddings").json() == ["style"]
    assert server.get("/extensions").json() == []


def test_view_metadata_reads_the_safetensors_header(server):
    folder = server.base / "models" / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"__metadata__": {"ss_network_dim": "4"}}).encode()
    (folder / "meta.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    assert server.get("/view_metadata/loras?filename=meta.safetensors").json() == {"ss_network_dim": "4"}
    assert server.get("/view_metadata/loras?filename=missing.safetensors").status_code == 404
    assert server.get("/view_metadata/loras").status_code == 404
    assert server.get("/view_metadata/loras?filename=meta.ckpt").status_code == 404


def test_websocket_without_upgrade_is_400(server):
    assert server.get("/ws").status_code == 400


@pytest.mark.parametrize("origin,status", [("http://evil.example", 403), (None, 200)])
def test_origin_check_protects_loopback(server, origin, status):
    headers = {"Origin": origin} if origin else {}
    assert server.get("/system_stats", headers=headers).status_code == status


def test_same_origin_is_allowed(server):
    headers = {"Origin": f"http://127.0.0.1:{server.port}"}
    assert server.get("/queue", headers=headers).status_code == 200


def test_cors_header_flag(start_server):
    srv = start_server("--enable-cors-header")
    response = srv.get("/queue", headers={"Origin": "http://elsewhere.example"})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in response.headers  # never with a wildcard origin
    assert "Origin" in response.headers["Vary"]
    preflight = {"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"}
    assert srv.http.options(srv.url + "/prompt", headers=preflight).status_code == 200
    # Only real preflights for routes that exist are answered.
    assert srv.http.options(srv.url + "/no/such/route", headers=preflight).status_code == 404
    assert srv.http.options(srv.url + "/prompt").status_code == 405


def test_cors_with_a_named_origin_allows_credentials(start_server):
    srv = start_server("--enable-cors-header", "https://app.example")
    response = srv.get("/queue", headers={"Origin": "https://app.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert "Origin" in response.headers["Vary"]
