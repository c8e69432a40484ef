#!/bin/sh
# minivmm and QEMU microvm side by side on the outer VM's hardware-style KVM:
# the same minimal kernel (PVH ELF) and initramfs, 2 vCPUs, 256M, from process
# start to /init's first line on the console; then the VMM is killed. Prints
# each run's time and peak RSS (VmHWM) and the medians. Runs inside the outer
# VM of scripts/test-nested-kvm.sh:
#
#   scripts/test-nested-kvm.sh --with-qemu --script scripts/nested/bench-vs-qemu.sh
#
# minivmm runs twice per round, with --irqchip split (m, the default) and
# --irqchip kernel (k). RUNS (default 5) runs of each, alternating. EXTRA_CMDLINE is appended to the
# kernel command line of both (e.g. printk.time=1 to see where time goes).
RUNS=${RUNS:-5}
LINE="minivmm-init: reached /init"
CMDLINE="console=ttyS0 reboot=k panic=-1 ${EXTRA_CMDLINE:-}"
# Milliseconds since boot (/proc/uptime: 10 ms steps; busybox date has no %N).
ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }

# Start "$@" in the background with its console in $console, wait for $LINE,
# then print "MS KB" (time to the line, peak RSS) and kill it.
measure() {
    console=$1; shift
    rm -f "$console"
    t0=$(ms)
    "$@" </dev/null >/dev/null 2>/tmp/bench-stderr.txt &
    pid=$!
    while ! grep -q "$LINE" "$console" 2>/dev/null; do
        # A boot that never gets there (the nested SVM of QEMU's TCG is not sound:
        # now and then a vCPU stalls) is named and left out of the medians.
        if ! kill -0 "$pid" 2>/dev/null || [ $(($(ms) - t0)) -gt 60000 ]; then
            echo "bench: $1 did not reach '$LINE' (ended, or 60 s passed):" >&2
            tail -n 20 "$console" /tmp/bench-stderr.txt >&2
            kill -9 "$pid" 2>/dev/null
            wait "$pid" 2>/dev/null
            echo "-1 -1"
            return
        fi
        sleep 0.05
    done
    t1=$(ms)
    hwm=$(awk '/^VmHWM:/ { print $2 }' /proc/$pid/status)
    kill -9 "$pid"
    wait "$pid" 2>/dev/null
    echo "$((t1 - t0)) $hwm"
}

median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

: >/tmp/m.txt
: >/tmp/k.txt
: >/tmp/q.txt
i=1
while [ "$i" -le "$RUNS" ]; do
    for mode in split kernel; do
        f=m
        [ "$mode" = kernel ] && f=k
        r=$(measure /tmp/$f-console.txt $MINIVMM_BIN run --no-ledger --kernel "$MINIVMM_LINUX_VMLINUX" \
            --initrd "$MINIVMM_INITRAMFS" --cmdline "$CMDLINE" --vcpus 2 --memory 256M \
            --irqchip $mode --serial-out /tmp/$f-console.txt)
        echo "bench: minivmm --irqchip $mode run $i: ms rss_kb = $r"
        echo "$r" >>/tmp/$f.txt
    done
    r=$(measure /tmp/q-console.txt qemu-system-x86_64 -enable-kvm -cpu host \
        -M microvm,x-option-roms=off -nodefaults -no-user-config -display none \
        -serial file:/tmp/q-console.txt -no-reboot -smp 2 -m 256M \
        -kernel "$MINIVMM_LINUX_VMLINUX" -initrd "$MINIVMM_INITRAMFS" -append "$CMDLINE")
    echo "bench: qemu run $i: ms rss_kb = $r"
    echo "$r" >>/tmp/q.txt
    i=$((i + 1))
done
echo "bench: m = minivmm --irqchip split, k = minivmm --irqchip kernel, q = QEMU microvm"
for f in m k q; do
    good=$(grep -v '^-1' /tmp/$f.txt)
    echo "bench: $f median ms $(echo "$good" | cut -d' ' -f1 | median) rss_kb $(echo "$good" | cut -d' ' -f2 | median) ($(echo "$good" | grep -c .) of $(grep -c . /tmp/$f.txt) runs reached /init)"
done
echo "bench: minivmm console:"; cat /tmp/m-console.txt
echo "bench: qemu console:"; cat /tmp/q-console.txt
