#!/bin/sh
# Tear webhoster's VM network down by name, like `webhoster net down`: the
# forwarding sysctls it turned on, its host nftables table, the host veth
# (which takes the host route with it) and the namespace (which takes the
# bridge, the taps and its own table with it). Safe to run twice.
# Usage: netns/down.sh [NETNS]   (default: $WEBHOSTER_NETNS or whns)
# Running VMs lose their network; stop them first.
set -eu
ns=${1:-${WEBHOSTER_NETNS:-whns}}
table="webhoster_$ns"

if nft list table ip "$table" >/dev/null 2>&1; then
    # Interfaces whose IPv4 forwarding webhoster turned on (set "opened").
    for ifc in $(nft -j list set ip "$table" opened 2>/dev/null |
                 grep -o '"elem": *\[[^]]*\]' | grep -o '"[^"]*"' | grep -v '"elem"' | tr -d '"'); do
        if [ -e "/proc/sys/net/ipv4/conf/$ifc/forwarding" ]; then
            echo 0 > "/proc/sys/net/ipv4/conf/$ifc/forwarding"
            echo "restored net.ipv4.conf.$ifc.forwarding=0"
        fi
    done
    nft delete table ip "$table"
    echo "deleted nftables table ip $table"
fi
if ip -d link show dev "$ns" 2>/dev/null | grep -q 'veth'; then
    ip link del dev "$ns"
    echo "deleted host veth $ns"
elif ip link show dev "$ns" >/dev/null 2>&1; then
    echo "left $ns alone: it is not a veth" >&2
fi
if ip netns list | grep -qE "^$ns( |\$)"; then
    ip netns del "$ns"
    echo "deleted namespace $ns"
fi
