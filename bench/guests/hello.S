/* hello: print one line on COM1 (0x3f8), then leave through isa-debug-exit
 * (port 0xf4) with value 0, i.e. exit status 1 under minivmm and QEMU alike.
 * The smallest useful guest: what the start-up, RSS and density benches run. */
#include "pvh-note.h"
        .text
        .code32
        .globl _start
_start:
        mov     $0x3f8, %dx
        mov     $msg, %esi
1:      lodsb
        test    %al, %al
        jz      2f
        out     %al, %dx
        jmp     1b
2:      mov     $0xf4, %dx
        xor     %eax, %eax
        out     %eax, %dx
        hlt
msg:    .asciz  "hello from a bench guest\n"
