/* acpi: finds the RSDP, walks XSDT (or RSDT) -> every table, checks every
 * checksum, counts the enabled local APICs in the MADT, and powers off through
 * the FADT. Section numbers are ACPI 6.5's.
 *
 *   acpi: rsdp 0x00000000000f0000 from scan revision 2
 *   acpi: xsdt tables FACP APIC ... (each checksum ok)
 *   acpi: madt apic-ids 0,1,2,3 ioapics 1 irq0-gsi 2 pcat 1
 *   acpi: rsdp ok xsdt ok madt ok lapics 4 fadt ok
 *   acpi: powering off (sleep control register, s5 type 5)
 *   ... the VM ends (poweroff); if it does not:
 *   acpi: FAIL still running after power off           exit 0x11
 *   acpi: FAIL <why>                                    exit 0x11
 */
#include "lib.h"

/* System description table header (§5.2.6, table 5.4). */
struct sdt {
	char sig[4];
	u32 length;
	u8 revision;
	u8 checksum;
	char oem[6];
	char oem_table[8];
	u32 oem_rev;
	u32 creator;
	u32 creator_rev;
} __attribute__((packed));

/* Root System Description Pointer (§5.2.5.3, table 5.3). */
struct rsdp {
	char sig[8]; /* "RSD PTR " */
	u8 checksum; /* over the first 20 bytes */
	char oem[6];
	u8 revision; /* 0: ACPI 1.0 (RSDT only); 2: XSDT and the fields below */
	u32 rsdt;
	u32 length;
	u64 xsdt;
	u8 ext_checksum; /* over `length` bytes */
	u8 reserved[3];
} __attribute__((packed));

/* Generic Address Structure (§5.2.3.2, table 5.1). */
struct gas {
	u8 space; /* 0 system memory, 1 system I/O */
	u8 bit_width;
	u8 bit_offset;
	u8 access_size;
	u64 address;
} __attribute__((packed));

/* FADT offsets (§5.2.9, table 5.9). */
#define FADT_DSDT 40
#define FADT_SMI_CMD 48
#define FADT_ACPI_ENABLE 52
#define FADT_PM1A_CNT_BLK 64
#define FADT_FLAGS 112
#define FADT_X_DSDT 140
#define FADT_X_PM1A_CNT_BLK 172
#define FADT_SLEEP_CONTROL 244
#define FLAGS_HW_REDUCED (1u << 20)

static u32 rd32(const void *p) { u32 v; memcpy(&v, p, 4); return v; }
static u64 rd64(const void *p) { u64 v; memcpy(&v, p, 8); return v; }

static const struct rsdp *scan_rsdp(u64 start, u64 end)
{
	/* On 16-byte boundaries (§5.2.5.1); one 64-bit compare per step. */
	for (u64 a = start; a < end; a += 16)
		if (*(const u64 *)a == 0x2052545020445352UL /* "RSD PTR " */ &&
		    !checksum8((const void *)a, 20))
			return (const void *)a;
	return NULL;
}

/* Given by the boot protocol, else the search of §5.2.5.1: the first KiB
 * of the EBDA, then the BIOS area 0xe0000-0xfffff. */
static const struct rsdp *find_rsdp(const char **from)
{
	if (boot.rsdp && boot.rsdp < (1UL << 32)) {
		*from = boot.entry[0] == 'p' ? "start_info" : "boot_params";
		return (const void *)boot.rsdp;
	}
	*from = "scan";
	u16 seg;
	memcpy(&seg, (const void *)0x40eUL, 2);
	u64 ebda = (u64)seg << 4;
	const struct rsdp *r = NULL;
	if (ebda >= 0x80000 && ebda < 0xa0000)
		r = scan_rsdp(ebda, ebda + 1024);
	return r ? r : scan_rsdp(0xe0000, 0x100000);
}

static const char *fail;

/* A table is usable if its address is mapped (below 4 GiB), its length
 * covers the header and its checksum is right. */
static const struct sdt *table(u64 addr, const char *want)
{
	if (!addr || addr >= (1UL << 32)) {
		fail = "table address outside the first 4 GiB";
		return NULL;
	}
	const struct sdt *t = (const void *)addr;
	if (want && memcmp(t->sig, want, 4)) {
		fail = "unexpected table signature";
		return NULL;
	}
	if (t->length < sizeof(*t) || checksum8(t, t->length)) {
		kprintf("acpi: table %c%c%c%c at %#lx: bad length or checksum\n", t->sig[0],
			t->sig[1], t->sig[2], t->sig[3], addr);
		fail = "bad table checksum";
		return NULL;
	}
	return t;
}

static u32 lapics, ioapics, irq0_gsi;

/* MADT entries (§5.2.12, table 5.21): 0 = processor local APIC (flags at +4,
 * bit 0 enabled), 1 = I/O APIC, 2 = interrupt source override (source at +3,
 * GSI at +4), 9 = processor local x2APIC (flags at +8). */
static int walk_madt(const struct sdt *m)
{
	const u8 *e = (const u8 *)m + 44, *end = (const u8 *)m + m->length;
	const char *sep = "";
	kprintf("acpi: madt apic-ids ");
	while (e + 2 <= end && e[1] >= 2 && e + e[1] <= end) {
		if (e[0] == 0 && e[1] >= 8 && (rd32(e + 4) & 1)) {
			kprintf("%s%u", sep, e[3]);
			sep = ",";
			lapics++;
		} else if (e[0] == 9 && e[1] >= 16 && (rd32(e + 8) & 1)) {
			kprintf("%s%u", sep, rd32(e + 4));
			sep = ",";
			lapics++;
		} else if (e[0] == 1) {
			ioapics++;
		} else if (e[0] == 2 && e[1] >= 10 && e[3] == 0) {
			irq0_gsi = rd32(e + 4);
		}
		e += e[1];
	}
	/* Flags at +40, bit 0 PCAT_COMPAT: the machine also has two 8259s. */
	kprintf(" ioapics %u irq0-gsi %u pcat %u\n", ioapics, irq0_gsi, rd32((const u8 *)m + 40) & 1);
	if (e != end) {
		fail = "MADT entries do not end at the table's end";
		return 0;
	}
	return 1;
}

/* SLP_TYPa for S5 from the DSDT's \_S5 package (§7.4.2.5): the AML
 * NameOp '_S5_' PackageOp PkgLength NumElements, then the first element
 * (BytePrefix 0x0a n, ZeroOp, OneOp). Falls back to 5. */
static u32 s5_type(const struct sdt *dsdt, const char **from)
{
	*from = "default";
	if (!dsdt)
		return 5;
	const u8 *p = (const u8 *)dsdt + sizeof(*dsdt), *end = (const u8 *)dsdt + dsdt->length;
	for (; p + 10 < end; p++) {
		if (memcmp(p, "_S5_", 4) || p[4] != 0x12)
			continue;
		const u8 *q = p + 5;
		q += 1 + (q[0] >> 6); /* PkgLength: bits 7-6 = extra bytes */
		q++;                  /* NumElements */
		*from = "dsdt";
		if (q[0] == 0x0a)
			return q[1] & 7;
		if (q[0] == 0x00 || q[0] == 0x01)
			return q[0];
		*from = "default";
		return 5;
	}
	return 5;
}

static void gas_write(const struct gas *g, u32 v, u32 bytes)
{
	if (g->space == 1) {
		if (bytes == 1)
			outb((u16)g->address, (u8)v);
		else
			outw((u16)g->address, (u16)v);
	} else if (bytes == 1) {
		*(volatile u8 *)g->address = (u8)v;
	} else {
		*(volatile u16 *)g->address = (u16)v;
	}
}

static int power_off(const struct sdt *fadt, u32 typ)
{
	const u8 *f = (const u8 *)fadt;
	struct gas g;
	if (fadt->length >= FADT_SLEEP_CONTROL + sizeof(g)) {
		memcpy(&g, f + FADT_SLEEP_CONTROL, sizeof(g));
		if (g.address) {
			/* Sleep control register (§4.8.3.7): SLP_TYPx in bits 2-4,
			 * SLP_EN bit 5. */
			kprintf("acpi: powering off (sleep control register, s5 type %u)\n", typ);
			gas_write(&g, (typ & 7) << 2 | 1 << 5, 1);
			return 1;
		}
	}
	memset(&g, 0, sizeof(g));
	if (fadt->length >= FADT_X_PM1A_CNT_BLK + sizeof(g))
		memcpy(&g, f + FADT_X_PM1A_CNT_BLK, sizeof(g));
	if (!g.address) {
		g.space = 1;
		g.address = rd32(f + FADT_PM1A_CNT_BLK);
	}
	if (!g.address)
		return 0;
	/* Fixed hardware: switch to ACPI mode first if firmware wants it
	 * (§4.8.2.1, SMI_CMD/ACPI_ENABLE; SCI_EN is PM1 control bit 0). */
	u32 smi = rd32(f + FADT_SMI_CMD);
	u8 enable = f[FADT_ACPI_ENABLE];
	if (g.space == 1 && smi && enable && !(inb((u16)g.address) & 1))
		outb((u16)smi, enable);
	/* PM1 control (§4.8.3.2.1): SLP_TYPx bits 10-12, SLP_EN bit 13. */
	kprintf("acpi: powering off (pm1a control, s5 type %u)\n", typ);
	gas_write(&g, (typ & 7) << 10 | 1 << 13, 2);
	return 1;
}

int guest_main(void)
{
	const char *from;
	const struct rsdp *r = find_rsdp(&from);
	if (!r || memcmp(r->sig, "RSD PTR ", 8) || checksum8(r, 20)) {
		kprintf("acpi: FAIL no valid RSDP (%s)\n", from);
		return EXIT_FAIL;
	}
	kprintf("acpi: rsdp %#016lx from %s revision %u\n", (u64)r, from, r->revision);
	int x = r->revision >= 2 && r->xsdt;
	if (r->revision >= 2 && checksum8(r, r->length < 36 ? 36 : r->length)) {
		kprintf("acpi: FAIL bad RSDP extended checksum\n");
		return EXIT_FAIL;
	}
	const struct sdt *root = x ? table(r->xsdt, "XSDT") : table(r->rsdt, "RSDT");
	if (!root)
		goto out;

	const struct sdt *madt = NULL, *fadt = NULL;
	u32 width = x ? 8 : 4, n = (root->length - sizeof(*root)) / width;
	const u8 *ent = (const u8 *)root + sizeof(*root);
	kprintf("acpi: %s tables", x ? "xsdt" : "rsdt");
	for (u32 i = 0; i < n; i++) {
		u64 a = x ? rd64(ent + i * 8) : rd32(ent + i * 4);
		const struct sdt *t = table(a, NULL);
		if (!t) {
			kprintf("\n");
			goto out;
		}
		kprintf(" %c%c%c%c", t->sig[0], t->sig[1], t->sig[2], t->sig[3]);
		if (!memcmp(t->sig, "APIC", 4))
			madt = t;
		else if (!memcmp(t->sig, "FACP", 4))
			fadt = t;
	}
	kprintf(" (each checksum ok)\n");
	if (!madt) {
		fail = "no MADT";
		goto out;
	}
	if (!walk_madt(madt))
		goto out;
	if (!fadt || fadt->length < FADT_FLAGS + 4) {
		fail = "no FADT";
		goto out;
	}
	/* The DSDT, reached through the FADT, is checked too. */
	u64 dsdt_addr = fadt->length >= FADT_X_DSDT + 8 ? rd64((const u8 *)fadt + FADT_X_DSDT) : 0;
	if (!dsdt_addr)
		dsdt_addr = rd32((const u8 *)fadt + FADT_DSDT);
	const struct sdt *dsdt = table(dsdt_addr, "DSDT");
	if (!dsdt)
		goto out;
	kprintf("acpi: rsdp ok %s ok madt ok lapics %u fadt ok\n", x ? "xsdt" : "rsdt", lapics);

	const char *s5_from;
	u32 typ = s5_type(dsdt, &s5_from);
	kprintf("acpi: fadt %s, s5 type %u from %s\n",
		rd32((const u8 *)fadt + FADT_FLAGS) & FLAGS_HW_REDUCED ? "hardware-reduced" : "fixed-hardware",
		typ, s5_from);
	if (!power_off(fadt, typ)) {
		fail = "FADT has neither a sleep control nor a PM1a control register";
		goto out;
	}
	delay_ms(100);
	fail = "still running after power off";
out:
	kprintf("acpi: FAIL %s\n", fail);
	return EXIT_FAIL;
}
