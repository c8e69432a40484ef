/* cpus: the BSP reads the MP table, starts every AP with INIT-SIPI-SIPI, and
 * checks that each processor the table lists reported its APIC ID.
 *
 *   cpus: mp-table ok processors N
 *   cpus: ok N apic-ids 0,1,...          exit 0x10
 *   cpus: FAIL <why>                      exit 0x11
 */
#include "lib.h"
#include "mp.h"

#define TRAMPOLINE 0x10000 /* SIPI vector 0x10: APs start at 0x10000 */

extern u8 ap_tramp_start[], ap_tramp_end[];

/* One bit per APIC ID (8-bit xAPIC IDs). */
static volatile u32 arrived[8];
static volatile u32 arrived_count;

static void mark_arrived(u32 id)
{
	__atomic_fetch_or(&arrived[id / 32], 1u << (id % 32), __ATOMIC_SEQ_CST);
	__atomic_fetch_add(&arrived_count, 1, __ATOMIC_SEQ_CST);
}

static int has_arrived(u32 id) { return (arrived[id / 32] >> (id % 32)) & 1; }

/* Each AP, in long mode on its own stack (smp.S). */
NORETURN void ap_main(void)
{
	mark_arrived(lapic_id());
	halt_forever();
}

/* Writes the ICR (SDM Vol. 3A §11.6.1) and waits, bounded, for the delivery
 * status bit to clear. */
static void send_ipi(u32 dest, u32 low)
{
	lapic_write(LAPIC_ICR_HI, dest << 24);
	lapic_write(LAPIC_ICR_LO, low);
	for (int i = 0; i < 1000 && (lapic_read(LAPIC_ICR_LO) & (1 << 12)); i++)
		cpu_relax();
}

#define ICR_INIT 0x00004500 /* INIT, level assert */
#define ICR_SIPI 0x00004600 /* start-up, vector in bits 0-7 */

int guest_main(void)
{
	struct mp_info mp;
	const char *err = mp_read(&mp);
	if (err) {
		kprintf("cpus: FAIL %s\n", err);
		return EXIT_FAIL;
	}
	kprintf("cpus: mp-table ok processors %u\n", mp.ncpus);

	u32 me = lapic_id();
	lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | 0x100); /* software enable */
	mark_arrived(me);
	memcpy((void *)TRAMPOLINE, ap_tramp_start, (usize)(ap_tramp_end - ap_tramp_start));

	/* The universal start-up algorithm (SDM Vol. 3A §9.4.4.1): INIT, wait
	 * 10 ms, SIPI, wait 200 us, second SIPI. APs that already run ignore a
	 * SIPI, so the second goes only to those not yet arrived. */
	for (u32 i = 0; i < mp.ncpus; i++)
		if (mp.ids[i] != me)
			send_ipi(mp.ids[i], ICR_INIT);
	delay_ms(10);
	for (u32 i = 0; i < mp.ncpus; i++)
		if (mp.ids[i] != me)
			send_ipi(mp.ids[i], ICR_SIPI | (TRAMPOLINE >> 12));
	delay_ms(1);
	for (u32 i = 0; i < mp.ncpus; i++)
		if (!has_arrived(mp.ids[i]))
			send_ipi(mp.ids[i], ICR_SIPI | (TRAMPOLINE >> 12));

	u64 end = deadline_ms(3000); /* generous: vCPU threads may wait for a busy host */
	while (arrived_count < mp.ncpus && !expired(end))
		cpu_relax();

	int ok = arrived_count == mp.ncpus;
	for (u32 i = 0; i < mp.ncpus; i++)
		ok &= has_arrived(mp.ids[i]);
	if (ok)
		kprintf("cpus: ok %u apic-ids ", mp.ncpus);
	else
		kprintf("cpus: FAIL arrived %u of %u apic-ids ", arrived_count, mp.ncpus);
	const char *sep = "";
	for (u32 id = 0; id < 256; id++)
		if (has_arrived(id)) {
			kprintf("%s%u", sep, id);
			sep = ",";
		}
	kprintf("\n");
	return ok ? EXIT_OK : EXIT_FAIL;
}
