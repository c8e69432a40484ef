/* irq: proves that hardware interrupts reach the guest through the IOAPIC and
 * LAPIC: one PIT tick (ISA IRQ 0) and one serial receive interrupt (COM1,
 * IRQ 4) when the VMM feeds a byte from its stdin. The pin the PIT tick came
 * in on must be the one the MP table gives for ISA IRQ 0: an OS programs
 * only that pin.
 *
 *   irq: pit ok (ioapic pin 2, mp table pin 2)
 *   irq: waiting for serial input
 *   irq: serial ok (ioapic pin 4) byte 0x61
 *   irq: ok                                        exit 0x10
 *   irq: FAIL <why>                                exit 0x11
 * No PIT tick at all leaves the guest halted until the VMM's --timeout.
 * wait=N: wait N seconds for serial input (default 5); wait=0: for ever.
 * sci=1: after the PIT tick, wait for the ACPI power button instead (SCI on
 * IOAPIC pin 9, PWRBTN_STS), then power off:
 *   irq: waiting for the power button
 *   irq: power button ok (ioapic pin 9), powering off  the VM ends (poweroff)
 */
#include "lib.h"
#include "mp.h"

/* Vectors (>= 32: below are exceptions). ISA IRQ 0 is wired to IOAPIC pin 2
 * by the usual interrupt source override, but a VMM may keep it on pin 0:
 * both pins are programmed, with different vectors, to tell which fired. */
#define VEC_PIN0 0x30
#define VEC_PIN2 0x32
#define VEC_COM1 0x34
#define VEC_SCI 0x39
#define VEC_SPURIOUS 0xff
#define PIN_COM1 4
#define PIN_SCI 9 /* the FADT's SCI_INT, identity-mapped */

/* 16550 registers (offsets from COM1). */
#define UART_RBR 0
#define UART_IER 1
#define UART_IIR 2
#define UART_MCR 4
#define UART_LSR 5

static volatile u32 ticks, ticks_pin0, ticks_pin2;
static volatile u32 rx_irqs, rx_bytes, sci_irqs;
static volatile u8 rx_first;

void irq_dispatch(u64 vec)
{
	if (vec < 32) {
		/* An exception in a guest this small is a bug: say which. */
		kprintf("irq: FAIL exception %lu\n", vec);
		debug_exit(EXIT_FAIL);
	}
	switch (vec) {
	case VEC_PIN0:
	case VEC_PIN2:
		ticks++;
		if (vec == VEC_PIN0)
			ticks_pin0++;
		else
			ticks_pin2++;
		break;
	case VEC_COM1:
		rx_irqs++;
		(void)inb(COM1 + UART_IIR);
		while (inb(COM1 + UART_LSR) & 1) { /* LSR.DR: drain the FIFO */
			u8 b = inb(COM1 + UART_RBR);
			if (!rx_bytes++)
				rx_first = b;
		}
		break;
	case VEC_SCI:
		sci_irqs++;
		break;
	case VEC_SPURIOUS:
		return; /* no EOI for the spurious vector (SDM Vol. 3A §11.9) */
	}
	lapic_write(LAPIC_EOI, 0);
}

/* Waits with interrupts on; `sti; hlt` cannot lose a wake-up because STI's
 * shadow covers HLT (SDM Vol. 2B, STI). */
static void wait_irq(void) { __asm__ volatile("sti; hlt; cli" ::: "memory"); }

/* ACPI PM1a event and control blocks (the FADT's; ACPI 6.5 §4.8.3). */
#define PM1_STS 0x600
#define PM1_EN 0x602
#define PM1_CNT 0x604
#define PWRBTN (1u << 8)
#define SLP_TYP_S5 (5u << 10)
#define SLP_EN (1u << 13)

/* sci=1: enables the power button event, halts until the SCI comes, checks and
 * clears PWRBTN_STS, then powers off as an OS would on a press. */
static int power_button(u32 me)
{
	ioapic_route(0, VEC_PIN0, me, 1);
	ioapic_route(2, VEC_PIN2, me, 1);
	ioapic_route(PIN_SCI, VEC_SCI, me, 0);
	outw(PM1_EN, PWRBTN);
	kprintf("irq: waiting for the power button\n");
	while (!sci_irqs)
		wait_irq();
	u16 sts = inw(PM1_STS);
	if (!(sts & PWRBTN)) {
		kprintf("irq: FAIL an SCI without PWRBTN_STS (pm1 status %#x)\n", sts);
		return EXIT_FAIL;
	}
	outw(PM1_STS, PWRBTN); /* write 1 to clear */
	if (inw(PM1_STS) & PWRBTN) {
		kprintf("irq: FAIL PWRBTN_STS stays set after a write of 1\n");
		return EXIT_FAIL;
	}
	kprintf("irq: power button ok (ioapic pin %u), powering off\n", PIN_SCI);
	outw(PM1_CNT, SLP_TYP_S5 | SLP_EN);
	kprintf("irq: FAIL still running after power off\n");
	return EXIT_FAIL;
}

#define PIT_HZ 1193182
#define TICK_HZ 100

int guest_main(void)
{
	u32 me = lapic_id();
	load_idt();

	/* Mask the 8259s (OCW1) and LINT0, so ISA interrupts come only through
	 * the IOAPIC (MP spec 1.4 §3.6.2.3, symmetric I/O mode). */
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
	lapic_write(LAPIC_LVT_LINT0, 1u << 16);
	lapic_write(LAPIC_SVR, 0x100 | VEC_SPURIOUS);

	ioapic_route(0, VEC_PIN0, me, 0);
	ioapic_route(2, VEC_PIN2, me, 0);
	ioapic_route(PIN_COM1, VEC_COM1, me, 0);

	/* PIT channel 0, lobyte/hibyte, mode 2 (rate generator), 100 Hz
	 * (Intel 8254 datasheet, control word format). */
	u32 div = PIT_HZ / TICK_HZ;
	outb(0x43, 0x34);
	outb(0x40, (u8)div);
	outb(0x40, (u8)(div >> 8));
	while (!ticks)
		wait_irq();
	struct mp_info mp;
	const char *err = mp_read(&mp);
	int pin = ticks_pin0 && ticks_pin2 ? -2 : ticks_pin2 ? 2 : 0;
	if (err || pin != mp.irq0_pin) {
		kprintf("irq: FAIL pit tick on ioapic pin %s but the mp table %s%d\n",
			pin == -2 ? "0 and 2" : pin ? "2" : "0",
			err ? err : "routes isa irq 0 to pin ", err ? 0 : mp.irq0_pin);
		return EXIT_FAIL;
	}
	kprintf("irq: pit ok (ioapic pin %d, mp table pin %d)\n", pin, mp.irq0_pin);
	if (cmdline_num("sci", 0))
		return power_button(me);

	/* Receive-data interrupt (IER bit 0); MCR.OUT2 gates the IRQ line on PCs. */
	outb(COM1 + UART_MCR, 0x0b);
	outb(COM1 + UART_IER, 0x01);
	kprintf("irq: waiting for serial input\n");
	/* Bounded by PIT ticks: 5 s at 100 Hz, or `wait=N` seconds. With wait=0 the
	 * PIT is masked and the guest halts until input comes, if ever: a parked VM
	 * that costs its host no CPU time (scripts/bench-serve.sh runs hundreds). */
	u64 wait_s = cmdline_num("wait", 5);
	if (wait_s == 0) {
		ioapic_route(0, VEC_PIN0, me, 1);
		ioapic_route(2, VEC_PIN2, me, 1);
	}
	u32 start = ticks;
	while (!rx_irqs && (wait_s == 0 || ticks - start < wait_s * TICK_HZ))
		wait_irq();
	outb(COM1 + UART_IER, 0);
	ioapic_route(0, VEC_PIN0, me, 1);
	ioapic_route(2, VEC_PIN2, me, 1);
	if (!rx_irqs) {
		if (inb(COM1 + UART_LSR) & 1)
			kprintf("irq: FAIL serial data is ready but no interrupt came\n");
		else
			kprintf("irq: FAIL no serial input within %lu s\n", wait_s);
		return EXIT_FAIL;
	}
	kprintf("irq: serial ok (ioapic pin %u) byte %#02x\n", PIN_COM1, rx_first);
	kprintf("irq: ok\n");
	return EXIT_OK;
}
