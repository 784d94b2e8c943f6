#!/usr/bin/env python3
"""Builds deploy/Dockerfile with podman on a host that reaches no container registry.

The base image is made locally (debootstrap of Debian bookworm, whose python3.11 matches python:3.11-slim's
minor version) and the torch wheel comes from local disk, so only the Python package index is needed.
The container tests and benchmarks use this; it also serves anyone building offline:

    python3 deploy/local_image.py --tag comfy-serverless:local [--target server|runpod] \
        [--torch-wheel /path/torch-2.13.0+cpu-...whl] [--ca-bundle /etc/ssl/certs/ca-certificates.crt]

Needs root, podman, runc and debootstrap (scripts/container_tools.sh installs them and writes the
containers.conf this uses).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE_TAG = "localhost/comfy-serverless-base:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# python3-venv brings python3.11 and ensurepip (the Dockerfile's `python3 -m venv`); ca-certificates lets pip
# verify the package index.
BASE_PACKAGES = "python3-venv,ca-certificates"
# What Debian's slim images leave out, so sizes compare with python:3.11-slim.
BASE_PRUNE = ("var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale",
              "usr/share/info")
TORCH_WHEEL_GLOB = "/opt/wheels/torch-2.13.0*cp311*.whl"
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
CONTEXT_FILES = ("pyproject.toml", "README.md", "deploy/Dockerfile", "deploy/build-extras/README.md")


def podman_env() -> dict:
    """The environment for podman: CONTAINERS_CONF from scripts/container_tools.sh unless already set."""
    env = dict(os.environ)
    if not env.get("CONTAINERS_CONF"):
        script = REPO / "scripts" / "container_tools.sh"
        path = subprocess.run([str(script), "--conf-path"], capture_output=True, text=True).stdout.strip()
        if path and os.path.exists(path):
            env["CONTAINERS_CONF"] = path
    return env


def podman(*args: str, check: bool = True, capture: bool = True, timeout: float | None = None,
           input_bytes: bytes | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], env=podman_env(), capture_output=capture, timeout=timeout,
                            input=input_bytes)
    if check and result.returncode != 0:
        err = result.stderr.decode(errors="replace") if capture else ""
        raise RuntimeError(f"podman {' '.join(args[:3])} ... failed ({result.returncode}):\n{err[-4000:]}")
    return result


def image_exists(tag: str) -> bool:
    return podman("image", "exists", tag, check=False).returncode == 0


def ensure_base_image(tag: str = BASE_TAG, log=print) -> float:
    """Makes the bookworm base image unless it exists; returns the seconds it took (0 when cached)."""
    if image_exists(tag):
        return 0.0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="comfy-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        log(f"debootstrap bookworm -> {rootfs} (about a minute)")
        result = subprocess.run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm",
                                 str(rootfs), DEBIAN_MIRROR], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"debootstrap failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        for relative in BASE_PRUNE:
            target = rootfs / relative
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True, exist_ok=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(["podman", "import", "--change", "CMD=[\"python3\"]", "-", tag],
                                  stdin=tar.stdout, env=podman_env(), capture_output=True)
        tar.stdout.close()
        tar.wait()
        if imported.returncode != 0:
            raise RuntimeError(f"podman import failed:\n{imported.stderr.decode(errors='replace')}")
    return time.monotonic() - started


def find_torch_wheel() -> str | None:
    wheels = sorted(glob.glob(TORCH_WHEEL_GLOB))
    return wheels[-1] if wheels else None


def make_build_context(dest: Path, torch_wheel: str | None = None, ca_bundle: str | None = None) -> dict:
    """A minimal build context (what the Dockerfile copies, nothing else); returns the build arguments."""
    for relative in CONTEXT_FILES:
        (dest / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / relative, dest / relative)
    shutil.copytree(REPO / "comfy_serverless", dest / "comfy_serverless",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    extras = dest / "deploy" / "build-extras"
    build_args = {}
    if torch_wheel:
        target = extras / os.path.basename(torch_wheel)
        try:
            os.link(torch_wheel, target)  # same file system: no 190 MB copy
        except OSError:
            shutil.copy2(torch_wheel, target)
    if ca_bundle:
        shutil.copy2(ca_bundle, extras / "extra-ca.crt")
        build_args["EXTRA_CA_CERT"] = "extra-ca.crt"
    return build_args


def build_image(tag: str, base_image: str = BASE_TAG, target: str | None = None,
                torch_wheel: str | None = None, ca_bundle: str | None = None, log=print,
                timeout: float = 1800, extra_build_args: dict | None = None) -> float:
    """Builds deploy/Dockerfile into `tag`; returns the build's seconds. The output goes to `log`."""
    with tempfile.TemporaryDirectory(prefix="comfy-context-") as tmp:
        context = Path(tmp)
        build_args = {"BASE_IMAGE": base_image, **make_build_context(context, torch_wheel, ca_bundle),
                      **(extra_build_args or {})}
        # docker format: OCI images drop HEALTHCHECK and STOPSIGNAL is kept either way.
        command = ["podman", "build", "--format", "docker", "-f", "deploy/Dockerfile",
                   "-t", tag]
        for key, value in build_args.items():
            command += ["--build-arg", f"{key}={value}"]
        if target:
            command += ["--target", target]
        command.append(str(context))
        started = time.monotonic()
        result = subprocess.run(command, env=podman_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, timeout=timeout)
        seconds = time.monotonic() - started
        if result.returncode != 0:
            raise RuntimeError(f"podman build failed after {seconds:.0f} s:\n{result.stdout[-6000:]}")
        log(result.stdout[-1500:])
        return seconds


def image_size_bytes(tag: str) -> int:
    out = podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.decode().strip()
    return int(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default="localhost/comfy-serverless:local")
    parser.add_argument("--target", help="Dockerfile stage (default: the last, `server`)")
    parser.add_argument("--base-image", default=BASE_TAG, help="made with debootstrap when it is the default")
    parser.add_argument("--torch-wheel", default=find_torch_wheel())
    parser.add_argument("--ca-bundle", default=HOST_CA_BUNDLE if os.path.exists(HOST_CA_BUNDLE) else None)
    args = parser.parse_args()
    if args.base_image == BASE_TAG:
        seconds = ensure_base_image(log=lambda m: print(m, file=sys.stderr))
        print(f"base image {BASE_TAG}: {'made in %.0f s' % seconds if seconds else 'cached'}", file=sys.stderr)
    seconds = build_image(args.tag, args.base_image, args.target, args.torch_wheel, args.ca_bundle,
                          log=lambda m: print(m, file=sys.stderr))
    print(f"built {args.tag} in {seconds:.0f} s, {image_size_bytes(args.tag) / 1e6:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
