/* The MP table (Intel MultiProcessor Specification 1.4): where to find it,
 * its checksums, the enabled processors and the IOAPIC pin of ISA IRQ 0. */
#include "mp.h"

/* MP floating pointer structure (Intel MP spec 1.4, §4.1, table 4-1). */
struct mp_fp {
	char sig[4]; /* "_MP_" */
	u32 config;  /* physical address of the configuration table */
	u8 length;   /* in 16-byte units */
	u8 rev;
	u8 checksum;
	u8 features[5]; /* features[0] != 0: a default configuration, no table */
};

/* MP configuration table header (MP spec 1.4, §4.2, table 4-2). */
struct mp_config {
	char sig[4]; /* "PCMP" */
	u16 length;
	u8 rev;
	u8 checksum;
	char oem[8];
	char product[12];
	u32 oem_table;
	u16 oem_size;
	u16 count;
	u32 lapic;
	u16 ext_length;
	u8 ext_checksum;
	u8 reserved;
} __attribute__((packed));

/* Searches [start, end) on 16-byte boundaries (MP spec 1.4, §4). */
static const struct mp_fp *scan(u64 start, u64 end)
{
	for (u64 a = start; a + sizeof(struct mp_fp) <= end; a += 16) {
		const struct mp_fp *fp = (const void *)a;
		/* One 32-bit compare per step: "_MP_" little-endian. */
		if (*(const u32 *)a == 0x5f504d5f && fp->length &&
		    checksum8(fp, fp->length * 16u) == 0)
			return fp;
	}
	return NULL;
}

/* The spec's places: the first KiB of the EBDA (segment at 0x40e), the last
 * KiB of base memory, and the BIOS ROM 0xf0000-0xfffff. */
static const struct mp_fp *find_mp(void)
{
	const struct mp_fp *fp = NULL;
	u16 seg;
	memcpy(&seg, (const void *)0x40eUL, 2); /* BDA word: EBDA segment */
	u64 ebda = (u64)seg << 4;
	if (ebda >= 0x80000 && ebda < 0xa0000)
		fp = scan(ebda, ebda + 1024);
	if (!fp)
		fp = scan(0x9fc00, 0xa0000);
	if (!fp)
		fp = scan(0xf0000, 0x100000);
	return fp;
}

/* Reads the entries (MP spec 1.4, §4.3, table 4-3): processors (table 4-4,
 * 20 bytes, flags bit 0 = enabled), buses (table 4-5, type string "ISA   "),
 * I/O interrupt assignments (table 4-8: interrupt type 0 = INT, source bus
 * and IRQ, destination IOAPIC pin); every other entry is 8 bytes. */
const char *mp_read(struct mp_info *out)
{
	out->ncpus = 0;
	out->irq0_pin = -1;
	const struct mp_fp *fp = find_mp();
	if (!fp)
		return "no MP floating pointer in 0x9fc00-0xa0000 or 0xf0000-0xfffff";
	if (fp->features[0] || !fp->config)
		return "MP default configuration (no table) is not supported";
	const struct mp_config *t = (const void *)(u64)fp->config;
	if (memcmp(t->sig, "PCMP", 4))
		return "bad MP configuration table signature";
	if (checksum8(t, t->length))
		return "bad MP configuration table checksum";
	const u8 *e = (const u8 *)(t + 1), *end = (const u8 *)t + t->length;
	int isa_bus = -1;
	/* Walk to the end of the base table, as Linux's mpparse does: some
	 * firmware (qboot, QEMU microvm) leaves the entry count at 0. */
	while (e < end) {
		switch (e[0]) {
		case 0:
			if ((e[3] & 1) && out->ncpus < MP_MAX_CPUS)
				out->ids[out->ncpus++] = e[1];
			e += 20;
			continue;
		case 1:
			if (!memcmp(e + 2, "ISA", 3))
				isa_bus = e[1];
			break;
		case 3:
			if (e[1] == 0 && e[4] == isa_bus && e[5] == 0)
				out->irq0_pin = e[7];
			break;
		case 2:
		case 4:
			break;
		default:
			return "unknown MP table entry type";
		}
		e += 8;
	}
	if (!out->ncpus)
		return "MP table lists no processor";
	return NULL;
}
