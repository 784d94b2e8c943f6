"""The `comfy-serverless` command: `serve` (the default), `snapshot`, and tools.

Kept light: argparse and our settings only, so `serve` reaches the listening socket quickly.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__, logs
from .settings import add_flags, settings_from

SUBCOMMANDS = ("serve", "snapshot", "prepare", "make-test-checkpoint")
DESCRIPTION = """\
API-only, ComfyUI-compatible workflow server built for serverless cold starts.

commands:
  serve      run the server (default when no command is given); ComfyUI's launch flags are accepted
  snapshot   import every node pack and write the node catalogue snapshot the server starts from (and decide
             bf16 or fp32 for this CPU, caching a timing where its flags leave it open); with
             --comfyui DIR (or --comfyui-url URL) also start that ComfyUI once and store its /object_info
  prepare    write each model file once in the dtype and layout this CPU computes in (an image build step;
             --prepared-dir DIR or COMFY_PREPARED_DIR, default .comfy-serverless/prepared); a cold start maps it.
             Each UNet also runs one step at --pack-size PIXELS (default 512; 0: not) and its weights are
             written packed as the CPU kernels compute with them, so the first step packs nothing
  make-test-checkpoint --arch {sd15,sd2,sd2-v,sdxl,...} --size {tiny,full} OUT.safetensors
             write a checkpoint with random weights in the original single-file layout (tests, benchmarks)

Every flag can also be set through the environment: --port -> COMFY_PORT, --cache-lru -> COMFY_CACHE_LRU,
switches take 1/true/yes. Probes for platforms: GET /health (liveness; 503 when the prompt worker is dead),
GET /ready (readiness: 503 until the node catalogue is loaded, while the queue is full, while the worker is
dead or stuck, and while shutting down), GET /metrics (Prometheus). Request limits and timeouts are the
--max-header-*, --*-timeout, --max-connections, --max-json-depth and --ws-* flags below (README: Reliability).
ComfyUI as a second backend: --comfyui DIR runs prompts with nodes this server lacks on that checkout
(a child process on a private loopback port sharing input/output/temp and model folders).
CPU speed: bf16 or fp32 follows the CPU's instruction set; the UNet's and ControlNet's prepared weights are
packed once for oneDNN (on AVX2 their 16x16-32x32 fp32 3x3 convolutions keep Winograd-transformed weights instead,
at most 10 % more memory), and large fp32 3x3 convolutions run as Winograd transforms (torch's NNPACK):
COMFY_CPU_KERNELS=0 gives torch's stock layers, =packed no Winograd; COMFY_CHANNELS_LAST=auto|all|none|unet|vae.
Memory: all threads share one malloc arena and, once models load, freed heap memory is kept for the next
allocation (fresh pages cost more than the memory kept; README: Memory).
SIGTERM drains: new prompts get 503, queued ones finish within --shutdown-grace seconds; exit status 0,
or 1 when prompts were dropped (recorded in /history as errors) or interrupted.
"""


def build_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"comfy-serverless {command}", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"comfy-serverless {__version__}")
    add_flags(parser)
    return parser


def split_command(argv: list[str]) -> tuple[str, list[str]]:
    if argv and argv[0] in SUBCOMMANDS:
        return argv[0], argv[1:]
    return "serve", argv


def parse(command: str, argv: list[str], environ=None):
    parser = build_parser(command)
    namespace, unknown = parser.parse_known_args(argv)
    try:
        return settings_from(namespace, argv, dict(os.environ) if environ is None else environ, tuple(unknown))
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = split_command(argv)
    if command == "make-test-checkpoint":
        from .tools import make_test_checkpoint_command

        return make_test_checkpoint_command(rest)
    if command == "prepare":
        from .prepare_command import prepare_command

        return prepare_command(rest)
    settings = parse(command, rest)
    logs.configure(settings)
    log = logging.getLogger("comfy_serverless")
    if settings.ignored_arguments:
        log.warning("ignoring unknown arguments: %s", " ".join(settings.ignored_arguments))
    if command == "snapshot":
        from .server.warmup import NATIVE_ONLY_ENV
        from .tools import write_snapshot

        status = write_snapshot(settings)
        from .models.precision import default_decision

        default_decision()  # an image build step: where the CPU flags leave bf16 open, time it now and cache it
        if settings.backend_configured and os.environ.get(NATIVE_ONLY_ENV) != "1":
            from .backend.snapshot import write_backend_snapshot

            status = write_backend_snapshot(settings) or status
        return status
    return serve(settings, rest, log)


def serve(settings, argv: list[str], log) -> int:
    import asyncio

    from .heap import share_one_arena

    share_one_arena()  # before any thread starts: the prompt worker's allocations then reuse freed heap memory
    from .server.app import App

    app = App(settings, argv)
    app.context.timeline.mark("front_imported")
    for flag in settings.not_applicable_flags():
        log.info("%s: not applicable on this CPU-only server; ignored", flag)
    app.prepare_directories()
    app.load_catalog_snapshot()
    if settings.warmup == "eager":
        app.warm_up_now()
    try:
        asyncio.run(app.serve_forever())
    except KeyboardInterrupt:
        pass
    return app.exit_status  # 1 when the shutdown dropped or interrupted prompts
