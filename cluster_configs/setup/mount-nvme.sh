#!/usr/bin/env bash
# Put the node's local NVMe at MOUNT (default /mnt/nvme): one RAID0 volume over the drives, formatted once.
#   bash mount-nvme.sh [MOUNT]
# Drives: $SPEEDRUN_NVME_DEVICES if set (on-prem: name them; drives holding a filesystem are never
# reformatted), else every EC2 instance-store NVMe ("Amazon EC2 NVMe Instance Storage"; p5.48xlarge
# has 8 x 3.84 TB). Idempotent: an existing mount or array is reused. Instance store is wiped when an
# EC2 instance stops: shards are re-staged and checkpoints live in the store, so nothing is lost.
set -euo pipefail
MOUNT="${1:-/mnt/nvme}"
FS="${SPEEDRUN_NVME_FS:-xfs}"
MD=/dev/md/speedrun-nvme

if mountpoint -q "$MOUNT"; then
    echo "mount-nvme: $MOUNT already mounted"; exit 0
fi
# AWS Deep Learning AMIs already assemble the instance store at /opt/dlami/nvme at boot: reuse it.
if [ -z "${SPEEDRUN_NVME_DEVICES:-}" ] && mountpoint -q /opt/dlami/nvme; then
    sudo mkdir -p "$MOUNT" && sudo mount --bind /opt/dlami/nvme "$MOUNT"
    sudo chown "$(id -u):$(id -g)" "$MOUNT"; echo "mount-nvme: $MOUNT -> /opt/dlami/nvme"; exit 0
fi
if [ -n "${SPEEDRUN_NVME_DEVICES:-}" ]; then
    read -r -a DEVS <<< "$SPEEDRUN_NVME_DEVICES"
else
    mapfile -t DEVS < <(lsblk -dpno NAME,MODEL | awk '/Instance Storage/ {print $1}')
fi
if [ "${#DEVS[@]}" -eq 0 ]; then
    echo "mount-nvme: no NVMe drives found or named; using a directory on the root disk" >&2
    sudo mkdir -p "$MOUNT"; sudo chown "$(id -u):$(id -g)" "$MOUNT"; exit 0
fi
for d in "${DEVS[@]}"; do
    if findmnt -rno TARGET --source "$d" >/dev/null 2>&1; then
        echo "mount-nvme: $d is mounted elsewhere; refusing to touch it" >&2; exit 1
    fi
done

if [ "${#DEVS[@]}" -eq 1 ]; then
    DEV="${DEVS[0]}"
else
    command -v mdadm >/dev/null || sudo apt-get install -y -q mdadm
    sudo mdadm --assemble "$MD" "${DEVS[@]}" 2>/dev/null || true
    if [ ! -e "$MD" ]; then
        for d in "${DEVS[@]}"; do
            if sudo blkid -p "$d" >/dev/null 2>&1; then
                echo "mount-nvme: $d holds data (blkid sees a signature); wipe it yourself if it may go" >&2; exit 1
            fi
        done
        # RAID0: shards and checkpoints are re-creatable; striping gives the read bandwidth of all drives.
        sudo mdadm --create "$MD" --name=speedrun-nvme --level=0 --raid-devices="${#DEVS[@]}" "${DEVS[@]}" --run
    fi
    DEV="$MD"
fi
if ! sudo blkid -p "$DEV" >/dev/null 2>&1; then
    [ "$FS" != xfs ] || command -v mkfs.xfs >/dev/null || sudo apt-get install -y -q xfsprogs
    if [ "$FS" = xfs ]; then sudo mkfs.xfs -q "$DEV"; else sudo mkfs.ext4 -q -E nodiscard -m 0 "$DEV"; fi
fi
sudo mkdir -p "$MOUNT"
sudo mount -o noatime "$DEV" "$MOUNT"
sudo chown "$(id -u):$(id -g)" "$MOUNT"
echo "mount-nvme: ${#DEVS[@]} drive(s) -> $DEV ($FS) at $MOUNT, $(df -h --output=size "$MOUNT" | tail -1 | tr -d ' ') total"
