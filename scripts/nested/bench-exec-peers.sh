#!/bin/sh
# `minivmm exec` against vmtest and virtme-ng (`vng`), the QEMU-based tools CI
# jobs use for the same job, on the outer VM's hardware-style KVM. Runs inside
# the outer VM of scripts/test-nested-kvm.sh:
#
#   scripts/test-nested-kvm.sh --with-exec-peers --script scripts/nested/bench-exec-peers.sh
#
# All three boot the same kernel (build-linux.sh --variant hostroot: virtio-pci,
# 9p, virtio-console, virtiofs and overlayfs built in, no modules) with 2 vCPUs
# and 1G, on the outer VM's root:
#   minivmm exec  virtio-fs share of / with a tmpfs overlay, the current directory
#                 read-write; its own static init
#   vmtest        QEMU pc, / over 9p read-write, commands through qemu-ga
#                 (`vmtest -c FILE`: the toml form, for 2 vCPUs and 1G)
#   vng           QEMU microvm, / over virtio-fs (the Rust virtiofsd from
#                 crates.io) read-only with tmpfs overlays; VNG_FLAGS=--force-9p
#                 for its 9p fallback (QEMU pc, no page cache: a build takes
#                 more than 300 s here)
# First each must give back an exit status (`exit 3`) and a line of stdout; a
# tool that does not is named and left out. Then RUNS (default 5) rounds of
# `true` and BUILD_RUNS (default 5) of building tiny guests (`make -C guest`,
# GUESTS: default "hello cpus", 4 ELF files from 6 C and assembly files; all 11
# take ~2 minutes a run here), alternating the tools; each run is timed from
# process start to exit (/proc/uptime, 10 ms steps). Prints every run and the
# medians. Times are TCG's, not hardware's: compare ratios.
RUNS=${RUNS:-5}
VNG_FLAGS=${VNG_FLAGS:-}
BUILD_RUNS=${BUILD_RUNS:-5}
# Which tiny guests the build makes (each: two ELF files, from C and assembly).
GUESTS=${GUESTS:-"hello cpus"}
K=$MINIVMM_HOSTROOT_BZIMAGE
W=/tmp/peers
# util-linux's setsid (in /usr/bin) must win over busybox's (in /bin): vmtest's
# init uses the caller's PATH.
export HOME=/root PATH=/usr/local/bin:/usr/bin:/usr/sbin:/bin:/sbin VMTEST_NO_UI=1
ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# The guest sources are staged at their path in the checkout that staged them.
SRC=${MINIVMM_BIN%/target/*}/guest
[ -r "$SRC/Makefile" ] || { echo "bench-exec-peers: no guest sources at $SRC"; exit 1; }
ELFS=""
for g in $GUESTS; do
    ELFS="$ELFS /tmp/gout/$g.elf /tmp/gout/$g-64.elf"
done
rm -rf $W
mkdir -p $W
cd $W || exit 1
# The build is a script on the shared root, not a command line: virtme-ng passes
# the command on the kernel's (2 KiB at most, with its own options).
echo "exec make -s -C $SRC O=/tmp/gout$ELFS" >$W/build.sh

# run TOOL CMD: runs CMD in a fresh VM with TOOL; its stdout in $W/TOOL.out.
run() {
    case $1 in
        minivmm)
            "$MINIVMM_BIN" exec --kernel "$K" --no-ledger --vcpus 2 --memory 1G --timeout 300s \
                -- sh -c "$2" </dev/null >$W/$1.out 2>$W/$1.err ;;
        vmtest)
            cat >$W/vmtest.toml <<EOF
[[target]]
name = "bench"
kernel = "$K"
command = "sh -c '$2'"
[target.vm]
num_cpus = 2
memory = "1G"
EOF
            timeout -k 10 300 vmtest -c $W/vmtest.toml </dev/null >$W/$1.out 2>$W/$1.err ;;
        vng)
            # shellcheck disable=SC2086 # VNG_FLAGS: words
            timeout -k 10 300 vng $VNG_FLAGS -r "$K" -p 2 -m 1G -e "$2" </dev/null >$W/$1.out 2>$W/$1.err ;;
    esac
}

# What a failed run printed, without vmtest's stack backtrace.
show() {
    for f in $W/$1.out $W/$1.err; do
        echo "==> $f"
        grep -v '^ *[0-9]*: \|^ *at ' "$f" | tail -n "$2"
    done
}

tools=""
for t in minivmm vmtest vng; do
    # Three tries: the QEMU-based tools fail now and then on this bed (vmtest
    # cannot reach its guest agent, vng's guest gives no status: 69 and 255).
    for try in 1 2 3; do
        run $t 'echo peer-check-$((40 + 2)); exit 3'
        st=$?
        if [ $st = 3 ] && grep -q peer-check-42 $W/$t.out; then
            echo "bench-exec-peers: $t gives back status and output (try $try)"
            tools="$tools $t"
            break
        fi
        echo "bench-exec-peers: $t FAILED the check, try $try (status $st, want 3 and 'peer-check-42' on stdout):"
        show $t 40
        if [ $t = vng ]; then
            echo "bench-exec-peers: vng again with --verbose, to see its guest's console:"
            # shellcheck disable=SC2086
            timeout -k 10 300 vng --verbose $VNG_FLAGS -r "$K" -p 2 -m 1G -e 'exit 3' </dev/null 2>&1 | tail -n 60
        fi
    done
done
[ -n "$tools" ] || exit 1

for job in true build; do
    cmd=true
    [ $job = build ] && cmd="sh $W/build.sh"
    n=$RUNS
    [ $job = build ] && n=$BUILD_RUNS
    i=1
    while [ $i -le "$n" ]; do
        for t in $tools; do
            rm -rf /tmp/gout
            a=$(ms)
            run $t "$cmd"
            st=$?
            b=$(ms)
            if [ $st != 0 ]; then
                echo "bench-exec-peers: $t $job run $i failed with status $st"
                show $t 25
                continue
            fi
            echo "bench-exec-peers: $t $job run $i $((b - a)) ms"
            echo $((b - a)) >>$W/$t.$job.ms
        done
        i=$((i + 1))
    done
done
for job in true build; do
    for t in $tools; do
        [ -s $W/$t.$job.ms ] || continue
        echo "bench-exec-peers: $job $t median $(median <$W/$t.$job.ms) ms ($(grep -c . $W/$t.$job.ms) runs)"
    done
done
