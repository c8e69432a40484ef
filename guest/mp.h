/* Reading the Intel MultiProcessor Specification 1.4 table (cpus and irq). */
#ifndef GUEST_MP_H
#define GUEST_MP_H
#include "lib.h"

#define MP_MAX_CPUS 64

struct mp_info {
	u32 ncpus;              /* enabled processor entries */
	u32 ids[MP_MAX_CPUS];   /* their local APIC IDs */
	int irq0_pin;           /* IOAPIC pin of ISA IRQ 0, -1 if no entry */
};

/* Finds and checks the table; returns NULL or what is wrong with it. */
const char *mp_read(struct mp_info *out);

#endif
