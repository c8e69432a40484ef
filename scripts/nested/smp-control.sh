#!/bin/sh
# The same SMP Linux boot under minivmm and under QEMU, alternating, on the outer
# VM's KVM: if QEMU's boots fail as minivmm's do, the fault is in the nested KVM
# (QEMU TCG's emulated SVM), not in minivmm. Runs inside the outer VM:
#
#   scripts/test-nested-kvm.sh --with-qemu --script scripts/nested/smp-control.sh
#
# RUNS (default 10) boots of each; VCPUS (default 4) vCPUs, 256M, the minimal
# kernel (PVH ELF) and the initramfs that ends with `reboot -f`. A boot is good
# when /init's last line ("minivmm-init: reboot -f") appears and the VMM exits 0
# within 300 s. QEMU's microvm has no i8042, so its guest reboots by triple fault
# (reboot=t), which -no-reboot turns into QEMU's exit. Prints a line per boot and
# a summary per VMM.
RUNS=${RUNS:-10}
VCPUS=${VCPUS:-4}
CMDLINE="console=ttyS0 reboot=k panic=-1"
m_bad=0 q_bad=0

verdict() { # vmm status console
    if [ "$2" = 0 ] && grep -q '^minivmm-init: reboot -f' "$3"; then
        echo "smp-control: $1 run $i ok in $(( $(date +%s) - start ))s"
        return 0
    fi
    echo "smp-control: $1 run $i BAD: status $2 after $(( $(date +%s) - start ))s; last lines:"
    tail -n 8 "$3" | sed 's/^/    /'
    return 1
}

i=1
while [ "$i" -le "$RUNS" ]; do
    start=$(date +%s)
    timeout 300 $MINIVMM_BIN run --no-ledger --kernel "$MINIVMM_LINUX_VMLINUX" \
        --initrd "$MINIVMM_INITRAMFS" --cmdline "$CMDLINE" --vcpus "$VCPUS" --memory 256M \
        --serial-out /tmp/m.txt >/dev/null 2>/tmp/m-err.txt
    verdict minivmm $? /tmp/m.txt || m_bad=$((m_bad + 1))
    start=$(date +%s)
    timeout 300 qemu-system-x86_64 -enable-kvm -cpu host -M microvm,x-option-roms=off \
        -nodefaults -no-user-config -display none -serial file:/tmp/q.txt -no-reboot \
        -smp "$VCPUS" -m 256M -kernel "$MINIVMM_LINUX_VMLINUX" -initrd "$MINIVMM_INITRAMFS" \
        -append "console=ttyS0 reboot=t panic=-1" </dev/null >/dev/null 2>/tmp/q-err.txt
    verdict qemu $? /tmp/q.txt || q_bad=$((q_bad + 1))
    i=$((i + 1))
done
echo "smp-control: RESULT minivmm $m_bad bad of $RUNS, qemu $q_bad bad of $RUNS ($VCPUS vCPUs)"
exit 0
