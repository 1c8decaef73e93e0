#!/usr/bin/env bash
# Install speedrun (with ray and boto3) on a GPU node, into a venv that sees the node's own CUDA torch.
#   bash ~/speedrun/cluster_configs/setup/install.sh [BASE_PYTHON]
# BASE_PYTHON: an interpreter whose site-packages hold a CUDA torch (AWS Deep Learning AMIs: /opt/pytorch/bin/python).
# Idempotent: re-running only re-installs the (editable) project. Never installs torch: pip would pick
# whatever CUDA build it likes, and the node's torch is the one the image was built and tested with.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${SPEEDRUN_VENV:-$HOME/speedrun-venv}"

pick_python() {
    for py in "$@" /opt/pytorch/bin/python python3; do
        [ -n "$py" ] && command -v "$py" >/dev/null 2>&1 && "$py" -c "import torch" 2>/dev/null && { echo "$py"; return 0; }
    done
    return 1
}
BASE="$(pick_python "${1:-}")" || {
    echo "install.sh: no python with torch found (tried ${1:-} /opt/pytorch/bin/python python3); install a CUDA torch first" >&2
    exit 1
}
if [ ! -x "$VENV/bin/python" ]; then
    "$BASE" -m venv "$VENV"
fi
# torch, triton and the CUDA libraries stay where the image put them. BASE may itself be a venv
# (the Deep Learning AMIs' /opt/pytorch), which --system-site-packages would not reach: a .pth
# file puts its site-packages on our sys.path, after our own.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$BASE" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"]); print(p["platlib"])' | sort -u \
    > "$SITE/speedrun-base-python.pth"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e "${REPO}[ray,s3,hf]"
"$VENV/bin/python" -c "import torch, ray, orchestrator; print('speedrun ready: torch', torch.__version__, 'cuda', torch.version.cuda, 'ray', ray.__version__, 'gpus', torch.cuda.device_count())"
