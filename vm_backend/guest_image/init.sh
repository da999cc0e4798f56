#!/bin/sh
# Tandem's guest /init (busybox sh as PID 1, laid out in the initramfs by vm_backend/guest_image/initramfs.py).
#
# Moves to a root that crun can pivot_root away from, mounts what the agent and crun need, loads
# the virtio modules, mounts the pod's virtio-fs share, finds the agent's virtio-serial port (no
# udev: by its name in sysfs) and execs the agent, which then stays PID 1. Anything that stops the agent from starting prints one `tandem-init:` line on
# the console and powers off, so the host sees QEMU exit instead of a guest that never answers;
# if the agent itself dies later, the kernel panics (init exited) and, with panic=-1 and QEMU's
# -no-reboot, QEMU exits too.
#
# Kernel command line: tandem.share=TAG (virtio-fs tag of the pod's share), tandem.probe=1 (print a
# marker and power off at once: the accelerator probe), tandem.debug=share (list the share and print
# its *.txt files and the NICs on the console, then power off) and tandem.debug=idle (stay up without an agent):
# the boot tests.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root

# Each line ends with the guest's uptime, so a console log shows where boot time went.
say() {
    up=?
    [ -r /proc/uptime ] && read -r up _ < /proc/uptime
    echo "tandem-init: $* [${up}s]"
}

off() {
    sync
    poweroff -f
    sleep 1000000
}

fail() {
    say "$*; powering off"
    off
}

# The initramfs root ("rootfs") can never be pivot_root'ed away, and crun pivot_roots into every
# container's rootfs. So first move to a tmpfs root holding bind mounts of the initramfs directories
# (read-only where nothing writes) and run this script again from there: ~0.1 s under TCG, where
# copying the files over would take ~0.6 s.
if [ -z "$TANDEM_ROOT_MOVED" ]; then
    mkdir -p /newroot
    mount -t tmpfs -o mode=0755 tmpfs /newroot || fail "cannot mount the root tmpfs"
    for dir in bin etc lib lib64 opt root sbin usr; do
        mkdir "/newroot/$dir"
        mount -o bind "/$dir" "/newroot/$dir" || fail "cannot bind /$dir"
        case "$dir" in etc | root) ;; *) mount -o remount,bind,ro "/newroot/$dir" ;; esac
    done
    cp /init /newroot/init
    mkdir -p /newroot/dev /newroot/proc /newroot/sys /newroot/run /newroot/tmp
    chmod 1777 /newroot/tmp
    cd /newroot && mount -o move . / || fail "cannot move the root tmpfs to /"
    TANDEM_ROOT_MOVED=1 exec chroot . /init
fi

mount -t proc -o nosuid,nodev,noexec proc /proc || fail "cannot mount /proc"
say "init started"
share= probe= debug=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        tandem.share=*) share="${arg#*=}" ;;
        tandem.probe=*) probe="${arg#*=}" ;;
        tandem.debug=*) debug="${arg#*=}" ;;
    esac
done
if [ "$probe" = 1 ]; then
    say "probe ok"
    off
fi

mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev || fail "cannot mount /dev"
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,ptmxmode=0666,mode=0620 devpts /dev/pts || fail "cannot mount /dev/pts"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm || fail "cannot mount /dev/shm"
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run || fail "cannot mount /run"
mount -t cgroup2 -o nosuid,nodev,noexec,nsdelegate cgroup2 /sys/fs/cgroup || fail "cannot mount cgroup2"

while read -r module; do
    insmod "/lib/modules/$module.ko" || fail "cannot load kernel module $module"
done < /etc/tandem/modules

say "modules loaded"
ip link set lo up || fail "cannot bring lo up"
# QMP system_powerdown presses the ACPI power button: acpid runs /etc/acpi/PWRF/00000080 (sync, power off).
acpid -f -c /etc/acpi -l /dev/null &

if [ -n "$share" ]; then
    mkdir -p /run/tandem/share
    mount -t virtiofs "$share" /run/tandem/share || fail "cannot mount the virtio-fs share '$share'"
fi
case "$debug" in
    share)
        say "share begin"
        find /run/tandem/share -print
        find /run/tandem/share -name '*.txt' -exec cat {} +
        ip -o link
        say "root is $(awk '$5 == "/" { print $(NF - 2) }' /proc/self/mountinfo)"
        say "share end"
        off
        ;;
    idle)
        say "idle"
        exec sleep 2147483647
        ;;
esac

port=
for name in /sys/class/virtio-ports/vport*/name; do
    if [ "$(cat "$name" 2>/dev/null)" = agent ]; then
        port="/dev/${name#/sys/class/virtio-ports/}"
        port="${port%/name}"
    fi
done
[ -n "$port" ] || fail "no virtio-serial port named 'agent'"
[ -e /opt/tandem/agent/vm_backend/agent/__main__.py ] || fail "the agent is missing from the initramfs"

export PYTHONPATH=/opt/tandem/agent PYTHONDONTWRITEBYTECODE=1 PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=upb
say "agent starting on $port"
exec python3 -S -m vm_backend.agent --port "$port"
