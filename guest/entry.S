/*
 * Entry stubs shared by every guest.
 *
 * entry64   64-bit entry (e_entry): long mode, paging on with the VMM's identity
 *           tables, RSI = boot_params (Linux 64-bit boot protocol,
 *           Documentation/arch/x86/boot.rst, as Firecracker does).
 * pvh_entry XEN_ELFNOTE_PHYS32_ENTRY (pvhnote.S): 32-bit protected mode, paging
 *           off, EBX = hvm_start_info (Xen docs/misc/pvh.pandoc). Builds identity
 *           page tables for the first 4 GiB and switches to long mode.
 * lm_enter32 the 32-bit to long mode switch, shared with the APs (cpus guest).
 *
 * Both paths end in C: boot_pvh(start_info) or boot_linux64(boot_params).
 */

#define CODE32_SEL 0x08
#define CODE64_SEL 0x10
#define DATA_SEL   0x18

#define CR0_PE     (1 << 0)
#define CR0_PG     (1 << 31)
#define CR4_PAE    (1 << 5)
#define MSR_EFER   0xc0000080
#define EFER_LME   (1 << 8)
#define PTE_P_RW   0x3
#define PTE_PS     0x80

#define BOOT_STACK_SIZE 16384

	.section .text.entry, "ax"

	.code64
	.globl entry64
entry64:
	cli
	cld
	/* The 0x8ff0 stack the VMM gives is small: use our own. */
	lea boot_stack_top(%rip), %rsp
	mov %rsi, %rbx			/* boot_params survives the bss clearing */
	lea __bss_start(%rip), %rdi
	lea __bss_end(%rip), %rcx
	sub %rdi, %rcx
	shr $3, %rcx
	xor %eax, %eax
	rep stosq
	mov %cr3, %rax			/* the APs reuse the VMM's tables */
	mov %eax, boot_cr3(%rip)
	mov %rbx, %rdi
	call boot_linux64
	jmp halt

	.code32
	.globl pvh_entry
pvh_entry:
	cli
	cld
	/*
	 * As little as possible in 32-bit mode: on a PVM host every 32-bit
	 * guest instruction is emulated, so the identity page tables are
	 * built by the assembler (.data below) and the .bss is cleared in
	 * long mode. EBX (start_info) survives lm_enter32.
	 */
	mov $boot_stack_top, %esp
	mov $pvh_long, %esi
	jmp lm_enter32

	/*
	 * 32-bit protected mode -> 64-bit mode (Intel SDM Vol. 3A §10.8.5
	 * "Initializing IA-32e Mode"; §9.8.5 in older editions): CR4.PAE, CR3,
	 * EFER.LME, then CR0.PG activates IA-32e mode; a far jump to a code
	 * segment with L=1 enters 64-bit mode. In: ESI = 64-bit continuation,
	 * boot_cr3 set, ESP = stack. Used by the BSP (PVH) and by the APs.
	 */
	.globl lm_enter32
lm_enter32:
	lgdt gdt_desc
	mov %cr4, %eax
	or $CR4_PAE, %eax
	mov %eax, %cr4
	mov boot_cr3, %eax
	mov %eax, %cr3
	mov $MSR_EFER, %ecx
	rdmsr
	or $EFER_LME, %eax
	wrmsr
	mov %cr0, %eax
	or $(CR0_PG | CR0_PE), %eax
	mov %eax, %cr0
	ljmp $CODE64_SEL, $lm_start64

	.code64
lm_start64:
	mov $DATA_SEL, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	mov %eax, %fs
	mov %eax, %gs
	/* Upper halves of registers are undefined after the mode switch
	 * (SDM Vol. 1 §3.4.1.1): zero-extend the continuation and stack. */
	mov %esi, %esi
	mov %esp, %esp
	jmp *%rsi

pvh_long:
	lea __bss_start(%rip), %rdi
	lea __bss_end(%rip), %rcx
	sub %rdi, %rcx
	shr $3, %rcx
	xor %eax, %eax
	rep stosq
	mov %ebx, %edi
	call boot_pvh
halt:
	cli
	hlt
	jmp halt

	.data
	.p2align 3
	/* Flat descriptors (SDM Vol. 3A §3.4.5), same selectors as the VMM's GDT
	 * and Linux's boot GDT; accessed bits preset so loads do not write. */
	.globl gdt
gdt:
	.quad 0
	.quad 0x00cf9b000000ffff	/* 0x08: code, 32-bit */
	.quad 0x00af9b000000ffff	/* 0x10: code, 64-bit (L=1) */
	.quad 0x00cf93000000ffff	/* 0x18: data */
gdt_end:
	.globl gdt_desc
	.p2align 3
gdt_desc:
	.word gdt_end - gdt - 1
	.quad gdt

	/* CR3 for lm_enter32: the tables below on the PVH path; entry64
	 * replaces it with the VMM's. In .data: it must outlive the .bss
	 * clearing, which the PVH path does after using it. */
	.globl boot_cr3
	.p2align 2
boot_cr3:
	.long pvh_pml4

	/*
	 * Identity map of the first 4 GiB for the PVH path (Intel SDM Vol. 3A
	 * §4.5, 4-level paging): PML4[0] -> PDPT; PDPT[0..3] -> four page
	 * directories of 2 MiB pages, written out by the assembler.
	 */
	.p2align 12
pvh_pml4:
	.quad pvh_pdpt + PTE_P_RW
	.skip 4096 - 8
pvh_pdpt:
	.quad pvh_pd + PTE_P_RW, pvh_pd + 0x1000 + PTE_P_RW
	.quad pvh_pd + 0x2000 + PTE_P_RW, pvh_pd + 0x3000 + PTE_P_RW
	.skip 4096 - 32
pvh_pd:
	.set page, 0
	.rept 2048
	.quad page + PTE_P_RW + PTE_PS
	.set page, page + 0x200000
	.endr

	.section .noinit, "aw", @nobits
	.p2align 4
	.skip BOOT_STACK_SIZE
	.globl boot_stack_top
boot_stack_top:
