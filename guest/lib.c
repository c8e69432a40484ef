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

void con_putc(char c)
{
	/* Wait (bounded) for the transmit holding register to be empty, as a
	 * real 16550 needs; an emulated one is always ready. */
	for (int i = 0; i < 100000 && !(inb(COM1 + UART_LSR) & LSR_THRE); i++)
		cpu_relax();
	outb(COM1, (u8)c);
}

void con_puts(const char *s)
{
	while (*s)
		con_putc(*s++);
}

static void put_num(u64 v, unsigned base, int width, char pad, int alt)
{
	char buf[24];
	int n = 0;
	do {
		buf[n++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	if (alt)
		con_puts("0x");
	while (width-- > n)
		con_putc(pad);
	while (n)
		con_putc(buf[--n]);
}

/* printf subset: %s %c %d %u %x with '#', '0', width and 'l'. */
void kprintf(const char *fmt, ...)
{
	__builtin_va_list ap;
	__builtin_va_start(ap, fmt);
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			con_putc(*fmt);
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
		case 's': con_puts(__builtin_va_arg(ap, const char *)); break;
		case 'c': con_putc((char)__builtin_va_arg(ap, int)); break;
		case 'd': {
			i64 v = is_long ? __builtin_va_arg(ap, i64) : __builtin_va_arg(ap, int);
			if (v < 0) { con_putc('-'); v = -v; }
			put_num((u64)v, 10, width, pad, 0);
			break;
		}
		case 'u':
		case 'x': {
			u64 v = is_long ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32);
			put_num(v, *fmt == 'x' ? 16 : 10, width, pad, alt);
			break;
		}
		case '%': con_putc('%'); break;
		default: con_putc('?'); break;
		}
	}
	__builtin_va_end(ap);
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
