/* exits: COUNT writes to port 0x80 (a port both VMMs ignore), each one a VM exit
 * to the VMM, then isa-debug-exit with value 0 (status 1). Build with
 * -DCOUNT=N. The loop is the same three instructions examples/exit_floor.rs
 * runs in its bare KVM loop: out %al,%dx; dec %ecx; jnz. */
#include "pvh-note.h"
#ifndef COUNT
#define COUNT 1000000
#endif
        .text
        .code32
        .globl _start
_start:
        mov     $0x80, %edx
        mov     $COUNT, %ecx
1:      out     %al, %dx
        dec     %ecx
        jnz     1b
        mov     $0xf4, %edx
        xor     %eax, %eax
        out     %eax, %dx
        hlt
