#!/bin/sh
# Tandem's guest /init (busybox sh as PID 1), in the initramfs and in the userland image alike
# (vm_backend/guest_image/initramfs.py lays out both).
#
# Runs twice. From the initramfs: loads the pmem modules and mounts the userland image (/dev/pmem0, ext4 with
# DAX: the host maps the image into guest memory, vm_backend/guest_memory.py) as the real root, then
# switch_roots there (which frees the initramfs) and runs again from the image. The root is the image itself,
# read-only: the initramfs root ("rootfs") can never be pivot_root'ed away, and crun pivot_roots into every
# container's rootfs; nothing in the guest writes outside the tmpfs mounts of /etc/fstab. From the real root:
# mounts those, loads the virtio modules, leaves the rest of the modules to a background job, finds the agent's
# virtio-serial port (no udev: by its name in sysfs) and execs the agent, which then stays PID 1. Anything that
# stops the agent from starting prints one `tandem-init:` line on the console and powers off, so the host sees
# QEMU exit instead of a guest that never answers; if the agent itself dies later, the kernel panics (init
# exited) and, with panic=-1 and QEMU's -no-reboot, QEMU exits too. Under TCG every process started costs
# time: shell builtins (read, case) do what they can.
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

if [ -z "$TANDEM_ROOT_MOVED" ]; then
    mount -t proc -o nosuid,nodev,noexec proc /proc || fail "cannot mount /proc"
    say "init started"
    read -r cmdline < /proc/cmdline
    case " $cmdline " in
        *" tandem.probe=1 "*)
            say "probe ok"
            off
            ;;
    esac
    mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev || fail "cannot mount /dev"
    while read -r module; do
        insmod "/lib/modules/$module.ko" || fail "cannot load kernel module $module"
    done < /etc/tandem/boot-modules
    [ -b /dev/pmem0 ] || fail "no /dev/pmem0: the userland image is not mapped"
    # dax=always: the mount fails rather than fall back to copying the image into guest RAM
    mount -t ext4 -o ro,dax=always,nodev /dev/pmem0 /newroot || fail "cannot mount the userland image"
    say "userland image mounted"
    mount -o move /dev /newroot/dev && mount -o move /proc /newroot/proc || fail "cannot move /dev and /proc"
    TANDEM_ROOT_MOVED=1 exec switch_root /newroot /init
    fail "cannot switch to the userland image"
fi

read -r cmdline < /proc/cmdline
share= debug=
for arg in $cmdline; do
    case "$arg" in
        tandem.share=*) share="${arg#*=}" ;;
        tandem.debug=*) debug="${arg#*=}" ;;
    esac
done

mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || fail "cannot mount /sys"
mkdir -p /dev/pts /dev/shm
mount -a || fail "cannot mount what /etc/fstab lists"

while read -r module; do
    insmod "/lib/modules/$module.ko" || fail "cannot load kernel module $module"
done < /etc/tandem/modules

say "modules loaded"
ip link set lo up || fail "cannot bring lo up"
# QMP system_powerdown presses the ACPI power button: acpid runs /etc/acpi/PWRF/00000080 (sync, power off).
acpid -f -c /etc/acpi -l /dev/null &
# The modules nothing needs before the agent answers, loaded at the lowest priority: they take the CPU while
# the agent waits for the host. While /run/tandem-modules-loading exists the agent holds back StartContainer
# (a container may need bridge or overlay); the host's work before it usually leaves the job time enough.
# virtio_balloon's free page reporting hands free guest memory back to the host in runs of 2^5 pages (128 KiB)
# instead of the kernel's default 2 MiB: what boot frees lies mostly in smaller runs (measured here: an idle
# guest's RAM on the host 93 -> 80 MiB).
: > /run/tandem-modules-loading
sh -c '
    renice -n 19 -p $$ > /dev/null
    while read -r module; do
        insmod "/lib/modules/$module.ko" || echo "tandem-init: cannot load kernel module $module"
    done < /etc/tandem/modules-later
    echo 5 > /sys/module/page_reporting/parameters/page_reporting_order
    exec rm /run/tandem-modules-loading
' &

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
    portname=
    read -r portname < "$name" 2> /dev/null
    if [ "$portname" = agent ]; then
        port="/dev/${name#/sys/class/virtio-ports/}"
        port="${port%/name}"
    fi
done
[ -n "$port" ] || fail "no virtio-serial port named 'agent'"
[ -e /opt/tandem/agent/vm_backend/agent/__main__.py ] || fail "the agent is missing from the userland image"

export PYTHONPATH=/opt/tandem/agent PYTHONDONTWRITEBYTECODE=1 PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=upb
say "agent starting on $port"
exec python3 -S -m vm_backend.agent --port "$port"
