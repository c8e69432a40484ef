/* Shared guest library: boot information for both entry paths, the COM1
 * console, a small printf, the command line, and the ways to end. */
#include "lib.h"

struct boot_info boot;

/* ---- Boot information ------------------------------------------------- */

/* Xen PVH: struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h,
 * docs/misc/pvh.pandoc). memmap fields exist from version 1 on. */
#define PVH_MAGIC 0x336ec578
struct hvm_start_info {
	u32 magic;
	u32 version;
	u32 flags;
	u32 nr_modules;
	u64 modlist_paddr;
	u64 cmdline_paddr;
	u64 rsdp_paddr;
	u64 memmap_paddr;
	u32 memmap_entries;
	u32 reserved;
};
struct hvm_memmap_entry {
	u64 addr;
	u64 size;
	u32 type;
	u32 reserved;
};

/* Linux boot_params "zero page" offsets (Documentation/arch/x86/zero-page.rst). */
#define BP_ACPI_RSDP 0x070
#define BP_EXT_CMD_LINE_PTR 0x0c8
#define BP_E820_ENTRIES 0x1e8
#define BP_CMD_LINE_PTR 0x228
#define BP_E820_TABLE 0x2d0
#define E820_ENTRY_SIZE 20
#define E820_MAX 128

static NORETURN void run_guest(void)
{
	if (!boot.cmdline)
		boot.cmdline = "";
	debug_exit((u32)guest_main());
}

/* Called by the PVH stub in long mode; start_info is below 4 GiB, hence mapped. */
void boot_pvh(u32 start_info)
{
	const struct hvm_start_info *si = (const void *)(u64)start_info;
	boot.entry = "pvh";
	if (si->magic != PVH_MAGIC) {
		kprintf("boot: bad hvm_start_info magic %#x at %#x\n", si->magic, start_info);
		debug_exit(EXIT_FAIL);
	}
	if (si->cmdline_paddr)
		boot.cmdline = (const char *)si->cmdline_paddr;
	boot.rsdp = si->rsdp_paddr;
	if (si->version >= 1 && si->memmap_paddr) {
		const struct hvm_memmap_entry *e = (const void *)si->memmap_paddr;
		for (u32 i = 0; i < si->memmap_entries && boot.nmem < MAX_MEM_RANGES; i++)
			boot.mem[boot.nmem++] = (struct mem_range){e[i].addr, e[i].size, e[i].type};
	}
	run_guest();
}

static u64 rd_u64(const u8 *p) { u64 v; memcpy(&v, p, 8); return v; }
static u32 rd_u32(const u8 *p) { u32 v; memcpy(&v, p, 4); return v; }

/* Called by the 64-bit stub with RSI = boot_params. */
void boot_linux64(const u8 *bp)
{
	boot.entry = "64";
	u64 cmd = rd_u32(bp + BP_CMD_LINE_PTR) | (u64)rd_u32(bp + BP_EXT_CMD_LINE_PTR) << 32;
	if (cmd)
		boot.cmdline = (const char *)cmd;
	boot.rsdp = rd_u64(bp + BP_ACPI_RSDP);
	u32 n = bp[BP_E820_ENTRIES];
	for (u32 i = 0; i < n && i < E820_MAX && boot.nmem < MAX_MEM_RANGES; i++) {
		const u8 *e = bp + BP_E820_TABLE + i * E820_ENTRY_SIZE;
		boot.mem[boot.nmem++] = (struct mem_range){rd_u64(e), rd_u64(e + 8), rd_u32(e + 16)};
	}
	run_guest();
}

/* ---- Console: polled 16550 on COM1 ------------------------------------ */

#define UART_LSR 5
#define LSR_THRE 0x20

/* Output goes out in runs of up to 16 bytes, the 16550's transmit FIFO: one
 * LSR check, then one `rep outsb` for the run, as Linux's 8250 driver fills
 * the FIFO per THRE. Each IN or OUT is a VM exit, and on a PVM host an exit
 * costs ~20 us: a byte at a time, hello spent most of its life in them. The
 * buffer is the caller's (on its stack), so vCPUs printing at once cannot
 * mix each other's runs. */
#define UART_FIFO 16

struct con_buf {
	u8 b[UART_FIFO];
	u32 n;
};

static void con_flush(struct con_buf *o)
{
	if (!o->n)
		return;
	/* Wait (bounded) for the transmit FIFO to be empty, as a real 16550
	 * needs; an emulated one is always ready. */
	for (int i = 0; i < 100000 && !(inb(COM1 + UART_LSR) & LSR_THRE); i++)
		cpu_relax();
	const u8 *p = o->b;
	u64 n = o->n;
	__asm__ volatile("rep outsb" : "+S"(p), "+c"(n) : "d"((u16)COM1) : "memory");
	o->n = 0;
}

static void buf_putc(struct con_buf *o, char c)
{
	o->b[o->n++] = (u8)c;
	if (o->n == UART_FIFO)
		con_flush(o);
}

void con_putc(char c)
{
	struct con_buf o = {.n = 0};
	buf_putc(&o, c);
	con_flush(&o);
}

static void buf_puts(struct con_buf *o, const char *s)
{
	while (*s)
		buf_putc(o, *s++);
}

void con_puts(const char *s)
{
	struct con_buf o = {.n = 0};
	buf_puts(&o, s);
	con_flush(&o);
}

static void put_num(struct con_buf *o, u64 v, unsigned base, int width, char pad, int alt)
{
	char buf[24];
	int n = 0;
	do {
		buf[n++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	if (alt)
		buf_puts(o, "0x");
	while (width-- > n)
		buf_putc(o, pad);
	while (n)
		buf_putc(o, buf[--n]);
}

/* printf subset: %s %c %d %u %x with '#', '0', width and 'l'. */
void kprintf(const char *fmt, ...)
{
	struct con_buf o = {.n = 0};
	__builtin_va_list ap;
	__builtin_va_start(ap, fmt);
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			buf_putc(&o, *fmt);
			continue;
		}
		int alt = 0, width = 0, is_long = 0;
		char pad = ' ';
		fmt++;
		if (*fmt == '#') { alt = 1; fmt++; }
		if (*fmt == '0') { pad = '0'; fmt++; }
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l') { is_long = 1; fmt++; }
		switch (*fmt) {
		case 's': buf_puts(&o, __builtin_va_arg(ap, const char *)); break;
		case 'c': buf_putc(&o, (char)__builtin_va_arg(ap, int)); break;
		case 'd': {
			i64 v = is_long ? __builtin_va_arg(ap, i64) : __builtin_va_arg(ap, int);
			if (v < 0) { buf_putc(&o, '-'); v = -v; }
			put_num(&o, (u64)v, 10, width, pad, 0);
			break;
		}
		case 'u':
		case 'x': {
			u64 v = is_long ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32);
			put_num(&o, v, *fmt == 'x' ? 16 : 10, width, pad, alt);
			break;
		}
		case '%': buf_putc(&o, '%'); break;
		default: buf_putc(&o, '?'); break;
		}
	}
	__builtin_va_end(ap);
	con_flush(&o);
}

/* ---- IOAPIC ------------------------------------------------------------- */

/* IOAPIC: index/data window (82093AA datasheet §3.0); redirection entry n
 * is registers 0x10 + 2n (low) and 0x11 + 2n (high). */
void ioapic_write(u32 reg, u32 v)
{
	mmio_write32(IOAPIC_BASE, reg);
	mmio_write32(IOAPIC_BASE + 0x10, v);
}

u32 ioapic_read(u32 reg)
{
	mmio_write32(IOAPIC_BASE, reg);
	return mmio_read32(IOAPIC_BASE + 0x10);
}

/* Fixed delivery, physical destination, active high, edge: only the vector
 * and the mask bit (16) are set. */
void ioapic_route(u32 pin, u8 vector, u32 dest, int masked)
{
	ioapic_write(0x11 + 2 * pin, dest << 24);
	ioapic_write(0x10 + 2 * pin, vector | (masked ? 1u << 16 : 0));
}

/* ---- Command line ------------------------------------------------------- */

/* Finds `key=` at the start of a word; returns the value and its length. */
const char *cmdline_value(const char *key, usize *len)
{
	usize klen = strlen(key);
	const char *p = boot.cmdline;
	while (*p) {
		while (*p == ' ')
			p++;
		const char *word = p;
		while (*p && *p != ' ')
			p++;
		if ((usize)(p - word) > klen && !memcmp(word, key, klen) && word[klen] == '=') {
			*len = (usize)(p - word) - klen - 1;
			return word + klen + 1;
		}
	}
	return NULL;
}

/* A number: decimal, or hexadecimal with 0x. */
u64 cmdline_num(const char *key, u64 dflt)
{
	usize len;
	const char *v = cmdline_value(key, &len);
	if (!v || !len)
		return dflt;
	unsigned base = 10;
	if (len > 2 && v[0] == '0' && (v[1] == 'x' || v[1] == 'X')) {
		base = 16;
		v += 2;
		len -= 2;
	}
	u64 n = 0;
	for (usize i = 0; i < len; i++) {
		char c = v[i];
		unsigned d;
		if (c >= '0' && c <= '9') d = (unsigned)(c - '0');
		else if (base == 16 && c >= 'a' && c <= 'f') d = (unsigned)(c - 'a' + 10);
		else if (base == 16 && c >= 'A' && c <= 'F') d = (unsigned)(c - 'A' + 10);
		else return dflt;
		n = n * base + d;
	}
	return n;
}

int cmdline_is(const char *key, const char *value)
{
	usize len;
	const char *v = cmdline_value(key, &len);
	return v && len == strlen(value) && !memcmp(v, value, len);
}

/* ---- Memory and strings (gcc may call these even in freestanding code) -- */

void *memset(void *d, int c, usize n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, usize n)
{
	u8 *p = d;
	const u8 *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

int memcmp(const void *a, const void *b, usize n)
{
	const u8 *p = a, *q = b;
	for (; n; n--, p++, q++)
		if (*p != *q)
			return *p - *q;
	return 0;
}

usize strlen(const char *s)
{
	usize n = 0;
	while (s[n])
		n++;
	return n;
}

/* Sum of bytes; MP and ACPI tables are valid when it is 0. */
u8 checksum8(const void *p, usize n)
{
	const u8 *b = p;
	u8 sum = 0;
	while (n--)
		sum = (u8)(sum + *b++);
	return sum;
}

/* ---- Time and ends -------------------------------------------------------- */

void delay_ms(u64 ms)
{
	u64 end = deadline_ms(ms);
	while (!expired(end))
		cpu_relax();
}

NORETURN void halt_forever(void)
{
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* isa-debug-exit: a 32-bit write ends the VM (QEMU hw/misc/debugexit.c). If the
 * device is missing the write is dropped, so halt rather than run on. */
NORETURN void debug_exit(u32 value)
{
	outl(DEBUG_EXIT_PORT, value);
	halt_forever();
}
