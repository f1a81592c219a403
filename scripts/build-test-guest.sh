#!/bin/sh
# Builds Corral's tiny test guest from Debian packages: a Debian kernel and an
# initramfs holding busybox-static, a few virtio modules and (when its
# packages can be fetched) qemu-guest-agent. Boots in a few seconds under TCG.
#
#   scripts/build-test-guest.sh [OUT_DIR]     (default ~/.cache/corral/guest)
#
# Output: OUT_DIR/vmlinuz, OUT_DIR/initrd.img. Re-running is cheap: the
# packages are cached in OUT_DIR/debs and nothing is rebuilt when the inputs
# are unchanged.
#
# What the guest does (see the generated /init below):
# - prints "corral-guest: ready" on ttyS0 when booted, then one line
#   "corral-tick <uptime-seconds>" per second, and gives a root shell on ttyS0;
# - powers off on the ACPI power button (busybox acpid), unless the kernel
#   command line has `corral.noacpi` (a guest that ignores clean shutdown);
# - runs qemu-ga on the org.qemu.guest_agent.0 port when it is present;
# - gives its NICs the addresses corral.ip.<nic>=<addr>/<prefix> asks for;
# - loads pvpanic, so a kernel panic (echo c > /proc/sysrq-trigger) reaches
#   QEMU as a guest-panicked event.
set -eu
SELF=$(readlink -f "$0")
OUT=${1:-${CORRAL_GUEST_DIR:-$HOME/.cache/corral/guest}}
mkdir -p "$OUT/debs"
cd "$OUT/debs"

fetch() { # download a package unless a .deb of it is already here
    ls "$1"_*.deb >/dev/null 2>&1 || apt-get download "$1" >/dev/null 2>&1 || return 1
}
kpkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}'; }
KPKG=$(kpkg)
[ -n "$KPKG" ] || { apt-get update -qq >/dev/null 2>&1; KPKG=$(kpkg); }
[ -n "$KPKG" ] || { echo "cannot resolve linux-image-amd64 (apt-get update?)" >&2; exit 1; }
fetch "$KPKG" || { apt-get update -qq && fetch "$KPKG"; } || { echo "cannot download $KPKG" >&2; exit 1; }
fetch busybox-static || { echo "cannot download busybox-static" >&2; exit 1; }
AGENT=1
for p in qemu-guest-agent libglib2.0-0 libnuma1 liburing2 libudev1 libpcre2-8-0 libffi8 libmount1 libselinux1 libblkid1; do
    fetch "$p" || AGENT=0
done

# The stamp covers the packages and this script, so editing the guest rebuilds it.
STAMP=$( (ls *.deb | sort; cat "$SELF") | md5sum | cut -c1-32)
if [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$STAMP" ] && [ -f "$OUT/initrd.img" ]; then
    exit 0
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
dpkg-deb -x "$(ls "$KPKG"_*.deb)" "$WORK/k"
dpkg-deb -x "$(ls busybox-static_*.deb)" "$WORK/bb"
BB="$WORK/bb/bin/busybox"
KVER=${KPKG#linux-image-}
R="$WORK/root"
mkdir -p "$R/bin" "$R/sbin" "$R/etc" "$R/proc" "$R/sys" "$R/dev" "$R/tmp" "$R/run" "$R/modules" "$R/lib64" "$R/lib" "$R/mnt"
cp "$BB" "$R/bin/busybox"
for a in $("$BB" --list); do [ "$a" = busybox ] || ln -sf busybox "$R/bin/$a"; done
ln -sf ../bin/busybox "$R/sbin/init"

# Modules in load order (dependencies first).
MODS="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk
virtio_console virtio_balloon button evdev scsi_common scsi_mod libata ata_piix cdrom sr_mod isofs
pvpanic pvpanic-mmio failover net_failover virtio_net mii e1000 8139cp 8139too"
: > "$R/modules/order"
for m in $MODS; do
    f=$(find "$WORK/k/lib/modules/$KVER" -name "$m.ko" | head -n1)
    [ -n "$f" ] || continue
    cp "$f" "$R/modules/"
    echo "$m" >> "$R/modules/order"
done

if [ "$AGENT" = 1 ]; then
    mkdir -p "$WORK/ga"
    for d in qemu-guest-agent libglib2.0-0 libnuma1 liburing2 libudev1 libpcre2-8-0 libffi8 libmount1 libselinux1 libblkid1; do
        dpkg-deb -x "$(ls "$d"_*.deb | head -n1)" "$WORK/ga"
    done
    cp "$WORK/ga/usr/sbin/qemu-ga" "$R/bin/qemu-ga"
    # The agent's libraries: the packages' own first, then the host's (same
    # Debian release) for libc and friends.
    LD_LIBRARY_PATH="$WORK/ga/usr/lib/x86_64-linux-gnu:$WORK/ga/lib/x86_64-linux-gnu" \
        ldd "$R/bin/qemu-ga" | awk '/=>/ {print $3} /ld-linux/ {print $1}' | while read -r lib; do
        [ -f "$lib" ] || continue
        case "$lib" in
        */ld-linux-x86-64.so.2) cp -L "$lib" "$R/lib64/" ;;
        *) cp -L "$lib" "$R/lib/" ;;
        esac
    done
fi

cat > "$R/init" <<'EOF'
#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
for m in $(cat /modules/order); do insmod /modules/$m.ko 2>/dev/null; done
mdev -s
hostname corral-guest
mkdir -p /etc/acpi/PWRF /var/run /var/log
printf '#!/bin/sh\npoweroff\n' > /etc/acpi/PWRF/00000080
chmod +x /etc/acpi/PWRF/00000080
grep -q corral.noacpi /proc/cmdline || acpid -c /etc/acpi
if [ -x /bin/qemu-ga ]; then
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat $p/name 2>/dev/null)" = org.qemu.guest_agent.0 ] || continue
        LD_LIBRARY_PATH=/lib qemu-ga -m virtio-serial -p /dev/$(basename $p) -d -t /run 2>/dev/null
    done
fi
# Addresses from the kernel command line: corral.ip.<nic>=<address>/<prefix>.
ip link set lo up
for kv in $(cat /proc/cmdline); do
    case "$kv" in
    corral.ip.*=*)
        nic=${kv#corral.ip.}; nic=${nic%%=*}
        ip link set "$nic" up && ip addr add "${kv#*=}" dev "$nic"
        ;;
    esac
done
echo "corral-guest: ready" > /dev/ttyS0
exec /sbin/init
EOF
cat > "$R/bin/corral-tick" <<'EOF'
#!/bin/sh
while :; do read up _ < /proc/uptime; echo "corral-tick $up"; sleep 1; done
EOF
chmod +x "$R/bin/corral-tick"
cat > "$R/etc/inittab" <<'EOF'
ttyS0::respawn:-/bin/sh
::respawn:/bin/sh -c '/bin/corral-tick > /dev/ttyS0'
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/echo "corral-guest: shutting down"
EOF
chmod +x "$R/init"
cat > "$R/etc/os-release" <<'EOF'
PRETTY_NAME="Corral test guest (Debian kernel, busybox)"
NAME="Corral test guest"
ID=corral-test-guest
VERSION_ID="1"
EOF

cp "$WORK/k/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
(cd "$R" && find . | "$BB" cpio -o -H newc 2>/dev/null | gzip -1) > "$OUT/initrd.img.tmp"
mv "$OUT/initrd.img.tmp" "$OUT/initrd.img"
echo "$STAMP" > "$OUT/stamp"
echo "test guest: $OUT/vmlinuz $OUT/initrd.img (kernel $KVER, agent=$AGENT)"
