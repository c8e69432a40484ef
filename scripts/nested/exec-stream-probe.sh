#!/bin/sh
# minivmm exec streaming 10 MB to stdout and 10 MB to stderr, on 1 and on 2 vCPUs,
# alternating, 3 times each, to count guest triple faults on the nested bed
# (status 123). Runs inside the outer VM of scripts/test-nested-kvm.sh:
#
#   scripts/test-nested-kvm.sh --tests exec --script scripts/nested/exec-stream-probe.sh
mkdir -p /tmp/tfp && cd /tmp/tfp || exit 1
for v in 1 2 1 2 1 2; do
    a=$(awk '{ print int($1) }' /proc/uptime)
    "$MINIVMM_BIN" exec --kernel "$MINIVMM_DEBIAN_VMLINUX" --modules "$MINIVMM_DEBIAN_MODULES" \
        --no-ledger --vcpus $v --memory 512M --timeout 300s --console-file /tmp/tfp/c$v.txt -- \
        sh -c "head -c 10000000 /dev/zero | tr '\\000' o; head -c 10000000 /dev/zero | tr '\\000' e >&2; exit 42" \
        >/tmp/tfp/out 2>/tmp/tfp/err
    st=$?
    b=$(awk '{ print int($1) }' /proc/uptime)
    echo "tf-probe: vcpus=$v status=$st out=$(wc -c </tmp/tfp/out) err=$(wc -c </tmp/tfp/err) $((b - a)) s $(tr -d 'e' </tmp/tfp/err | tail -c 200)"
done
