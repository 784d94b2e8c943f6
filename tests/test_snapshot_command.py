"""`comfy-serverless snapshot` (run by every ./serve.sh) rebuilds only when a node pack changed."""

import os
import shutil
import subprocess

from conftest import COMMAND, PACKS


def snapshot(base):
    return subprocess.run([*COMMAND, "snapshot", "--base-directory", str(base), "--log-stdout"],
                          capture_output=True, text=True, timeout=300, cwd=str(base))


def test_snapshot_is_skipped_when_nothing_changed_and_rebuilt_when_a_pack_changes(tmp_path):
    (tmp_path / "custom_nodes").mkdir()
    pack = tmp_path / "custom_nodes" / "engine_test_nodes.py"
    shutil.copy2(PACKS / "engine_test_nodes.py", pack)
    catalog = tmp_path / ".comfy-serverless" / "catalog.json"

    first = snapshot(tmp_path)
    assert first.returncode == 0 and "catalogue snapshot:" in first.stdout, first.stdout + first.stderr
    built = catalog.stat().st_mtime_ns

    second = snapshot(tmp_path)
    assert second.returncode == 0 and "up to date" in second.stdout
    assert catalog.stat().st_mtime_ns == built

    stat = pack.stat()
    os.utime(pack, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    third = snapshot(tmp_path)
    assert "catalogue snapshot:" in third.stdout and catalog.stat().st_mtime_ns != built


def test_fingerprint_follows_comfyuis_module_names_only_for_custom_packs(tmp_path, monkeypatch):
    from comfy_serverless.catalog import snapshot as snapshot_module

    adapters = tmp_path / "comfy_modules"
    adapters.mkdir()
    (adapters / "folder_paths.py").write_text("x = 1\n")
    monkeypatch.setattr(snapshot_module, "_COMFY_MODULES_DIR", str(adapters))
    builtin_only = ["builtin:comfy_serverless.nodes.images"]
    with_pack = builtin_only + [f"custom:{PACKS / 'engine_test_nodes.py'}"]
    before = snapshot_module.fingerprint(builtin_only), snapshot_module.fingerprint(with_pack)
    (adapters / "folder_paths.py").write_text("x = 22\n")
    assert snapshot_module.fingerprint(builtin_only) == before[0]  # no custom pack imports the adapters
    assert snapshot_module.fingerprint(with_pack) != before[1]
