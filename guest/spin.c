/* spin: never ends, for testing --timeout. `mode=hlt` halts with interrupts
 * off instead of burning the CPU.
 *
 *   spin: spinning (mode busy)    or    spin: spinning (mode hlt)
 */
#include "lib.h"

int guest_main(void)
{
	if (cmdline_is("mode", "hlt")) {
		kprintf("spin: spinning (mode hlt)\n");
		halt_forever();
	}
	kprintf("spin: spinning (mode busy)\n");
	for (;;)
		__asm__ volatile("" ::: "memory");
}
