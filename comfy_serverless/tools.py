"""Command-line tools besides `serve`."""

from __future__ import annotations

import logging

from . import paths
from .catalog import packs, snapshot

log = logging.getLogger("comfy_serverless")


def write_snapshot(settings) -> int:
    """Imports every pack and writes the catalogue snapshot the server starts from."""
    folders = paths.configure(settings)
    refs = packs.all_pack_refs(folders.model_dirs("custom_nodes"), settings.disable_all_custom_nodes,
                               settings.whitelist_custom_nodes)
    snap = snapshot.build(refs)
    snapshot.save(snap, settings.catalog_path)
    log.info("catalogue snapshot: %d nodes (%d failed) in %.2f s -> %s", len(snap["nodes"]), len(snap["failed"]),
             snap["built_in_s"], settings.catalog_path)
    return 0
