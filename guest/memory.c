/* memory: reads the memory map the VMM handed over (PVH memmap or e820),
 * writes and reads back a pattern at the start and the end of every RAM
 * region, above 4 GiB too, and reports the total.
 *
 *   memory: ram 0x0000000000000000-0x000000000009fbff 639 KiB ok
 *   memory: reserved 0x...-0x... 
 *   memory: total 65151 KiB (63 MiB) in 2 ram regions: ok     exit 0x10
 *   (FAIL instead of ok on a mismatch, or no memory map)        exit 0x11
 */
#include "lib.h"

/*
 * Any physical address is reached through a 2 MiB window: PML4[1] (virtual
 * 512 GiB) -> win_pdpt -> win_pd[0], one 2 MiB page re-pointed per access
 * (SDM Vol. 3A §4.5, table 4-18 for a PDE that maps a 2 MiB page). This
 * works on both entry paths (our page tables or the VMM's, which only cover
 * 4 GiB) and needs no 1 GiB page support.
 */
#define WINDOW_VA (1UL << 39)
#define PAGE_2M (1UL << 21)
#define PTE_P_RW 0x3UL
#define PTE_PS 0x80UL

static u64 win_pdpt[512] __attribute__((aligned(4096)));
static u64 win_pd[512] __attribute__((aligned(4096)));

static void window_init(void)
{
	u64 *pml4 = (u64 *)(read_cr3() & 0x000ffffffffff000UL);
	win_pdpt[0] = (u64)win_pd | PTE_P_RW;
	pml4[1] = (u64)win_pdpt | PTE_P_RW;
	__asm__ volatile("mov %%cr3, %%rax; mov %%rax, %%cr3" ::: "rax", "memory");
}

static volatile u64 *window(u64 phys)
{
	win_pd[0] = (phys & ~(PAGE_2M - 1)) | PTE_P_RW | PTE_PS;
	__asm__ volatile("invlpg (%0)" : : "r"(WINDOW_VA) : "memory");
	return (volatile u64 *)(WINDOW_VA + (phys & (PAGE_2M - 1)));
}

/* Writes two patterns and reads each back, then restores the old value:
 * the first RAM byte above 1 MiB is this guest's own code. */
static int probe(u64 phys)
{
	volatile u64 *p = window(phys);
	u64 old = *p, pat = phys ^ 0x5a5aa5a5c3c33c3cUL;
	*p = pat;
	int ok = *p == pat;
	*p = ~pat;
	ok &= *p == ~pat;
	*p = old;
	return ok;
}

static const char *type_name(u32 t)
{
	/* ACPI 6.x §15, table 15.1 (address range types). */
	switch (t) {
	case 1: return "ram";
	case 2: return "reserved";
	case 3: return "acpi";
	case 4: return "nvs";
	case 5: return "unusable";
	default: return "other";
	}
}

int guest_main(void)
{
	if (!boot.nmem) {
		kprintf("memory: FAIL no memory map (entry %s)\n", boot.entry);
		return EXIT_FAIL;
	}
	window_init();
	u64 total = 0;
	u32 nram = 0;
	int all_ok = 1;
	for (u32 i = 0; i < boot.nmem; i++) {
		const struct mem_range *r = &boot.mem[i];
		if (!r->size)
			continue; /* QEMU's PVH memmap ends with an empty entry */
		u64 last = r->addr + r->size - 1;
		kprintf("memory: %s %#016lx-%#016lx", type_name(r->type), r->addr, last);
		if (r->type != 1 || r->size < 8) {
			kprintf("\n");
			continue;
		}
		u64 first = (r->addr + 7) & ~7UL, end = (last + 1 - 8) & ~7UL;
		int ok = probe(first) && probe(end);
		all_ok &= ok;
		total += r->size;
		nram++;
		kprintf(" %lu KiB %s\n", r->size >> 10, ok ? "ok" : "FAIL");
	}
	kprintf("memory: total %lu KiB (%lu MiB) in %u ram regions: %s\n", total >> 10,
		total >> 20, nram, all_ok && nram ? "ok" : "FAIL");
	return all_ok && nram ? EXIT_OK : EXIT_FAIL;
}
