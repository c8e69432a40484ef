#!/usr/bin/env bash
# The whole test suite, as README.md gives it: installs what the tests need (a C
# toolchain for the tiny guests, the packages to build the minimal Linux guest),
# builds the guest kernels once (cached), then runs every test with one release build
# and prints how many tests skipped and why (with CI=true any skip fails the run).
set -euo pipefail
cd "$(dirname "$0")/.."

# CI services set CI=true; there every skipped test fails the run (tests/common/mod.rs).
case "${CI:-}" in [Tt][Rr][Uu][Ee] | 1) in_ci=1 ;; *) in_ci="" ;; esac

# MINIVMM_SKIP_LINUX leaves the Linux guests unbuilt, so their tests skip: fine on a
# workstation (the skips are counted below), never in CI, and never together with
# MINIVMM_REQUIRE_LINUX=1.
if [ -n "${MINIVMM_SKIP_LINUX:-}" ]; then
    if [ -n "$in_ci" ]; then
        echo "test.sh: MINIVMM_SKIP_LINUX is set but CI=true: CI must run the Linux tests; unset MINIVMM_SKIP_LINUX" >&2
        exit 1
    fi
    if [ "${MINIVMM_REQUIRE_LINUX:-}" = 1 ]; then
        echo "test.sh: MINIVMM_SKIP_LINUX and MINIVMM_REQUIRE_LINUX=1 contradict each other; unset one" >&2
        exit 1
    fi
    echo "test.sh: MINIVMM_SKIP_LINUX is set: the Linux guests are not built and their tests skip" >&2
fi

# gcc/make/ld build the tiny guests; iasl (acpica-tools) checks minivmm's ACPI tables;
# GNU time measures a big VM's peak RSS; QEMU runs a tiny guest for comparison;
# PostgreSQL serves the ledger's second store.
need_pkgs=()
for tool in gcc make ld; do
    command -v "$tool" >/dev/null || need_pkgs+=(build-essential)
done
command -v iasl >/dev/null || need_pkgs+=(acpica-tools)
[ -x /usr/bin/time ] || need_pkgs+=(time)
command -v qemu-system-x86_64 >/dev/null || need_pkgs+=(qemu-system-x86)
# PostgreSQL: the ledger's conformance tests start a server of their own from it.
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || need_pkgs+=(postgresql)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "test.sh: installing ${need_pkgs[*]}" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        $(printf '%s\n' "${need_pkgs[@]}" | sort -u)
fi
export MINIVMM_REQUIRE_IASL="${MINIVMM_REQUIRE_IASL:-1}"
export MINIVMM_REQUIRE_QEMU="${MINIVMM_REQUIRE_QEMU:-1}"

# Guest Linux kernels (built from Debian's linux-source, cached outside the repo).
# The tests find them through these variables; without them Linux tests skip (and
# are counted below), and with MINIVMM_REQUIRE_LINUX=1 or CI=true they fail instead.
if [ -z "${MINIVMM_SKIP_LINUX:-}" ]; then
    # shellcheck source=scripts/lib.sh
    . scripts/lib.sh
    export_linux_guests
    export MINIVMM_REQUIRE_LINUX="${MINIVMM_REQUIRE_LINUX:-1}"
fi

# Every skip is recorded here as "test: why" (tests/common/mod.rs, skip()); cargo
# shows no passing test's stderr, so the summary below is where skips become visible.
target_dir="${CARGO_TARGET_DIR:-target}"
case "$target_dir" in /*) ;; *) target_dir="$PWD/$target_dir" ;; esac
export MINIVMM_SKIP_LOG="${MINIVMM_SKIP_LOG:-$target_dir/tmp/skips.log}"
mkdir -p "$(dirname "$MINIVMM_SKIP_LOG")"
: >"$MINIVMM_SKIP_LOG"

status=0
cargo test --release "$@" || status=$?

# The tiny guests again with the interrupt controllers in the host kernel: the run
# above used minivmm's default, --irqchip split, and every guest must pass in both
# modes (the outer VM below runs the Linux tests in both too).
if [ "$#" -eq 0 ]; then
    echo "test.sh: the tiny-guest tests again with --irqchip kernel (MINIVMM_IRQCHIP=kernel)" >&2
    MINIVMM_IRQCHIP=kernel cargo test --release --test guest_basic --test guest_io \
        --test guest_memory --test guest_smp --test guest_virtio --test guest_virtiofs \
        --test acpi --test i8042 || status=$?
fi

# A short pass of every fuzz target (scripts/fuzz.sh; run it longer by hand). Not
# with a test filter: a filtered run is someone looking at one test.
if [ "$#" -eq 0 ]; then
    echo "test.sh: a short fuzzing pass (scripts/fuzz.sh --seconds ${MINIVMM_FUZZ_SECONDS:-20})" >&2
    scripts/fuzz.sh --seconds "${MINIVMM_FUZZ_SECONDS:-20}" || status=$?
fi

# The tests that need hardware KVM (Linux to /init, and the tiny guests again), in
# an outer VM whose KVM is Debian's kvm_amd on QEMU's emulated SVM: PVM hosts, such
# as the project's own, cannot show them otherwise. MINIVMM_SKIP_NESTED=1 leaves it
# out on a workstation (counted as a skip; refused with CI=true).
if [ -n "${MINIVMM_SKIP_NESTED:-}" ]; then
    echo "scripts/test-nested-kvm.sh: MINIVMM_SKIP_NESTED is set" >>"$MINIVMM_SKIP_LOG"
    if [ -n "$in_ci" ]; then
        echo "test.sh: MINIVMM_SKIP_NESTED is set but CI=true: CI must run the hardware-KVM tests" >&2
        status=1
    fi
else
    echo "test.sh: the hardware-KVM tests, in an outer VM (scripts/test-nested-kvm.sh)" >&2
    nested_start=$(date +%s)
    scripts/test-nested-kvm.sh || status=$?
    echo "test.sh: scripts/test-nested-kvm.sh took $(( $(date +%s) - nested_start )) s" >&2
fi

skipped=$(grep -c . "$MINIVMM_SKIP_LOG" || true)
echo
if [ "$skipped" -eq 0 ]; then
    echo "test.sh: no test skipped"
else
    if [ "$skipped" -eq 1 ]; then echo "test.sh: 1 test skipped:"; else echo "test.sh: $skipped tests skipped:"; fi
    sed 's/^/  /' "$MINIVMM_SKIP_LOG"
    if [ -n "$in_ci" ]; then
        echo "test.sh: CI=true and tests skipped: failing the run" >&2
        [ "$status" -ne 0 ] || status=1
    fi
fi
exit "$status"
