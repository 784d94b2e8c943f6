"""Side by side with ComfyUI (issue 12): time to the first image from a cold start, alternating fresh processes.

    .venv/bin/python benchmarks/compare_comfyui.py --comfyui /path/to/ComfyUI --comfyui-python /path/venv/bin/python \
        [--runs 5] [--size 256] [--steps 4] [--paired-warm N] [--isa native|avx2|avx512] [--json out.json]

Both servers get the default txt2img workflow (256x256, 4 steps, euler / normal, cfg 7) on the same full-size
SD1.5-architecture checkpoint with random weights (benchmarks/first_image.py makes it, 2.1 GB fp16). Each run
spawns a fresh process as a user would: ComfyUI with plain `--cpu` (its best configuration, BENCHMARKS.md),
comfy-serverless with its defaults, runs alternating A, B, A, B. Build-time steps are done before the clock
starts and not counted, as an image build would: comfy-serverless `snapshot` and `prepare` (the prepared
weights, once per checkpoint and CPU class, under benchmarks/.cache/prepared, with the UNet's weights packed for
--size). Figures per run: spawn to the
first HTTP answer, spawn to the image file (cold), POST to done of that first prompt, POST to done of a second
prompt with a new seed (warm), peak RSS (VmHWM). The table shows medians and the ratio ours / ComfyUI.
This machine's speed drifts by up to 3x within a minute, so warm runs minutes apart compare different phases:
--paired-warm N then starts both servers side by side and sends N warm prompts alternately to each (one runs
while the other idles), and prints the ratio of each adjacent pair.

ComfyUI needs torchvision at import time (spandrel, a few model files), and PyPI's torchvision wheel is a CUDA
build that fails to import beside the CPU torch. For this benchmark only, ComfyUI's process gets a stand-in
`torchvision` package on PYTHONPATH (written to a temporary folder, see TORCHVISION_STAND_IN): any attribute
imports, any call raises. Nothing in the SD1.5 txt2img path calls torchvision, so the workflow runs as usual;
the model files and nodes that would call it are simply never used here.

ComfyUI's environment, as set up for the README's figures: a venv, `pip install torch==2.13.0`, then its
requirements.txt without torch, torchvision and torchaudio; its other requirements (kornia, spandrel) pull
torchvision and a CUDA torch 2.14.1 back in, so end with `pip install torch==2.13.0 requests` (0.3.64 imports
requests without listing it) and `pip uninstall torchvision`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from coldstart import free_port  # run as a script: benchmarks/ is on sys.path
from first_image import CACHE, CHECKPOINT, VENV_BIN, ensure_checkpoint, peak_rss_mb, run_prompt, wait_for_file
from first_image import workflow as txt2img
from machine import describe as describe_machine
from machine import precision_line

PREPARED = CACHE / "prepared"
# Other CPU classes stood in for by capping the instruction set torch (ATen kernels), oneDNN (convolutions,
# packed matmuls) and MKL (torch's fp32 matrix products: stock linears, attention, Winograd products) may use; bf16
# is then emulated exactly as on such a CPU: "avx2" an AVX2-only one (bf16 at 1.5 GFLOP/s here), "avx512" one with
# AVX-512 and VNNI but no bf16 (Cascade Lake, as in many cloud VMs). Before 2026-12-02 MKL was not capped, so its
# products ran AVX-512 code under "avx2" (Winograd F(2x2) 2x320->320 at 32x32: 9.0 ms, 12.8 with MKL capped).
ISA_CAPS = {"native": {},
            "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
            "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI",
                       "MKL_ENABLE_INSTRUCTIONS": "AVX512"}}

TORCHVISION_STAND_IN = '''"""Stand-in torchvision (benchmarks/compare_comfyui.py only): imports succeed, use raises."""
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+benchmark-stand-in"
__path__ = []


class _Missing:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(self._name + "." + attr)

    def __call__(self, *args, **kwargs):
        raise RuntimeError(self._name + ": torchvision is not installed (benchmark stand-in)")

    def __mro_entries__(self, bases):
        return (object,)


def __getattr__(attr):
    if attr.startswith("__"):
        raise AttributeError(attr)
    return _Missing("torchvision." + attr)


class _Module(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(self.__name__ + "." + attr)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Module(spec.name)

    def exec_module(self, module):
        module.__path__ = []


sys.meta_path.insert(0, _Finder())
'''

FIGURES = (("spawn to first answer", "ready_s", "s"), ("spawn to image file (cold)", "cold_image_s", "s"),
           ("POST to done, first prompt", "first_prompt_s", "s"), ("POST to done, warm, new seed", "warm_s", "s"),
           ("peak RSS", "peak_rss_gb", "GB"))


def write_stand_in(folder: Path) -> Path:
    package = folder / "torchvision"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(TORCHVISION_STAND_IN)
    return folder


def base_with_checkpoint(checkpoint: Path, prefix: str) -> Path:
    base = Path(tempfile.mkdtemp(prefix=prefix))
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / CHECKPOINT).symlink_to(checkpoint)
    return base


def ours_build(checkpoint: Path, size: int) -> tuple[list[str], dict, Path]:
    """comfy-serverless's build steps (not timed), then its serve command line. `prepare` packs the UNet's weights
    for the size served (--pack-size), as a deployment serving that size would."""
    base = base_with_checkpoint(checkpoint, "compare-ours-")
    env = {**os.environ, "COMFY_PREPARED_DIR": str(PREPARED)}
    quiet = ["--base-directory", str(base), "--verbose", "WARNING"]
    subprocess.run([str(VENV_BIN / "comfy-serverless"), "snapshot", *quiet], check=True, cwd=base, env=env)
    subprocess.run([str(VENV_BIN / "python"), "-m", "comfy_serverless.prepare_command", *quiet,
                    "--pack-size", str(size)], check=True, cwd=base, env=env)
    return [str(VENV_BIN / "comfy-serverless"), "serve", "--base-directory", str(base), "--dont-print-server",
            "--port"], env, base


def comfyui_build(checkpoint: Path, comfyui: Path, python: str, stand_in: Path) -> tuple[list[str], dict, Path]:
    base = base_with_checkpoint(checkpoint, "compare-comfyui-")
    (base / "custom_nodes").mkdir()  # ComfyUI lists it before anything else
    env = {**os.environ, "PYTHONPATH": str(stand_in), "CUDA_VISIBLE_DEVICES": ""}
    return [python, str(comfyui / "main.py"), "--listen", "127.0.0.1", "--cpu", "--base-directory", str(base),
            "--database-url", f"sqlite:///{base / 'comfyui.db'}", "--dont-print-server", "--port"], env, base


class Server:
    """One server process, spawned as a user starts it; `stop()` ends it."""

    def __init__(self, command: list[str], env: dict, base: Path):
        self.port = free_port()
        self.log = open(base / "server.log", "wb")
        self.spawned = time.perf_counter()
        self.wall_start = time.time()
        self.proc = subprocess.Popen([*command, str(self.port)], cwd=base, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.base = base

    def wait_ready(self) -> float:
        """Seconds from the spawn to its first HTTP answer."""
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); log: {self.base / 'server.log'}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/system_stats", timeout=1).read()
                return time.perf_counter() - self.spawned
            except OSError:
                time.sleep(0.005)

    def prompt_s(self, seed: int, size: int, steps: int) -> float:
        """POST to done of the txt2img workflow with this seed."""
        start = time.perf_counter()
        times = run_prompt(self.port, txt2img(seed, size, steps), self.spawned)
        return times["done"] - (start - self.spawned)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def one_run(command: list[str], env: dict, base: Path, seed: int, size: int, steps: int) -> dict:
    server = Server(command, env, base)
    try:
        ready = server.wait_ready()
        cold = run_prompt(server.port, txt2img(seed, size, steps), server.spawned)
        image_at = wait_for_file(base / "output", server.wall_start, server.spawned)
        return {"ready_s": ready, "cold_image_s": image_at, "first_prompt_s": cold["done"] - cold["posted"],
                "warm_s": server.prompt_s(seed + 1, size, steps), "peak_rss_gb": peak_rss_mb(server.proc.pid) / 1024}
    finally:
        server.stop()


def paired_warm(builds: dict, prompts: int, size: int, steps: int) -> dict[str, list[float]]:
    """Warm POST-to-done times with both servers running at once, prompts alternating between them (each runs
    alone: the other waits idle), so that each pair meets the machine in the same phase of its speed drift. The
    first prompt of each (the cold one) is not counted."""
    servers = {name: Server(*build) for name, build in builds.items()}
    try:
        for server in servers.values():
            server.wait_ready()
            server.prompt_s(2000, size, steps)
        times: dict[str, list[float]] = {name: [] for name in servers}
        for index in range(prompts):
            for name, server in servers.items():
                times[name].append(server.prompt_s(2001 + index, size, steps))
            print(f"paired warm {index + 1}: " + ", ".join(f"{name} {values[-1]:.2f} s" for name, values in
                                                          times.items()), flush=True)
        return times
    finally:
        for server in servers.values():
            server.stop()


def print_paired(times: dict[str, list[float]]) -> None:
    ratios = sorted(ours / theirs for ours, theirs in zip(times["ours"], times["comfyui"]))
    print(f"\npaired warm, {len(ratios)} alternating prompts to two running servers: ComfyUI median "
          f"{statistics.median(times['comfyui']):.2f} s, ours {statistics.median(times['ours']):.2f} s; ratio per "
          f"pair median {statistics.median(ratios):.2f} (range {ratios[0]:.2f}-{ratios[-1]:.2f})", flush=True)


def import_torch_s(python: str) -> float:
    start = time.perf_counter()
    subprocess.run([python, "-c", "import torch"], check=True)
    return time.perf_counter() - start


def torch_facts() -> str:
    code = ("import torch; print(torch.__version__, torch.backends.cpu.get_cpu_capability(), "
            "'oneDNN bf16' if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 'no oneDNN bf16')")
    return subprocess.run([str(VENV_BIN / "python"), "-c", code], capture_output=True, text=True).stdout.strip()


def chosen_precision(log: str) -> str:
    for line in log.splitlines():
        if "precision: default compute dtype" in line:
            return line.split("precision: ", 1)[1]
    return "set by flags"


def print_table(results: dict, precision: str, args) -> None:
    runs = len(results["ours"])
    print(f"\n{describe_machine()}; load average now: {os.getloadavg()}")
    print(f"comfy-serverless {precision}")
    print(f"default txt2img {args.size}x{args.size}, {args.steps} steps, euler, cfg 7, full-size SD1.5 random "
          f"weights; medians of {runs} alternating fresh-process runs\n")
    print("| figure | ComfyUI 0.3.64 `--cpu` | comfy-serverless | ratio |\n|---|---|---|---|")
    for label, key, unit in FIGURES:
        theirs = statistics.median(r[key] for r in results["comfyui"])
        ours = statistics.median(r[key] for r in results["ours"])
        print(f"| {label} | {theirs:.2f} {unit} | {ours:.2f} {unit} | {ours / theirs:.2f} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", required=True, type=Path, help="a ComfyUI checkout (0.3.64)")
    parser.add_argument("--comfyui-python", required=True, help="the Python of ComfyUI's own environment")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json")
    parser.add_argument("--paired-warm", type=int, default=0, metavar="N",
                        help="then N warm prompts to both servers running at once, alternating: a warm ratio per "
                             "pair, which the machine's speed drift moves less than one across separate runs")
    parser.add_argument("--isa", choices=tuple(ISA_CAPS), default="native",
                        help="cap torch, oneDNN and MKL in both servers (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, "
                             "MKL_ENABLE_INSTRUCTIONS): avx2 "
                             "stands in for an AVX2-only CPU, avx512 for one with AVX-512 but no bf16")
    args = parser.parse_args()
    os.environ.update(ISA_CAPS[args.isa])  # inherited by every process started below
    print(describe_machine(), flush=True)
    print(f"torch: {torch_facts()}; {precision_line(str(VENV_BIN / 'python'))}", flush=True)
    print(f"load average before: {os.getloadavg()}", flush=True)
    torch_import = {"comfyui": import_torch_s(args.comfyui_python), "ours": import_torch_s(str(VENV_BIN / "python"))}
    print(f"python -c 'import torch': ComfyUI's environment {torch_import['comfyui']:.2f} s, ours "
          f"{torch_import['ours']:.2f} s", flush=True)
    checkpoint = ensure_checkpoint()
    stand_in = write_stand_in(Path(tempfile.mkdtemp(prefix="torchvision-stand-in-")))
    results: dict[str, list[dict]] = {"comfyui": [], "ours": []}
    precision = "?"
    for index in range(args.runs):
        for name in ("comfyui", "ours"):
            if name == "ours":
                command, env, base = ours_build(checkpoint, args.size)
            else:
                command, env, base = comfyui_build(checkpoint, args.comfyui, args.comfyui_python, stand_in)
            try:
                run = one_run(command, env, base, 1000 + index, args.size, args.steps)
                if name == "ours":
                    precision = chosen_precision((base / "server.log").read_text(errors="replace"))
            finally:
                shutil.rmtree(base, ignore_errors=True)
            results[name].append(run)
            print(f"run {index + 1} {name}: " + ", ".join(f"{key} {value:.2f}" for key, value in run.items()),
                  flush=True)
        print_table(results, precision, args)  # after every pair: a cut-short run still leaves a table
    paired: dict[str, list[float]] = {}
    if args.paired_warm:
        builds = {"comfyui": comfyui_build(checkpoint, args.comfyui, args.comfyui_python, stand_in),
                  "ours": ours_build(checkpoint, args.size)}
        try:
            paired = paired_warm(builds, args.paired_warm, args.size, args.steps)
        finally:
            for _, _, base in builds.values():
                shutil.rmtree(base, ignore_errors=True)
        print_paired(paired)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": describe_machine(), "precision": precision,
                                               "results": results, "paired_warm_s": paired,
                                               "torch_import_s": torch_import}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
