#!/usr/bin/env bash
# `make demo`: start the daemon (if it is not running), build the demo guest, boot VM `demo`, wait until
# its guest agent answers, and say what to type next. Running it again is quick and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh --link
VMKIT=/usr/local/bin/vmkit

if ! "$VMKIT" vm list >/dev/null 2>&1; then
  if [ -d /run/systemd/system ]; then
    install -m 0644 systemd/vmkit.service /etc/systemd/system/vmkit.service
    # The demo adds the web UI's TCP listener on loopback (plain HTTP is allowed there); the unit as shipped has none.
    sed -i "s|^ExecStart=.*|ExecStart=$PWD/.venv/bin/vmkit daemon --listen 127.0.0.1:8006|" /etc/systemd/system/vmkit.service
    systemctl daemon-reload
    systemctl start vmkit.service
    how_stop="systemctl stop vmkit"
  else
    mkdir -p /var/log/vmkit
    setsid -f "$VMKIT" daemon --listen 127.0.0.1:8006 >>/var/log/vmkit/daemon.log 2>&1 </dev/null
    how_stop="pkill -f 'vmkit daemon'   (VMs keep running; start it again with: setsid -f vmkit daemon --listen 127.0.0.1:8006)"
  fi
  for _ in $(seq 100); do "$VMKIT" vm list >/dev/null 2>&1 && break; sleep 0.1; done
  "$VMKIT" vm list >/dev/null
else
  how_stop="systemctl stop vmkit, or: pkill -f 'vmkit daemon'   (VMs keep running)"
fi

"$VMKIT" image demo
# The daemon made network `default` on its first start; it may have been stopped since (vmkit network stop).
if "$VMKIT" network info default >/dev/null 2>&1; then
  "$VMKIT" network start default >/dev/null
fi
if ! "$VMKIT" vm info demo >/dev/null 2>&1; then
  "$VMKIT" vm create demo --image demo --memory 256
fi
state=$("$VMKIT" vm info demo --json | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["state"])')
if [ "$state" != "running" ]; then
  [ "$state" = "paused" ] && "$VMKIT" vm resume demo || "$VMKIT" vm start demo
fi
echo "waiting for the demo guest to boot (TCG emulation: a few seconds)..."
"$VMKIT" vm wait demo --for agent --timeout 120 >/dev/null
"$VMKIT" vm list
cat <<MSG

The VM 'demo' is running. Try:
  vmkit vm exec demo -- uname -a      # run a command through the guest agent
  vmkit vm console demo               # serial console (Ctrl-] leaves)
  vmkit vm log demo                   # boot log so far
  vmkit vm info demo                  # its QEMU's own uid and cgroup, CPU time, memory
  vmkit vm shutdown demo              # ACPI power-off
  vmkit vm ifaddr demo                # its address on network 'default' (NAT, 192.168.122.0/24); busybox ping it
  vmkit network list                  # networks: bridge, subnet, VMs
  vmkit vm disks demo                 # its disk: a thin overlay volume on the demo image
  vmkit volume list                   # every volume, its format, provisioning, backing and users
  vmkit vm create inst --iso demo-installer --disk 1G --memory 256 --start   # a real install from an ISO
  vmkit --help
Stop the daemon: $how_stop
MSG
# The web UI: a one-time login link (needs the daemon's TCP listener; a daemon started earlier without one says how).
if ui_url=$("$VMKIT" ui 2>/dev/null); then
  echo
  echo "Web UI (one-time login link, valid 5 minutes; later: vmkit ui again, or log in with a vmkit token):"
  echo "  $ui_url"
else
  echo
  "$VMKIT" ui || true
fi
