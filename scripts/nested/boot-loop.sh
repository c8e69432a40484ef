#!/bin/sh
# Boots every Linux case of the tests again and again on the outer VM's KVM and
# counts the boots that did not end as asked: to show that SMP boots are
# reliable. Runs inside the outer VM of scripts/test-nested-kvm.sh:
#
#   scripts/test-nested-kvm.sh --script scripts/nested/boot-loop.sh
#
# RUNS (default 30) boots per case, one after the other; CASES picks some
# (default: all); EXTRA_FLAGS go to every `minivmm run` (e.g. --no-pit, or
# --irqchip kernel); TIMEOUT (default 300s) bounds each boot. A boot counts as
# good when /init's command ran, its last line was the expected end and
# minivmm's JSON says the matching reason. Each bad boot's console is printed.
# Exit status: the number of bad boots (0: none lost), at most 100.
RUNS=${RUNS:-30}
CASES=${CASES:-"elf4 bz4 acpi4 debian3"}
CMDLINE="console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1"
bad_total=0

one_case() { # name kernel initrd vcpus memory end reason
    name=$1 kernel=$2 initrd=$3 vcpus=$4 mem=$5 end=$6 reason=$7
    bad=0 times=""
    i=1
    while [ "$i" -le "$RUNS" ]; do
        start=$(date +%s)
        $MINIVMM_BIN run --no-ledger --kernel "$kernel" --initrd "$initrd" \
            --cmdline "$CMDLINE" --vcpus "$vcpus" --memory "$mem" --timeout "${TIMEOUT:-300s}" ${EXTRA_FLAGS:-} \
            --json --serial-out /tmp/console.txt >/tmp/summary.json 2>/tmp/stderr.txt
        status=$?
        secs=$(( $(date +%s) - start ))
        times="$times $secs"
        last=$(grep '^minivmm-init: ' /tmp/console.txt | tail -n 1 | tr -d '\r')
        if [ "$status" = 0 ] && grep -q "\"reason\":\"$reason\"" /tmp/summary.json &&
            grep -q '^minivmm-init: exit-status=0' /tmp/console.txt &&
            grep -q "^minivmm-init: nproc=$vcpus" /tmp/console.txt &&
            [ "$last" = "minivmm-init: $end" ]; then
            echo "boot-loop: $name run $i ok in ${secs}s"
        else
            bad=$((bad + 1))
            echo "boot-loop: $name run $i BAD: status $status, $(cat /tmp/summary.json), last init line '$last'"
            echo "---- console of $name run $i (last 60 lines) ----"
            tail -n 60 /tmp/console.txt
            echo "---- stderr ----"
            cat /tmp/stderr.txt
            echo "----"
        fi
        i=$((i + 1))
    done
    echo "boot-loop: RESULT $name: $bad bad of $RUNS; seconds:$times"
    bad_total=$((bad_total + bad))
}

for c in $CASES; do
    case $c in
        elf4) one_case elf4 "$MINIVMM_LINUX_VMLINUX" "$MINIVMM_INITRAMFS" 4 256M "reboot -f" reset ;;
        elf2) one_case elf2 "$MINIVMM_LINUX_VMLINUX" "$MINIVMM_INITRAMFS" 2 256M "reboot -f" reset ;;
        bz4) one_case bz4 "$MINIVMM_LINUX_BZIMAGE" "$MINIVMM_INITRAMFS" 4 1G "reboot -f" reset ;;
        acpi4) one_case acpi4 "$MINIVMM_LINUX_ACPI_VMLINUX" "$MINIVMM_INITRAMFS_POWEROFF" 4 256M "poweroff -f" poweroff ;;
        debian2) one_case debian2 "$MINIVMM_DEBIAN_VMLINUX" "$MINIVMM_INITRAMFS_POWEROFF" 2 256M "poweroff -f" poweroff ;;
        debian3) one_case debian3 "$MINIVMM_DEBIAN_VMLINUX" "$MINIVMM_INITRAMFS_POWEROFF" 3 512M "poweroff -f" poweroff ;;
        *) echo "boot-loop: unknown case $c"; exit 100 ;;
    esac
done
[ "$bad_total" -le 100 ] || bad_total=100
exit "$bad_total"
