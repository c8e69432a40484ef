/* Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY, type 18): both minivmm and QEMU
 * load an ELF carrying it through PVH and enter `_start` in 32-bit protected mode
 * with paging off. Included by every bench guest. */
        .section .note.Xen, "a"
        .align 4
        .long 4, 4, 18          /* namesz, descsz, type */
        .asciz "Xen"
        .align 4
        .long _start
