"""Every server setting in one place: flag, environment variable, default, help.

ComfyUI's launch flags are all accepted so that existing launch scripts keep working. Flags that only
matter on a GPU (or for the web frontend) are parsed, then logged as not applicable. Every flag can also be
set through the environment as ``COMFY_<FLAG>`` (``--cache-lru`` -> ``COMFY_CACHE_LRU``), because container
platforms configure through the environment. Precedence: command line, then environment, then default.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

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


@dataclass
class Settings:
    """Parsed settings. ``values`` holds every flag by dest; the properties resolve derived paths."""

    values: dict = field(default_factory=dict)
    explicitly_set: frozenset = frozenset()
    ignored_arguments: tuple = ()

    def __getattr__(self, name: str):
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def base_directory(self) -> str:
        return os.path.abspath(self.values.get("base_directory") or os.getcwd())

    def _under_base(self, dest: str, default_leaf: str) -> str:
        given = self.values.get(dest)
        return os.path.abspath(given) if given else os.path.join(self.base_directory, default_leaf)

    @property
    def output_directory(self) -> str:
        return self._under_base("output_directory", "output")

    @property
    def input_directory(self) -> str:
        return self._under_base("input_directory", "input")

    @property
    def temp_directory(self) -> str:
        parent = self.values.get("temp_directory")
        return os.path.join(os.path.abspath(parent) if parent else self.base_directory, "temp")

    @property
    def user_directory(self) -> str:
        return self._under_base("user_directory", "user")

    @property
    def catalog_path(self) -> str:
        return self._under_base("catalog_path", os.path.join(".comfy-serverless", "catalog.json"))

    @property
    def cache_mode(self) -> str:
        if self.values.get("cache_none"):
            return "none"
        if (self.values.get("cache_lru") or 0) > 0:
            return "lru"
        return "classic"

    @property
    def max_upload_bytes(self) -> int:
        return int(round(self.values["max_upload_size"] * 1024 * 1024))

    @property
    def listen_addresses(self) -> list[str]:
        return [a.strip() for a in str(self.values["listen"]).split(",") if a.strip()]

    def not_applicable_flags(self) -> list[str]:
        return [f.name for f in FLAGS if not f.applies and f.dest in self.explicitly_set]


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server (ComfyUI-compatible; each flag also reads COMFY_<FLAG>)")
    for flag in FLAGS:
        help_text = f"{flag.help} [env {flag.env_name}]"
        common = {"dest": flag.dest, "help": help_text}
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
    values["verbose"] = str(values.get("verbose") or "INFO").upper()
    return Settings(values=values, explicitly_set=frozenset(explicitly), ignored_arguments=tuple(ignored))


def default_settings(**overrides) -> Settings:
    """Settings with every default, for tools and tests that run without a command line."""
    parser = argparse.ArgumentParser(add_help=False)
    add_flags(parser)
    settings = settings_from(parser.parse_args([]), [], {})
    settings.values.update(overrides)
    return settings


def current() -> Settings:
    """The running server's settings (node packs read flags such as --disable-metadata here)."""
    from . import context

    return context.current().settings
