#!/usr/bin/env bash
# Install everything vmkit needs on Debian 12, idempotently: Debian packages, a venv with the project,
# and (with --link) the `vmkit` command on PATH. Fast when nothing is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-system-x86 qemu-utils          # the emulator and qemu-img
  qemu-guest-agent                    # its qemu-ga goes into the demo guest
  busybox-static kmod cpio            # demo guest userland, depmod, initramfs packing
  syslinux syslinux-common extlinux   # demo boot disk: boot loader + MBR code; extlinux runs in the installer guest
  isolinux xorriso                    # the demo installer ISO
  dosfstools mtools                   # the boot disk's FAT partition, made inside an image file (no loop device)
  debootstrap                         # `image build debian-12`: a Debian root from the host's mirror
  python3 python3-venv                # the daemon and CLI
  util-linux                          # setpriv: QEMU starts as its VM's own uid, without capabilities
  dnsmasq-base nftables iproute2      # networks: DHCP/DNS per network, vmkit's own nft tables; tests use ip netns
  openvswitch-switch                  # networks --mode ovs: vmkit runs its own ovsdb-server/ovs-vswitchd (userspace datapath)
                                      # (private db/sockets under its run dir; vmkit never uses the system OVS service)
  ca-certificates
  openssl                             # the TCP listener's self-signed TLS pair
  qemu-block-extra libiscsi-bin       # shared pools: QEMU's own NFS (libnfs) and iSCSI (libiscsi) drivers; iscsi-ls lists LUNs
  nfs-ganesha nfs-ganesha-vfs rpcbind # tests only: a userspace NFSv3 server (in a namespace of the test's own)
  tgt                                 # tests only: a userspace iSCSI target (likewise)
  chromium                            # tests/ui only: the web UI driven by Playwright (never its own browser download)
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # vmkit runs its own dnsmasq and Open vSwitch instances: the packages' system services must not start (Open
  # vSwitch's would try to load a kernel module these machines lack, and fail the install). Debian's way to
  # say so is a policy-rc.d answering 101; one is put in place for the install when the machine has none.
  made_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    made_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  if [ -n "$made_policy" ]; then
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT
  fi
fi
# The demo guest's kernel comes from `apt-get download`, which needs package lists.
# (Captured first: `grep -q` closing the pipe early would fail the pipeline under pipefail.)
policy=$(apt-cache policy linux-image-amd64 2>/dev/null || true)
if ! grep -q 'Candidate: [0-9]' <<<"$policy"; then
  apt-get update -q
fi

PY=/usr/bin/python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.vmkit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  # compat mode: a plain .pth path entry, not an import hook that slows every CLI start by ~9 ms
  PYTHONWARNINGS=ignore .venv/bin/pip install -q -e '.[dev]' --config-settings editable_mode=compat
  touch "$stamp"
fi
# The web UI's front-end libraries (xterm.js, noVNC), pinned by vmkit/ui/package-lock.json; the daemon serves
# them at /ui/vendor/, so no page fetches anything from a CDN.
ui_stamp=vmkit/ui/node_modules/.vmkit-installed
if [ ! -f "$ui_stamp" ] || [ vmkit/ui/package-lock.json -nt "$ui_stamp" ]; then
  if ! command -v npm >/dev/null; then
    echo "installing Debian packages: nodejs npm"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nodejs npm
  fi
  (cd vmkit/ui && npm ci --omit=dev --no-audit --no-fund --loglevel=error)
  touch "$ui_stamp"
fi
if [ "${1:-}" = "--link" ]; then
  ln -sf "$PWD/.venv/bin/vmkit" /usr/local/bin/vmkit
fi
