/* Shared helpers for the tiny guests: port and MMIO access, the COM1 console,
 * the normalised boot information, and the ways a guest ends. */
#ifndef GUEST_LIB_H
#define GUEST_LIB_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;
typedef unsigned long usize;

#define NULL ((void *)0)
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define NORETURN __attribute__((noreturn))

/* Exit values written to isa-debug-exit. QEMU and minivmm turn v into the
 * status (v << 1) | 1, so 0x10 -> 33 (success) and 0x11 -> 35 (failure). */
#define EXIT_OK 0x10
#define EXIT_FAIL 0x11

/* Fixed addresses of the machine (DESIGN.md, guest/README.md). */
#define COM1 0x3f8
#define DEBUG_EXIT_PORT 0xf4
#define LAPIC_BASE 0xfee00000UL
#define IOAPIC_BASE 0xfec00000UL

/* One memory map entry, the same for the PVH memmap and the e820 table. */
struct mem_range {
	u64 addr;
	u64 size;
	u32 type; /* 1 = RAM (ACPI 6.x §15, E820 address range types) */
};

#define MAX_MEM_RANGES 128

/* What the entry stubs found, whatever the boot protocol. */
struct boot_info {
	const char *entry;   /* "pvh" or "64" */
	const char *cmdline; /* never NULL; "" if none */
	u64 rsdp;            /* from start_info / boot_params, 0 if not given */
	u32 nmem;
	struct mem_range mem[MAX_MEM_RANGES];
};
extern struct boot_info boot;

/* CR3 of the boot CPU, for the APs to share (written by the entry stubs). */
extern u32 boot_cr3;

/* Each guest provides this; its return value goes to isa-debug-exit. */
int guest_main(void);

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u16 inw(u16 port)
{
	u16 v;
	__asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

static inline u64 read_cr3(void)
{
	u64 v;
	__asm__ volatile("mov %%cr3, %0" : "=r"(v));
	return v;
}

/* The TSC rate is not known without calibration; deadlines assume at most
 * 4 GHz, so a wait lasts at least as long as asked (longer on slower CPUs). */
#define TSC_PER_MS 4000000UL
static inline u64 deadline_ms(u64 ms) { return rdtsc() + ms * TSC_PER_MS; }
static inline int expired(u64 deadline) { return (i64)(rdtsc() - deadline) >= 0; }
void delay_ms(u64 ms);

/* Console on COM1 (polled 16550). */
void con_putc(char c);
void con_puts(const char *s);
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Command line: `key=value` words separated by spaces. */
const char *cmdline_value(const char *key, usize *len);
u64 cmdline_num(const char *key, u64 dflt);
int cmdline_is(const char *key, const char *value);

void *memset(void *d, int c, usize n);
void *memcpy(void *d, const void *s, usize n);
int memcmp(const void *a, const void *b, usize n);
usize strlen(const char *s);
u8 checksum8(const void *p, usize n);

/* LAPIC registers (Intel SDM Vol. 3A §11.4.1, table 11-1). */
#define LAPIC_ID 0x20
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define LAPIC_LVT_LINT0 0x350
static inline u32 lapic_read(u32 reg) { return mmio_read32(LAPIC_BASE + reg); }
static inline void lapic_write(u32 reg, u32 v) { mmio_write32(LAPIC_BASE + reg, v); }
static inline u32 lapic_id(void) { return lapic_read(LAPIC_ID) >> 24; }

NORETURN void debug_exit(u32 value);

/* intr.c (guests linked with isr.o): the IDT. */
void load_idt(void);
/* The IOAPIC's registers. */
void ioapic_write(u32 reg, u32 v);
u32 ioapic_read(u32 reg);
void ioapic_route(u32 pin, u8 vector, u32 dest, int masked);
NORETURN void halt_forever(void);

#endif
