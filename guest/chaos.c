/* chaos: a hostile guest for the interrupt controllers and the timer. It
 * writes every IOAPIC register and every word of the IOAPIC's page, every
 * byte value to every 8259 and 8254 port, then runs the PIT at its fastest
 * (a count of 1: 0.84 us) with the tick routed to it, and finally parks
 * halted with that timer still running and its pin masked. The VMM must
 * survive all of it, stay sane (the IOAPIC's version register still reads
 * right), and spend little CPU time while the guest is parked: the test ends
 * it with --timeout and reads the process's CPU time.
 *
 *   chaos: ioapic ok (version 0x170011)
 *   chaos: pic ok
 *   chaos: pit ok
 *   chaos: fast pit: 500 ticks
 *   chaos: parked with the pit running         then halts until the timeout
 *   chaos: FAIL <why>                          exit 0x11
 */
#include "lib.h"

#define VEC_TICK 0x30 /* one of isr.S's stubs */
#define VEC_SPURIOUS 0xff
#define IOAPIC_PINS 24
#define TICKS 500

static volatile u32 ticks;

void irq_dispatch(u64 vec)
{
	if (vec < 32) {
		kprintf("chaos: FAIL exception %lu\n", vec);
		debug_exit(EXIT_FAIL);
	}
	if (vec == VEC_SPURIOUS)
		return;
	if (vec == VEC_TICK)
		ticks++;
	lapic_write(LAPIC_EOI, 0);
}

static void mask_all_pins(void)
{
	for (u32 pin = 0; pin < IOAPIC_PINS; pin++)
		ioapic_route(pin, VEC_TICK, 0, 1);
}

/* Counter 0 waits for a count: no ticks while the rest is swept. */
static void pit_stop(void) { outb(0x43, 0x30); }

static const u32 patterns[] = {0, 0xffffffff, 0x55555555, 0xaaaaaaaa, 0x00010000,
			       0x000007ff, 0x0000a5ff};

static void sweep_ioapic(void)
{
	for (u32 reg = 0; reg < 256; reg++)
		for (u32 i = 0; i < ARRAY_SIZE(patterns); i++) {
			ioapic_write(reg, patterns[i] ^ reg);
			(void)ioapic_read(reg);
		}
	/* Every word of the page: IOREGSEL, IOWIN, EOI and the reserved rest. */
	for (u64 off = 0; off < 0x1000; off += 4) {
		(void)mmio_read32(IOAPIC_BASE + off);
		mmio_write32(IOAPIC_BASE + off, 0xffffffff);
	}
	mask_all_pins();
}

static void sweep_ports(const u16 *ports, u32 n)
{
	for (u32 p = 0; p < n; p++)
		for (u32 v = 0; v < 256; v++) {
			outb(ports[p], (u8)v);
			(void)inb(ports[p]);
		}
}

/* The 8259 pair back to a sane, fully masked state (ICW1-4, then OCW1). */
static void pic_reset(void)
{
	outb(0x20, 0x11);
	outb(0x21, 0x20);
	outb(0x21, 0x04);
	outb(0x21, 0x01);
	outb(0xa0, 0x11);
	outb(0xa1, 0x28);
	outb(0xa1, 0x02);
	outb(0xa1, 0x01);
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
}

static void wait_irq(void) { __asm__ volatile("sti; hlt; cli" ::: "memory"); }

int guest_main(void)
{
	u32 me = lapic_id();
	load_idt();
	/* ISA interrupts only through the IOAPIC: PICs and LINT0 masked. */
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
	lapic_write(LAPIC_LVT_LINT0, 1u << 16);
	lapic_write(LAPIC_SVR, 0x100 | VEC_SPURIOUS);
	pit_stop();

	sweep_ioapic();
	u32 version = ioapic_read(1);
	if ((version & 0xff) < 0x10 || (version >> 16 & 0xff) + 1 < IOAPIC_PINS) {
		kprintf("chaos: FAIL ioapic version register reads %#x\n", version);
		return EXIT_FAIL;
	}
	kprintf("chaos: ioapic ok (version %#x)\n", version);

	static const u16 pic_ports[] = {0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1};
	sweep_ports(pic_ports, ARRAY_SIZE(pic_ports));
	pic_reset();
	kprintf("chaos: pic ok\n");

	static const u16 pit_ports[] = {0x40, 0x41, 0x42, 0x43, 0x61};
	sweep_ports(pit_ports, ARRAY_SIZE(pit_ports));
	pit_stop();
	outb(0x61, 0);
	kprintf("chaos: pit ok\n");

	/* Mode 2 with a count of 1: the fastest period the 8254 has. */
	ioapic_route(0, VEC_TICK, me, 0);
	outb(0x43, 0x34);
	outb(0x40, 1);
	outb(0x40, 0);
	while (ticks < TICKS)
		wait_irq();
	kprintf("chaos: fast pit: %u ticks\n", TICKS);

	/* The timer keeps running; its pin is masked and the CPU halts. */
	ioapic_route(0, VEC_TICK, me, 1);
	kprintf("chaos: parked with the pit running\n");
	for (;;)
		__asm__ volatile("cli; hlt");
}
