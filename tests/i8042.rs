//! The i8042 keyboard controller on real KVM: a tiny guest talks to it through ports
//! 0x60/0x64 as a polling driver does, then takes IRQ 1 and IRQ 12 through the IOAPIC,
//! then resets the machine through the output port (command 0xd1, bit 0 clear).

mod common;
use common::*;

/// The guest (32-bit PVH entry, flat segments, no paging). Each check that fails
/// writes its step number to isa-debug-exit; success ends in a reset.
const GUEST: &str = r#"
.macro rd                      # poll status bit 0 (OBF), then read the data port
1: in $0x64, %al
  test $1, %al
  jz 1b
  in $0x60, %al
.endm
.macro expect val, step
  rd
  mov $\step, %ecx
  cmp $\val, %al
  jne fail
.endm
.macro cmd c                   # a controller command on 0x64
  mov $\c, %al
  out %al, $0x64
.endm
.macro dat d                   # a byte on 0x60
  mov $\d, %al
  out %al, $0x60
.endm
.macro gate vec, handler       # 32-bit interrupt gate in idt
  mov $\handler, %eax
  mov $idt + \vec * 8, %edi
  mov %ax, (%edi)
  mov %cs, %bx
  mov %bx, 2(%edi)
  movw $0x8e00, 4(%edi)
  shr $16, %eax
  mov %ax, 6(%edi)
.endm
.macro ioapic_route pin, vec   # unmasked, edge, to APIC ID 0
  movl $0x10 + 2 * \pin, 0xfec00000
  movl $\vec, 0xfec00010
  movl $0x11 + 2 * \pin, 0xfec00000
  movl $0, 0xfec00010
.endm
  mov $stack_top, %esp
  # 1: controller self-test
  cmd 0xaa
  expect 0x55, 1
  # 2: CTR written and read back: interrupts off, system flag, translation
  cmd 0x60
  dat 0x44
  cmd 0x20
  expect 0x44, 2
  # 3: status: system flag and "not inhibited" set, input buffer never full
  in $0x64, %al
  mov $3, %ecx
  and $0x16, %al
  cmp $0x14, %al
  jne fail
  # 4: keyboard identify, second byte translated from set 2 (0x83) to set 1
  dat 0xf2
  expect 0xfa, 4
  expect 0xab, 4
  expect 0x41, 4
  # 5: keyboard reset
  dat 0xff
  expect 0xfa, 5
  expect 0xaa, 5
  # 6: aux loopback: the byte comes back marked as aux (status bit 5)
  cmd 0xd3
  dat 0x5a
  in $0x64, %al
  mov $6, %ecx
  test $0x20, %al
  jz fail
  expect 0x5a, 6
  # 7: port tests
  cmd 0xab
  expect 0, 7
  cmd 0xa9
  expect 0, 7
  # Interrupts: LAPIC on, 8259 (LINT0) masked, ISA IRQ 1 and 12 through the IOAPIC.
  gate 0x31, on_kbd
  gate 0x3c, on_aux
  lidt idtr
  movl $0x10000, 0xfee00350
  movl $0x1ff, 0xfee000f0
  ioapic_route 1, 0x31
  ioapic_route 12, 0x3c
  # 8: keyboard interrupt on, then an echo to the keyboard raises IRQ 1
  cmd 0x60
  dat 0x45
  sti
  dat 0xee
2: hlt
  jmp 2b
on_kbd:
  mov $8, %ecx
  in $0x64, %al
  test $0x20, %al
  jnz fail
  in $0x60, %al
  cmp $0xee, %al
  jne fail
  movl $0, 0xfee000b0
  # 9: aux interrupt on, then a loopback byte raises IRQ 12
  cmd 0x60
  dat 0x47
  sti
  cmd 0xd3
  dat 0xa5
2: hlt
  jmp 2b
on_aux:
  mov $9, %ecx
  in $0x64, %al
  test $0x20, %al
  jz fail
  in $0x60, %al
  cmp $0xa5, %al
  jne fail
  movl $0, 0xfee000b0
  # Reset through the output port: bit 0 (the reset line) low.
  cmd 0xd1
  dat 0xfe
2: hlt
  jmp 2b
fail:
  mov $0xf4, %dx
  mov %ecx, %eax
  out %eax, %dx
  hlt
.align 8
idtr:
  .word 256 * 8 - 1
  .long idt
.align 8
idt:
  .fill 256 * 8, 1, 0
  .fill 4096, 1, 0
stack_top:
"#;

#[test]
fn i8042_polled_and_interrupt_driven_then_reset() {
    if !kvm_or_skip("i8042_polled_and_interrupt_driven_then_reset") {
        return;
    }
    let d = scratch("i8042");
    let guest = tiny_guest(&d, "i8042", GUEST, true);
    let o = output({
        let mut c = minivmm();
        c.arg("run")
            .arg("--kernel")
            .arg(&guest)
            .args(["--json", "--timeout", "10s", "--no-pit"]);
        c
    });
    let out = stdout(&o);
    let summary: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("bad JSON {out:?}: {e}"));
    // isa-debug-exit value v ends minivmm with (v << 1) | 1.
    let step = o.status.code().map(|c| c >> 1);
    assert_eq!(
        summary["reason"],
        "reset",
        "guest failed at step {step:?} ({}): {}",
        summary["reason"],
        stderr(&o)
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}
