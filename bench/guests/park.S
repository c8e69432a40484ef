/* park: print one line on COM1, then halt forever with interrupts off. The VM
 * stays alive doing nothing, so a bench can read the VMM's /proc/PID/smaps and
 * tell the guest's touched RAM from the VMM's own memory, then kill it. */
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
2:      cli
        hlt
        jmp     2b
msg:    .asciz  "parked\n"
