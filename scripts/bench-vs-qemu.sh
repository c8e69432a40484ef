#!/usr/bin/env bash
# minivmm side by side with QEMU on the very same guest files, alternating
# A B A B so both see the same host load.
#
# Usage: scripts/bench-vs-qemu.sh [--runs N] [--pc-runs N] [--linux-runs N]
#                                 [--no-pc] [--no-linux] [--keep DIR]
#
#   hello   bench/guests/hello.S: a PVH ELF that prints a line and writes 0 to
#           isa-debug-exit (status 1 in both VMMs). minivmm vs QEMU -M microvm
#           (--runs each, default 10) and vs QEMU's default -M pc (--pc-runs
#           each, default 3: its firmware runs emulated here, ~9 s a boot).
#   no-pit  hello again with no in-kernel PIT on either side: minivmm --no-pit vs
#           QEMU -M microvm,...,pit=off (--runs each).
#   linux   the minimal Linux (scripts/build-linux.sh, PVH ELF vmlinux), 2 vCPUs,
#           256M, until its "Processors:" line appears on the serial console;
#           then the VMM is killed. minivmm vs QEMU -M microvm (--linux-runs
#           each, default 10). Builds the kernel on first use (~4 min).
#   overhead  for hello under minivmm: wall_ms - run_ms (start-up + teardown
#           outside Vm::run), first_output_ms, and RSS beyond the guest's pages.
#
# Prints a table of medians with minivmm/QEMU ratios (wall, CPU = user+sys,
# peak RSS); the raw bench_run lines stay in --keep DIR (default: a temp dir,
# removed). Exits non-zero only when a VM fails (wrong status, no output).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib.sh
. "$here/lib.sh"
# shellcheck source=scripts/bench-lib.sh
. "$here/bench-lib.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

runs=10 pc_runs=3 linux_runs=10 do_pc=true do_linux=true keep=""
while [ "$#" -gt 0 ]; do
    case "$1" in
        --runs) runs="${2:?--runs needs a number}"; shift 2 ;;
        --pc-runs) pc_runs="${2:?--pc-runs needs a number}"; shift 2 ;;
        --linux-runs) linux_runs="${2:?--linux-runs needs a number}"; shift 2 ;;
        --no-pc) do_pc=false; shift ;;
        --no-linux) do_linux=false; shift ;;
        --keep) keep="${2:?--keep needs a directory}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1'; see $0 --help" ;;
    esac
done

bench_need_kvm
bench_need_qemu
bench_build_tools
if [ -n "$keep" ]; then
    mkdir -p "$keep"
    work="$(cd "$keep" && pwd)"
else
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
fi
bench_build_guests "$work/guests"
hello="$work/guests/hello.elf"
hello_text="hello from a bench guest"
failures=0

# run_hello VMM SERIES: one hello run; appends the bench_run line to
# $work/SERIES.txt and checks status 1 and the console line.
run_hello() {
    local vmm="$1" series="$2" out="$work/$2.console" line
    rm -f "$out"
    case "$vmm" in
        minivmm) line="$("$BENCH_RUN" --timeout 60 -- "$MINIVMM" run --no-ledger --kernel "$hello" --serial-out "$out")" ;;
        minivmm-nopit) line="$("$BENCH_RUN" --timeout 60 -- "$MINIVMM" run --no-ledger --no-pit --kernel "$hello" --serial-out "$out")" ;;
        microvm) line="$("$BENCH_RUN" --timeout 60 -- "$QEMU" "${qemu_base[@]}" "${qemu_microvm[@]}" -m 128M -smp 1 -serial "file:$out" -kernel "$hello")" ;;
        microvm-nopit) line="$("$BENCH_RUN" --timeout 60 -- "$QEMU" "${qemu_base[@]}" "${qemu_microvm_nopit[@]}" -m 128M -smp 1 -serial "file:$out" -kernel "$hello")" ;;
        pc) line="$("$BENCH_RUN" --timeout 120 -- "$QEMU" "${qemu_base[@]}" "${qemu_pc[@]}" -m 128M -smp 1 -serial "file:$out" -kernel "$hello")" ;;
    esac
    echo "$line" >>"$work/$series.txt"
    if [ "$(kv status "$line")" != 1 ] || ! grep -qF "$hello_text" "$out" 2>/dev/null; then
        log "FAILED: $vmm on hello: $line (console: $(head -c 200 "$out" 2>/dev/null || echo none))"
        failures=$((failures + 1))
    fi
}

# run_linux VMM SERIES: one Linux boot to "Processors:".
run_linux() {
    local vmm="$1" series="$2" out="$work/$2.console" line
    local cmdline="console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1"
    local until=(--until "$out" --pattern "Processors:" --timeout 120 --)
    case "$vmm" in
        minivmm) line="$("$BENCH_RUN" "${until[@]}" "$MINIVMM" run --no-ledger --kernel "$vmlinux" --cmdline "$cmdline" --vcpus 2 --memory 256M --serial-out "$out")" ;;
        microvm) line="$("$BENCH_RUN" "${until[@]}" "$QEMU" "${qemu_base[@]}" "${qemu_microvm[@]}" -m 256M -smp 2 -serial "file:$out" -kernel "$vmlinux" -append "$cmdline")" ;;
    esac
    echo "$line" >>"$work/$series.txt"
    if [ "$(kv matched "$line")" != 1 ]; then
        log "FAILED: $vmm on Linux never printed 'Processors:': $line (last console line: $(tail -n 1 "$out" 2>/dev/null || echo none))"
        failures=$((failures + 1))
    fi
}

rows=()
# add_rows GUEST A_SERIES A_NAME B_SERIES B_NAME: a row per VMM and a ratio row.
add_rows() {
    local guest="$1" a="$work/$2.txt" an="$3" b="$work/$4.txt" bn="$5" k
    local -A m
    for k in wall_ms cpu_ms maxrss_kib; do
        m[a$k]="$(median_of "$k" "$a")"
        m[b$k]="$(median_of "$k" "$b")"
    done
    local n_a n_b
    n_a="$(wc -l <"$a")" n_b="$(wc -l <"$b")"
    rows+=("$(printf '%-8s %-16s %5s %11s %11s %12s' "$guest" "$an" "$n_a" "${m[awall_ms]}" "${m[acpu_ms]}" "$(awk -v k="${m[amaxrss_kib]}" 'BEGIN{printf "%.1f", k/1024}')")")
    rows+=("$(printf '%-8s %-16s %5s %11s %11s %12s' "$guest" "$bn" "$n_b" "${m[bwall_ms]}" "${m[bcpu_ms]}" "$(awk -v k="${m[bmaxrss_kib]}" 'BEGIN{printf "%.1f", k/1024}')")")
    rows+=("$(printf '%-8s %-16s %5s %11s %11s %12s' "$guest" "ratio" "" "$(ratio "${m[awall_ms]}" "${m[bwall_ms]}")" "$(ratio "${m[acpu_ms]}" "${m[bcpu_ms]}")" "$(ratio "${m[amaxrss_kib]}" "${m[bmaxrss_kib]}")")")
}

host="$(bench_host_line)"
log "$host"

log "hello: minivmm vs QEMU microvm, $runs runs each, alternating"
: >"$work/hello-minivmm.txt"
: >"$work/hello-microvm.txt"
run_hello minivmm warmup-m >/dev/null
run_hello microvm warmup-q >/dev/null
for _ in $(seq "$runs"); do
    run_hello minivmm hello-minivmm
    run_hello microvm hello-microvm
done
add_rows hello hello-minivmm minivmm hello-microvm "qemu microvm"

# The same without the in-kernel PIT on both sides (hello never uses it): the PIT's
# kernel thread and its teardown are a large part of a tiny VM's life here.
log "hello without a PIT: minivmm --no-pit vs QEMU microvm,pit=off, $runs runs each, alternating"
: >"$work/nopit-minivmm.txt"
: >"$work/nopit-microvm.txt"
for _ in $(seq "$runs"); do
    run_hello minivmm-nopit nopit-minivmm
    run_hello microvm-nopit nopit-microvm
done
add_rows no-pit nopit-minivmm "minivmm --no-pit" nopit-microvm "qemu microvm,pit=off"

# Overhead on hello from minivmm's own JSON: wall_ms - run_ms is everything
# between main() and the JSON line outside Vm::run (argument parsing, Vm::new,
# and the VM's teardown after the last vCPU thread is joined).
: >"$work/hello-json.txt"
for _ in $(seq "$runs"); do
    "$MINIVMM" run --no-ledger --kernel "$hello" --serial none --json >>"$work/hello-json.txt" || true
done
json_median() { sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p" "$work/hello-json.txt" | median; }
outside="$(sed -n 's/.*"run_ms":\([0-9.]*\).*"wall_ms":\([0-9.]*\).*/\2 \1/p' "$work/hello-json.txt" | awk '{ print $1 - $2 }' | median)"
first_out="$(json_median first_output_ms)"
run_ms="$(json_median run_ms)"

# Phases from strace (-ttt -T, seccomp-bpf so only the traced calls stop): exec to
# the first KVM_RUN, the last KVM_RUN's return to the process's end, and the
# close of the VM fd (KVM tears the VM down in it). strace adds a little.
strace_phases() {
    command -v strace >/dev/null || ensure_debs strace
    strace -f --seccomp-bpf -ttt -T -e trace=execve,ioctl,close,exit_group -o "$work/strace.txt" \
        "$MINIVMM" run --no-ledger --kernel "$hello" --serial none >/dev/null 2>&1 || true
    awk '
        { ts = $2; d = 0
          if (match($0, /<[0-9.]+>$/)) d = substr($0, RSTART + 1, RLENGTH - 2) }
        /execve\(/ && !exec { exec = ts }
        /KVM_RUN/ { if (!first) first = ts; if (ts + d > last) last = ts + d }
        /KVM_CREATE_VM/ { vmfd = $0; sub(/.*= /, "", vmfd); sub(/ .*/, "", vmfd) }
        vmfd != "" && $0 ~ ("close\\(" vmfd "\\)") { destroy = d }
        vmfd != "" && $0 ~ ("close\\(" vmfd " <unfinished") { pending = ts }
        pending && /<\.\.\. close resumed>/ { destroy = ts - pending; pending = 0 }
        { end = ts }
        END { printf "%.3f %.3f %.3f\n", (first - exec) * 1e3, (end - last) * 1e3, destroy * 1e3 }
    ' "$work/strace.txt"
}
read -r st_start st_end st_destroy < <(strace_phases)

# Memory: run park.elf (prints, then halts forever), read the VMM's smaps once its
# line is out, then kill it. The guest-RAM mapping is the one of the guest's
# size (minivmm) or the largest (QEMU); everything else is the VMM's own.
park="$work/guests/park.elf"
# smaps_split PID: prints "total_rss_kib guest_rss_kib vmm_dirty_kib", the last
# being the VMM's Private_Dirty pages outside guest RAM (heap, stacks, written
# data): memory only this VM uses. The rest of its RSS is clean file pages (the
# binary's text, shared libraries) that every process running the same files
# shares and the kernel can drop and re-read.
smaps_split() {
    awk '
        /^[0-9a-f]+-[0-9a-f]+ / { cur++ }
        /^Size:/ { size[cur] = $2 }
        /^Rss:/ { rss[cur] = $2; total += $2 }
        /^Private_Dirty:/ { dirty[cur] = $2; tdirty += $2 }
        END { best = 0; for (i in size) if (size[i] > size[best]) best = i
              print total, rss[best], tdirty - dirty[best] }
    ' "/proc/$1/smaps"
}
park_memory() {
    local vmm="$1" out="$work/park-$1.console" pid split=""
    rm -f "$out"
    # A binary just written by cargo sits dirty in the page cache until writeback, and
    # smaps counts its mapped pages as Private_Dirty (2.4 MiB more, measured): flush first.
    sync
    case "$vmm" in
        minivmm) "$MINIVMM" run --no-ledger --kernel "$park" --serial-out "$out" </dev/null >/dev/null 2>&1 & ;;
        microvm) "$QEMU" "${qemu_base[@]}" "${qemu_microvm[@]}" -m 128M -smp 1 -serial "file:$out" -kernel "$park" </dev/null >/dev/null 2>&1 & ;;
    esac
    pid=$!
    for _ in $(seq 500); do
        grep -q parked "$out" 2>/dev/null && { sleep 0.05; split="$(smaps_split "$pid")"; break; }
        sleep 0.01
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    [ -n "$split" ] || { log "FAILED: $vmm never printed 'parked'"; failures=$((failures + 1)); split="0 0 0"; }
    echo "$split"
}
read -r m_total m_guest m_dirty < <(park_memory minivmm)
read -r q_total q_guest q_dirty < <(park_memory microvm)

if [ "$do_pc" = true ]; then
    log "hello: minivmm vs QEMU -M pc (emulated firmware, ~9 s a run), $pc_runs runs each"
    : >"$work/pc-minivmm.txt"
    : >"$work/pc-qemu.txt"
    for _ in $(seq "$pc_runs"); do
        run_hello minivmm pc-minivmm
        run_hello pc pc-qemu
    done
    add_rows hello pc-minivmm minivmm pc-qemu "qemu pc"
fi

if [ "$do_linux" = true ]; then
    vmlinux="$("$here/build-linux.sh" | sed -n 's/^vmlinux=//p')"
    [ -s "$vmlinux" ] || die "scripts/build-linux.sh gave no vmlinux"
    log "linux to 'Processors:': minivmm vs QEMU microvm, $linux_runs runs each, alternating (~5 s a run)"
    : >"$work/linux-minivmm.txt"
    : >"$work/linux-microvm.txt"
    for _ in $(seq "$linux_runs"); do
        run_linux minivmm linux-minivmm
        run_linux microvm linux-microvm
    done
    add_rows linux linux-minivmm minivmm linux-microvm "qemu microvm"
fi

echo "# $host"
echo "# medians; runs = VMs measured; CPU = user+sys; RSS = peak (wait4 ru_maxrss)"
printf '%-8s %-16s %5s %11s %11s %12s\n' guest vmm runs wall_ms cpu_ms peak_rss_MiB
printf '%s\n' "${rows[@]}"
echo
echo "# minivmm overhead on hello ($runs runs of --json, medians)"
echo "wall_ms - run_ms (main() to JSON, outside Vm::run)     = $outside ms"
echo "run_ms (vCPU threads start to join)                    = $run_ms ms"
echo "first_output_ms (Vm::run start to first serial byte)   = $first_out ms"
echo "# one run under strace -ttt -T (adds a little to each)"
echo "exec to first KVM_RUN                                  = $st_start ms"
echo "last KVM_RUN return to process end                     = $st_end ms"
echo "  of which close(VM fd), KVM's VM teardown             = $st_destroy ms"
echo "# memory with park.elf (128M guest, parked after one line), from /proc/PID/smaps"
printf '%-8s total_rss=%6s KiB guest_ram_rss=%6s KiB vmm_rss=%6s KiB vmm_private_dirty=%6s KiB\n' \
    minivmm "$m_total" "$m_guest" "$((m_total - m_guest))" "$m_dirty" \
    qemu "$q_total" "$q_guest" "$((q_total - q_guest))" "$q_dirty"
echo "ratios minivmm/qemu: vmm_rss $(ratio "$((m_total - m_guest))" "$((q_total - q_guest))"), vmm_private_dirty $(ratio "$m_dirty" "$q_dirty")"
if [ "$failures" -gt 0 ]; then
    die "$failures VM run(s) failed; see the FAILED lines above"
fi
