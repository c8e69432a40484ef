/* virtio: drives the VMM's virtio-mmio devices by hand, as a driver would:
 * finds them on the command line (`virtio_mmio.device=<size>@<addr>:<irq>`,
 * the Linux virtio_mmio syntax), initialises each through the version 2
 * register layout and talks to it over one split virtqueue, polling the used
 * ring. Section numbers are the virtio 1.2 spec's.
 *
 * virtio.mode=basic (default): every virtio-blk and virtio-rng device.
 *   virtio: found 3 devices
 *   virtio: dev 0 at 0xd0000000 irq 5 id 2
 *   virtio-blk 0: features 0x100000220 accepted 0x100000220
 *   virtio-blk 0: capacity 2048 ro 0
 *   virtio: dev 0 irq 5 lapic irr 0->1        (the line rose and reached the CPU)
 *   virtio-blk 0: sector 0 sum 89abcdef
 *   virtio-blk 0: sector 0 text "minivmm sector 0"
 *   virtio-blk 0: serial <up to 20 characters>
 *   virtio-blk 0: write status 0              (1 = IOERR on a ro disk)
 *   virtio-blk 0: flush status 0              (rw disks)
 *   virtio-blk 0: readback ok                 (ro: "ro sector 1 unchanged")
 *   virtio-blk 0: write 4 sectors in 2 buffers status 0    (rw disks)
 *   virtio-blk 0: read 8 sectors in 2 buffers sum 01234567 ok
 *   virtio-blk 0: 4 requests in one notify ok
 *   virtio-blk 0: 35 reads ok (ring wrapped)
 *   virtio-blk 0: read past end status 1
 *   virtio-blk 0: unknown type status 2
 *   virtio-rng 2: got 64 bytes, 60 distinct
 *   virtio: ok                                           exit 0x10
 *   virtio: FAIL <why>                                   exit 0x11
 * Sector s (1-5) is written with blk_pattern(): the text
 * "minivmm virtio-blk <dev> wrote sector <s>\n", then bytes
 * (j*7 + 3 + s*13 + dev*29) & 0xff. Sums are 32-bit FNV-1a.
 *
 * virtio.mode=hostile: illegal requests to the first virtio-blk device (and
 * the rng), each of which must leave it DEVICE_NEEDS_RESET rather than hang
 * or crash the VMM, then a reset and a normal read:
 *   virtio-hostile: queue 99 num-max 0 ready 0
 *   virtio-hostile: read-only registers unchanged
 *   virtio-hostile: odd accesses survived (status 0x..)
 *   virtio-hostile: loop -> needs-reset
 *   virtio-hostile: loop interrupt-status 0x2         (bit 1: config change, §2.1.2)
 *   virtio-hostile: read after write -> needs-reset
 *   virtio-hostile: bad address -> needs-reset
 *   virtio-hostile: huge length -> needs-reset      (or "-> ioerr")
 *   virtio-hostile: bad next -> needs-reset
 *   virtio-hostile: bad head -> needs-reset
 *   virtio-hostile: rings outside ram -> needs-reset  (or "not ready"; these
 *   virtio-hostile: misaligned rings -> needs-reset    five print whatever the
 *   virtio-hostile: queue-num above max -> ...          device did: also
 *   virtio-hostile: queue-num 3 -> ...                  "completed", "completed
 *   virtio-hostile: queue-num 0 -> ...                  with an error", "no answer")
 *   virtio-hostile: no VERSION_1 -> features-ok 0
 *   virtio-hostile: unoffered feature -> features-ok 0
 *   virtio-hostile: rng loop -> needs-reset
 *   virtio-hostile: recovered
 *   virtio: ok
 *
 * The registers, device set-up and queues are in virtio-lib.c.
 */
#include "virtio-lib.h"

const char vio_name[] = "virtio";

/* ---- virtio-blk and virtio-rng ------------------------------------------- */

#define BLK_F_RO (1UL << 5)     /* §5.2.3 */
#define BLK_F_FLUSH (1UL << 9)

#define ID_BLK 2 /* §5 */
#define ID_RNG 4

/* virtio-blk requests (§5.2.6). */
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8
#define BLK_T_BOGUS 0x55 /* no such request type */
#define BLK_S_OK 0
#define BLK_S_IOERR 1
#define BLK_S_UNSUPP 2
#define BLK_ID_BYTES 20
#define SECTOR 512

/* An address no guest RAM reaches (minivmm gives at most 1 TiB). */
#define OUTSIDE_RAM 0x7ff000000000UL

/* One queue at a time: each device is reset before the next one is set up. */
static struct vq_mem qmem __attribute__((aligned(4096)));

/* ---- Buffers --------------------------------------------------------------- */

struct blk_hdr {
	u32 type;
	u32 reserved;
	u64 sector;
};
static struct blk_hdr hdr __attribute__((aligned(16)));
static volatile u8 blk_status __attribute__((aligned(16)));
static u8 sec0[SECTOR] __attribute__((aligned(64)));
static u8 sec1_orig[SECTOR] __attribute__((aligned(64)));
static u8 wbuf[4 * SECTOR] __attribute__((aligned(64)));
static u8 rbuf[8 * SECTOR] __attribute__((aligned(4096)));
static u8 idbuf[BLK_ID_BYTES + 4] __attribute__((aligned(16)));
static u8 rngbuf[64] __attribute__((aligned(64)));

/* 32-bit FNV-1a. */
static u32 fnv1a(const u8 *p, usize n)
{
	u32 h = 0x811c9dc5;
	while (n--) {
		h ^= *p++;
		h *= 0x01000193;
	}
	return h;
}

/* Whether `vector` waits in the local APIC's interrupt request register
 * (IRR, eight 32-bit registers from 0x200; SDM Vol. 3A §11.8.4). With
 * interrupts off throughout, a delivered interrupt stays there. */
static u32 lapic_pending(u32 vector)
{
	return lapic_read(0x200 + 0x10 * (vector / 32)) >> (vector % 32) & 1;
}

/* Each device's IOAPIC pin goes to a vector of its own. */
static u32 dev_vector(const struct dev *d) { return 0x40 + d->index; }

/* Reset, features, queue 0 on qmem, DRIVER_OK. */
static int dev_init(struct dev *d, u64 want, u64 *accepted)
{
	return vio_init(d, want, accepted, &qmem, 1);
}

/* The device's line around its first request, as the CPU sees it: the pin
 * is routed (fixed, edge, to this CPU) just before, so an edge it carries
 * leaves the device's vector pending in the LAPIC, whether the IOAPIC is
 * KVM's or the VMM's. */
static u32 irr_before;
static void irr_note_before(const struct dev *d)
{
	if (d->irr_checked || d->irq >= 24)
		return;
	lapic_write(LAPIC_SVR, 0x1ff); /* software-enabled: it accepts interrupts */
	ioapic_route(d->irq, (u8)dev_vector(d), lapic_id(), 0);
	irr_before = lapic_pending(dev_vector(d));
}
static void irr_note_after(struct dev *d)
{
	if (d->irr_checked || d->irq >= 24)
		return;
	d->irr_checked = 1;
	/* The VMM raises the line through an irqfd, which KVM delivers a moment
	 * later: wait for it, bounded. */
	u32 after;
	u64 end = deadline_ms(1000);
	while (!(after = lapic_pending(dev_vector(d))) && !expired(end))
		cpu_relax();
	kprintf("virtio: dev %u irq %u lapic irr %u->%u\n", d->index, d->irq, irr_before, after);
}

/* One request and its completion; returns the used length in *len. */
static int vq_request(struct dev *d, const struct buf *bufs, u32 n, u32 *len, const char *what)
{
	u32 writable = 0;
	for (u32 i = 0; i < n; i++)
		if (bufs[i].flags & DESC_F_WRITE)
			writable += bufs[i].len;
	irr_note_before(d);
	u16 head = vq_chain(d, 0, bufs, n);
	vq_post(d, 0, head);
	TRY(vq_wait(d, 0, head, writable, len, what));
	irr_note_after(d);
	return 0;
}

/* ---- virtio-blk ---------------------------------------------------------------- */

/* header, `nbufs` data buffers of `buflen` bytes from `data`, status byte. */
static int blk_request(struct dev *d, u32 type, u64 sector, u8 *data, u32 nbufs, u32 buflen,
		       int device_writes, u8 *status, const char *what)
{
	struct buf bufs[6];
	u32 n = 0;
	hdr = (struct blk_hdr){type, 0, sector};
	bufs[n++] = (struct buf){(u64)&hdr, sizeof(hdr), 0};
	for (u32 i = 0; i < nbufs; i++)
		bufs[n++] = (struct buf){(u64)(data + i * buflen), buflen,
					 device_writes ? DESC_F_WRITE : 0};
	bufs[n++] = (struct buf){(u64)&blk_status, 1, DESC_F_WRITE};
	if (n > d->q[0].num)
		FAIL("dev %u: %s needs %u descriptors, queue has %u", d->index, what, n, d->q[0].num);
	blk_status = 0xff;
	u32 len;
	TRY(vq_request(d, bufs, n, &len, what));
	*status = blk_status;
	if (*status == 0xff)
		FAIL("dev %u: %s: the device did not write the status byte", d->index, what);
	if (len < 1)
		FAIL("dev %u: %s: used len 0, but the status byte was written", d->index, what);
	return 0;
}

static void put_text(const u8 *p, usize n, char nonprint)
{
	for (usize i = 0; i < n; i++)
		con_putc(p[i] >= 0x20 && p[i] < 0x7f ? (char)p[i] : nonprint);
}

/* Sector s's pattern for device dev (the test rebuilds it on the host). */
static void blk_pattern(u8 *p, u32 dev, u32 s)
{
	for (u32 j = 0; j < SECTOR; j++)
		p[j] = (u8)(j * 7 + 3 + s * 13 + dev * 29);
	static const char a[] = "minivmm virtio-blk ", b[] = " wrote sector ";
	usize n = 0;
	char num[12];
	int k;
	memcpy(p, a, sizeof(a) - 1);
	n = sizeof(a) - 1;
	k = 0;
	do { num[k++] = (char)('0' + dev % 10); dev /= 10; } while (dev);
	while (k) p[n++] = (u8)num[--k];
	memcpy(p + n, b, sizeof(b) - 1);
	n += sizeof(b) - 1;
	do { num[k++] = (char)('0' + s % 10); s /= 10; } while (s);
	while (k) p[n++] = (u8)num[--k];
	p[n] = '\n';
}

#define BATCH 4
static struct blk_hdr bhdr[BATCH] __attribute__((aligned(16)));
static volatile u8 bstatus[BATCH] __attribute__((aligned(16)));
static u8 bbuf[BATCH * SECTOR] __attribute__((aligned(64)));

/* Reads of sectors 3, 2, 1, 0 made available together, with one notify: the
 * device must serve every one (in any order). `want` holds sectors 0-3. */
static int blk_batch(struct dev *d, const u8 *want)
{
	u32 i = d->index;
	if (d->q[0].num < 3 * BATCH) {
		kprintf("virtio-blk %u: %u requests in one notify skipped (queue size %u)\n", i,
			BATCH, d->q[0].num);
		return 0;
	}
	u16 heads[BATCH];
	memset(bbuf, 0, sizeof(bbuf));
	for (u32 k = 0; k < BATCH; k++) {
		bhdr[k] = (struct blk_hdr){BLK_T_IN, 0, BATCH - 1 - k};
		bstatus[k] = 0xff;
		struct buf b[3] = {
			{(u64)&bhdr[k], sizeof(bhdr[k]), 0},
			{(u64)(bbuf + k * SECTOR), SECTOR, DESC_F_WRITE},
			{(u64)&bstatus[k], 1, DESC_F_WRITE},
		};
		heads[k] = vq_chain(d, 0, b, 3);
		qmem.avail.ring[(u16)(d->q[0].avail_idx + k) % d->q[0].num] = heads[k];
	}
	compiler_barrier();
	d->q[0].avail_idx = (u16)(d->q[0].avail_idx + BATCH);
	VOL16(qmem.avail.idx) = d->q[0].avail_idx;
	mb();
	wr(d, VM_QUEUE_NOTIFY, 0);

	u64 end = deadline_ms(5000);
	u16 done;
	while ((done = (u16)(VOL16(qmem.used.idx) - d->q[0].used_idx)) < BATCH) {
		if (expired(end))
			FAIL("virtio-blk %u: %u of %u requests made available together came back "
			     "within 5 s (status 0x%x)", i, done, BATCH, rd(d, VM_STATUS));
		cpu_relax();
	}
	if (done != BATCH)
		FAIL("virtio-blk %u: used idx moved by %u for %u requests", i, done, BATCH);
	compiler_barrier();
	u32 seen = 0;
	for (u32 j = 0; j < BATCH; j++) {
		volatile struct vq_used_elem *e =
			&qmem.used.ring[(u16)(d->q[0].used_idx + j) % d->q[0].num];
		u32 id = e->id, len = e->len, k = 0;
		while (k < BATCH && heads[k] != id)
			k++;
		if (k == BATCH || (seen & 1u << k))
			FAIL("virtio-blk %u: used element id %u is no outstanding head (or twice)", i, id);
		seen |= 1u << k;
		if (len > SECTOR + 1)
			FAIL("virtio-blk %u: used len %u for %u writable bytes", i, len, SECTOR + 1);
	}
	d->q[0].used_idx = (u16)(d->q[0].used_idx + BATCH);
	TRY(int_check(d, "requests made available together"));
	for (u32 k = 0; k < BATCH; k++) {
		u32 sector = BATCH - 1 - k;
		if (bstatus[k] != BLK_S_OK)
			FAIL("virtio-blk %u: read of sector %u (of %u together) status %u", i, sector,
			     BATCH, bstatus[k]);
		if (memcmp(bbuf + k * SECTOR, want + sector * SECTOR, SECTOR))
			FAIL("virtio-blk %u: sector %u read together with others differs", i, sector);
	}
	kprintf("virtio-blk %u: %u requests in one notify ok\n", i, BATCH);
	return 0;
}

static int blk_basic(struct dev *d)
{
	u32 i = d->index;
	u64 acc;
	TRY(dev_init(d, BLK_F_RO | BLK_F_FLUSH, &acc));
	kprintf("virtio-blk %u: features %#lx accepted %#lx\n", i, d->offered, acc);
	int ro = (d->offered & BLK_F_RO) != 0;
	u64 cap;
	TRY(config_u64(d, 0, &cap));
	kprintf("virtio-blk %u: capacity %lu ro %u\n", i, cap, ro);
	if (cap < 6)
		FAIL("virtio-blk %u: capacity %lu sectors, this guest needs 6", i, cap);
	if (d->q[0].num < 4)
		FAIL("virtio-blk %u: queue size %u, this guest needs 4", i, d->q[0].num);

	u8 st;
	TRY(blk_request(d, BLK_T_IN, 0, sec0, 1, SECTOR, 1, &st, "read sector 0"));
	if (st != BLK_S_OK)
		FAIL("virtio-blk %u: read sector 0 status %u", i, st);
	kprintf("virtio-blk %u: sector 0 sum %08x\n", i, fnv1a(sec0, SECTOR));
	kprintf("virtio-blk %u: sector 0 text \"", i);
	put_text(sec0, 16, '.');
	con_puts("\"\n");

	memset(idbuf, 0, sizeof(idbuf));
	TRY(blk_request(d, BLK_T_GET_ID, 0, idbuf, 1, BLK_ID_BYTES, 1, &st, "get id"));
	if (st != BLK_S_OK) {
		kprintf("virtio-blk %u: serial (none, status %u)\n", i, st);
	} else {
		kprintf("virtio-blk %u: serial ", i);
		put_text(idbuf, strlen((const char *)idbuf), '?');
		con_putc('\n');
	}

	TRY(blk_request(d, BLK_T_IN, 1, sec1_orig, 1, SECTOR, 1, &st, "read sector 1"));
	if (st != BLK_S_OK)
		FAIL("virtio-blk %u: read sector 1 status %u", i, st);
	blk_pattern(wbuf, i, 1);
	TRY(blk_request(d, BLK_T_OUT, 1, wbuf, 1, SECTOR, 0, &st, "write sector 1"));
	kprintf("virtio-blk %u: write status %u\n", i, st);
	if (st != (ro ? BLK_S_IOERR : BLK_S_OK))
		FAIL("virtio-blk %u: write status %u on a %s disk", i, st, ro ? "read-only" : "writable");
	if (!ro) {
		TRY(blk_request(d, BLK_T_FLUSH, 0, NULL, 0, 0, 0, &st, "flush"));
		kprintf("virtio-blk %u: flush status %u\n", i, st);
		if ((acc & BLK_F_FLUSH) && st != BLK_S_OK)
			FAIL("virtio-blk %u: flush status %u with VIRTIO_BLK_F_FLUSH", i, st);
	}
	TRY(blk_request(d, BLK_T_IN, 1, rbuf, 1, SECTOR, 1, &st, "read sector 1 back"));
	if (st != BLK_S_OK)
		FAIL("virtio-blk %u: read sector 1 back status %u", i, st);
	if (ro) {
		if (memcmp(rbuf, sec1_orig, SECTOR))
			FAIL("virtio-blk %u: sector 1 of a read-only disk changed", i);
		kprintf("virtio-blk %u: ro sector 1 unchanged\n", i);
	} else {
		if (memcmp(rbuf, wbuf, SECTOR))
			FAIL("virtio-blk %u: sector 1 reads back differently from what was written", i);
		kprintf("virtio-blk %u: readback ok\n", i);
		/* Sectors 2-5 from two buffers of two sectors each. */
		for (u32 s = 2; s < 6; s++)
			blk_pattern(wbuf + (s - 2) * SECTOR, i, s);
		TRY(blk_request(d, BLK_T_OUT, 2, wbuf, 2, 2 * SECTOR, 0, &st, "write sectors 2-5"));
		kprintf("virtio-blk %u: write 4 sectors in 2 buffers status %u\n", i, st);
		if (st != BLK_S_OK)
			FAIL("virtio-blk %u: write sectors 2-5 status %u", i, st);
	}

	/* Sectors 0-7 into two buffers of four sectors each. */
	if (cap >= 8) {
		memset(rbuf, 0, sizeof(rbuf));
		TRY(blk_request(d, BLK_T_IN, 0, rbuf, 2, 4 * SECTOR, 1, &st, "read sectors 0-7"));
		if (st != BLK_S_OK)
			FAIL("virtio-blk %u: read sectors 0-7 status %u", i, st);
		if (memcmp(rbuf, sec0, SECTOR))
			FAIL("virtio-blk %u: sector 0 differs in the 8-sector read", i);
		u8 *want1 = sec1_orig;
		if (!ro) {
			want1 = sec1_orig; /* reuse as scratch: the pattern of sector 1 */
			blk_pattern(want1, i, 1);
		}
		if (memcmp(rbuf + SECTOR, want1, SECTOR))
			FAIL("virtio-blk %u: sector 1 differs in the 8-sector read", i);
		if (!ro && memcmp(rbuf + 2 * SECTOR, wbuf, 4 * SECTOR))
			FAIL("virtio-blk %u: sectors 2-5 differ in the 8-sector read", i);
		kprintf("virtio-blk %u: read 8 sectors in 2 buffers sum %08x ok\n", i,
			fnv1a(rbuf, 8 * SECTOR));
		TRY(blk_batch(d, rbuf));
		/* Enough single reads that the ring indexes wrap round twice. */
		u32 n = 2 * d->q[0].num + 3;
		for (u32 k = 0; k < n; k++) {
			u32 sector = k % 8;
			TRY(blk_request(d, BLK_T_IN, sector, bbuf, 1, SECTOR, 1, &st, "read (wrap)"));
			if (st != BLK_S_OK || memcmp(bbuf, rbuf + sector * SECTOR, 32))
				FAIL("virtio-blk %u: read %u of %u (sector %u) status %u or wrong data", i, k,
				     n, sector, st);
		}
		kprintf("virtio-blk %u: %u reads ok (ring wrapped)\n", i, n);
	}

	/* One sector past the end: the device must refuse it. */
	TRY(blk_request(d, BLK_T_IN, cap, rbuf, 1, SECTOR, 1, &st, "read past end"));
	kprintf("virtio-blk %u: read past end status %u\n", i, st);
	if (st == BLK_S_OK)
		FAIL("virtio-blk %u: reading sector %lu of %lu succeeded", i, cap, cap);

	/* §5.2.6.1: UNSUPP for a request type the device does not support. */
	TRY(blk_request(d, BLK_T_BOGUS, 0, rbuf, 1, SECTOR, 1, &st, "unknown type"));
	kprintf("virtio-blk %u: unknown type status %u\n", i, st);
	if (st != BLK_S_UNSUPP)
		FAIL("virtio-blk %u: request type %#x answered %u, not UNSUPP", i, BLK_T_BOGUS, st);

	return dev_reset(d);
}

/* ---- virtio-rng ---------------------------------------------------------------- */

static int rng_request(struct dev *d, u32 *got, u32 *distinct)
{
	memset(rngbuf, 0, sizeof(rngbuf));
	struct buf b = {(u64)rngbuf, sizeof(rngbuf), DESC_F_WRITE};
	u32 len;
	TRY(vq_request(d, &b, 1, &len, "rng request"));
	u32 seen[8] = {0}, nonzero = 0;
	*distinct = 0;
	for (u32 k = 0; k < len; k++) {
		u8 v = rngbuf[k];
		nonzero |= v;
		if (!(seen[v / 32] & (1u << (v % 32)))) {
			seen[v / 32] |= 1u << (v % 32);
			++*distinct;
		}
	}
	*got = len;
	if (!len)
		FAIL("virtio-rng %u: used len 0", d->index);
	if (!nonzero)
		FAIL("virtio-rng %u: %u bytes, all zero", d->index, len);
	return 0;
}

static int rng_basic(struct dev *d)
{
	TRY(dev_init(d, 0, NULL));
	u32 got, distinct;
	TRY(rng_request(d, &got, &distinct));
	kprintf("virtio-rng %u: got %u bytes, %u distinct\n", d->index, got, distinct);
	return dev_reset(d);
}

/* ---- Hostile mode ---------------------------------------------------------- */

/* Posts `head` as it stands in the descriptor table and waits, bounded, for
 * DEVICE_NEEDS_RESET. Returns 1 if it came, 0 if the request completed
 * instead (its status byte in *st), -1 on a hang. */
static int expect_needs_reset(struct dev *d, u16 head, const char *what, u8 *st)
{
	blk_status = 0xff;
	vq_post(d, 0, head);
	u64 end = deadline_ms(2000);
	for (;;) {
		u32 s = rd(d, VM_STATUS);
		if (s & S_NEEDS_RESET)
			return 1;
		if (VOL16(qmem.used.idx) != d->q[0].used_idx) {
			*st = blk_status;
			return 0;
		}
		if (expired(end))
			FAIL("dev %u: %s: neither DEVICE_NEEDS_RESET nor a used buffer within 2 s (status 0x%x)",
			     d->index, what, s);
		cpu_relax();
	}
}

/* A case that must end in DEVICE_NEEDS_RESET: prints it and resets. */
static int hostile_case(struct dev *d, u16 head, const char *what)
{
	u8 st = 0;
	int r = expect_needs_reset(d, head, what, &st);
	TRY(r);
	if (!r)
		FAIL("dev %u: %s: completed (status byte %u) instead of DEVICE_NEEDS_RESET", d->index,
		     what, st);
	kprintf("virtio-hostile: %s -> needs-reset\n", what);
	/* §2.1.2: with DRIVER_OK, a configuration change notification follows. */
	kprintf("virtio-hostile: %s interrupt-status %#x\n", what, rd(d, VM_INT_STATUS));
	/* More notifies must change nothing. */
	wr(d, VM_QUEUE_NOTIFY, 0);
	u32 s = rd(d, VM_STATUS);
	if (!(s & S_NEEDS_RESET))
		FAIL("dev %u: %s: DEVICE_NEEDS_RESET went away by itself (status 0x%x)", d->index, what, s);
	return dev_reset(d);
}

/* Writes `v` to a register the driver may only read; it must not change. */
static int ro_reg(const struct dev *d, u32 reg, const char *name)
{
	u32 before = rd(d, reg);
	wr(d, reg, ~before);
	wr(d, reg, 0xdeadbeef);
	u32 after = rd(d, reg);
	if (after != before)
		FAIL("dev %u: read-only %s (%#x) changed from %#x to %#x on a write", d->index, name,
		     reg, before, after);
	return 0;
}

static int blk_read0(struct dev *d, u32 *sum)
{
	u8 st;
	TRY(blk_request(d, BLK_T_IN, 0, rbuf, 1, SECTOR, 1, &st, "read sector 0"));
	if (st != BLK_S_OK)
		FAIL("dev %u: read sector 0 status %u", d->index, st);
	*sum = fnv1a(rbuf, SECTOR);
	return 0;
}

/* Sets queue 0 up the way the driver must not (size `qnum`, the rings at
 * these addresses), DRIVER_OK, posts a read of sector 0 (into qmem: only
 * where the rings really are) and prints what the device made of it:
 * "not ready" (QueueReady did not stick), "needs-reset", "completed" or
 * "no answer" within 2 s. Then resets it. */
static int hostile_queue(struct dev *d, u32 qnum, u64 desc, u64 avail, u64 used,
			 const char *what, const char **outcome)
{
	TRY(dev_reset(d));
	wr(d, VM_STATUS, S_ACKNOWLEDGE | S_DRIVER);
	wr(d, VM_DRV_FEATURES_SEL, 0);
	wr(d, VM_DRV_FEATURES, 0);
	wr(d, VM_DRV_FEATURES_SEL, 1);
	wr(d, VM_DRV_FEATURES, (u32)(F_VERSION_1 >> 32));
	wr(d, VM_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
	if (!(rd(d, VM_STATUS) & S_FEATURES_OK))
		FAIL("dev %u: %s: FEATURES_OK did not stick", d->index, what);
	wr(d, VM_QUEUE_SEL, 0);
	memset(&qmem, 0, sizeof(qmem));
	wr(d, VM_QUEUE_NUM, qnum);
	wr(d, VM_QUEUE_DESC_LO, (u32)desc);
	wr(d, VM_QUEUE_DESC_HI, (u32)(desc >> 32));
	wr(d, VM_QUEUE_DRIVER_LO, (u32)avail);
	wr(d, VM_QUEUE_DRIVER_HI, (u32)(avail >> 32));
	wr(d, VM_QUEUE_DEVICE_LO, (u32)used);
	wr(d, VM_QUEUE_DEVICE_HI, (u32)(used >> 32));
	wr(d, VM_QUEUE_READY, 1);
	*outcome = "not ready";
	if (rd(d, VM_QUEUE_READY) == 1) {
		wr(d, VM_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
		d->q[0].mem = &qmem;
		d->q[0].num = QSIZE;
		d->q[0].next_desc = d->q[0].avail_idx = d->q[0].used_idx = 0;
		struct buf b[3] = {
			{(u64)&hdr, sizeof(hdr), 0},
			{(u64)rbuf, SECTOR, DESC_F_WRITE},
			{(u64)&blk_status, 1, DESC_F_WRITE},
		};
		hdr = (struct blk_hdr){BLK_T_IN, 0, 0};
		blk_status = 0xff;
		vq_post(d, 0, vq_chain(d, 0, b, 3));
		*outcome = "no answer";
		u64 end = deadline_ms(2000);
		while (!expired(end)) {
			if (rd(d, VM_STATUS) & S_NEEDS_RESET) {
				*outcome = "needs-reset";
				break;
			}
			if (VOL16(qmem.used.idx) != 0) {
				*outcome = blk_status == BLK_S_OK ? "completed" : "completed with an error";
				break;
			}
			cpu_relax();
		}
	}
	kprintf("virtio-hostile: %s -> %s\n", what, *outcome);
	return dev_reset(d);
}

static int hostile(void)
{
	struct dev *d = NULL, *rng = NULL;
	for (u32 k = 0; k < ndevs; k++) {
		if (devs[k].id == ID_BLK && !d)
			d = &devs[k];
		if (devs[k].id == ID_RNG && !rng)
			rng = &devs[k];
	}
	if (!d)
		FAIL("hostile mode needs a virtio-blk device");
	u32 sum0, sum;
	TRY(dev_init(d, 0, NULL));
	TRY(blk_read0(d, &sum0));

	/* A queue that does not exist (§4.2.2: QueueNumMax 0). */
	wr(d, VM_QUEUE_SEL, 99);
	u32 max = rd(d, VM_QUEUE_NUM_MAX), ready = rd(d, VM_QUEUE_READY);
	kprintf("virtio-hostile: queue 99 num-max %u ready %u\n", max, ready);
	if (max || ready)
		FAIL("dev %u: queue 99 has QueueNumMax %u QueueReady %u, expected 0 0", d->index, max,
		     ready);
	wr(d, VM_QUEUE_READY, 1); /* readying a queue that is not there */
	wr(d, VM_QUEUE_NOTIFY, 99);
	wr(d, VM_QUEUE_SEL, 0);

	/* Registers the driver only reads. */
	wr(d, VM_DEV_FEATURES_SEL, 0);
	TRY(ro_reg(d, VM_MAGIC, "MagicValue"));
	TRY(ro_reg(d, VM_VERSION, "Version"));
	TRY(ro_reg(d, VM_DEVICE_ID, "DeviceID"));
	TRY(ro_reg(d, VM_VENDOR_ID, "VendorID"));
	TRY(ro_reg(d, VM_DEV_FEATURES, "DeviceFeatures"));
	TRY(ro_reg(d, VM_QUEUE_NUM_MAX, "QueueNumMax"));
	TRY(ro_reg(d, VM_CONFIG_GEN, "ConfigGeneration"));
	TRY(ro_reg(d, VM_CONFIG, "capacity (low)"));
	TRY(ro_reg(d, VM_CONFIG + 4, "capacity (high)"));
	u32 isr = rd(d, VM_INT_STATUS);
	wr(d, VM_INT_STATUS, 0xffffffff);
	if (rd(d, VM_INT_STATUS) != isr)
		FAIL("dev %u: InterruptStatus changed on a write", d->index);
	kprintf("virtio-hostile: read-only registers unchanged\n");

	/* Reads of write-only and reserved registers, accesses that are not
	 * 32 bits wide, the far end of the window: only that nothing breaks. */
	u32 junk = rd(d, VM_QUEUE_NOTIFY) ^ rd(d, VM_INT_ACK) ^ rd(d, VM_QUEUE_SEL) ^
		   rd(d, VM_DRV_FEATURES) ^ rd(d, 0x018) ^ rd(d, 0x0b0) ^ rd(d, 0x0f8);
	junk ^= rd8(d, VM_MAGIC) ^ rd8(d, VM_MAGIC + 1) ^ rd16(d, VM_VERSION + 2) ^
		rd8(d, VM_CONFIG + 3);
	junk ^= rd(d, (u32)d->size - 4);
	wr8(d, 0x0c0, 0xff);
	wr16(d, 0x0c4, 0xffff);
	wr(d, 0x0b0, 0xffffffff);
	wr(d, (u32)d->size - 4, 0xffffffff);
	(void)junk;
	u32 magic = rd(d, VM_MAGIC);
	if (magic != VIRTIO_MAGIC)
		FAIL("dev %u: MagicValue %#x after odd accesses", d->index, magic);
	kprintf("virtio-hostile: odd accesses survived (status %#x)\n", rd(d, VM_STATUS));

	/* (a) A chain that loops: desc h -> h+1 -> h, all device-readable so
	 * that nothing but the loop is wrong with it. */
	TRY(dev_init(d, 0, NULL));
	u16 h = 3 % d->q[0].num, h1 = (u16)((h + 1) % d->q[0].num);
	hdr = (struct blk_hdr){BLK_T_OUT, 0, 0};
	qmem.desc[h] = (struct vq_desc){(u64)&hdr, sizeof(hdr), DESC_F_NEXT, h1};
	qmem.desc[h1] = (struct vq_desc){(u64)rbuf, SECTOR, DESC_F_NEXT, h};
	TRY(hostile_case(d, h, "loop"));

	/* (a2) A device-readable buffer after a writable one (§2.7.4.2). */
	TRY(dev_init(d, 0, NULL));
	struct buf order[3] = {
		{(u64)&hdr, sizeof(hdr), 0},
		{(u64)&blk_status, 1, DESC_F_WRITE},
		{(u64)rbuf, SECTOR, 0},
	};
	hdr = (struct blk_hdr){BLK_T_OUT, 0, 0};
	TRY(hostile_case(d, vq_chain(d, 0, order, 3), "read after write"));

	/* (b) A buffer outside guest RAM. */
	TRY(dev_init(d, 0, NULL));
	struct buf bad[3] = {
		{(u64)&hdr, sizeof(hdr), 0},
		{OUTSIDE_RAM, SECTOR, DESC_F_WRITE},
		{(u64)&blk_status, 1, DESC_F_WRITE},
	};
	hdr = (struct blk_hdr){BLK_T_IN, 0, 0};
	TRY(hostile_case(d, vq_chain(d, 0, bad, 3), "bad address"));

	/* (b2) A buffer that starts in RAM and runs 4 GiB past it: either
	 * DEVICE_NEEDS_RESET or IOERR (the request is past the disk's end too). */
	TRY(dev_init(d, 0, NULL));
	bad[1] = (struct buf){(u64)rbuf, 0xfffffe00, DESC_F_WRITE};
	hdr = (struct blk_hdr){BLK_T_IN, 0, 0};
	u8 st = 0;
	int r = expect_needs_reset(d, vq_chain(d, 0, bad, 3), "huge length", &st);
	TRY(r);
	if (r) {
		kprintf("virtio-hostile: huge length -> needs-reset\n");
	} else {
		if (st == BLK_S_OK || st == 0xff)
			FAIL("dev %u: a 4 GiB read into 64 MiB completed with status %u", d->index, st);
		kprintf("virtio-hostile: huge length -> %s\n", st == BLK_S_IOERR ? "ioerr" : "unsupp");
	}

	/* (c) A next index outside the descriptor table. */
	TRY(dev_init(d, 0, NULL));
	hdr = (struct blk_hdr){BLK_T_IN, 0, 0};
	qmem.desc[0] = (struct vq_desc){(u64)&hdr, sizeof(hdr), DESC_F_NEXT, (u16)(d->q[0].num + 5)};
	TRY(hostile_case(d, 0, "bad next"));

	/* (d) A head index outside the descriptor table. */
	TRY(dev_init(d, 0, NULL));
	TRY(hostile_case(d, (u16)(d->q[0].num + 3), "bad head"));

	/* Queues set up against §2.7 / §4.2.3.2: rings outside RAM, a
	 * misaligned descriptor table, sizes that are 0, not a power of 2 or
	 * above QueueNumMax. A device should refuse such a queue ("not ready"
	 * or "needs-reset"); the outcome is printed for the test to judge, and
	 * the guest goes on. */
	const char *out;
	u64 dsc = (u64)&qmem.desc, av = (u64)&qmem.avail, us = (u64)&qmem.used;
	TRY(hostile_queue(d, QSIZE, OUTSIDE_RAM, av, us, "rings outside ram", &out));
	TRY(hostile_queue(d, QSIZE, dsc + 8, av, us, "misaligned rings", &out));
	wr(d, VM_QUEUE_SEL, 0);
	u32 qmax = rd(d, VM_QUEUE_NUM_MAX);
	TRY(hostile_queue(d, qmax * 2, dsc, av, us, "queue-num above max", &out));
	TRY(hostile_queue(d, 3, dsc, av, us, "queue-num 3", &out));
	TRY(hostile_queue(d, 0, dsc, av, us, "queue-num 0", &out));

	/* Features: without VERSION_1, or one not offered, FEATURES_OK must
	 * not stick (§2.2.2, §6.1). */
	for (int k = 0; k < 2; k++) {
		TRY(dev_reset(d));
		u64 f = k ? F_VERSION_1 | 1UL << 31 : 0;
		const char *what = k ? "unoffered feature" : "no VERSION_1";
		if (k && (read_features(d) & 1UL << 31)) {
			kprintf("virtio-hostile: %s -> skipped (bit 31 offered)\n", what);
			continue;
		}
		wr(d, VM_STATUS, S_ACKNOWLEDGE | S_DRIVER);
		wr(d, VM_DRV_FEATURES_SEL, 0);
		wr(d, VM_DRV_FEATURES, (u32)f);
		wr(d, VM_DRV_FEATURES_SEL, 1);
		wr(d, VM_DRV_FEATURES, (u32)(f >> 32));
		wr(d, VM_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
		u32 fs = rd(d, VM_STATUS);
		kprintf("virtio-hostile: %s -> features-ok %u\n", what, (fs & S_FEATURES_OK) ? 1 : 0);
		if (fs & S_FEATURES_OK)
			FAIL("dev %u: FEATURES_OK stuck with driver features %#lx", d->index, f);
	}

	/* The rng, if there is one: a loop too, then a normal request. */
	if (rng) {
		TRY(dev_init(rng, 0, NULL));
		u16 g = 1 % rng->q[0].num;
		qmem.desc[g] = (struct vq_desc){(u64)rngbuf, 8, DESC_F_NEXT | DESC_F_WRITE, g};
		TRY(hostile_case(rng, g, "rng loop"));
		TRY(dev_init(rng, 0, NULL));
		u32 got, distinct;
		TRY(rng_request(rng, &got, &distinct));
		TRY(dev_reset(rng));
	}

	/* Recovered: a reset device works as new. */
	TRY(dev_init(d, 0, NULL));
	TRY(blk_read0(d, &sum));
	if (sum != sum0)
		FAIL("dev %u: sector 0 sum %08x after the hostile requests, %08x before", d->index, sum,
		     sum0);
	kprintf("virtio-hostile: recovered\n");
	return dev_reset(d);
}

/* ---- Main ------------------------------------------------------------------ */

int guest_main(void)
{
	int basic = 1;
	usize mlen;
	if (cmdline_value("virtio.mode", &mlen)) {
		if (cmdline_is("virtio.mode", "hostile")) {
			basic = 0;
		} else if (!cmdline_is("virtio.mode", "basic")) {
			kprintf("virtio: FAIL unknown virtio.mode (basic or hostile)\n");
			return EXIT_FAIL;
		}
	}
	if (find_devices() < 0)
		return EXIT_FAIL;
	kprintf("virtio: found %u devices\n", ndevs);
	for (u32 k = 0; k < ndevs; k++) {
		struct dev *d = &devs[k];
		u32 magic = rd(d, VM_MAGIC), version = rd(d, VM_VERSION);
		d->id = rd(d, VM_DEVICE_ID);
		kprintf("virtio: dev %u at %#lx irq %u id %u\n", k, d->addr, d->irq, d->id);
		if (magic != VIRTIO_MAGIC) {
			kprintf("virtio: FAIL dev %u: MagicValue %#x, expected %#x\n", k, magic, VIRTIO_MAGIC);
			return EXIT_FAIL;
		}
		if (version != 2) {
			kprintf("virtio: FAIL dev %u: Version %u, expected 2\n", k, version);
			return EXIT_FAIL;
		}
	}
	if (basic) {
		for (u32 k = 0; k < ndevs; k++) {
			struct dev *d = &devs[k];
			int r = 0;
			if (d->id == ID_BLK)
				r = blk_basic(d);
			else if (d->id == ID_RNG)
				r = rng_basic(d);
			/* Anything else (0: no device, §4.2.3.1.1) is left alone. */
			if (r < 0)
				return EXIT_FAIL;
		}
	} else if (hostile() < 0) {
		return EXIT_FAIL;
	}
	kprintf("virtio: ok\n");
	return EXIT_OK;
}
