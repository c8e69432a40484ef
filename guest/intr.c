/* The IDT of the guests that take interrupts (irq, chaos): every exception
 * and the device vectors of isr.S's stubs, all calling irq_dispatch(). */
#include "lib.h"

/* The stub layout of isr.S: 16 bytes per vector, exceptions 0-31 first, then
 * these, in this order. */
extern u8 isr_stubs[];
static const u8 stub_vectors[] = {0x30, 0x32, 0x34, 0x39, 0xff};

/* 64-bit interrupt gate (SDM Vol. 3A §7.14.1, figure 7-8). */
struct gate {
	u16 off_lo;
	u16 sel;
	u8 ist;
	u8 type; /* P=1, DPL=0, type 0xe: 64-bit interrupt gate */
	u16 off_mid;
	u32 off_hi;
	u32 zero;
};
static struct gate idt[256] __attribute__((aligned(16)));

static void set_gate(u32 vec, u64 handler, u16 cs)
{
	idt[vec] = (struct gate){(u16)handler, cs, 0, 0x8e, (u16)(handler >> 16),
				 (u32)(handler >> 32), 0};
}

void load_idt(void)
{
	u16 cs;
	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	for (u32 v = 0; v < 32; v++)
		set_gate(v, (u64)isr_stubs + 16 * v, cs);
	for (u32 i = 0; i < ARRAY_SIZE(stub_vectors); i++)
		set_gate(stub_vectors[i], (u64)isr_stubs + 16 * (32 + i), cs);
	struct __attribute__((packed)) { u16 limit; u64 base; } idtr = {sizeof(idt) - 1, (u64)idt};
	__asm__ volatile("lidt %0" : : "m"(idtr));
}
