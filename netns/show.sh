#!/bin/sh
# Show everything webhoster's VM network consists of, by name (read-only).
# Usage: netns/show.sh [NETNS]   (default: $WEBHOSTER_NETNS or whns)
set -u
ns=${1:-${WEBHOSTER_NETNS:-whns}}
table="webhoster_$ns"

echo "== namespace"
ip netns list | grep -E "^$ns( |\$)" || echo "(no namespace $ns)"
echo "== host veth $ns"
ip -d addr show dev "$ns" 2>/dev/null || echo "(no host veth $ns)"
for k in forwarding route_localnet; do
    [ -e "/proc/sys/net/ipv4/conf/$ns/$k" ] && echo "net.ipv4.conf.$ns.$k = $(cat "/proc/sys/net/ipv4/conf/$ns/$k")"
done
echo "== host routes through it"
ip -4 route show dev "$ns" 2>/dev/null
echo "== host nftables table ip $table (SSH forwards: map ssh_fwd, port -> guest . 22, comment = vm_id)"
nft list table ip "$table" 2>/dev/null || echo "(no table)"
if ip netns list | grep -qE "^$ns( |\$)"; then
    echo "== inside $ns: links (taps are whv*, isolated bridge ports of br0)"
    ip -n "$ns" -d -br link
    ip -n "$ns" -br addr
    ip -n "$ns" route
    echo "net.ipv4.ip_forward (inside) = $(ip netns exec "$ns" cat /proc/sys/net/ipv4/ip_forward)"
    echo "== inside $ns: bridge ports"
    bridge -n "$ns" -d link show 2>/dev/null | grep -E "^[0-9]+:|isolated" || true
    echo "== inside $ns: neighbours of br0 (guests: PERMANENT, set with their guard)"
    ip -n "$ns" neigh show dev br0
    echo "== inside $ns: nftables (bridge webhoster_guard: what each tap may send from)"
    ip netns exec "$ns" nft list ruleset
fi
