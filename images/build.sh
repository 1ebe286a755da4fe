#!/bin/bash
# Builds the webhoster guest image. Run by `webhoster image build` (which
# checks root, tools, disk space and the mirror first, and owns the cache);
# not meant to be run by hand. Inputs, from the environment:
#   WH_RECIPE   directory holding this recipe (packages.txt, overlay/, ...)
#   WH_WORK     empty build directory; outputs are written here
#   WH_SUITE    Debian suite (the host's release)
#   WH_SOURCES  file of one-line `deb URI SUITE COMPONENTS` sources, read
#               from the host's apt configuration
#   WH_APTOPTS  file of extra apt options, one per line (may be empty)
#   WH_AGENT    the seed agent binary (webhoster-seed-agent, built from this
#               repository for the same Debian release as the guest)
# Outputs in WH_WORK: vmlinux, initrd.img, disk.qcow2, packages.tsv,
# kernel-version. Lines `@@stage NAME` on stdout mark progress.
set -euo pipefail
umask 022
: "${WH_RECIPE:?}" "${WH_WORK:?}" "${WH_SUITE:?}" "${WH_SOURCES:?}" "${WH_APTOPTS:?}" "${WH_AGENT:?}"
export LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive
rootfs="$WH_WORK/rootfs"

stage() { echo "@@stage $1"; }

stage rootfs
packages=$(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$WH_RECIPE/packages.txt" | tr -s '[:space:]' ',' | sed 's/,$//')
mirrors=()
while IFS= read -r line; do [ -n "$line" ] && mirrors+=("$line"); done < "$WH_SOURCES"
aptopts=(--aptopt='Apt::Install-Recommends "false"')
while IFS= read -r line; do [ -n "$line" ] && aptopts+=(--aptopt="$line"); done < "$WH_APTOPTS"
dpkgopts=()
while IFS= read -r line; do
    case "$line" in ''|'#'*) ;; *) dpkgopts+=(--dpkgopt="$line") ;; esac
done < "$WH_RECIPE/dpkg-excludes.cfg"
mmdebstrap --mode=root --variant=minbase --format=directory \
    "${aptopts[@]}" "${dpkgopts[@]}" --include="$packages" \
    "$WH_SUITE" "$rootfs" -- "${mirrors[@]}"

stage configure
cp -a "$WH_RECIPE/overlay/." "$rootfs/"
# The seed agent applies the NoCloud seed at first boot (webhoster-seed.service);
# debug info stripped (a debug build carries megabytes of it).
install -m 0755 "$WH_AGENT" "$rootfs/usr/local/sbin/webhoster-seed-agent"
if command -v objcopy >/dev/null; then
    objcopy --strip-debug "$rootfs/usr/local/sbin/webhoster-seed-agent"
fi
chroot "$rootfs" /usr/local/sbin/webhoster-seed-agent --source-hash >/dev/null
# Unique per VM, made at first boot: machine-id (systemd), host keys (cloud-init).
: > "$rootfs/etc/machine-id"
rm -f "$rootfs/var/lib/dbus/machine-id" "$rootfs"/etc/ssh/ssh_host_*
echo localhost > "$rootfs/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > "$rootfs/etc/hosts"
printf '# Set by cloud-init or the administrator: guests have no resolver by default.\n' > "$rootfs/etc/resolv.conf"
echo 'LANG=C.UTF-8' > "$rootfs/etc/default/locale"
# Keys only by default (a seed can turn passwords on with ssh_pwauth, which
# cloud-init's set-passwords writes before sshd first starts: see
# 99-webhoster.cfg).
sed -i 's/^#\?PasswordAuthentication .*/PasswordAuthentication no/' "$rootfs/etc/ssh/sshd_config"
grep -q '^PasswordAuthentication no' "$rootfs/etc/ssh/sshd_config"
# Every SSH and SFTP session ran /etc/update-motd.d (a uname line) through
# pam_motd: 0.5-0.6 s of guest CPU under TCG per login, for a text SFTP never
# shows. The static /etc/motd is still printed.
sed -i 's|^\(session\s\+optional\s\+pam_motd\.so\s\+motd=/run/motd\.dynamic\)$|\1 noupdate|' \
    "$rootfs/etc/pam.d/sshd"
grep -qE '^session\s+optional\s+pam_motd\.so\s+motd=/run/motd\.dynamic noupdate$' "$rootfs/etc/pam.d/sshd"
# The seed adds the login user to www-data so SFTP uploads land as pages.
chown root:www-data "$rootfs/var/www/html"
chmod 2775 "$rootfs/var/www/html"
# Drivers for hardware a webhoster VM does not use. Debian's generic kernel
# (linux-image-amd64, chosen for its vmgenid driver) has them as modules, and
# udev's coldplug loaded each at every boot: seconds under TCG. The cloud
# kernel never had them. `blacklist` stops only the automatic loading (by
# device alias); `modprobe NAME` still loads one by hand.
# the host's CPU virtualisation (no nested KVM), the q35 chipset's SATA,
# watchdog, SMBus and LPC, PC speaker, PS/2 mouse, wireless. Not evdev:
# systemd-logind sees the ACPI power button through it (a clean stop).
mkdir -p "$rootfs/etc/modprobe.d"
cat > "$rootfs/etc/modprobe.d/webhoster-vm.conf" <<'EOF'
# Written by webhoster's image build: drivers a VM does not use (see build.sh).
blacklist kvm_amd
blacklist kvm_intel
blacklist ccp
blacklist ahci
blacklist iTCO_wdt
blacklist intel_pmc_bxt
blacklist i2c_i801
blacklist lpc_ich
blacklist pcspkr
blacklist psmouse
blacklist serio_raw
blacklist cfg80211
EOF
sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$WH_RECIPE/masked-units.txt" | while read -r unit; do
    ln -sfn /dev/null "$rootfs/etc/systemd/system/$unit"
done
sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$WH_RECIPE/startup-cpu-weights.txt" | while read -r unit weight; do
    [ -n "$weight" ] || { echo "startup-cpu-weights.txt: no weight for $unit" >&2; exit 1; }
    mkdir -p "$rootfs/etc/systemd/system/$unit.d"
    printf '# From startup-cpu-weights.txt in webhoster'"'"'s image recipe.\n[Service]\nStartupCPUWeight=%s\n' "$weight" \
        > "$rootfs/etc/systemd/system/$unit.d/50-webhoster-startup-weight.conf"
done
mkdir -p "$rootfs/etc/systemd/system-generators"
sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$WH_RECIPE/masked-generators.txt" | while read -r generator; do
    [ -e "$rootfs/lib/systemd/system-generators/$generator" ] ||
        { echo "masked-generators.txt: no generator $generator" >&2; exit 1; }
    ln -sfn /dev/null "$rootfs/etc/systemd/system-generators/$generator"
done
chroot "$rootfs" systemctl enable systemd-networkd.service >/dev/null
chroot "$rootfs" systemctl enable nginx.service ssh.service qemu-guest-agent.service >/dev/null
chroot "$rootfs" systemctl enable webhoster-seed.service webhoster-seed-runcmd.service webhoster-growfs.service \
    webhoster-ready.target >/dev/null 2>&1
# A build leaves no state that would make every VM look alike or stale.
rm -rf "$rootfs"/var/lib/cloud/* "$rootfs"/var/log/cloud-init* \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/cache/debconf/*-old "$rootfs"/var/lib/dpkg/*-old \
    "$rootfs"/tmp/* "$rootfs"/var/tmp/*
find "$rootfs/var/log" -type f -exec truncate -s 0 {} +
# Python bytecode is precompiled by the packages; compile anything missed so
# no boot pays for it (and a read-only root would still be fast).
chroot "$rootfs" python3 -m compileall -q -j 0 /usr/lib/python3/dist-packages >/dev/null 2>&1 || true

stage kernel
kver=$(basename "$(ls -1 "$rootfs"/boot/vmlinuz-* | sort -V | tail -n 1)")
kver=${kver#vmlinuz-}
echo "$kver" > "$WH_WORK/kernel-version"
# The kernel unpacked: QEMU boots an ELF vmlinux through its PVH entry point
# (`-kernel vmlinux`), with no real-mode setup and no self-decompression.
# Under TCG, decompressing the bzImage took 4-4.5 s of emulated CPU before
# the kernel's first line. The payload is found by its magic, as Linux's
# scripts/extract-vmlinux does; the result must be an ELF with the PVH note.
vmlinuz="$rootfs/boot/vmlinuz-$kver"
unpack() {
    local magic=$1 tool=$2 offset
    offset=$(LC_ALL=C grep -abo -m 1 -P "$magic" "$vmlinuz" | head -n 1 | cut -d: -f1)
    [ -n "$offset" ] || return 1
    tail -c +"$((offset + 1))" "$vmlinuz" | $tool > "$WH_WORK/vmlinux" 2>/dev/null || true
    [ "$(head -c 4 "$WH_WORK/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ]
}
unpack '\xfd7zXZ\x00' 'xz -dc --single-stream' || unpack '\x28\xb5\x2f\xfd' 'zstd -qdc' ||
    unpack '\x1f\x8b\x08' 'gzip -dc' || { echo "cannot unpack $vmlinuz" >&2; exit 1; }
# The PVH entry QEMU needs: an ELF note named "Xen" of type 18
# (XEN_ELFNOTE_PHYS32_ENTRY), in the kernel since Linux 5.0 with CONFIG_PVH.
LC_ALL=C grep -qaP '\x04\x00\x00\x00[\x04\x08]\x00\x00\x00\x12\x00\x00\x00Xen\x00' "$WH_WORK/vmlinux" ||
    { echo "$vmlinuz has no PVH entry point (CONFIG_PVH)" >&2; exit 1; }
# The guest boots our initrd below, never this one: keep the disk small.
rm -f "$rootfs"/boot/initrd.img*

stage initrd
moddir="$rootfs/lib/modules/$kver"
initrd="$WH_WORK/initrd"
mkdir -p "$initrd"/{bin,dev,proc,sys,newroot,lib/modules}
cp /bin/busybox "$initrd/bin/busybox"
cp "$WH_RECIPE/initrd/init" "$initrd/init"
chmod 755 "$initrd/init"
: > "$initrd/modules.list"
declare -A added=()
# Adds a module after its dependencies (modules.dep order), decompressed.
add_module() {
    local name=$1 path dep
    path=$(grep -E "(^|/)${name//_/[_-]}\.ko(\.[a-z]+)?:" "$moddir/modules.dep" | head -n 1 | cut -d: -f1) || true
    if [ -z "$path" ]; then
        grep -qE "/${name//_/[_-]}\.ko" "$moddir/modules.builtin" && return 0
        echo "module $name is neither built in nor in modules.dep" >&2
        return 1
    fi
    [ -n "${added[$path]:-}" ] && return 0
    added[$path]=1
    for dep in $(grep -E "^$path:" "$moddir/modules.dep" | cut -d: -f2); do
        dep=$(basename "$dep"); dep=${dep%%.ko*}
        add_module "$dep"
    done
    local base; base=$(basename "$path"); base=${base%%.ko*}.ko
    case "$path" in
        *.xz) xz -dc "$moddir/$path" > "$initrd/lib/modules/$base" ;;
        *.zst) zstd -qdc "$moddir/$path" > "$initrd/lib/modules/$base" ;;
        *.gz) gzip -dc "$moddir/$path" > "$initrd/lib/modules/$base" ;;
        *) cp "$moddir/$path" "$initrd/lib/modules/$base" ;;
    esac
    echo "$base" >> "$initrd/modules.list"
}
# virtio_rng early: the kernel's entropy pool is ready before systemd starts.
# isofs: the seed agent mounts the cidata ISO before udev runs, without a
# modprobe process. virtio_net: the agent sets a static address before udev
# runs. virtio_console: the guest agent's port, for qemu-guest-agent.service
# before udev (the initrd names the port).
for m in virtio_pci virtio_blk virtio_rng crc32c_generic ext4 isofs virtio_net virtio_console; do
    add_module "$m"
done
(cd "$initrd" && find . -print0 | sort -z | cpio --null -o -H newc --quiet) | gzip -9n > "$WH_WORK/initrd.img"
rm -rf "$initrd"

stage disk
dpkg-query --admindir="$rootfs/var/lib/dpkg" -W -f '${Package}\t${Version}\t${Installed-Size}\n' > "$WH_WORK/packages.tsv"
used_mib=$(du -sxm "$rootfs" | cut -f1)
# Room for the first boot's writes; cloud-init's resizefs grows it to the VM's disk.
size_mib=$(( (used_mib * 5 / 4 + 256 + 63) / 64 * 64 ))
[ "$size_mib" -lt 1024 ] && size_mib=1024
mkfs.ext4 -q -F -L whroot -T default -b 4096 -m 1 -d "$rootfs" "$WH_WORK/disk.raw" "${size_mib}M"
# The journal commits every second instead of every 5 s (the other half of
# the writeback bound: overlay/etc/sysctl.d/60-webhoster-writeback.conf).
# Stored as a default mount option in the superblock, so it holds however
# the disk is mounted (initrd, rescue, a kernel command line without it).
tune2fs -E mount_opts=commit=1 "$WH_WORK/disk.raw" >/dev/null
rm -rf "$rootfs"
# Compressed clusters: half the size on disk; QEMU inflates them on read
# (host-side, cheap next to the guest's TCG time). VMs write to overlays.
qemu-img convert -f raw -O qcow2 -c -o compression_type=zstd "$WH_WORK/disk.raw" "$WH_WORK/disk.qcow2"
rm -f "$WH_WORK/disk.raw"
