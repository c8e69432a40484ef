#!/bin/sh
# Disk and shared-directory speed, minivmm against QEMU, on the same guest and
# the same files. Runs inside the outer VM of scripts/test-nested-kvm.sh:
#
#   scripts/test-nested-kvm.sh --with-qemu --script scripts/nested/bench-virtio.sh
#
# The guest (the minimal kernel, 512M, VCPUS vCPUs: default 1, because with 2
# the guest stalled while reading the share, under minivmm and under QEMU
# alike, and the inner QEMU then ignored SIGTERM: the nested bed's fault) runs
# the script it finds on its first disk (the initramfs of tests/linux_virtio.rs)
# and times, from
# /proc/uptime, each of:
#   seq-write   256 MiB to the raw data disk (dd bs=1M, O_DIRECT, then fsync)
#   seq-read    256 MiB from it (dd bs=1M, O_DIRECT)
#   rand-read   400 reads of 4 KiB at scattered offsets (dd, O_DIRECT)
#   tree-read   every file of a 2,000-file tree on the share (4 KiB each), cat,
#               on a fresh mount (the minimal kernel has no drop_caches)
# Both VMMs reach the image through the outer VM's page cache (minivmm's
# pread/pwrite; QEMU's default cache=writeback: the outer VM's root file system
# has no O_DIRECT, so cache=none cannot open it), and flushes are fdatasync.
# minivmm: --disk and --share (virtio-fs served in-process). QEMU: microvm with
# virtio-blk-device and vhost-user-fs-device backed by QEMU's own virtiofsd
# (guest RAM in a shared memfd, as vhost-user needs). RUNS (default 3) runs of
# each, alternating; the median of each and minivmm's time / QEMU's are printed.
# VMMS="minivmm" runs only minivmm (e.g. to chase a stall).
# Times are TCG's (the outer VM is emulated): compare the ratios only.
RUNS=${RUNS:-3}
VMMS=${VMMS:-"minivmm qemu"}
VCPUS=${VCPUS:-1}
# reboot=k resets through the i8042, which minivmm has; QEMU's microvm has none,
# so its guest resets by triple fault (reboot=t) instead of hanging at the end.
CMDLINE="console=ttyS0 panic=-1"
W=/tmp/bench-virtio
rm -rf $W
mkdir -p $W/tree
ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }

# The guest's side. Timings use the guest's /proc/uptime (10 ms steps).
cat >$W/guest.sh <<'EOF'
up() { cut -d' ' -f1 /proc/uptime; }
timed() {
    name=$1; shift
    a=$(up); "$@"; b=$(up)
    echo "bench-guest: $name $(awk "BEGIN { print $b - $a }")"
}
# The data disk is the bigger one (whichever name the VMM's order gave it).
D=/dev/vdb
[ "$(cat /sys/block/vda/size)" -lt "$(cat /sys/block/vdb/size)" ] || D=/dev/vda
rand_read() {
    i=0
    while [ $i -lt 400 ]; do
        dd if=$D of=/dev/null bs=4096 count=1 skip=$(( (i * 7919) % 65536 )) iflag=direct 2>/dev/null || return 1
        i=$((i + 1))
    done
}
mkdir -p /share
mount -t virtiofs tree /share || echo "bench-guest: FAIL mount"
timed seq-write dd if=/dev/zero of=$D bs=1M count=256 oflag=direct conv=fsync
timed seq-read dd if=$D of=/dev/null bs=1M count=256 iflag=direct
timed rand-read rand_read
timed tree-read sh -c 'cat /share/*/* >/dev/null'
echo "bench-guest: files $(ls /share/*/* | wc -l)"
umount /share
EOF
dd if=/dev/zero of=$W/script.img bs=4096 count=1 2>/dev/null
dd if=$W/guest.sh of=$W/script.img conv=notrunc 2>/dev/null
dd if=/dev/zero of=$W/data.img bs=1M count=256 2>/dev/null
d=0
while [ $d -lt 20 ]; do
    mkdir -p $W/tree/d$d
    f=0
    while [ $f -lt 100 ]; do
        dd if=/dev/urandom of=$W/tree/d$d/f$f bs=4096 count=1 2>/dev/null
        f=$((f + 1))
    done
    d=$((d + 1))
done

run_minivmm() {
    $MINIVMM_BIN run --no-ledger --kernel "$MINIVMM_LINUX_VMLINUX" \
        --initrd "$MINIVMM_INITRAMFS_DISK_SCRIPT" --cmdline "$CMDLINE reboot=k" --vcpus $VCPUS --memory 512M \
        --disk $W/script.img --disk $W/data.img --share $W/tree,tag=tree \
        --timeout 300s --serial-out $W/console.txt </dev/null >/dev/null 2>$W/stderr.txt
}

run_qemu() {
    rm -f $W/vfs.sock
    /usr/lib/qemu/virtiofsd --socket-path=$W/vfs.sock -o source=$W/tree -o sandbox=chroot \
        -o cache=auto </dev/null >/dev/null 2>$W/virtiofsd.txt &
    vpid=$!
    w=0 # not i: sh has no locals, and i counts the runs below
    while [ ! -S $W/vfs.sock ] && [ $w -lt 100 ]; do sleep 0.1; w=$((w + 1)); done
    # acpi=off: microvm then lists its virtio-mmio devices on the kernel command
    # line, which is where the minimal kernel (no ACPI) finds them.
    # force-legacy=false: microvm's virtio-mmio transports default to the legacy
    # (version 1) layout, which virtiofsd's libvhost-user refuses ("virtio legacy
    # devices aren't supported"), leaving the guest's mount waiting for ever;
    # minivmm offers only version 2, so both VMMs now use the same transport.
    # The script disk comes first so that it is /dev/vda, as with minivmm: the
    # initramfs reads all of /dev/vda for its script (a 256 MiB disk there took
    # minutes). A QEMU that never ends is stopped, its console and stderr shown.
    timeout -k 10 300 qemu-system-x86_64 -enable-kvm -cpu host -M microvm,acpi=off,x-option-roms=off,memory-backend=mem \
        -global virtio-mmio.force-legacy=false \
        -nodefaults -no-user-config -display none -no-reboot -smp $VCPUS -m 512M \
        -object memory-backend-memfd,id=mem,size=512M,share=on \
        -serial file:$W/console.txt -kernel "$MINIVMM_LINUX_VMLINUX" \
        -initrd "$MINIVMM_INITRAMFS_DISK_SCRIPT" -append "$CMDLINE reboot=t" \
        -chardev socket,id=vfs,path=$W/vfs.sock -device vhost-user-fs-device,chardev=vfs,tag=tree \
        -drive id=script,file=$W/script.img,format=raw,if=none -device virtio-blk-device,drive=script \
        -drive id=data,file=$W/data.img,format=raw,if=none -device virtio-blk-device,drive=data \
        </dev/null >/dev/null 2>$W/stderr.txt
    kill $vpid 2>/dev/null
    wait $vpid 2>/dev/null
}

median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

bad=0
for vmm in $VMMS; do : >$W/$vmm.txt; done
i=1
while [ "$i" -le "$RUNS" ]; do
    for vmm in $VMMS; do
        t0=$(ms)
        run_$vmm
        t1=$(ms)
        if ! grep -q '^bench-guest: files 2000' $W/console.txt; then
            echo "bench: $vmm run $i did not finish:"
            tail -n 30 $W/console.txt $W/stderr.txt
            [ "$vmm" != qemu ] || tail -n 30 $W/virtiofsd.txt
            bad=$((bad + 1))
            continue
        fi
        grep '^bench-guest: ' $W/console.txt | tr -d '\r' | sed "s/^bench-guest: /$vmm /" >>$W/$vmm.txt
        echo "bench: $vmm run $i: $((t1 - t0)) ms in all; $(tr -d '\r' <$W/console.txt | grep '^bench-guest: [a-z-]* [0-9.]*$' | cut -d' ' -f2,3 | tr '\n' ' ')"
    done
    i=$((i + 1))
done
for t in seq-write seq-read rand-read tree-read; do
    m=$(awk -v t=$t '$2 == t { print $3 }' $W/minivmm.txt | median)
    q=$(awk -v t=$t '$2 == t { print $3 }' $W/qemu.txt 2>/dev/null | median)
    [ -n "$q" ] || q=0
    echo "bench: $t median seconds: minivmm $m qemu $q ratio(minivmm/qemu) $(awk "BEGIN { if ($q > 0) printf \"%.2f\", $m / $q }")"
done
exit $bad
