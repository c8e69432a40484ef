/* echo: echoes serial input, polling the 16550, until a '.' at the start of
 * a line (or of the input). Waits for input as long as the VMM runs it.
 *
 *   echo: ready (end with '.' at the start of a line)
 *   <the input, echoed byte for byte>
 *   echo: done N bytes                              exit 0x10
 */
#include "lib.h"

#define UART_LSR 5
#define LSR_DR 0x01 /* data ready (16550 datasheet, line status register) */

int guest_main(void)
{
	kprintf("echo: ready (end with '.' at the start of a line)\n");
	u64 n = 0;
	int line_start = 1;
	for (;;) {
		while (!(inb(COM1 + UART_LSR) & LSR_DR))
			cpu_relax();
		char c = (char)inb(COM1);
		if (c == '.' && line_start)
			break;
		con_putc(c);
		n++;
		/* A terminal in raw mode sends CR for Enter; pipes send LF. */
		line_start = c == '\n' || c == '\r';
	}
	kprintf("%secho: done %lu bytes\n", line_start ? "" : "\n", n);
	return EXIT_OK;
}
