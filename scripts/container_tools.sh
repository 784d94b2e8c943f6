#!/usr/bin/env bash
# Installs what the container tests and benchmark need (podman with runc, debootstrap) and writes the
# containers.conf they use. Idempotent and fast when everything is there. Needs root (apt-get) on Debian.
#
#   scripts/container_tools.sh            install if missing, write the config, print its path
#   export CONTAINERS_CONF=$(scripts/container_tools.sh --conf-path)
#
# Why a containers.conf of our own: crun refuses this machine class's hybrid cgroup layout (runc works), and
# the default ulimits podman passes (nofile above 1024) are refused here too.
set -euo pipefail

conf_dir="${COMFY_CONTAINERS_CONF_DIR:-/etc/containers/comfy-serverless}"
conf_path="$conf_dir/containers.conf"

if [ "${1:-}" = "--conf-path" ]; then
  echo "$conf_path"
  exit 0
fi

packages=(podman runc debootstrap iptables uidmap containernetworking-plugins netavark aardvark-dns
          ca-certificates)

missing=()
for tool in podman runc debootstrap iptables; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done

if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "container_tools: missing ${missing[*]}; install podman, runc and debootstrap (needs root on Debian)" >&2
    exit 1
  fi
  echo "container_tools: installing ${packages[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

mkdir -p "$conf_dir"
desired=$(cat <<'EOF'
# Written by scripts/container_tools.sh (comfy-serverless container tests and benchmark).
[containers]
# Podman's default raises nofile/nproc above what this host allows a container.
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
# crun refuses this host's hybrid cgroup v1/v2 layout; runc copes.
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
)
if [ ! -f "$conf_path" ] || [ "$(cat "$conf_path")" != "$desired" ]; then
  printf '%s\n' "$desired" > "$conf_path"
fi
echo "$conf_path"
