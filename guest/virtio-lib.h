/* virtio-mmio for the tiny guests (virtio.c, virtiofs.c): the version 2
 * register layout, the devices named on the command line
 * (`virtio_mmio.device=<size>@<addr>:<irq>`), initialisation, and split
 * virtqueues driven by polling their used ring. Section numbers are the
 * virtio 1.2 spec's.
 *
 * Guest memory is identity-mapped (the image is linked at 1 MiB), so the
 * address of a static buffer is its guest-physical address. */
#ifndef GUEST_VIRTIO_LIB_H
#define GUEST_VIRTIO_LIB_H

#include "lib.h"

/* ---- virtio-mmio, version 2 (§4.2.2, table 4.1) -------------------------- */

#define VM_MAGIC 0x000
#define VM_VERSION 0x004
#define VM_DEVICE_ID 0x008
#define VM_VENDOR_ID 0x00c
#define VM_DEV_FEATURES 0x010
#define VM_DEV_FEATURES_SEL 0x014
#define VM_DRV_FEATURES 0x020
#define VM_DRV_FEATURES_SEL 0x024
#define VM_QUEUE_SEL 0x030
#define VM_QUEUE_NUM_MAX 0x034
#define VM_QUEUE_NUM 0x038
#define VM_QUEUE_READY 0x044
#define VM_QUEUE_NOTIFY 0x050
#define VM_INT_STATUS 0x060
#define VM_INT_ACK 0x064
#define VM_STATUS 0x070
#define VM_QUEUE_DESC_LO 0x080
#define VM_QUEUE_DESC_HI 0x084
#define VM_QUEUE_DRIVER_LO 0x090
#define VM_QUEUE_DRIVER_HI 0x094
#define VM_QUEUE_DEVICE_LO 0x0a0
#define VM_QUEUE_DEVICE_HI 0x0a4
#define VM_CONFIG_GEN 0x0fc
#define VM_CONFIG 0x100

#define VIRTIO_MAGIC 0x74726976 /* "virt" */

/* Device status bits (§2.1). */
#define S_ACKNOWLEDGE 0x01
#define S_DRIVER 0x02
#define S_DRIVER_OK 0x04
#define S_FEATURES_OK 0x08
#define S_NEEDS_RESET 0x40
#define S_FAILED 0x80

/* InterruptStatus bits (§4.2.2). */
#define INT_USED_BUFFER 0x1
#define INT_CONFIG_CHANGE 0x2

#define F_VERSION_1 (1UL << 32) /* §6 */

/* ---- Split virtqueue (§2.7) ---------------------------------------------- */

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2

struct vq_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct vq_used_elem {
	u32 id;
	u32 len;
};

/* Queue size used: at most QSIZE (a power of 2, §2.7), at most QueueNumMax. */
#define QSIZE 16

/* One queue's memory; the device sees the three parts at their own addresses.
 * Alignment (§2.7, table 2.4): descriptors 16, driver area 2, device area 4. */
struct vq_mem {
	struct vq_desc desc[QSIZE];
	struct {
		u16 flags;
		u16 idx;
		u16 ring[QSIZE];
		u16 used_event;
	} avail __attribute__((aligned(64)));
	struct {
		u16 flags;
		u16 idx;
		struct vq_used_elem ring[QSIZE];
		u16 avail_event;
	} used __attribute__((aligned(64)));
};

/* The driver's side of one queue. */
struct vq {
	struct vq_mem *mem;
	u16 num;       /* queue size */
	u16 next_desc; /* next free descriptor (requests take turns) */
	u16 avail_idx; /* our copy of avail.idx */
	u16 used_idx;  /* used.idx seen so far */
};

/* ---- Devices ------------------------------------------------------------- */

#define MAX_DEVS 32
#define MAX_QUEUES 2

struct dev {
	u32 index;
	u64 addr, size;
	u32 irq;
	u32 id;
	u64 offered;     /* DeviceFeatures */
	int irr_checked; /* virtio.c: the LAPIC IRR line was printed */
	u32 nq;          /* queues set up by vio_init */
	struct vq q[MAX_QUEUES];
};

/* Every `virtio_mmio.device=` word of the command line, in order (find_devices). */
extern struct dev devs[MAX_DEVS];
extern u32 ndevs;

/* Each guest names itself for the failure lines: "<vio_name>: FAIL <why>". */
extern const char vio_name[];

static inline u32 rd(const struct dev *d, u32 reg) { return mmio_read32(d->addr + reg); }
static inline void wr(const struct dev *d, u32 reg, u32 v) { mmio_write32(d->addr + reg, v); }
static inline u8 rd8(const struct dev *d, u32 reg) { return *(volatile u8 *)(d->addr + reg); }
static inline void wr8(const struct dev *d, u32 reg, u8 v) { *(volatile u8 *)(d->addr + reg) = v; }
static inline u16 rd16(const struct dev *d, u32 reg) { return *(volatile u16 *)(d->addr + reg); }
static inline void wr16(const struct dev *d, u32 reg, u16 v) { *(volatile u16 *)(d->addr + reg) = v; }

/* Full barrier (a locked instruction: mfence is not emulated everywhere). */
static inline void mb(void) { __asm__ volatile("lock; orl $0, (%%rsp)" ::: "memory", "cc"); }
static inline void compiler_barrier(void) { __asm__ volatile("" ::: "memory"); }

#define VOL16(x) (*(volatile u16 *)&(x))
#define VOL32(x) (*(volatile u32 *)&(x))

/* Every failure prints one line and makes the caller return -1. */
#define FAIL(...)                                   \
	do {                                        \
		kprintf("%s: FAIL ", vio_name);     \
		kprintf(__VA_ARGS__);               \
		con_putc('\n');                     \
		return -1;                          \
	} while (0)

#define TRY(x)                   \
	do {                             \
		if ((x) < 0)             \
			return -1;       \
	} while (0)

/* Fills devs[] from the command line; -1 (after a FAIL line) on a bad word. */
int find_devices(void);

/* Writes 0 to Status and waits (bounded) until it reads 0. */
int dev_reset(struct dev *d);
u64 read_features(const struct dev *d);

/* Reset, ACKNOWLEDGE, DRIVER, features (those of `want` the device offers;
 * VIRTIO_F_VERSION_1 is required), FEATURES_OK, queues 0..nq-1 on mem[0..nq-1],
 * DRIVER_OK. */
int vio_init(struct dev *d, u64 want, u64 *accepted, struct vq_mem *mem, u32 nq);

/* A 64-bit config field as two 32-bit reads, retried until ConfigGeneration
 * is the same before and after (§4.2.2.2, §2.5.1). */
int config_u64(const struct dev *d, u32 off, u64 *out);

/* One buffer of a request. */
struct buf {
	u64 addr;
	u32 len;
	u16 flags; /* DESC_F_WRITE: the device writes it */
};

/* Writes a chain of descriptors for `bufs` on queue qi from its next free
 * descriptor; returns its head. */
u16 vq_chain(struct dev *d, u32 qi, const struct buf *bufs, u32 n);
/* Makes `head` available on queue qi and notifies it (§2.7.13). */
void vq_post(struct dev *d, u32 qi, u16 head);
/* Polls queue qi's used ring for the one outstanding request (bounded), checks
 * the element (id = head, len <= max_len) and the interrupt status, and
 * acknowledges the interrupt. The used length goes to *len. */
int vq_wait(struct dev *d, u32 qi, u16 head, u32 max_len, u32 *len, const char *what);
/* §4.2.2: InterruptStatus bit 0 after used buffers, cleared by InterruptACK. */
int int_check(struct dev *d, const char *what);

#endif
