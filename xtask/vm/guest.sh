#!/bin/bash
# The guest's second stage, run by the host's own bash on the overlay root: give the guest the
# layout most user hosts have (pure cgroup v2 at /sys/fs/cgroup, bpffs, writable /tmp and /run,
# the kernel's modules for autoloading), then run /ka-vm/command and leave its exit status in
# /ka-vm/status. The guest powers itself off at the end; the host's qemu then exits.
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

# The kernel asks /sbin/modprobe for veth, nf_tables, conntrack, ... as the tests need them.
modules="/lib/modules/$(uname -r)"
mkdir -p "$modules"
mount --bind "$KA_VM_MODULES" "$modules"

ip link set lo up
hostname ka-vm

# Pre-5.11 kernels charge BPF maps to RLIMIT_MEMLOCK. Start from the kernel's own default
# (64 KiB) so the agent's raising of the limit is what the run proves.
ulimit -l 64
# PID 1 starts at 1024 open files; the load tests hold thousands of connections per process.
ulimit -n 65536

cut -d" " -f1 /proc/uptime >/ka-vm/boot-seconds
export KA_VM_OUT=/ka-vm
echo "ka-vm: kernel $(uname -r) up in $(cut -d" " -f1 /proc/uptime) s, cgroup2 at /sys/fs/cgroup, $(nproc) CPUs"
cd "$KA_VM_CWD" || poweroff
bash /ka-vm/command
echo $? >/ka-vm/status
poweroff
