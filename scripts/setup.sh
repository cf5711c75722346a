#!/usr/bin/env bash
# Install everything vmbuild needs on a fresh Debian 12 machine (run as root), then the Python
# package and its development tools into ./.venv. Safe to run again: it skips what is there.
# The venv is made from Debian's /usr/bin/python3, never from whatever `python3` is first on
# root's PATH (on the development machines that is pyenv's, inside /root): a venv points at
# its interpreter, so only a system Python gives a .venv that other users can run.
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM_PACKAGES=(
  packer                      # the image builder (Debian's 1.6.6 has qemu + shell-local built in)
  qemu-system-x86 qemu-utils  # build boots, validation boots, the runner's QEMU backend
  ovmf                        # UEFI firmware for firmware: efi
  mmdebstrap                  # the minimal Debian root filesystem of the base stage
  grub-pc-bin grub-efi-amd64-bin grub2-common  # boot loaders written into the disk
  e2fsprogs dosfstools mtools fdisk            # filesystems and partitions, without loop devices
  uidmap                      # newuidmap/newgidmap: base images built without root (user namespace)
  zstd                        # compressed VM state in checkpoints (the runner falls back to none)
  openssh-client              # per-build SSH keys; Ansible's transport
  slurmctld slurmd slurm-client munge  # the real one-node Slurm cluster of tests/slurm_cluster.py
  # the real one-machine HTCondor pool of tests/condor_pool.py: the prebuilt 25.0 tarball in
  # ../shared/htcondor links these besides libc/libstdc++ (condor_urlfetch alone wants libcurl4;
  # the pool does not run it); xz unpacks the tarball
  libgomp1 libpcre2-8-0 libssl3 libuuid1 xz-utils
  python3 python3-venv python3-dev
)

missing=()
for pkg in "${SYSTEM_PACKAGES[@]}"; do
  dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: missing system packages (${missing[*]}); run this script as root" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}" >&2
  apt-get update -qq || echo "setup: apt-get update reported errors; trying the install anyway" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

PYTHON=/usr/bin/python3
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
elif ! grep -qx "home = $(dirname "$PYTHON")" .venv/pyvenv.cfg 2>/dev/null; then
  # Not removed here: someone may be using it. Say how to remake it.
  echo "setup: .venv was not made from $PYTHON ($(grep '^home' .venv/pyvenv.cfg 2>/dev/null));" \
       "other users cannot run it: rm -rf .venv and run this again to remake it" >&2
fi
.venv/bin/python -m pip install -q --upgrade pip >&2
.venv/bin/python -m pip install -q -e '.[dev]' >&2
echo "setup: ready (.venv/bin/vmbuild)" >&2
