/* virtio-mmio helpers shared by the virtio guests; see virtio-lib.h. */
#include "virtio-lib.h"

struct dev devs[MAX_DEVS];
u32 ndevs;

/* ---- The command line ------------------------------------------------------ */

/* A number: 0x-prefixed hex or decimal. Returns the end, or NULL if none. */
static const char *parse_num(const char *p, const char *end, u64 *out)
{
	u64 v = 0;
	unsigned base = 10;
	int digits = 0;
	if (end - p > 2 && p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
		base = 16;
		p += 2;
	}
	for (; p < end; p++, digits++) {
		char c = *p;
		unsigned dv;
		if (c >= '0' && c <= '9') dv = (unsigned)(c - '0');
		else if (base == 16 && c >= 'a' && c <= 'f') dv = (unsigned)(c - 'a' + 10);
		else if (base == 16 && c >= 'A' && c <= 'F') dv = (unsigned)(c - 'A' + 10);
		else break;
		v = v * base + dv;
	}
	*out = v;
	return digits ? p : NULL;
}

static void put_word(const char *w, const char *end)
{
	while (w < end)
		con_putc(*w++);
}

/* Every `virtio_mmio.device=<size>[KMG]@<addr>:<irq>[:<id>]` word, in order. */
int find_devices(void)
{
	static const char key[] = "virtio_mmio.device=";
	const usize klen = sizeof(key) - 1;
	const char *p = boot.cmdline;
	while (*p) {
		while (*p == ' ')
			p++;
		const char *w = p;
		while (*p && *p != ' ')
			p++;
		if ((usize)(p - w) <= klen || memcmp(w, key, klen))
			continue;
		const char *s = w + klen;
		u64 size, addr, irq, id;
		s = parse_num(s, p, &size);
		if (s && s < p) {
			char c = *s | 0x20;
			if (c == 'k' || c == 'm' || c == 'g') {
				size <<= c == 'k' ? 10 : c == 'm' ? 20 : 30;
				s++;
			}
		}
		if (s && s < p && *s == '@')
			s = parse_num(s + 1, p, &addr);
		else
			s = NULL;
		if (s && s < p && *s == ':')
			s = parse_num(s + 1, p, &irq);
		else
			s = NULL;
		if (s && s < p && *s == ':')
			s = parse_num(s + 1, p, &id); /* platform device id: not needed */
		if (!s || s != p || !size || (addr & 3) || addr >> 32) {
			kprintf("%s: FAIL cannot parse \"", vio_name);
			put_word(w, p);
			con_puts("\"\n");
			return -1;
		}
		if (ndevs == MAX_DEVS)
			FAIL("more than %u virtio_mmio.device entries", MAX_DEVS);
		if (size < VM_CONFIG)
			FAIL("dev %u: window of %lu bytes is smaller than the registers", ndevs, size);
		struct dev *d = &devs[ndevs];
		d->index = ndevs++;
		d->addr = addr;
		d->size = size;
		d->irq = (u32)irq;
	}
	return 0;
}

/* ---- Device initialisation (§3.1.1, §4.2.3) ------------------------------ */

int dev_reset(struct dev *d)
{
	wr(d, VM_STATUS, 0);
	u64 end = deadline_ms(1000);
	u32 s;
	while ((s = rd(d, VM_STATUS)) != 0) {
		if (expired(end))
			FAIL("dev %u: status 0x%x, not 0, 1 s after the reset", d->index, s);
		cpu_relax();
	}
	return 0;
}

u64 read_features(const struct dev *d)
{
	wr(d, VM_DEV_FEATURES_SEL, 0);
	u64 lo = rd(d, VM_DEV_FEATURES);
	wr(d, VM_DEV_FEATURES_SEL, 1);
	u64 hi = rd(d, VM_DEV_FEATURES);
	return lo | hi << 32;
}

/* Queue qi on `mem` (§4.2.3.2). */
static int queue_setup(struct dev *d, u32 qi, struct vq_mem *mem)
{
	wr(d, VM_QUEUE_SEL, qi);
	u32 ready = rd(d, VM_QUEUE_READY);
	if (ready)
		FAIL("dev %u: queue %u QueueReady reads %u after a reset, not 0", d->index, qi, ready);
	u32 max = rd(d, VM_QUEUE_NUM_MAX);
	if (!max)
		FAIL("dev %u: queue %u not available (QueueNumMax 0)", d->index, qi);
	u32 num = QSIZE;
	while (num > max)
		num >>= 1;
	memset(mem, 0, sizeof(*mem));
	struct vq *q = &d->q[qi];
	q->mem = mem;
	q->num = (u16)num;
	q->next_desc = 0;
	q->avail_idx = 0;
	q->used_idx = 0;
	wr(d, VM_QUEUE_NUM, num);
	wr(d, VM_QUEUE_DESC_LO, (u32)(u64)&mem->desc);
	wr(d, VM_QUEUE_DESC_HI, (u32)((u64)&mem->desc >> 32));
	wr(d, VM_QUEUE_DRIVER_LO, (u32)(u64)&mem->avail);
	wr(d, VM_QUEUE_DRIVER_HI, (u32)((u64)&mem->avail >> 32));
	wr(d, VM_QUEUE_DEVICE_LO, (u32)(u64)&mem->used);
	wr(d, VM_QUEUE_DEVICE_HI, (u32)((u64)&mem->used >> 32));
	wr(d, VM_QUEUE_READY, 1);
	ready = rd(d, VM_QUEUE_READY);
	if (ready != 1)
		FAIL("dev %u: queue %u QueueReady reads %u after writing 1", d->index, qi, ready);
	return 0;
}

int vio_init(struct dev *d, u64 want, u64 *accepted, struct vq_mem *mem, u32 nq)
{
	if (nq > MAX_QUEUES)
		FAIL("dev %u: %u queues asked for, at most %u", d->index, nq, MAX_QUEUES);
	TRY(dev_reset(d));
	wr(d, VM_STATUS, S_ACKNOWLEDGE);
	wr(d, VM_STATUS, S_ACKNOWLEDGE | S_DRIVER);
	d->offered = read_features(d);
	if (!(d->offered & F_VERSION_1))
		FAIL("dev %u: VIRTIO_F_VERSION_1 not offered (features 0x%lx)", d->index, d->offered);
	u64 acc = d->offered & (want | F_VERSION_1);
	wr(d, VM_DRV_FEATURES_SEL, 0);
	wr(d, VM_DRV_FEATURES, (u32)acc);
	wr(d, VM_DRV_FEATURES_SEL, 1);
	wr(d, VM_DRV_FEATURES, (u32)(acc >> 32));
	wr(d, VM_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
	u32 s = rd(d, VM_STATUS);
	if (!(s & S_FEATURES_OK))
		FAIL("dev %u: FEATURES_OK did not stick (status 0x%x, accepted 0x%lx)", d->index, s, acc);
	if (accepted)
		*accepted = acc;

	d->nq = nq;
	for (u32 qi = 0; qi < nq; qi++)
		TRY(queue_setup(d, qi, &mem[qi]));

	wr(d, VM_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	s = rd(d, VM_STATUS);
	if (s != (S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK))
		FAIL("dev %u: status 0x%x after DRIVER_OK, expected 0xf", d->index, s);
	return 0;
}

int config_u64(const struct dev *d, u32 off, u64 *out)
{
	for (int tries = 0; tries < 10; tries++) {
		u32 gen = rd(d, VM_CONFIG_GEN);
		u64 lo = rd(d, VM_CONFIG + off);
		u64 hi = rd(d, VM_CONFIG + off + 4);
		if (rd(d, VM_CONFIG_GEN) == gen) {
			*out = lo | hi << 32;
			return 0;
		}
	}
	FAIL("dev %u: ConfigGeneration changes on every read", d->index);
}

/* ---- Requests ---------------------------------------------------------------- */

u16 vq_chain(struct dev *d, u32 qi, const struct buf *bufs, u32 n)
{
	struct vq *q = &d->q[qi];
	u16 head = q->next_desc;
	for (u32 i = 0; i < n; i++) {
		u16 at = q->next_desc;
		q->next_desc = (u16)((q->next_desc + 1) % q->num);
		q->mem->desc[at] = (struct vq_desc){bufs[i].addr, bufs[i].len,
						    (u16)(bufs[i].flags | (i + 1 < n ? DESC_F_NEXT : 0)),
						    i + 1 < n ? q->next_desc : 0};
	}
	return head;
}

void vq_post(struct dev *d, u32 qi, u16 head)
{
	struct vq *q = &d->q[qi];
	q->mem->avail.ring[q->avail_idx % q->num] = head;
	compiler_barrier(); /* x86 keeps stores in order: the entry before idx */
	q->avail_idx++;
	VOL16(q->mem->avail.idx) = q->avail_idx;
	mb(); /* idx visible before the device looks */
	wr(d, VM_QUEUE_NOTIFY, qi);
}

int vq_wait(struct dev *d, u32 qi, u16 head, u32 max_len, u32 *len, const char *what)
{
	struct vq *q = &d->q[qi];
	u64 end = deadline_ms(5000);
	while (VOL16(q->mem->used.idx) == q->used_idx) {
		if (expired(end))
			FAIL("dev %u: %s: no used buffer within 5 s (queue %u used idx %u, status 0x%x, interrupt status 0x%x)",
			     d->index, what, qi, q->used_idx, rd(d, VM_STATUS), rd(d, VM_INT_STATUS));
		cpu_relax();
	}
	u16 uidx = VOL16(q->mem->used.idx);
	if (uidx != (u16)(q->used_idx + 1))
		FAIL("dev %u: %s: used idx went from %u to %u for one request", d->index, what,
		     q->used_idx, uidx);
	compiler_barrier(); /* x86 keeps loads in order: idx before the element */
	volatile struct vq_used_elem *e = &q->mem->used.ring[q->used_idx % q->num];
	u32 id = e->id, n = e->len;
	q->used_idx = uidx;
	if (id != head)
		FAIL("dev %u: %s: used element id %u, posted head %u", d->index, what, id, head);
	if (n > max_len)
		FAIL("dev %u: %s: used len %u, but only %u bytes were device-writable", d->index, what,
		     n, max_len);
	*len = n;
	return int_check(d, what);
}

/* The device may set InterruptStatus just after used.idx: wait for it, bounded. */
int int_check(struct dev *d, const char *what)
{
	u32 isr;
	u64 end = deadline_ms(1000);
	while (!((isr = rd(d, VM_INT_STATUS)) & INT_USED_BUFFER)) {
		if (expired(end))
			FAIL("dev %u: %s: InterruptStatus 0x%x, bit 0 not set after a used buffer",
			     d->index, what, isr);
		cpu_relax();
	}
	wr(d, VM_INT_ACK, isr);
	u32 after = rd(d, VM_INT_STATUS);
	if (after)
		FAIL("dev %u: %s: InterruptStatus 0x%x after writing 0x%x to InterruptACK, expected 0",
		     d->index, what, after, isr);
	return 0;
}
