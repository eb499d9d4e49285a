#!/bin/busybox sh
# The guest's first stage (PID 1 in the initramfs that `cargo xtask test --kernel` builds):
# load the modules this kernel builds as modules (9p, virtio, overlay), mount the host's root
# read-only over 9p with a tmpfs overlay on top, mount the shared results directory, and
# switch to the host's own bash for the second stage (guest.sh). A guest of another
# architecture (ka_vm_userland on the command line) lays a root of its own architecture over
# the host's: its programs, the host's workspace and test binaries.
/bin/busybox --install -s /bin
export PATH=/bin

fail() {
    echo "ka-vm: init: $*"
    echo 1 >/proc/sys/kernel/sysrq
    echo o >/proc/sysrq-trigger
    sleep 60
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

while read -r module; do
    insmod "/modules/$module" || fail "insmod $module failed"
done </modules/order

mkdir -p /lower /upper /newroot
# msize: 9p's default (8 KiB) makes loading the test binaries slow.
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /lower \
    || fail "cannot mount the host's root (9p tag hostroot)"
lower=/lower
if grep -qw ka_vm_userland /proc/cmdline; then
    mkdir -p /userland
    mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose userland /userland \
        || fail "cannot mount the guest's userland (9p tag userland)"
    lower=/userland:/lower
fi
mount -t tmpfs -o mode=0755 tmpfs /upper
mkdir -p /upper/data /upper/work
mount -t overlay -o "lowerdir=$lower,upperdir=/upper/data,workdir=/upper/work" overlay /newroot \
    || fail "cannot mount the overlay root"
# The host's ld.so.cache names the host's libraries: the userland's loader gets its own.
if [ "$lower" != /lower ]; then
    chroot /newroot /sbin/ldconfig || fail "ldconfig of the guest's userland failed"
fi
mkdir -p /newroot/ka-vm
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 out /newroot/ka-vm \
    || fail "cannot mount the results directory (9p tag out)"

for dir in proc sys dev; do
    mount --move "/$dir" "/newroot/$dir"
done
exec switch_root /newroot /bin/bash /ka-vm/guest.sh
