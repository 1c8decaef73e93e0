#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: system packages the integration tests start
# (Slurm, munge, nginx, an sshd for the Ray cluster launcher's on-prem provider, with the rsync and nc
# that launcher uses), a virtualenv with the CPU build of torch, and this project.
# Re-running it is cheap: every step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(slurm-wlm munge nginx-light openssh-server openssh-client rsync netcat-openbsd)
VENV=${SPEEDRUN_VENV:-.venv}
TORCH_CPU=torch==2.13.0   # the CPU build, installed from a local file on this kind of machine

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  echo "bootstrap: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "bootstrap: installing $TORCH_CPU"
  "$PY" -m pip install -q "$TORCH_CPU"
fi
stamp="$VENV/.speedrun-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing speedrun[dev] into $VENV"
  "$PY" -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
