#!/bin/sh
# Talk to a VM's QMP operator socket by hand (needs socat).
#
#   qemu/qmp.sh <vm_id>                          interactive: type JSON lines
#   qemu/qmp.sh <vm_id> '{"execute":"query-status"}'   one command, print the reply
#
# The state dir defaults to /var/lib/webhoster (WEBHOSTER_STATE_DIR overrides).
# The supervisor of `webhoster serve` owns qmp.sock; this uses the second
# monitor, qmp-operator.sock, which serves one client at a time.
set -eu
vm_id=${1:?usage: $0 <vm_id> [json-command]}
sock=${WEBHOSTER_STATE_DIR:-/var/lib/webhoster}/vms/$vm_id/qmp-operator.sock
[ -S "$sock" ] || { echo "no QMP socket at $sock (unknown VM, or not running)" >&2; exit 1; }
command -v socat >/dev/null || { echo "socat not found: install the Debian package socat" >&2; exit 1; }
if [ $# -ge 2 ]; then
    # Negotiate, send the command, give QEMU a moment to answer, then close.
    { echo '{"execute":"qmp_capabilities"}'; echo "$2"; sleep 1; } |
        socat -t 2 - "UNIX-CONNECT:$sock" | sed -n '3,$p'
else
    echo 'connected; send {"execute":"qmp_capabilities"} first' >&2
    exec socat READLINE,history=/dev/null "UNIX-CONNECT:$sock"
fi
