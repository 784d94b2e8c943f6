"""Every server setting in one place: flag, environment variable, default, help.

ComfyUI's launch flags are all accepted so that existing launch scripts keep working. Flags that only
matter on a GPU (or for the web frontend) are parsed, then logged as not applicable. Every flag can also be
set through the environment as ``COMFY_<FLAG>`` (``--cache-lru`` -> ``COMFY_CACHE_LRU``), because container
platforms configure through the environment. Precedence: command line, then environment, then default.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "COMFY_"
WARMUP_MODES = ("lazy", "background", "eager")
TRUE_WORDS = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Flag:
    name: str  # e.g. "--port"
    help: str
    kind: str = "switch"  # switch | value | optional-value | list | append-list
    type: type = str
    default: object = None
    const: object = None  # value of a bare optional-value flag
    choices: tuple | None = None
    applies: bool = True  # False: accepted for compatibility, logged as not applicable
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    @property
    def env_name(self) -> str:
        return ENV_PREFIX + self.dest.upper()


def _gpu(name: str, help: str = "GPU-only; accepted for compatibility.", **kw) -> Flag:
    return Flag(name, help, applies=False, **kw)


FLAGS: tuple[Flag, ...] = (
    # network
    Flag("--listen", "IP address(es) to listen on, comma separated; bare --listen means 0.0.0.0,::.",
         kind="optional-value", default="127.0.0.1", const="0.0.0.0,::", metavar="IP"),
    Flag("--port", "Port to listen on.", kind="value", type=int, default=8188),
    Flag("--tls-keyfile", "TLS key file (enables HTTPS together with --tls-certfile).", kind="value"),
    Flag("--tls-certfile", "TLS certificate file.", kind="value"),
    Flag("--enable-cors-header", "Send CORS headers with this origin (bare flag: '*').",
         kind="optional-value", const="*", metavar="ORIGIN"),
    Flag("--max-upload-size", "Largest request body in MB (bigger bodies get 413).", kind="value",
         type=float, default=100.0),
    # limits and timeouts (uvicorn's and aiohttp's defaults as the reference; README "Reliability")
    Flag("--max-header-size", "Largest request line plus headers in bytes (bigger: 431).", kind="value",
         type=int, default=16384, metavar="BYTES"),
    Flag("--max-header-count", "Most header fields in one request (more: 431).", kind="value", type=int,
         default=100),
    Flag("--header-timeout", "Seconds a client may take to send a request's line and headers (then 408; "
         "0: no limit).", kind="value", type=float, default=10.0),
    Flag("--body-timeout", "Seconds a request body may stall without new data, and a response without being "
         "read (then 408 or a close; 0: no limit).", kind="value", type=float, default=30.0),
    Flag("--keep-alive-timeout", "Seconds an idle keep-alive connection stays open (0: no limit).",
         kind="value", type=float, default=75.0),
    Flag("--max-connections", "Most open connections (HTTP and WebSocket); beyond it only /health, /ready "
         "and /metrics are served, on a small reserve.", kind="value", type=int, default=1000),
    Flag("--max-json-depth", "Deepest nesting of arrays and objects accepted in a JSON body (deeper: 400).",
         kind="value", type=int, default=100),
    Flag("--ws-max-message-size", "Largest WebSocket message a client may send, in MB (bigger: close 1009).",
         kind="value", type=float, default=4.0),
    Flag("--ws-max-send-buffer", "Unsent WebSocket data in MB per client before a client that does not "
         "read is disconnected.", kind="value", type=float, default=16.0),
    Flag("--ws-ping-interval", "Seconds between WebSocket pings (0: never).", kind="value", type=float,
         default=20.0),
    Flag("--ws-ping-timeout", "Seconds to wait for any data after a ping before closing (0: forever).",
         kind="value", type=float, default=20.0),
    Flag("--worker-stall-timeout", "Seconds a running prompt may go without any progress before /ready "
         "reports the worker stuck (0: never).", kind="value", type=float, default=600.0),
    Flag("--allow-external-symlinks", "Let /view and uploads follow symbolic links out of the input, "
         "output and temp directories (model folders always may)."),
    Flag("--enable-compress-response-body", "Gzip JSON and text responses for clients that accept it."),
    Flag("--dont-print-server", "Do not log each HTTP request."),
    Flag("--multi-user", "Per-user storage (frontend feature; not applicable to this API-only server).",
         applies=False),
    # directories
    Flag("--base-directory", "Root for models/, custom_nodes/, input/, output/, temp/, user/ (default: "
         "the current directory).", kind="value"),
    Flag("--extra-model-paths-config", "Load one or more extra_model_paths.yaml files.", kind="append-list",
         metavar="PATH"),
    Flag("--output-directory", "Output directory (default: <base>/output).", kind="value"),
    Flag("--input-directory", "Input directory (default: <base>/input).", kind="value"),
    Flag("--temp-directory", "Parent of the temp directory (default: <base>).", kind="value"),
    Flag("--user-directory", "User directory (default: <base>/user).", kind="value"),
    Flag("--disable-all-custom-nodes", "Load no custom node packs."),
    Flag("--whitelist-custom-nodes", "With --disable-all-custom-nodes, still load these packs.", kind="list",
         default=()),
    Flag("--disable-api-nodes", "No API nodes are shipped; accepted for compatibility.", applies=False),
    # execution
    Flag("--cache-classic", "Classic cache: keep only results the current prompt can reuse (default)."),
    Flag("--cache-lru", "Keep up to N node results across prompts (least recently used dropped).",
         kind="value", type=int, default=0, metavar="N"),
    Flag("--cache-none", "Reuse nothing between prompts; free results as soon as consumers ran."),
    Flag("--max-queue-size", "Most pending prompts; beyond it POST /prompt and /ready answer 503 "
         "(0 = unbounded).", kind="value", type=int, default=100),
    Flag("--warmup", "When node packs load: lazy (first prompt), background (right after listening), "
         "eager (before listening).", kind="value", default="background", choices=WARMUP_MODES),
    Flag("--catalog-path", "Node catalogue snapshot file (default: <base>/.comfy-serverless/catalog.json).",
         kind="value"),
    # a ComfyUI installation behind this server (comfy_serverless/backend/)
    Flag("--comfyui", "A ComfyUI checkout to run as a second execution backend for prompts with nodes this server "
         "does not have (a child process on a private loopback port).", kind="value", metavar="DIR"),
    Flag("--comfyui-python", "The Python interpreter for --comfyui (default: DIR/.venv or DIR/venv, else "
         "python3 on PATH).", kind="value", metavar="PATH"),
    Flag("--comfyui-url", "Use a ComfyUI that is already running at this URL as the backend instead of "
         "starting one.", kind="value", metavar="URL"),
    Flag("--comfyui-args", "Extra arguments for the ComfyUI child, one string (e.g. '--cpu').", kind="value",
         default="", metavar="ARGS"),
    Flag("--prefer-comfyui", "A node both this server and the ComfyUI backend have runs on the backend "
         "(default: natively)."),
    Flag("--comfyui-boot-timeout", "Seconds the ComfyUI backend may take to answer after it is started.",
         kind="value", type=float, default=300.0),
    Flag("--disable-metadata", "Do not embed the prompt and workflow in saved PNG files."),
    Flag("--preview-method", "Latent previews over the WebSocket; auto and taesd use latent2rgb (taesd needs "
         "weights this server does not ship).", kind="value", default="none",
         choices=("none", "auto", "latent2rgb", "taesd")),
    Flag("--preview-size", "Largest side of preview images.", kind="value", type=int, default=512),
    Flag("--default-hashing-function", "Hash for upload duplicate detection.", kind="value",
         default="sha256", choices=("md5", "sha1", "sha256", "sha512")),
    # logging
    Flag("--verbose", "Log level (bare flag: DEBUG).", kind="optional-value", default="INFO", const="DEBUG",
         choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), metavar="LEVEL"),
    Flag("--log-stdout", "Log to stdout instead of stderr."),
    Flag("--log-format", "text, or json: one JSON object per line (with prompt_id while a prompt runs).",
         kind="value", default="text", choices=("text", "json")),
    Flag("--shutdown-grace", "Seconds SIGTERM waits for queued and running prompts before interrupting them.",
         kind="value", type=float, default=30.0),
    # compute (CPU server: precision flags are honoured by the model packs)
    Flag("--cpu", "Run on the CPU (always true for this server)."),
    Flag("--cpu-vae", "The VAE always runs on the CPU here; accepted for compatibility.", applies=False),
    Flag("--force-fp32", "Compute in fp32."),
    Flag("--force-fp16", "Compute in fp16 (slow on most CPUs)."),
    Flag("--fp16-vae", "Run the VAE in fp16 (very slow on most CPUs)."),
    Flag("--fp32-vae", "Run the VAE in fp32."),
    Flag("--bf16-vae", "Run the VAE in bf16."),
    Flag("--bf16-unet", "Run the diffusion model in bf16."),
    Flag("--fp16-unet", "Run the diffusion model in fp16."),
    Flag("--fp32-unet", "Run the diffusion model in fp32."),
    Flag("--fp16-text-enc", "Run text encoders in fp16."),
    Flag("--fp32-text-enc", "Run text encoders in fp32."),
    Flag("--bf16-text-enc", "Run text encoders in bf16."),
    Flag("--disable-smart-memory", "Unload models after every prompt instead of keeping them loaded."),
    Flag("--reserve-ram", "RAM in GB to keep free when caching loaded models.", kind="value", type=float,
         default=None),
    Flag("--deterministic", "Ask torch for deterministic algorithms."),
    Flag("--fast", "Enable untested optimisations (GPU-oriented; logged).", kind="list", default=None,
         applies=False),
    # GPU-only flags, accepted so existing launch scripts keep working
    _gpu("--cuda-device", kind="value", type=int),
    _gpu("--default-device", kind="value", type=int),
    _gpu("--cuda-malloc"), _gpu("--disable-cuda-malloc"),
    _gpu("--fp64-unet"), _gpu("--fp8_e4m3fn-unet"), _gpu("--fp8_e5m2-unet"), _gpu("--fp8_e8m0fnu-unet"),
    _gpu("--fp8_e4m3fn-text-enc"), _gpu("--fp8_e5m2-text-enc"),
    _gpu("--force-channels-last"),
    _gpu("--directml", kind="optional-value", type=int, const=-1),
    _gpu("--oneapi-device-selector", kind="value"),
    _gpu("--disable-ipex-optimize"), _gpu("--supports-fp8-compute"),
    _gpu("--use-split-cross-attention"), _gpu("--use-quad-cross-attention"),
    _gpu("--use-pytorch-cross-attention"), _gpu("--use-sage-attention"), _gpu("--use-flash-attention"),
    _gpu("--disable-xformers"), _gpu("--force-upcast-attention"), _gpu("--dont-upcast-attention"),
    _gpu("--gpu-only"), _gpu("--highvram"), _gpu("--normalvram"), _gpu("--lowvram"), _gpu("--novram"),
    _gpu("--reserve-vram", kind="value", type=float),
    _gpu("--async-offload"), _gpu("--disable-pinned-memory"), _gpu("--mmap-torch-files"),
    _gpu("--disable-mmap"),
    # frontend and desktop flags (no frontend here)
    Flag("--auto-launch", "No web frontend; accepted for compatibility.", applies=False),
    Flag("--disable-auto-launch", "No web frontend; accepted for compatibility.", applies=False),
    Flag("--front-end-version", "No web frontend; accepted for compatibility.", kind="value", applies=False),
    Flag("--front-end-root", "No web frontend; accepted for compatibility.", kind="value", applies=False),
    Flag("--windows-standalone-build", "Accepted for compatibility.", applies=False),
    Flag("--quick-test-for-ci", "Accepted for compatibility.", applies=False),
    Flag("--comfy-api-base", "No API nodes; accepted for compatibility.", kind="value", applies=False),
    Flag("--database-url", "No database layer; accepted for compatibility.", kind="value", applies=False),
)


class FrozenSettingsError(AttributeError):
    """Settings never change once a server has them."""


class Settings:
    """Parsed settings: one typed attribute per flag of FLAGS (same name as the flag's dest; a test keeps the
    two in step), plus the resolved paths and values derived from them. Frozen: a server's settings never change.

    A plain class rather than a frozen dataclass: the dataclass decorator generates code for 100+ fields at
    import, measured at 4.5 ms of the front's start here, against nothing for this.
    """

    listen: str
    port: int
    tls_keyfile: str | None
    tls_certfile: str | None
    enable_cors_header: str | None
    max_upload_size: float
    max_header_size: int
    max_header_count: int
    header_timeout: float
    body_timeout: float
    keep_alive_timeout: float
    max_connections: int
    max_json_depth: int
    ws_max_message_size: float
    ws_max_send_buffer: float
    ws_ping_interval: float
    ws_ping_timeout: float
    worker_stall_timeout: float
    allow_external_symlinks: bool
    enable_compress_response_body: bool
    dont_print_server: bool
    multi_user: bool
    base_directory: str | None
    extra_model_paths_config: tuple[str, ...] | None
    output_directory: str | None
    input_directory: str | None
    temp_directory: str | None
    user_directory: str | None
    disable_all_custom_nodes: bool
    whitelist_custom_nodes: tuple[str, ...] | None
    disable_api_nodes: bool
    cache_classic: bool
    cache_lru: int
    cache_none: bool
    max_queue_size: int
    warmup: str
    catalog_path: str | None
    comfyui: str | None
    comfyui_python: str | None
    comfyui_url: str | None
    comfyui_args: str
    prefer_comfyui: bool
    comfyui_boot_timeout: float
    disable_metadata: bool
    preview_method: str
    preview_size: int
    default_hashing_function: str
    verbose: str
    log_stdout: bool
    log_format: str
    shutdown_grace: float
    cpu: bool
    cpu_vae: bool
    force_fp32: bool
    force_fp16: bool
    fp16_vae: bool
    fp32_vae: bool
    bf16_vae: bool
    bf16_unet: bool
    fp16_unet: bool
    fp32_unet: bool
    fp16_text_enc: bool
    fp32_text_enc: bool
    bf16_text_enc: bool
    disable_smart_memory: bool
    reserve_ram: float | None
    deterministic: bool
    fast: tuple[str, ...] | None
    cuda_device: int | None
    default_device: int | None
    cuda_malloc: bool
    disable_cuda_malloc: bool
    fp64_unet: bool
    fp8_e4m3fn_unet: bool
    fp8_e5m2_unet: bool
    fp8_e8m0fnu_unet: bool
    fp8_e4m3fn_text_enc: bool
    fp8_e5m2_text_enc: bool
    force_channels_last: bool
    directml: int | None
    oneapi_device_selector: str | None
    disable_ipex_optimize: bool
    supports_fp8_compute: bool
    use_split_cross_attention: bool
    use_quad_cross_attention: bool
    use_pytorch_cross_attention: bool
    use_sage_attention: bool
    use_flash_attention: bool
    disable_xformers: bool
    force_upcast_attention: bool
    dont_upcast_attention: bool
    gpu_only: bool
    highvram: bool
    normalvram: bool
    lowvram: bool
    novram: bool
    reserve_vram: float | None
    async_offload: bool
    disable_pinned_memory: bool
    mmap_torch_files: bool
    disable_mmap: bool
    auto_launch: bool
    disable_auto_launch: bool
    front_end_version: str | None
    front_end_root: str | None
    windows_standalone_build: bool
    quick_test_for_ci: bool
    comfy_api_base: str | None
    database_url: str | None
    explicitly_set: frozenset  # dests given on the command line or in the environment
    ignored_arguments: tuple  # unknown arguments, logged and ignored

    def __init__(self, **values: Any):
        values.setdefault("explicitly_set", frozenset())
        values.setdefault("ignored_arguments", ())
        names = field_names()
        if values.keys() != names:
            unknown, missing = sorted(values.keys() - names), sorted(names - values.keys())
            raise TypeError(f"settings: unknown {unknown}, missing {missing}")
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenSettingsError(f"settings are frozen: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenSettingsError(f"settings are frozen: cannot delete {name!r}")

    def __repr__(self) -> str:
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items())})"

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in field_names()}

    def replace(self, **changes: Any) -> "Settings":
        """A copy with some values changed."""
        return Settings(**{**self.as_dict(), **changes})

    @property
    def base_dir(self) -> str:
        return os.path.abspath(self.base_directory or os.getcwd())

    def _under_base(self, given: str | None, default_leaf: str) -> str:
        return os.path.abspath(given) if given else os.path.join(self.base_dir, default_leaf)

    @property
    def output_dir(self) -> str:
        return self._under_base(self.output_directory, "output")

    @property
    def input_dir(self) -> str:
        return self._under_base(self.input_directory, "input")

    @property
    def temp_dir(self) -> str:
        """--temp-directory names the parent, as in ComfyUI."""
        parent = self.temp_directory
        return os.path.join(os.path.abspath(parent) if parent else self.base_dir, "temp")

    @property
    def user_dir(self) -> str:
        return self._under_base(self.user_directory, "user")

    @property
    def catalog_file(self) -> str:
        return self._under_base(self.catalog_path, os.path.join(".comfy-serverless", "catalog.json"))

    @property
    def backend_configured(self) -> bool:
        """True when a ComfyUI backend is configured (--comfyui or --comfyui-url)."""
        return bool(self.comfyui or self.comfyui_url)

    @property
    def cache_mode(self) -> str:
        if self.cache_none:
            return "none"
        if (self.cache_lru or 0) > 0:
            return "lru"
        return "classic"

    @property
    def max_upload_bytes(self) -> int:
        return int(round(self.max_upload_size * 1024 * 1024))

    @property
    def listen_addresses(self) -> list[str]:
        return [a.strip() for a in str(self.listen).split(",") if a.strip()]

    def not_applicable_flags(self) -> list[str]:
        return [f.name for f in FLAGS if not f.applies and f.dest in self.explicitly_set]


def field_names() -> frozenset[str]:
    """Every setting's name: one per flag, plus explicitly_set and ignored_arguments."""
    return _FIELD_NAMES


_FIELD_NAMES = frozenset(Settings.__annotations__)


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server (ComfyUI-compatible; each flag also reads COMFY_<FLAG>)")
    for flag in FLAGS:
        help_text = f"{flag.help} [env {flag.env_name}]"
        common: dict[str, Any] = {"dest": flag.dest, "help": help_text}
        if flag.metavar:
            common["metavar"] = flag.metavar
        if flag.kind == "switch":
            group.add_argument(flag.name, action="store_true", default=False, **common)
        elif flag.kind == "value":
            group.add_argument(flag.name, type=flag.type, default=flag.default, choices=flag.choices, **common)
        elif flag.kind == "optional-value":
            group.add_argument(flag.name, nargs="?", type=flag.type, default=flag.default, const=flag.const,
                               choices=flag.choices, **common)
        elif flag.kind == "list":
            group.add_argument(flag.name, nargs="*", default=flag.default, **common)
        elif flag.kind == "append-list":
            group.add_argument(flag.name, nargs="+", action="append", default=None, **common)


def env_value(flag: Flag, raw: str):
    """Converts an environment string the way the command line would."""
    if flag.kind == "switch":
        return raw.strip().lower() in TRUE_WORDS
    if flag.kind in ("list", "append-list"):
        items = [p for p in raw.replace(",", " ").split() if p]
        return [items] if flag.kind == "append-list" else items
    value = flag.type(raw)
    if flag.choices and value not in flag.choices:
        raise ValueError(f"{flag.env_name}={raw!r}: must be one of {', '.join(map(str, flag.choices))}")
    return value


def settings_from(namespace: argparse.Namespace, argv: list[str], environ: dict,
                  ignored: tuple = ()) -> Settings:
    values = dict(vars(namespace))
    given_on_command_line = {f.dest for f in FLAGS if any(a == f.name or a.startswith(f.name + "=")
                                                          for a in argv)}
    explicitly = set(given_on_command_line)
    for flag in FLAGS:
        raw = environ.get(flag.env_name)
        if raw is None or flag.dest in given_on_command_line:
            continue
        values[flag.dest] = env_value(flag, raw)
        explicitly.add(flag.dest)
    if values.get("extra_model_paths_config"):
        values["extra_model_paths_config"] = [p for group in values["extra_model_paths_config"] for p in group]
    for flag in FLAGS:  # lists become tuples: the settings are immutable
        if flag.kind in ("list", "append-list") and values.get(flag.dest) is not None:
            values[flag.dest] = tuple(values[flag.dest])
    values["verbose"] = str(values.get("verbose") or "INFO").upper()
    return Settings(**values, explicitly_set=frozenset(explicitly), ignored_arguments=tuple(ignored))


def default_settings(**overrides) -> Settings:
    """Settings with every default, for tools and tests that run without a command line."""
    parser = argparse.ArgumentParser(add_help=False)
    add_flags(parser)
    return settings_from(parser.parse_args([]), [], {}).replace(**overrides)


def current() -> Settings:
    """The running server's settings (node packs read flags such as --disable-metadata here)."""
    from . import context

    return context.current().settings
