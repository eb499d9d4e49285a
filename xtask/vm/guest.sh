#!/bin/bash
# The guest's second stage, run by the host's own bash on the overlay root: give the guest the
# layout most user hosts have (pure cgroup v2 at /sys/fs/cgroup, bpffs, writable /tmp and /run,
# the kernel's modules for autoloading), then run /ka-vm/command and leave its exit status in
# /ka-vm/status. The guest powers itself off at the end; the host's qemu then exits.
# With KA_VM_INIT=systemd, systemd (the host root's, or the newer one in KA_VM_SYSTEMD_ROOT)
# becomes PID 1 instead and sets up that layout itself; the command runs as its ka-vm.service.
set -u
# PID 1's environment is the initramfs's (PATH=/bin): give the host's programs theirs.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8

poweroff() {
    sync
    echo o >/proc/sysrq-trigger
    sleep 60
}
echo 1 >/proc/sys/kernel/sysrq

# shellcheck source=/dev/null
source /ka-vm/env

# The command itself, with its status left in /ka-vm/status; then power off.
run_command() {
    cut -d" " -f1 /proc/uptime >/ka-vm/boot-seconds
    uname -m >/ka-vm/machine
    export KA_VM_OUT=/ka-vm
    local init=$KA_VM_INIT
    [ "$init" = systemd ] && init=$(systemctl --version | head -n1)
    echo "ka-vm: kernel $(uname -r) up in $(cut -d" " -f1 /proc/uptime) s, init: $init, $(nproc) CPUs"
    cd "$KA_VM_CWD" || poweroff
    bash /ka-vm/command
    echo $? >/ka-vm/status
    poweroff
}

# The kernel asks /sbin/modprobe for veth, nf_tables, conntrack, ... as the tests need them.
bind_modules() {
    local modules
    modules="/lib/modules/$(uname -r)"
    mkdir -p "$modules"
    mount --bind "$KA_VM_MODULES" "$modules"
}

if [ "$KA_VM_INIT" = systemd ]; then
    if [ "${1:-}" = command ]; then
        # Under systemd, as ka-vm.service: systemd mounted cgroup2, bpffs, /run and /dev/shm.
        mkdir -p /ka-tmp
        mount -t tmpfs -o mode=1777 tmpfs /ka-tmp
        export TMPDIR=/ka-tmp
        run_command
    fi
    # A newer systemd than the host root's, unpacked from Debian's packages over the overlay
    # (the host's /lib is a symlink to usr/lib: tar keeps it one).
    if [ -n "${KA_VM_SYSTEMD_ROOT:-}" ]; then
        tar -C "$KA_VM_SYSTEMD_ROOT" -c . | tar -C / -x --keep-directory-symlink
    fi
    # PID 1: systemd takes over with ka-vm.target as its default, which starts sysinit (journald,
    # udev, the mounts) and ka-vm.service, and none of the host root's enabled services.
    bind_modules
    # The host root's marker of a Docker container: systemd would believe it runs in one. And
    # its image's policy-rc.d, which forbids maintainer scripts to start services (no host has
    # one); and man-db's index update after each install (a minute and a half under emulation).
    rm -f /.dockerenv /usr/sbin/policy-rc.d /var/lib/man-db/auto-update
    units=/etc/systemd/system
    cat >"$units/ka-vm.target" <<'UNIT'
[Unit]
Description=ka-vm: run the command under systemd
Requires=basic.target ka-vm.service
After=basic.target
AllowIsolate=yes
UNIT
    cat >"$units/ka-vm.service" <<'UNIT'
[Unit]
Description=ka-vm: the command
After=basic.target
[Service]
Type=exec
ExecStart=/bin/bash /ka-vm/guest.sh command
StandardOutput=journal+console
StandardError=journal+console
LimitNOFILE=65536
UNIT
    ln -sfn ka-vm.target "$units/default.target"
    # What the host root enabled for its own default target (podman's services) stays off.
    rm -rf "$units/default.target.wants"
    # /tmp is the overlay's, and the checkout may live there: no tmpfs over it (tmp.mount),
    # and no emptying it at boot (tmpfiles.d/tmp.conf's "D /tmp").
    ln -sfn /dev/null /etc/tmpfiles.d/tmp.conf
    for unit in tmp.mount systemd-timesyncd.service systemd-pstore.service getty@tty1.service; do
        ln -sfn /dev/null "$units/$unit"
    done
    exec /lib/systemd/systemd --log-level=warning --show-status=false
fi

mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
# /tmp stays the overlay's (the checkout may live there); the tests get a tmpfs of their own.
for dir in /run /dev/shm /ka-tmp; do
    mkdir -p "$dir"
    mount -t tmpfs -o mode=1777 tmpfs "$dir"
done
export TMPDIR=/ka-tmp
mkdir -p /dev/pts
mount -t devpts devpts /dev/pts

bind_modules

ip link set lo up
hostname ka-vm

# Pre-5.11 kernels charge BPF maps to RLIMIT_MEMLOCK. Start from the kernel's own default
# (64 KiB) so the agent's raising of the limit is what the run proves.
ulimit -l 64
# PID 1 starts at 1024 open files; the load tests hold thousands of connections per process.
ulimit -n 65536

run_command
