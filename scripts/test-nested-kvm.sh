#!/usr/bin/env bash
# Run the tests that need hardware-style KVM inside an outer VM whose KVM is
# Debian's own kvm_amd, on any x86-64 Linux host, with or without VT-x/AMD-V.
#
# Usage: scripts/test-nested-kvm.sh [options]
#
#   --tests "A B ..."  test targets to run inside (default: the Linux tests and
#                      the tiny-guest suite: linux acpi_linux guest_basic
#                      guest_io guest_memory guest_smp guest_virtio
#                      guest_virtiofs linux_virtio exec)
#   --irqchips "M ..." run every test binary once per --irqchip mode (default
#                      "split kernel": split is minivmm's default, and every
#                      guest must pass with both; the runs in kernel mode are
#                      named NAME@kernel)
#   --script FILE      run this shell script inside instead of the tests; its
#                      exit status becomes the verdict (for loops and
#                      benchmarks; /nested/env holds the guests' variables)
#   --with-qemu        copy qemu-system-x86_64, its libraries and firmware in
#   --with-exec-peers  also copy in vmtest and virtme-ng (scripts/fetch-exec-peers.sh)
#                      with what they and their guests need (virtiofsd, bash,
#                      util-linux setsid, qemu-ga, udev, python3.11), gcc and
#                      guest/ for a build, and the hostroot kernel, for
#                      scripts/nested/bench-exec-peers.sh; implies --with-qemu
#   --env K=V          set K=V in the environment of the tests or script inside
#                      (NESTED_STUCK_SECS=N: call a test binary stuck after N s,
#                      not 900, to try that path)
#   --outer-qemu Q     the QEMU that runs the outer VM: backports (default:
#                      QEMU 10 from Debian's bookworm-backports, fetched into
#                      the cache by scripts/fetch-qemu.sh: its SVM emulation
#                      honours the XSETBV intercept, inner Linux boots take
#                      3-8 s instead of 10-50, and its outer VMs crashed far
#                      less), system (Debian 12's own 7.2) or the path of a
#                      qemu-system-x86_64
#   --tcg MODE         QEMU's TCG threading: multi (default: a host thread per
#                      outer vCPU) or single (one thread for both)
#   --test-threads N   tests run at once inside (default 1: one VM at a time)
#   --retries N        a failed test runs up to N more times, alone, and is
#                      named (default 2); 0: a failed test fails the run at once
#   --no-retry         the same as --retries 0 --attempts 1
#   --cpus N           the outer VM's vCPUs (default 2)
#   --memory SIZE      the outer VM's memory (default 12G)
#   --timeout SECS     give up after this long, every boot of the outer VM
#                      included (default 3600)
#   --idle SECS        ... or when its console is silent this long (default 150;
#                      the outer VM prints a heartbeat every 30 s)
#   --attempts N       boots of the outer VM when it crashes or hangs (default 10);
#                      a new boot runs only the test binaries that had not
#                      finished (passed or failed) on the boots before
#   --log FILE         also write its whole console to FILE
#   --work DIR         where to stage and keep the console (default
#                      target/nested; give each concurrent run its own)
#
# How: QEMU's TCG emulates AMD SVM with nested paging, so Debian's cloud
# kernel, started as `qemu-system-x86_64 -accel tcg -cpu EPYC-Rome,+svm,+npt`,
# can load kvm-amd.ko from its own package and offer a /dev/kvm that behaves
# like hardware KVM (guest ring 0 runs, XSAVE and int3 work). That outer VM
# ("L1") boots an initramfs made here holding busybox, the KVM modules,
# minivmm, the test binaries (`cargo test --release --no-run`), the Linux
# guests and every shared library they need, all at their paths on this
# host. Its /init loads irqbypass.ko, kvm.ko and kvm-amd.ko, runs each test
# binary with CI=true (a skip fails), checks L1's own kernel log for KVM
# complaints (e.g. "Unhandled WRMSR"), prints "minivmm-nested: verdict=N" and
# powers off. The VMs minivmm starts in there ("L2") are real KVM guests.
#
# Times are TCG's, not hardware's (a Linux boot to /init: 6-50 s): compare
# ratios, never absolute times. Exit status: 0 when every test passed inside;
# 1 when one failed or a step failed, with the step named. Needs: root or
# the qemu-system-x86 and cpio packages installed; python3; cargo.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib.sh
. "$here/lib.sh"
cd "$here/.."

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

# linux_virtio was left out of the default set while a guest reading a share
# now and then stalled there with its vCPU stuck in KVM_RUN (through SIGKILL: a
# fault of the outer kernel). It has passed since the share's requests grew to
# 1 MiB (76 s for all of it); an outer VM that hangs is booted again (below).
irqchips="split kernel"
tests="linux acpi_linux guest_basic guest_io guest_memory guest_smp guest_virtio guest_virtiofs linux_virtio exec"
script=""
with_qemu=false
with_peers=false
outer_qemu=backports
extra_env=()
memory=12G
tcg=multi
cpus=2
test_threads=1
retries=2
limit=3600
idle=150
attempts=10
logfile=""
work="$PWD/target/nested"
while [ "$#" -gt 0 ]; do
    case "$1" in
        --tests) [ "$#" -ge 2 ] || die "--tests needs a list, e.g. --tests 'linux guest_smp'"; tests="$2"; shift 2 ;;
        --irqchips) [[ "${2:-}" =~ ^(split|kernel)( (split|kernel))*$ ]] || die "--irqchips needs modes, e.g. --irqchips 'split kernel'"; irqchips="$2"; shift 2 ;;
        --script) [ "$#" -ge 2 ] || die "--script needs a file"; script="$(realpath "$2")"; shift 2 ;;
        --with-qemu) with_qemu=true; shift ;;
        --with-exec-peers) with_qemu=true; with_peers=true; shift ;;
        --outer-qemu) [ "$#" -ge 2 ] || die "--outer-qemu needs backports, system or a path"; outer_qemu="$2"; shift 2 ;;
        --env) [[ "${2:-}" == [A-Za-z_]*=* ]] || die "--env needs NAME=VALUE"; extra_env+=("$2"); shift 2 ;;
        --tcg) [[ "${2:-}" =~ ^(single|multi)$ ]] || die "--tcg takes single or multi"; tcg="$2"; shift 2 ;;
        --test-threads) [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || die "--test-threads needs a count"; test_threads="$2"; shift 2 ;;
        --no-retry) retries=0; attempts=1; shift ;;
        --retries) [[ "${2:-}" =~ ^[0-9]+$ ]] || die "--retries needs a count"; retries="$2"; shift 2 ;;
        --cpus) [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || die "--cpus needs a count"; cpus="$2"; shift 2 ;;
        --memory) [ "$#" -ge 2 ] || die "--memory needs a size, e.g. 12G"; memory="$2"; shift 2 ;;
        --timeout) [ "$#" -ge 2 ] || die "--timeout needs seconds"; limit="$2"; shift 2 ;;
        --work) [ "$#" -ge 2 ] || die "--work needs a directory"; work="$(realpath -m "$2")"; shift 2 ;;
        --attempts) [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || die "--attempts needs a count"; attempts="$2"; shift 2 ;;
        --idle) [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || die "--idle needs seconds"; idle="$2"; shift 2 ;;
        --log) [ "$#" -ge 2 ] || die "--log needs a file"; logfile="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1'; see $0 --help" ;;
    esac
done
[ -z "$script" ] || [ -r "$script" ] || die "cannot read the script $script"

# Tests that cannot run inside, with why: they are run by scripts/test.sh on
# this host instead, and named here so that the list is honest.
declare -A skip_inside=(
    [guest_basic]="qemu_compatible_success_is_status_33" # needs QEMU as its peer, not KVM
)

step() { log "step: $*"; }

step "packages (qemu-system-x86, cpio, e2fsprogs)"
ensure_debs qemu-system-x86 cpio e2fsprogs
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 is not on PATH after installing qemu-system-x86"
# The outer VM's QEMU, and where it finds its firmware (-L).
outer_dirs=()
case "$outer_qemu" in
    system) outer_bin="$(command -v qemu-system-x86_64)" ;;
    backports)
        step "QEMU for the outer VM (scripts/fetch-qemu.sh)"
        out="$(scripts/fetch-qemu.sh)" || die "fetching QEMU from bookworm-backports failed (above); --outer-qemu system uses Debian 12's"
        outer_bin="$(sed -n 's/^qemu=//p' <<<"$out")"
        outer_dirs=(-L "$(sed -n 's/^datadir=//p' <<<"$out")" -L /usr/share/seabios)
        ;;
    *) outer_bin="$outer_qemu" ;;
esac
[ -x "$outer_bin" ] || die "the outer VM's QEMU $outer_bin is not an executable file"
log "outer VM: $("$outer_bin" --version | head -n 1)"
command -v python3 >/dev/null || die "python3 is needed to read cargo's build plan; install python3"

step "minivmm and the test binaries (cargo test --release --no-run)"
cargo build --release --quiet || die "cargo build --release failed"
test_args=()
for t in $tests; do test_args+=(--test "$t"); done
# One JSON line per artifact; keep "target-name executable" of each test target.
plan_bins="$(cargo test --release --no-run --message-format=json "${test_args[@]}" 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])
')" || die "cargo test --no-run failed; run it by hand to see why"
[ -n "$plan_bins" ] || die "cargo built no test binary for: $tests"
minivmm_bin="$PWD/target/release/minivmm"
[ -x "$minivmm_bin" ] || die "$minivmm_bin is missing after cargo build"

guest_vars=(MINIVMM_LINUX_VMLINUX MINIVMM_LINUX_BZIMAGE MINIVMM_INITRAMFS
    MINIVMM_LINUX_ACPI_VMLINUX MINIVMM_INITRAMFS_POWEROFF MINIVMM_DEBIAN_VMLINUX
    MINIVMM_INITRAMFS_DISK_SCRIPT MINIVMM_INITRAMFS_DISK_SCRIPT_DEBIAN)
# Only the Linux tests (and scripts) need the Linux guests built.
case " $tests " in
    *" linux "* | *" acpi_linux "* | *" linux_virtio "* | *" exec "*) need_linux=true ;;
    *) [ -n "$script" ] && need_linux=true || need_linux=false ;;
esac
if [ "$need_linux" = true ]; then
    step "Linux guests and the outer kernel with its KVM modules"
    export_linux_guests
else
    step "the outer kernel with its KVM modules"
    out="$(scripts/fetch-debian-kernel.sh --no-vmlinux)"
    MINIVMM_DEBIAN_VMLINUZ="$(sed -n 's/^vmlinuz=//p' <<<"$out")"
    MINIVMM_DEBIAN_MODULES="$(sed -n 's/^modules=//p' <<<"$out")"
    guest_vars=()
fi
l1_kernel="$MINIVMM_DEBIAN_VMLINUZ"
for m in irqbypass kvm kvm-amd; do
    [ -s "$MINIVMM_DEBIAN_MODULES/$m.ko" ] || die "$MINIVMM_DEBIAN_MODULES/$m.ko is missing; run scripts/fetch-debian-kernel.sh --refresh"
done

cache="$(minivmm_cache_dir)"
busybox="$(fetch_busybox "$cache" "$(busybox_version "$cache")")"
rm -rf "$work"
mkdir -p "$work"
root="$work/root"
mkdir -p "$root"/{bin,etc,proc,sys,dev,tmp,root,run,nested/modules}

step "staging the outer VM's initramfs in $root"
install_busybox "$busybox" "$root"
cp "$MINIVMM_DEBIAN_MODULES"/{irqbypass,kvm,kvm-amd}.ko "$root/nested/modules/"

# Copy FILE into the stage at its own absolute path (the test binaries have
# the paths of this host compiled in: CARGO_BIN_EXE_minivmm, the guest dir).
stage_file() {
    mkdir -p "$root$(dirname "$1")"
    # Never through a busybox applet's link: that would overwrite busybox.
    rm -f "$root$1"
    cp -L "$1" "$root$1"
}
# Copy every shared library ldd resolves for an ELF file (none for a static one).
stage_libs() {
    local lib
    { ldd "$1" 2>/dev/null || true; } | { grep -oE '/[^ ]+' || true; } | while read -r lib; do
        [ -e "$root$lib" ] || stage_file "$lib"
    done
}
# Copy an ELF program and its shared libraries.
stage_program() {
    stage_file "$1"
    stage_libs "$1"
}

stage_program "$minivmm_bin"
# tests/linux_virtio.rs makes and checks ext4 images on this side, with
# e2fsprogs: busybox's own mke2fs (first on PATH, in /bin) makes only ext2.
for tool in mke2fs debugfs e2fsck; do
    path="$(PATH="$PATH:/sbin:/usr/sbin" command -v "$tool")" || die "$tool is missing; install e2fsprogs"
    rm -f "$root/bin/$tool"
    stage_program "$path"
done
: >"$root/nested/plan"
while read -r name bin; do
    stage_program "$bin"
done <<<"$plan_bins"
first_mode="${irqchips%% *}"
for mode in $irqchips; do
    while read -r name bin; do
        label="$name"
        [ "$mode" = "$first_mode" ] || label="$name@$mode"
        printf '%s|%s|%s|%s\n' "$label" "$bin" "${skip_inside[$name]:-}" "$mode" >>"$root/nested/plan"
    done <<<"$plan_bins"
done
# The tiny guests are built by build.rs into a directory compiled into the
# test binaries; take it from there.
guest_dirs="$(find "$PWD/target/release/build" -maxdepth 4 -name hello.elf -printf '%h\n')"
[ -n "$guest_dirs" ] || die "no tiny guests under target/release/build; cargo build should have made them"
for d in $guest_dirs; do
    mkdir -p "$root$d"
    cp -a "$d/." "$root$d/"
done
for v in "${guest_vars[@]}"; do
    stage_file "${!v}"
done
# tests/exec.rs gives `minivmm exec` Debian's modules as --modules.
if [ "$need_linux" = true ]; then
    mkdir -p "$root$MINIVMM_DEBIAN_MODULES"
    cp -a "$MINIVMM_DEBIAN_MODULES/." "$root$MINIVMM_DEBIAN_MODULES/"
    guest_vars+=(MINIVMM_DEBIAN_MODULES)
fi
if [ "$with_qemu" = true ]; then
    stage_program "$(command -v qemu-system-x86_64)"
    # QEMU's own virtio-fs daemon, for scripts/nested/bench-virtio.sh.
    [ ! -x /usr/lib/qemu/virtiofsd ] || stage_program /usr/lib/qemu/virtiofsd
    for f in /usr/share/qemu/qboot.rom /usr/share/qemu/bios-microvm.bin /usr/share/seabios/bios-256k.bin; do
        # Not `[ -e ] && ...`: a for loop whose last test fails would end the script (set -e).
        [ ! -e "$f" ] || stage_file "$f"
    done
fi
if [ "$with_peers" = true ]; then
    step "vmtest, virtme-ng and the hostroot kernel (scripts/fetch-exec-peers.sh, build-linux.sh --variant hostroot)"
    out="$(scripts/fetch-exec-peers.sh)" || die "scripts/fetch-exec-peers.sh failed"
    peer() { sed -n "s/^$1=//p" <<<"$out"; }
    stage_program "$(peer vmtest)"
    mkdir -p "$root/usr/bin"
    ln -sf "$(peer vmtest)" "$root/usr/bin/vmtest"
    # vmtest's guest init is a bash script calling util-linux's `setsid --ctty
    # --wait` (busybox's setsid has neither); /usr/bin comes first on PATH there.
    stage_program /bin/bash
    stage_program /usr/bin/setsid
    # The build workload: the tiny guests (freestanding C and assembly: gcc,
    # cc1, as, ld and make, no headers or libc), from this checkout's guest/.
    stage_program /usr/bin/make
    for tool in gcc as ld; do
        real="$(readlink -f "$(command -v "$tool")")" || die "$tool is missing; install gcc and binutils"
        stage_program "$real"
        ln -sf "$real" "$root/usr/bin/$tool"
    done
    stage_program "$(gcc -print-prog-name=cc1)"
    # cpp includes it in every .S file, freestanding or not.
    stage_file /usr/include/stdc-predef.h
    mkdir -p "$root$PWD/guest"
    cp -a guest/. "$root$PWD/guest/"
    qga="$(peer qga)"
    mkdir -p "$root/usr/sbin"
    cp "$qga/usr/sbin/qemu-ga" "$root/usr/sbin/qemu-ga"
    stage_libs "$qga/usr/sbin/qemu-ga"
    # qemu-ga keeps its pid file in /var/run; vmtest's init mounts a tmpfs on /mnt.
    mkdir -p "$root/var" "$root/mnt"
    ln -sfn /run "$root/var/run"
    udev="$(peer udev)"
    rm -f "$root/bin/udevadm"
    cp "$udev/bin/udevadm" "$root/bin/udevadm"
    stage_libs "$udev/bin/udevadm"
    mkdir -p "$root/lib/systemd" "$root/lib/udev/rules.d"
    ln -sf /bin/udevadm "$root/lib/systemd/systemd-udevd"
    # The one rule virtme-ng's init relies on: /dev/virtio-ports/NAME links.
    grep 'virtio-ports' "$udev/lib/udev/rules.d/50-udev-default.rules" >"$root/lib/udev/rules.d/50-udev-default.rules" ||
        die "udev's 50-udev-default.rules has no virtio-ports rule"
    stage_program /usr/bin/python3.11
    mkdir -p "$root/usr/lib"
    cp -a /usr/lib/python3.11 "$root/usr/lib/"
    rm -rf "$root/usr/lib/python3.11/test" "$root/usr/lib/python3.11/dist-packages"
    for so in "$root"/usr/lib/python3.11/lib-dynload/*.so; do
        stage_libs "$so"
    done
    mkdir -p "$root/usr/local/lib/python3.11" "$root/usr/local/bin"
    # virtme-ng takes the first virtiofsd on PATH (then its microvm + virtio-fs).
    stage_program "$(peer virtiofsd)"
    ln -sf "$(peer virtiofsd)" "$root/usr/local/bin/virtiofsd"
    cp -a "$(peer vng_site)" "$root/usr/local/lib/python3.11/dist-packages"
    # pip's own launchers name the interpreter of the machine that ran pip.
    for cmd in "vng virtme_ng.run" "virtme-run virtme.commands.run"; do
        read -r name module <<<"$cmd"
        printf '#!/usr/bin/python3.11\nimport sys\nfrom %s import main\nsys.exit(main())\n' "$module" >"$root/usr/local/bin/$name"
        chmod +x "$root/usr/local/bin/$name"
    done
    # The option ROMs of QEMU's pc machine for -kernel.
    for f in /usr/share/qemu/linuxboot_dma.bin /usr/share/qemu/kvmvapic.bin; do
        stage_file "$f"
    done
    grep -q '^root:' "$root/etc/passwd" 2>/dev/null || echo 'root:x:0:0:root:/root:/bin/sh' >>"$root/etc/passwd"
    out="$(scripts/build-linux.sh --variant hostroot)" || die "scripts/build-linux.sh --variant hostroot failed"
    MINIVMM_HOSTROOT_BZIMAGE="$(sed -n 's/^bzImage=//p' <<<"$out")"
    stage_file "$MINIVMM_HOSTROOT_BZIMAGE"
    guest_vars+=(MINIVMM_HOSTROOT_BZIMAGE)
fi
[ -z "$script" ] || cp "$script" "$root/nested/script"

# What the tests read from the environment inside: the guests, and CI's
# switches so that nothing can skip there.
{
    for v in "${guest_vars[@]}"; do
        printf 'export %s=%q\n' "$v" "${!v}"
    done
    echo "export CI=true MINIVMM_REQUIRE_KVM=1 MINIVMM_REQUIRE_LINUX=1 MINIVMM_EXPECT_KVM=hardware MINIVMM_NESTED_TCG=1"
    echo "export MINIVMM_BIN=$minivmm_bin"
    echo "export RUST_BACKTRACE=1 HOME=/root TEST_THREADS=$test_threads RETRIES=$retries"
    for kv in "${extra_env[@]}"; do
        printf 'export %s=%q\n' "${kv%%=*}" "${kv#*=}"
    done
} >"$root/nested/env"

cat >"$root/init" <<'EOF'
#!/bin/sh
# /init of the outer VM (scripts/test-nested-kvm.sh): load KVM, run the tests.
export PATH=/bin:/usr/bin:/sbin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# No tmpfs over /tmp: the staged files keep their host paths, which may lie there.
say() { echo "minivmm-nested: $*"; }
end() { sync; say "verdict=$1"; poweroff -f; sleep 5; }
fail() { say "FAILED at step: $*"; end 1; }

say "outer VM up: $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ { print $2 }' /proc/meminfo) kB"
# A heartbeat while the tests run, however long one test is silent: when it stops,
# this kernel no longer schedules, and the host stops waiting for it.
# It also watches the test binary that runs (run_tests below writes its start and
# name to /tmp/test-since): one past $STUCK s is stuck, which a test cannot be on
# its own (each boot has a --timeout, and a test kills a VM that overstays it). Seen
# once in CI: an inner vCPU thread runnable (R) in kvm_vcpu_block but never run
# again, so its VM ignored --timeout and the test's SIGKILL never took; the rest of
# this kernel went on, heartbeat included. That is this kernel losing a wake-up,
# not a test failing: say "stuck" and the host boots this VM again.
# (`--env NESTED_STUCK_SECS=N` shortens it, to see this path work.)
. /nested/env
STUCK=${NESTED_STUCK_SECS:-900}
vcpu_threads() {
    for s in /proc/[0-9]*/task/[0-9]*/stack; do
        grep -qs kvm_vcpu_block "$s" || continue
        printf ' %s/%s:%s' "$(cat "${s%/task/*}/comm")" "$(cat "${s%stack}comm")" \
            "$(sed -n 's/^State:[[:space:]]*\(.\).*/\1/p' "${s%stack}status")"
    done
}
(
    while sleep 30; do
        say "heartbeat $(cut -d' ' -f1 /proc/uptime)"
        read -r since name 2>/dev/null </tmp/test-since || continue
        ran=$(($(date +%s) - since))
        [ "$ran" -le "$STUCK" ] ||
            say "stuck: $name has run for $ran s (more than $STUCK); threads in kvm_vcpu_block:$(vcpu_threads)"
    done
) &
for m in irqbypass kvm kvm-amd; do
    insmod /nested/modules/$m.ko || fail "insmod $m.ko: the outer VM cannot load KVM (does QEMU emulate SVM? -cpu EPYC-Rome,+svm,+npt)"
done
[ -c /dev/kvm ] || fail "kvm-amd.ko loaded but /dev/kvm did not appear"
dmesg | grep -E 'kvm|SVM' | sed 's/^/minivmm-nested: dmesg: /'
dmesg | grep -q 'Nested Paging enabled' || fail "kvm_amd did not enable nested paging"
$MINIVMM_BIN check || fail "minivmm check refused this KVM"
dmesg -c >/dev/null

# Run a test binary with its output on the console and in /tmp/test-output.txt;
# print its exit status.
run_tests() {
    echo "$(date +%s) ${1##*/}" >/tmp/test-since
    { "$@" </dev/null 2>&1; echo $? >/tmp/test-status; } | tee /tmp/test-output.txt >&2
    rm -f /tmp/test-since
    cat /tmp/test-status
}
# The names cargo's test harness lists under its last "failures:" heading.
failed_tests() {
    awk '/^failures:$/ { n = ""; on = 1; next }
        on && /^    [^ ]/ { n = n " " $1; next }
        on && /^$/ && n != "" { on = 0 }
        END { print n }' "$1"
}

status=0
retried=""
# Test binaries that finished on an earlier boot of this VM (the host passes
# them when the outer kernel crashed or hung): they are not run again.
arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^minivmm\.$1=//p" | tr ',' ' '; }
passed_before=" $(arg passed) "
failed_before=" $(arg failed) "
if [ -s /nested/script ]; then
    say "running /nested/script"
    sh /nested/script </dev/null
    status=$?
    say "script status=$status"
else
    while IFS='|' read -r name bin skip mode <&3; do
        case "$passed_before" in *" $name "*) say "passed on an earlier boot: $name"; continue ;; esac
        case "$failed_before" in *" $name "*) say "FAILED on an earlier boot: $name"; status=1; continue ;; esac
        # --nocapture: each boot's status and time appear as they happen.
        set -- --test-threads="$TEST_THREADS" --nocapture
        [ -z "$skip" ] || set -- "$@" --skip "$skip"
        export MINIVMM_IRQCHIP="$mode"
        say "running $name ($bin $*) with --irqchip $mode"
        start=$(date +%s)
        rc=$(run_tests "$bin" "$@")
        say "result $name status=$rc ($(( $(date +%s) - start )) s)"
        # The nested SVM of QEMU's TCG is not sound (see the host script's
        # comments): rerun the tests that failed, alone, up to $RETRIES times,
        # and name them. A test that fails every time fails the run.
        try=0
        while [ "$rc" != 0 ] && [ "$try" -lt "$RETRIES" ]; do
            failed=$(failed_tests /tmp/test-output.txt)
            [ -n "$failed" ] || break
            try=$((try + 1))
            say "RETRY $name: $(echo $failed) failed; running them again ($try of $RETRIES)"
            rc=$(run_tests "$bin" --exact --test-threads=1 --nocapture $failed)
            say "RETRY $name status=$rc"
            [ "$rc" != 0 ] || retried="$retried $name:$(echo $failed | tr ' ' ,)"
        done
        say "final $name status=$rc"
        [ "$rc" = 0 ] || status=1
    done 3</nested/plan
    say "tests run here: $(cut -d'|' -f1 /nested/plan | tr '\n' ' ')"
    say "left to the host: $(cut -d'|' -f3 /nested/plan | tr '\n' ' ')"
    [ -z "$retried" ] || say "passed only when run again:$retried"
fi

# This kernel is the VMs' host: a VMM must leave nothing in its log.
# One line is the guest's, not the VMM's: Linux probes AMD's legacy perf counter
# (WRMSR 0xc0010007 = 0xffff, perf's check_hw_exists) and this KVM, without a vPMU,
# logs it once per VM; QEMU's guests do the same. A seccomp "log" action (audit
# type 1326: run with --env MINIVMM_SECCOMP=log) is a system call missing from a
# thread's allow-list.
if dmesg | grep -iE 'unhandled|unimplemented|kvm.*(error|fail)|BUG|WARNING|type=1326' |
    grep -vE 'Unhandled WRMSR\(0xc001000[0-7]\)'; then
    say "the outer kernel's log has KVM complaints (above)"
    status=1
fi
end "$status"
EOF
chmod 0755 "$root/init"

step "packing $(du -sh "$root" | cut -f1) into $work/initramfs.cpio"
initramfs_cpio "$root" >"$work/initramfs.cpio"
rm -rf "$root"

# What the outer kernel prints when it is broken for good: a CPU stuck in
# the kernel (soft lockup, RCU stall) or an oops. Its own lines carry a
# "[ seconds ]" stamp; the tests' output does not.
# Its /init says "stuck" when a test binary runs far too long (see there).
outer_fault='^(\[ *[0-9.]+\] (watchdog: BUG: soft lockup|rcu: INFO: rcu_[a-z]+ (self-)?detected stall|BUG: |Kernel panic)|minivmm-nested: stuck: )'

# nohz=off keeps the outer kernel's tick running on idle CPUs. Inner guests
# stalled for good with a vCPU thread runnable (state R) in kvm_vcpu_block and
# never scheduled, surviving even SIGKILL: the wake-up IPI to an idle outer CPU
# was lost under TCG's emulated SVM, and a tickless idle CPU sleeps until the
# next IPI. With the tick, a lost IPI costs at most one tick (4 ms).
# Boot the outer VM once; its console goes to stdout and to $console. A console
# silent for $idle seconds means the outer VM hangs (its /init prints a heartbeat
# every 30 s, whatever the tests do): it is stopped.
boot_outer() {
    rm -f "$work/qemu.pid" "$work/qemu.status"
    : >"$console"
    local left=$((deadline - $(date +%s)))
    {
        timeout --foreground -k 10 "$left" \
            "$outer_bin" "${outer_dirs[@]}" -accel tcg,thread="$tcg" -cpu EPYC-Rome,+svm,+npt \
            -smp "$cpus" -m "$memory" -display none -monitor none -serial stdio -no-reboot \
            -pidfile "$work/qemu.pid" -kernel "$l1_kernel" -initrd "$work/initramfs.cpio" \
            -append "console=ttyS0 panic=-1 loglevel=3 nohz=off rdinit=/init $resume" </dev/null 2>"$work/qemu.stderr"
        echo $? >"$work/qemu.status"
    } | tee "$console" &
    local pipe=$!
    hung=false
    local why
    while kill -0 "$pipe" 2>/dev/null; do
        sleep 5
        [ "$hung" = false ] || continue
        why=""
        if [ $(($(date +%s) - $(stat -c %Y "$console"))) -gt "$idle" ]; then
            why="it has printed nothing for $idle s"
        elif why="$(grep -m1 -aE "$outer_fault" "$console")"; then
            # A stuck outer CPU keeps printing its soft-lockup warning every
            # ~30 s, so the silence test above never fires: stop it now.
            why="its kernel reports: $(tr -d '\r' <<<"$why")"
        fi
        if [ -n "$why" ]; then
            log "the outer VM hangs ($why); stopping it"
            hung=true
            kill "$(cat "$work/qemu.pid" 2>/dev/null)" 2>/dev/null || true
        fi
    done
    wait "$pipe" || true
    qemu_status="$(cat "$work/qemu.status" 2>/dev/null || echo 1)"
    [ -z "$logfile" ] || cp "$console" "$logfile"
    verdict="$(sed -n 's/^minivmm-nested: verdict=\([0-9]*\).*/\1/p' "$console" | tail -n 1)"
}

step "booting the outer VM (QEMU TCG, SVM emulated; its console follows)"
console="$work/console.txt"
deadline=$(($(date +%s) + limit))
resume=""
boot_outer
# The outer kernel itself can crash under QEMU's emulated SVM (seen: a page fault
# on its own per-CPU area inside KVM's vCPU thread, "corrupted stack end"), or stop
# printing altogether with both of its vCPUs busy (seen in about one run in three,
# during tiny-guest tests too): no guest or VMM process can do that to its host's
# kernel. Boot it again, up to --attempts times, and say so.
# The next boot skips the test binaries that already finished, passed or failed.
# An outer VM whose QEMU exited 0 with no verdict reset itself (a triple fault of
# the outer kernel, turned into an exit by -no-reboot; seen under QEMU 10 in the
# middle of an SMP boot loop, with nothing on its console): the same kind of crash.
attempt=1
while [ -z "$verdict" ] && [ "$attempt" -lt "$attempts" ] && [ "$qemu_status" != 124 ] &&
    [ $((deadline - $(date +%s))) -gt 300 ] &&
    { [ "$hung" = true ] || [ "$qemu_status" = 0 ] || grep -qaE "$outer_fault" "$console"; }; do
    cp "$console" "$work/console-crashed-$attempt.txt"
    finished="$(cat "$work"/console-crashed-*.txt | tr -d '\r' |
        sed -n 's/^minivmm-nested: final \([A-Za-z0-9_@]*\) status=\([0-9]*\)$/\1 \2/p')"
    passed="$(awk '$2 == 0 { printf "%s,", $1 }' <<<"$finished")"
    failed="$(awk '$2 != 0 { printf "%s,", $1 }' <<<"$finished")"
    resume="minivmm.passed=${passed%,} minivmm.failed=${failed%,}"
    attempt=$((attempt + 1))
    log "the outer VM crashed or hung (console in $work/console-crashed-$((attempt - 1)).txt); booting it again (attempt $attempt of $attempts; finished before: ${passed%,} ${failed%,})"
    boot_outer
done
if [ -z "$verdict" ]; then
    [ "$qemu_status" != 124 ] || die "the outer VM ran past --timeout $limit s (all boots); its console is in $console"
    grep -v 'warning: TCG doesn.t support' "$work/qemu.stderr" >&2 || true
    [ "$hung" = false ] || die "the outer VM hung on boot $attempt of $attempts (see above why); its console is in $console"
    die "the outer VM ended (status $qemu_status) without a verdict; its console is in $console"
fi
cat "$work"/console-crashed-*.txt "$console" 2>/dev/null |
    grep '^minivmm-nested: \(result\|RETRY\|final\|passed\|FAILED\|tests run\|left to\|script status\)' >&2 || true
rm -f "$work/initramfs.cpio"
[ "$verdict" = 0 ] || die "tests failed inside the outer VM (verdict $verdict); console in $console"
log "every test passed on the outer VM's hardware-style KVM"
