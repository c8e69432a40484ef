#!/bin/sh
# `minivmm exec -- true` from process start to exit, with Debian's cloud kernel
# and its modules (the kernel and --modules of tests/exec.rs). Runs inside the
# outer VM of scripts/test-nested-kvm.sh:
#
#   scripts/test-nested-kvm.sh --script scripts/nested/bench-exec.sh
#
# The first run builds the initramfs cache and is reported apart; then RUNS
# (default 5) runs, each timed from the outer VM's /proc/uptime (10 ms steps),
# and their median. Also the same kernel booting to a /init that powers off at
# once (`minivmm run` with the busybox initramfs of tests/acpi_linux.rs), to show
# what exec adds to a bare boot. Times are those of
# the nested bed (the outer VM is emulated by QEMU's TCG): compare ratios only.
RUNS=${RUNS:-5}
W=/tmp/bench-exec
rm -rf $W
mkdir -p $W
cd $W || exit 1
ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
ex() {
    "$MINIVMM_BIN" exec --kernel "$MINIVMM_DEBIAN_VMLINUX" --modules "$MINIVMM_DEBIAN_MODULES" \
        --no-ledger --vcpus 2 --memory 512M --timeout 300s "$@"
}

rm -rf /root/.cache/minivmm/exec-initramfs-*
a=$(ms); ex -- true; st=$?; b=$(ms)
echo "bench-exec: first exec (builds the initramfs) $((b - a)) ms, status $st"
i=0
while [ $i -lt "$RUNS" ]; do
    a=$(ms); ex --json-out $W/run$i.json -- true; st=$?; b=$(ms)
    [ $st = 0 ] || echo "bench-exec: run $i failed with status $st"
    echo "$((b - a))" >>$W/exec.ms
    echo "bench-exec: exec -- true $((b - a)) ms ($(cat $W/run$i.json))"
    if [ -n "$MINIVMM_INITRAMFS_POWEROFF" ] && [ -s "$MINIVMM_INITRAMFS_POWEROFF" ]; then
        a=$(ms)
        "$MINIVMM_BIN" run --kernel "$MINIVMM_DEBIAN_VMLINUX" --initrd "$MINIVMM_INITRAMFS_POWEROFF" \
            --no-ledger --vcpus 2 --memory 512M --timeout 300s --serial none
        b=$(ms)
        echo "$((b - a))" >>$W/boot.ms
    fi
    i=$((i + 1))
done
echo "bench-exec: median of $RUNS: exec -- true $(median <$W/exec.ms) ms"
[ ! -s $W/boot.ms ] || echo "bench-exec: median of $RUNS: bare boot to a powering-off /init $(median <$W/boot.ms) ms"
