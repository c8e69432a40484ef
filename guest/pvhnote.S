/*
 * The Xen PVH ELF note, linked only into <name>.elf: XEN_ELFNOTE_PHYS32_ENTRY
 * (type 18, xen/include/public/elfnote.h) holds the 32-bit physical address
 * where a PVH loader (QEMU -kernel, minivmm, Xen) enters in protected mode.
 * Without it the same image is entered in long mode at e_entry.
 */
	.section .note.Xen, "a", @note
	.p2align 2
	.long 2f - 1f		/* namesz */
	.long 4f - 3f		/* descsz */
	.long 18		/* type: XEN_ELFNOTE_PHYS32_ENTRY */
1:	.asciz "Xen"
2:	.p2align 2
3:	.long pvh_entry
4:	.p2align 2
