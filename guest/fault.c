/* fault: triple-faults on purpose. With an empty IDT (limit 0) the #UD from
 * ud2 cannot be delivered, which raises #GP, then #DF, and a fault while
 * delivering #DF shuts the processor down (SDM Vol. 3A §7.15, interrupt 8,
 * "triple fault"): KVM reports KVM_EXIT_SHUTDOWN.
 *
 *   fault: triple-faulting now (empty IDT, ud2)
 *   (nothing more; if the CPU survives: "fault: FAIL still running", exit 0x11)
 */
#include "lib.h"

int guest_main(void)
{
	kprintf("fault: triple-faulting now (empty IDT, ud2)\n");
	struct __attribute__((packed)) { u16 limit; u64 base; } empty = {0, 0};
	__asm__ volatile("lidt %0; ud2" : : "m"(empty));
	kprintf("fault: FAIL still running\n");
	return EXIT_FAIL;
}
