/*
 * Interrupt entry stubs for the irq guest (64-bit IDT, SDM Vol. 3A §7.14,
 * "64-bit mode exception and interrupt handling"; §6.14 in older editions).
 * Each stub pushes its vector and joins isr_common, which saves the
 * registers C may clobber, calls irq_dispatch(vector) and returns with iretq.
 * Exceptions never return (irq_dispatch ends the guest), so the error code
 * some of them push does not matter.
 */
	.text
	.code64

	.macro STUB vec
	.p2align 4
	push $\vec
	jmp isr_common
	.endm

	/* One 16-byte stub per vector: 0-31, then 0x30, 0x32, 0x34, 0x39, 0xff
	 * (intr.c fills the IDT from this layout). */
	.globl isr_stubs
	.p2align 4
isr_stubs:
	.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	STUB \v
	.endr
	STUB 0x30
	STUB 0x32
	STUB 0x34
	STUB 0x39
	STUB 0xff

isr_common:
	push %rax
	push %rcx
	push %rdx
	push %rsi
	push %rdi
	push %r8
	push %r9
	push %r10
	push %r11
	mov 72(%rsp), %rdi
	/* The CPU aligned RSP to 16 before pushing its 5-qword frame; with the
	 * vector and 9 registers RSP is 8 mod 16: realign for the call. */
	sub $8, %rsp
	call irq_dispatch
	add $8, %rsp
	pop %r11
	pop %r10
	pop %r9
	pop %r8
	pop %rdi
	pop %rsi
	pop %rdx
	pop %rcx
	pop %rax
	add $8, %rsp
	iretq
