#!/bin/sh
# The same SMP Linux boot under minivmm and under QEMU, alternating, on the outer
# VM's KVM: if QEMU's boots fail as minivmm's do, the fault is in the nested KVM
# (QEMU TCG's emulated SVM), not in minivmm. Runs inside the outer VM:
#
#   scripts/test-nested-kvm.sh --with-qemu --script scripts/nested/smp-control.sh
#
# RUNS (default 10) boots of each VMM per case. CASES (default elf4) picks them:
# elf4 is the minimal kernel (PVH ELF) with 4 vCPUs and 256M, acpi4 its ACPI build
# (MADT, no MP table) the same, debian3 Debian's cloud kernel (entered through its
# PVH note by both VMMs) with 3 vCPUs and 512M: the kinds of boot that were lost in
# boot-loop.sh. All boot the initramfs
# that ends with `reboot -f`. A boot is good when /init's last line
# ("minivmm-init: reboot -f") appears and the VMM exits 0 within 300 s. QEMU's
# microvm has no i8042, so its guest reboots by triple fault (reboot=t), which
# -no-reboot turns into QEMU's exit. Prints a line per boot and a summary per case.
RUNS=${RUNS:-10}
CASES=${CASES:-elf4}

verdict() { # vmm status console
    if [ "$2" = 0 ] && grep -q '^minivmm-init: reboot -f' "$3"; then
        echo "smp-control: $case $1 run $i ok in $(( $(date +%s) - start ))s"
        return 0
    fi
    echo "smp-control: $case $1 run $i BAD: status $2 after $(( $(date +%s) - start ))s; last lines:"
    tail -n 8 "$3" | sed 's/^/    /'
    return 1
}

one_case() { # kernel vcpus memory
    m_bad=0 q_bad=0
    i=1
    while [ "$i" -le "$RUNS" ]; do
        start=$(date +%s)
        timeout 300 $MINIVMM_BIN run --no-ledger --kernel "$1" \
            --initrd "$MINIVMM_INITRAMFS" --cmdline "console=ttyS0 reboot=k panic=-1" \
            --vcpus "$2" --memory "$3" --serial-out /tmp/m.txt >/dev/null 2>/tmp/m-err.txt
        verdict minivmm $? /tmp/m.txt || m_bad=$((m_bad + 1))
        start=$(date +%s)
        timeout 300 qemu-system-x86_64 -enable-kvm -cpu host -M microvm,x-option-roms=off \
            -nodefaults -no-user-config -display none -serial file:/tmp/q.txt -no-reboot \
            -smp "$2" -m "$3" -kernel "$1" -initrd "$MINIVMM_INITRAMFS" \
            -append "console=ttyS0 reboot=t panic=-1" </dev/null >/dev/null 2>/tmp/q-err.txt
        verdict qemu $? /tmp/q.txt || q_bad=$((q_bad + 1))
        i=$((i + 1))
    done
    echo "smp-control: RESULT $case: minivmm $m_bad bad of $RUNS, qemu $q_bad bad of $RUNS ($2 vCPUs, $3)"
}

for case in $CASES; do
    case $case in
        elf4) one_case "$MINIVMM_LINUX_VMLINUX" 4 256M ;;
        acpi4) one_case "$MINIVMM_LINUX_ACPI_VMLINUX" 4 256M ;;
        debian3) one_case "$MINIVMM_DEBIAN_VMLINUX" 3 512M ;;
        *) echo "smp-control: unknown case $case (elf4, acpi4, debian3)"; exit 2 ;;
    esac
done
exit 0
