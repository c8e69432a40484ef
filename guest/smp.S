/*
 * Application processor start-up for the cpus guest.
 *
 * The BSP copies ap_tramp_start..ap_tramp_end to 0x10000 and sends
 * INIT-SIPI-SIPI with vector 0x10: each AP then starts in real mode at
 * CS:IP = 0x1000:0000 (Intel SDM Vol. 3A §9.4.4 "MP Initialization Example",
 * §11.6.1 "Start-up IPI"; 8.4.4 and 10.6.1 in older editions). The trampoline
 * enters 32-bit protected mode with the guest's GDT, takes a stack slot and
 * joins lm_enter32 (entry.S), which switches to long mode with the BSP's CR3
 * and continues at ap_entry64 -> ap_main (cpus.c).
 */

#define CODE32_SEL 0x08
#define DATA_SEL   0x18
#define AP_STACK_SIZE 2048
#define AP_MAX 255

	.text
	.code16
	.globl ap_tramp_start, ap_tramp_end
ap_tramp_start:
	cli
	cld
	mov %cs, %ax
	mov %ax, %ds
	/* DS-relative: the trampoline runs at 0x10000, not where it is linked.
	 * The descriptor's base is the absolute address of the guest's GDT. */
	lgdtl ap_gdtr - ap_tramp_start
	mov %cr0, %eax
	or $1, %eax			/* CR0.PE */
	mov %eax, %cr0
	ljmpl $CODE32_SEL, $ap_pm32
	.p2align 3
ap_gdtr:
	.word 31			/* 4 descriptors, see entry.S */
	.long gdt			/* 32-bit base, absolute */
ap_tramp_end:

	.code32
ap_pm32:
	mov $DATA_SEL, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	/* A private stack per AP: slot = atomic increment of ap_next_slot. */
	mov $1, %eax
	lock xadd %eax, ap_next_slot
	cmp $AP_MAX, %eax
	jae 9f
	inc %eax
	imul $AP_STACK_SIZE, %eax
	add $ap_stacks, %eax
	mov %eax, %esp
	mov $ap_entry64, %esi
	jmp lm_enter32
9:	cli
	hlt
	jmp 9b

	.code64
ap_entry64:
	call ap_main
	jmp 9b

	.bss
	.p2align 2
ap_next_slot:
	.long 0

	.section .noinit, "aw", @nobits
	.p2align 4
ap_stacks:
	.skip AP_STACK_SIZE * (AP_MAX + 1)
