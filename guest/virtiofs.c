/* virtiofs: speaks FUSE over the VMM's virtio-fs devices (`--share`) by hand,
 * as the Linux virtiofs driver would: finds them on the command line
 * (`virtio_mmio.device=`), reads each one's tag, sets up the high-priority
 * queue (0) and the request queue (1), and sends FUSE requests
 * (include/uapi/linux/fuse.h) one at a time, polling the used ring.
 * Section numbers are the virtio 1.2 spec's (§5.11: file system device).
 *
 * Every fs device (id 26) gets the read checks; `virtiofs.rw=TAG` and
 * `virtiofs.ro=TAG` on the command line name the share that must take writes
 * and the one (`--share DIR,ro`) that must refuse them:
 *   virtiofs: found 2 devices
 *   virtiofs: dev 0 at 0xd0000000 irq 5 id 26
 *   virtiofs: dev 0 tag rw
 *   virtiofs 0: request queues 1, queue sizes 16 16
 *   virtiofs 0: init server 7.33 negotiated 7.31 max_write 1048576 max_pages 256 big_writes
 *   virtiofs 0: root nodeid 1 is a directory
 *   virtiofs 0: hello.txt nodeid 2 regular size 27
 *   virtiofs 0: hello.txt read 27 bytes "hello from the minivmm host"
 *                                        (non-printable bytes and '"' as '.')
 *   virtiofs 0: .. at root stays at root (nodeid 1)
 *   virtiofs 0: lookup "../hello.txt" -> -22
 *   virtiofs 0: link is a symlink (mode 0120777)     (or "virtiofs 0: no link")
 *   virtiofs 0: link readlink "<target>"
 *   virtiofs 0: open link -> -9                     (must fail)
 *   virtiofs 0: read link with hello.txt's handle -> -9   (must fail)
 *   virtiofs 0: dirlink is a symlink (mode 0120777) (or "virtiofs 0: no dirlink")
 *   virtiofs 0: lookup secret.txt through dirlink -> -20  (must fail)
 *   virtiofs 0: forget on the hiprio queue, used len 0
 *   virtiofs 0: release hello.txt -> 0
 * the share named by virtiofs.rw:
 *   virtiofs 0: rw create made-by-guest.txt -> 0
 *   virtiofs 0: rw write 16 bytes -> 16
 *   virtiofs 0: rw release -> 0
 *   virtiofs 0: rw made-by-guest.txt reads back 16 bytes ok
 *   virtiofs 0: rw create again with O_EXCL -> -17
 *   virtiofs 0: rw mkdir dir-by-guest -> 0
 *   virtiofs 0: rw create through dirlink -> -20    (if there is a dirlink; must fail)
 *   virtiofs 0: rw mkdir through dirlink -> -20
 * the share named by virtiofs.ro:
 *   virtiofs 1: ro create -> -30
 *   virtiofs 1: ro mkdir -> -30
 *   virtiofs 1: ro setattr size 0 -> -30
 *   virtiofs 1: ro open O_WRONLY -> -30
 *   virtiofs 1: ro open O_RDWR -> -30
 *   virtiofs 1: ro open O_TRUNC -> -30
 *   virtiofs 1: ro write through a read-only handle -> -30
 * and at the end:
 *   virtiofs: ok                                         exit 0x10
 *   virtiofs: FAIL <why>                                 exit 0x11
 * With `virtiofs.fifo=NAME`, after the rw share's checks it opens NAME there for
 * reading ("virtiofs 0: opening fifo NAME", then "virtiofs 0: open fifo -> ERR"):
 * the host made it a FIFO with no writer, which must not block the device.
 * With `virtiofs.end=hlt` it stops (cli; hlt) after "virtiofs: ok" instead of
 * exiting, so that the host can be looked at while the VM holds its shares.
 * Every request's reply is checked: used length = out_header.len, the same
 * `unique`, an error of 0 or a negative errno, and a body of the right size.
 * The content of a file read through `link` or `dirlink` is never printed.
 */
#include "virtio-lib.h"

const char vio_name[] = "virtiofs";

#define ID_FS 26 /* §5 */

/* ---- FUSE (include/uapi/linux/fuse.h, protocol 7.31) ------------------------ */

#define FUSE_LOOKUP 1
#define FUSE_FORGET 2
#define FUSE_GETATTR 3
#define FUSE_SETATTR 4
#define FUSE_READLINK 5
#define FUSE_MKDIR 9
#define FUSE_OPEN 14
#define FUSE_READ 15
#define FUSE_WRITE 16
#define FUSE_RELEASE 18
#define FUSE_INIT 26
/* fuse_init_in/out flags: writes of more than a page, and max_pages from the
 * reply (Linux offers both). */
#define FUSE_BIG_WRITES (1u << 5)
#define FUSE_MAX_PAGES (1u << 22)
#define FUSE_CREATE 35

#define FUSE_ROOT_ID 1
#define FATTR_SIZE (1 << 3)
#define FUSE_MAJOR 7
#define FUSE_MINOR 31

/* open(2) flags and modes (x86-64 Linux). */
#define O_RDONLY 0
#define O_WRONLY 01
#define O_RDWR 02
#define O_CREAT 0100
#define O_EXCL 0200
#define O_TRUNC 01000
#define S_IFMT 0170000
#define S_IFDIR 0040000
#define S_IFREG 0100000
#define S_IFLNK 0120000

#define EROFS 30

struct fuse_in_header {
	u32 len;
	u32 opcode;
	u64 unique;
	u64 nodeid;
	u32 uid;
	u32 gid;
	u32 pid;
	u16 total_extlen;
	u16 padding;
};

struct fuse_out_header {
	u32 len;
	int error; /* 0 or a negative errno */
	u64 unique;
};

struct fuse_attr {
	u64 ino, size, blocks, atime, mtime, ctime;
	u32 atimensec, mtimensec, ctimensec;
	u32 mode, nlink, uid, gid, rdev, blksize, flags;
};

struct fuse_entry_out {
	u64 nodeid;
	u64 generation;
	u64 entry_valid;
	u64 attr_valid;
	u32 entry_valid_nsec;
	u32 attr_valid_nsec;
	struct fuse_attr attr;
};

struct fuse_getattr_in {
	u32 getattr_flags;
	u32 dummy;
	u64 fh;
};

struct fuse_attr_out {
	u64 attr_valid;
	u32 attr_valid_nsec;
	u32 dummy;
	struct fuse_attr attr;
};

struct fuse_setattr_in {
	u32 valid;
	u32 padding;
	u64 fh;
	u64 size;
	u64 lock_owner;
	u64 atime, mtime, ctime;
	u32 atimensec, mtimensec, ctimensec;
	u32 mode;
	u32 unused4;
	u32 uid;
	u32 gid;
	u32 unused5;
};

struct fuse_init_in {
	u32 major;
	u32 minor;
	u32 max_readahead;
	u32 flags;
	u32 flags2;
	u32 unused[11];
};

struct fuse_init_out {
	u32 major;
	u32 minor;
	u32 max_readahead;
	u32 flags;
	u16 max_background;
	u16 congestion_threshold;
	u32 max_write;
	u32 time_gran;
	u16 max_pages;
	u16 map_alignment;
	u32 flags2;
	u32 unused[7];
};

struct fuse_open_in {
	u32 flags;
	u32 open_flags;
};

struct fuse_open_out {
	u64 fh;
	u32 open_flags;
	u32 padding;
};

struct fuse_create_in {
	u32 flags;
	u32 mode;
	u32 umask;
	u32 open_flags;
};

struct fuse_mkdir_in {
	u32 mode;
	u32 umask;
};

struct fuse_read_in {
	u64 fh;
	u64 offset;
	u32 size;
	u32 read_flags;
	u64 lock_owner;
	u32 flags;
	u32 padding;
};

struct fuse_write_in {
	u64 fh;
	u64 offset;
	u32 size;
	u32 write_flags;
	u64 lock_owner;
	u32 flags;
	u32 padding;
};

struct fuse_write_out {
	u32 size;
	u32 padding;
};

struct fuse_release_in {
	u64 fh;
	u32 flags;
	u32 release_flags;
	u64 lock_owner;
};

struct fuse_forget_in {
	u64 nlookup;
};

/* The sizes of include/uapi/linux/fuse.h. */
_Static_assert(sizeof(struct fuse_in_header) == 40, "fuse_in_header");
_Static_assert(sizeof(struct fuse_out_header) == 16, "fuse_out_header");
_Static_assert(sizeof(struct fuse_attr) == 88, "fuse_attr");
_Static_assert(sizeof(struct fuse_entry_out) == 128, "fuse_entry_out");
_Static_assert(sizeof(struct fuse_getattr_in) == 16, "fuse_getattr_in");
_Static_assert(sizeof(struct fuse_attr_out) == 104, "fuse_attr_out");
_Static_assert(sizeof(struct fuse_setattr_in) == 88, "fuse_setattr_in");
_Static_assert(sizeof(struct fuse_init_in) == 64, "fuse_init_in");
_Static_assert(sizeof(struct fuse_init_out) == 64, "fuse_init_out");
_Static_assert(sizeof(struct fuse_open_in) == 8, "fuse_open_in");
_Static_assert(sizeof(struct fuse_open_out) == 16, "fuse_open_out");
_Static_assert(sizeof(struct fuse_create_in) == 16, "fuse_create_in");
_Static_assert(sizeof(struct fuse_mkdir_in) == 8, "fuse_mkdir_in");
_Static_assert(sizeof(struct fuse_read_in) == 40, "fuse_read_in");
_Static_assert(sizeof(struct fuse_write_in) == 40, "fuse_write_in");
_Static_assert(sizeof(struct fuse_write_out) == 8, "fuse_write_out");
_Static_assert(sizeof(struct fuse_release_in) == 24, "fuse_release_in");
_Static_assert(sizeof(struct fuse_forget_in) == 8, "fuse_forget_in");

/* ---- Buffers ----------------------------------------------------------------- */

/* Queue 0 (hiprio) and queue 1 (requests) of the device being driven. */
static struct vq_mem qmems[2] __attribute__((aligned(4096)));

/* A request: the header and the fixed arguments in one device-readable
 * buffer, a name or write data in a second; the reply: the out header in one
 * device-writable buffer, the body in another (as Linux lays them out). */
#define REQ_MAX 256
#define DATA_MAX 4096
#define BODY_MAX 4096
static u8 req[REQ_MAX] __attribute__((aligned(64)));
static u8 req_data[DATA_MAX] __attribute__((aligned(64)));
static struct fuse_out_header out_hdr __attribute__((aligned(64)));
static u8 body[BODY_MAX] __attribute__((aligned(4096)));

static u64 next_unique = 1;

/* `dirlink`'s nodeid on the share being checked, 0 if it has none. */
static u64 dirlink_node;

/* Which queue carries requests; queue 0 is the high-priority one (§5.11.2). */
#define HIPRIO 0
#define REQUESTS 1

/* ---- Output ------------------------------------------------------------------ */

static void put_text(const u8 *p, usize n)
{
	for (usize i = 0; i < n; i++)
		con_putc(p[i] >= 0x20 && p[i] < 0x7f && p[i] != '"' ? (char)p[i] : '.');
}

static void put_oct(u32 v)
{
	char buf[12];
	int n = 0;
	do {
		buf[n++] = (char)('0' + (v & 7));
		v >>= 3;
	} while (v);
	con_putc('0');
	while (n)
		con_putc(buf[--n]);
}

static const char *type_name(u32 mode)
{
	switch (mode & S_IFMT) {
	case S_IFREG: return "regular";
	case S_IFDIR: return "directory";
	case S_IFLNK: return "symlink";
	default: return "other";
	}
}

/* ---- FUSE requests ----------------------------------------------------------- */

/* One FUSE request on the request queue: `arg` (argl bytes) after the header,
 * `data` (datal bytes) in a second buffer, room for `room` bytes of reply body.
 * *err gets the reply's error (0 or -errno), *blen its body length. Returns -1
 * (after a FAIL line) when the device or the reply breaks the protocol. */
static int fuse_call(struct dev *d, u32 opcode, u64 nodeid, const void *arg, u32 argl,
		     const void *data, u32 datal, u32 room, int *err, u32 *blen, const char *what)
{
	if (sizeof(struct fuse_in_header) + argl > REQ_MAX || datal > DATA_MAX || room > BODY_MAX)
		FAIL("dev %u: %s: request too large for this guest", d->index, what);
	struct fuse_in_header *h = (struct fuse_in_header *)req;
	u64 unique = next_unique++;
	*h = (struct fuse_in_header){
		.len = (u32)sizeof(*h) + argl + datal,
		.opcode = opcode,
		.unique = unique,
		.nodeid = nodeid,
		.uid = 0,
		.gid = 0,
		.pid = 1,
	};
	if (argl)
		memcpy(req + sizeof(*h), arg, argl);
	if (datal && data != req_data)
		memcpy(req_data, data, datal);
	memset(&out_hdr, 0xa5, sizeof(out_hdr));
	memset(body, 0, room);

	struct buf bufs[4];
	u32 n = 0;
	bufs[n++] = (struct buf){(u64)req, (u32)sizeof(*h) + argl, 0};
	if (datal)
		bufs[n++] = (struct buf){(u64)req_data, datal, 0};
	bufs[n++] = (struct buf){(u64)&out_hdr, sizeof(out_hdr), DESC_F_WRITE};
	if (room)
		bufs[n++] = (struct buf){(u64)body, room, DESC_F_WRITE};
	u16 head = vq_chain(d, REQUESTS, bufs, n);
	vq_post(d, REQUESTS, head);
	u32 len;
	TRY(vq_wait(d, REQUESTS, head, (u32)sizeof(out_hdr) + room, &len, what));

	if (len < sizeof(out_hdr))
		FAIL("dev %u: %s: used len %u, shorter than fuse_out_header", d->index, what, len);
	if (out_hdr.len != len)
		FAIL("dev %u: %s: out_header.len %u but used len %u", d->index, what, out_hdr.len, len);
	if (out_hdr.unique != unique)
		FAIL("dev %u: %s: reply unique %lu, request unique %lu", d->index, what,
		     out_hdr.unique, unique);
	if (out_hdr.error > 0 || out_hdr.error < -4095)
		FAIL("dev %u: %s: reply error %d is not a negative errno", d->index, what,
		     out_hdr.error);
	if (out_hdr.error && len != sizeof(out_hdr))
		FAIL("dev %u: %s: error %d with a %u-byte body", d->index, what, out_hdr.error,
		     len - (u32)sizeof(out_hdr));
	*err = out_hdr.error;
	*blen = len - (u32)sizeof(out_hdr);
	return 0;
}

/* A request whose success reply must be exactly `want` bytes of body. */
static int fuse_fixed(struct dev *d, u32 opcode, u64 nodeid, const void *arg, u32 argl,
		      const void *data, u32 datal, u32 want, int *err, const char *what)
{
	u32 blen;
	TRY(fuse_call(d, opcode, nodeid, arg, argl, data, datal, want, err, &blen, what));
	if (!*err && blen != want)
		FAIL("dev %u: %s: reply body %u bytes, expected %u", d->index, what, blen, want);
	return 0;
}

static int fuse_lookup(struct dev *d, u64 parent, const char *name, struct fuse_entry_out *e,
		       int *err)
{
	TRY(fuse_fixed(d, FUSE_LOOKUP, parent, NULL, 0, name, (u32)strlen(name) + 1,
		       sizeof(*e), err, name));
	if (!*err) {
		memcpy(e, body, sizeof(*e));
		if (!e->nodeid)
			FAIL("dev %u: lookup %s: success with nodeid 0", d->index, name);
	}
	return 0;
}

static int fuse_open(struct dev *d, u64 nodeid, u32 flags, u64 *fh, int *err, const char *what)
{
	struct fuse_open_in in = {flags, 0};
	TRY(fuse_fixed(d, FUSE_OPEN, nodeid, &in, sizeof(in), NULL, 0,
		       sizeof(struct fuse_open_out), err, what));
	if (!*err)
		*fh = ((struct fuse_open_out *)body)->fh;
	return 0;
}

/* READ of up to `size` bytes at `off` into body[]; *got the bytes. */
static int fuse_read(struct dev *d, u64 nodeid, u64 fh, u64 off, u32 size, u32 *got, int *err,
		     const char *what)
{
	struct fuse_read_in in = {.fh = fh, .offset = off, .size = size, .flags = O_RDONLY};
	TRY(fuse_call(d, FUSE_READ, nodeid, &in, sizeof(in), NULL, 0, size, err, got, what));
	if (*got > size)
		FAIL("dev %u: %s: %u bytes for a %u-byte read", d->index, what, *got, size);
	return 0;
}

static int fuse_write(struct dev *d, u64 nodeid, u64 fh, u32 flags, const void *p, u32 n,
		      u32 *wrote, int *err, const char *what)
{
	struct fuse_write_in in = {.fh = fh, .offset = 0, .size = n, .flags = flags};
	TRY(fuse_fixed(d, FUSE_WRITE, nodeid, &in, sizeof(in), p, n,
		       sizeof(struct fuse_write_out), err, what));
	if (!*err)
		*wrote = ((struct fuse_write_out *)body)->size;
	return 0;
}

static int fuse_release(struct dev *d, u64 nodeid, u64 fh, u32 flags, int *err,
			const char *what)
{
	struct fuse_release_in in = {.fh = fh, .flags = flags};
	return fuse_fixed(d, FUSE_RELEASE, nodeid, &in, sizeof(in), NULL, 0, 0, err, what);
}

/* FORGET (no reply) on the high-priority queue, as Linux sends it. */
static int fuse_forget(struct dev *d, u64 nodeid, u64 nlookup, u32 *used)
{
	struct fuse_in_header *h = (struct fuse_in_header *)req;
	*h = (struct fuse_in_header){
		.len = (u32)(sizeof(*h) + sizeof(struct fuse_forget_in)),
		.opcode = FUSE_FORGET,
		.unique = next_unique++,
		.nodeid = nodeid,
	};
	((struct fuse_forget_in *)(req + sizeof(*h)))->nlookup = nlookup;
	struct buf b = {(u64)req, h->len, 0};
	u16 head = vq_chain(d, HIPRIO, &b, 1);
	vq_post(d, HIPRIO, head);
	return vq_wait(d, HIPRIO, head, 0, used, "forget");
}

/* ---- One share ---------------------------------------------------------------- */

static const char hello[] = "hello.txt";
static const char made[] = "made-by-guest.txt";
static const char payload[16] = "written by guest";

/* Whether `virtiofs.<key>=<tag>` is on the command line. */
static int tag_is(const char *key, const char *tag)
{
	return cmdline_is(key, tag);
}

/* The reads every share gets; leaves hello.txt's nodeid in *hello_node. */
static int fs_reads(struct dev *d, u64 *hello_node)
{
	u32 i = d->index, got;
	int err;

	/* The root, for its inode number. */
	struct fuse_getattr_in ga = {0, 0, 0};
	TRY(fuse_fixed(d, FUSE_GETATTR, FUSE_ROOT_ID, &ga, sizeof(ga), NULL, 0,
		       sizeof(struct fuse_attr_out), &err, "getattr root"));
	if (err)
		FAIL("dev %u: getattr of the root -> %d", i, err);
	struct fuse_attr root = ((struct fuse_attr_out *)body)->attr;
	if ((root.mode & S_IFMT) != S_IFDIR)
		FAIL("dev %u: the root's mode is 0%x, not a directory", i, root.mode);
	kprintf("virtiofs %u: root nodeid %u is a directory\n", i, FUSE_ROOT_ID);

	/* hello.txt: lookup, open, read, EOF. */
	struct fuse_entry_out e;
	TRY(fuse_lookup(d, FUSE_ROOT_ID, hello, &e, &err));
	if (err)
		FAIL("dev %u: lookup hello.txt -> %d", i, err);
	kprintf("virtiofs %u: hello.txt nodeid %lu %s size %lu\n", i, e.nodeid,
		type_name(e.attr.mode), e.attr.size);
	if ((e.attr.mode & S_IFMT) != S_IFREG)
		FAIL("dev %u: hello.txt is not a regular file", i);
	if (e.attr.size > BODY_MAX)
		FAIL("dev %u: hello.txt is %lu bytes, this guest reads at most %u", i, e.attr.size,
		     BODY_MAX);
	*hello_node = e.nodeid;
	u64 fh;
	TRY(fuse_open(d, e.nodeid, O_RDONLY, &fh, &err, "open hello.txt"));
	if (err)
		FAIL("dev %u: open hello.txt read-only -> %d", i, err);
	TRY(fuse_read(d, e.nodeid, fh, 0, BODY_MAX, &got, &err, "read hello.txt"));
	if (err)
		FAIL("dev %u: read hello.txt -> %d", i, err);
	kprintf("virtiofs %u: hello.txt read %u bytes \"", i, got);
	put_text(body, got);
	con_puts("\"\n");
	if (got != e.attr.size)
		FAIL("dev %u: read %u bytes of a %lu-byte file", i, got, e.attr.size);
	TRY(fuse_read(d, e.nodeid, fh, got, 64, &got, &err, "read hello.txt at its end"));
	if (err || got)
		FAIL("dev %u: read at the end of hello.txt -> %d, %u bytes", i, err, got);

	/* `..` of the root is the root (§5.11: the device must not let the
	 * driver out of the shared directory). */
	TRY(fuse_lookup(d, FUSE_ROOT_ID, "..", &e, &err));
	if (err)
		FAIL("dev %u: lookup .. at the root -> %d", i, err);
	if (e.nodeid != FUSE_ROOT_ID && e.attr.ino != root.ino)
		FAIL("dev %u: .. at the root is nodeid %lu ino %lu, the root is ino %lu", i,
		     e.nodeid, e.attr.ino, root.ino);
	kprintf("virtiofs %u: .. at root stays at root (nodeid %lu)\n", i, e.nodeid);
	/* A name with a slash is not one path component. */
	TRY(fuse_lookup(d, FUSE_ROOT_ID, "../hello.txt", &e, &err));
	kprintf("virtiofs %u: lookup \"../hello.txt\" -> %d\n", i, err);
	if (!err)
		FAIL("dev %u: lookup of \"../hello.txt\" succeeded (nodeid %lu)", i, e.nodeid);

	/* `link`, a symlink: the guest gets the link, never what it points to. */
	TRY(fuse_lookup(d, FUSE_ROOT_ID, "link", &e, &err));
	if (err == -2) {
		kprintf("virtiofs %u: no link\n", i);
	} else if (err) {
		FAIL("dev %u: lookup link -> %d", i, err);
	} else {
		u64 link = e.nodeid;
		kprintf("virtiofs %u: link is a %s (mode ", i, type_name(e.attr.mode));
		put_oct(e.attr.mode);
		con_puts(")\n");
		if ((e.attr.mode & S_IFMT) != S_IFLNK)
			FAIL("dev %u: link's lookup gives mode 0%x, not a symlink", i, e.attr.mode);
		TRY(fuse_call(d, FUSE_READLINK, link, NULL, 0, NULL, 0, BODY_MAX - 1, &err, &got,
			      "readlink link"));
		if (err)
			FAIL("dev %u: readlink link -> %d", i, err);
		kprintf("virtiofs %u: link readlink \"", i);
		put_text(body, got);
		con_puts("\"\n");
		u64 lfh;
		TRY(fuse_open(d, link, O_RDONLY, &lfh, &err, "open link"));
		kprintf("virtiofs %u: open link -> %d\n", i, err);
		if (!err)
			FAIL("dev %u: open of the symlink node succeeded (fh %lu)", i, lfh);
		/* READ on the link's node with a handle of another file. */
		TRY(fuse_read(d, link, fh, 0, BODY_MAX, &got, &err, "read link"));
		kprintf("virtiofs %u: read link with hello.txt's handle -> %d\n", i, err);
		if (!err)
			FAIL("dev %u: read on the symlink node gave %u bytes", i, got);
		TRY(fuse_forget(d, link, 1, &got));
		kprintf("virtiofs %u: forget on the hiprio queue, used len %u\n", i, got);
	}

	/* `dirlink`, a symlink to a directory: nothing is found through it. */
	dirlink_node = 0;
	TRY(fuse_lookup(d, FUSE_ROOT_ID, "dirlink", &e, &err));
	if (err == -2) {
		kprintf("virtiofs %u: no dirlink\n", i);
	} else if (err) {
		FAIL("dev %u: lookup dirlink -> %d", i, err);
	} else {
		kprintf("virtiofs %u: dirlink is a %s (mode ", i, type_name(e.attr.mode));
		put_oct(e.attr.mode);
		con_puts(")\n");
		if ((e.attr.mode & S_IFMT) != S_IFLNK)
			FAIL("dev %u: dirlink's lookup gives mode 0%x, not a symlink", i, e.attr.mode);
		dirlink_node = e.nodeid;
		TRY(fuse_lookup(d, dirlink_node, "secret.txt", &e, &err));
		kprintf("virtiofs %u: lookup secret.txt through dirlink -> %d\n", i, err);
		if (!err)
			FAIL("dev %u: secret.txt found through dirlink (nodeid %lu)", i, e.nodeid);
	}

	TRY(fuse_release(d, *hello_node, fh, O_RDONLY, &err, "release hello.txt"));
	kprintf("virtiofs %u: release hello.txt -> %d\n", i, err);
	if (err)
		FAIL("dev %u: release hello.txt -> %d", i, err);
	return 0;
}

/* The share that takes writes. */
static int fs_rw(struct dev *d)
{
	u32 i = d->index, got, wrote = 0;
	int err;
	struct {
		struct fuse_entry_out e;
		struct fuse_open_out o;
	} *co = (void *)body;

	struct fuse_create_in ci = {O_WRONLY | O_CREAT | O_EXCL, S_IFREG | 0644, 022, 0};
	TRY(fuse_fixed(d, FUSE_CREATE, FUSE_ROOT_ID, &ci, sizeof(ci), made, sizeof(made),
		       sizeof(*co), &err, "create"));
	kprintf("virtiofs %u: rw create %s -> %d\n", i, made, err);
	if (err)
		FAIL("dev %u: create %s -> %d", i, made, err);
	u64 node = co->e.nodeid, fh = co->o.fh;
	if ((co->e.attr.mode & S_IFMT) != S_IFREG || co->e.attr.size)
		FAIL("dev %u: created %s has mode 0%x size %lu", i, made, co->e.attr.mode,
		     co->e.attr.size);
	TRY(fuse_write(d, node, fh, O_WRONLY, payload, sizeof(payload), &wrote, &err, "write"));
	kprintf("virtiofs %u: rw write %u bytes -> %d\n", i, (u32)sizeof(payload),
		err ? err : (int)wrote);
	if (err || wrote != sizeof(payload))
		FAIL("dev %u: write of %u bytes -> error %d, wrote %u", i, (u32)sizeof(payload), err,
		     wrote);
	TRY(fuse_release(d, node, fh, O_WRONLY, &err, "release"));
	kprintf("virtiofs %u: rw release -> %d\n", i, err);
	if (err)
		FAIL("dev %u: release of %s -> %d", i, made, err);

	/* Read it back through a new lookup and open. */
	struct fuse_entry_out e;
	TRY(fuse_lookup(d, FUSE_ROOT_ID, made, &e, &err));
	if (err || e.attr.size != sizeof(payload))
		FAIL("dev %u: lookup %s -> %d size %lu", i, made, err, err ? 0 : e.attr.size);
	TRY(fuse_open(d, e.nodeid, O_RDONLY, &fh, &err, "open for readback"));
	if (err)
		FAIL("dev %u: open %s read-only -> %d", i, made, err);
	TRY(fuse_read(d, e.nodeid, fh, 0, 64, &got, &err, "readback"));
	if (err || got != sizeof(payload) || memcmp(body, payload, sizeof(payload)))
		FAIL("dev %u: %s reads back -> %d, %u bytes", i, made, err, got);
	TRY(fuse_release(d, e.nodeid, fh, O_RDONLY, &err, "release readback"));
	if (err)
		FAIL("dev %u: release of %s -> %d", i, made, err);
	kprintf("virtiofs %u: rw %s reads back %u bytes ok\n", i, made, got);

	TRY(fuse_fixed(d, FUSE_CREATE, FUSE_ROOT_ID, &ci, sizeof(ci), made, sizeof(made),
		       sizeof(*co), &err, "create again"));
	kprintf("virtiofs %u: rw create again with O_EXCL -> %d\n", i, err);
	if (err != -17)
		FAIL("dev %u: a second O_EXCL create of %s -> %d, not -EEXIST", i, made, err);

	struct fuse_mkdir_in mi = {0755, 022};
	static const char dir[] = "dir-by-guest";
	TRY(fuse_fixed(d, FUSE_MKDIR, FUSE_ROOT_ID, &mi, sizeof(mi), dir, sizeof(dir),
		       sizeof(struct fuse_entry_out), &err, "mkdir"));
	kprintf("virtiofs %u: rw mkdir %s -> %d\n", i, dir, err);
	if (err)
		FAIL("dev %u: mkdir %s -> %d", i, dir, err);
	if ((((struct fuse_entry_out *)body)->attr.mode & S_IFMT) != S_IFDIR)
		FAIL("dev %u: mkdir %s made no directory", i, dir);

	/* Nothing is made through a symlink to a directory outside. */
	if (dirlink_node) {
		static const char esc[] = "escaped.txt";
		TRY(fuse_fixed(d, FUSE_CREATE, dirlink_node, &ci, sizeof(ci), esc, sizeof(esc),
			       sizeof(*co), &err, "create through dirlink"));
		kprintf("virtiofs %u: rw create through dirlink -> %d\n", i, err);
		if (!err)
			FAIL("dev %u: %s created through dirlink", i, esc);
		TRY(fuse_fixed(d, FUSE_MKDIR, dirlink_node, &mi, sizeof(mi), esc, sizeof(esc),
			       sizeof(struct fuse_entry_out), &err, "mkdir through dirlink"));
		kprintf("virtiofs %u: rw mkdir through dirlink -> %d\n", i, err);
		if (!err)
			FAIL("dev %u: directory %s made through dirlink", i, esc);
	}
	return 0;
}

/* The share that must refuse every change with EROFS. */
static int expect_erofs(struct dev *d, const char *what, int err)
{
	kprintf("virtiofs %u: ro %s -> %d\n", d->index, what, err);
	if (err != -EROFS)
		FAIL("dev %u: %s on a read-only share -> %d, not -EROFS", d->index, what, err);
	return 0;
}

static int fs_ro(struct dev *d, u64 hello_node)
{
	int err;
	u64 fh;
	struct fuse_create_in ci = {O_WRONLY | O_CREAT | O_EXCL, S_IFREG | 0644, 022, 0};
	TRY(fuse_fixed(d, FUSE_CREATE, FUSE_ROOT_ID, &ci, sizeof(ci), made, sizeof(made),
		       sizeof(struct fuse_entry_out) + sizeof(struct fuse_open_out), &err, "create"));
	TRY(expect_erofs(d, "create", err));
	struct fuse_mkdir_in mi = {0755, 022};
	TRY(fuse_fixed(d, FUSE_MKDIR, FUSE_ROOT_ID, &mi, sizeof(mi), "dir-by-guest", 13,
		       sizeof(struct fuse_entry_out), &err, "mkdir"));
	TRY(expect_erofs(d, "mkdir", err));
	/* What truncate(2) sends. */
	struct fuse_setattr_in sa = {.valid = FATTR_SIZE, .size = 0};
	TRY(fuse_fixed(d, FUSE_SETATTR, hello_node, &sa, sizeof(sa), NULL, 0,
		       sizeof(struct fuse_attr_out), &err, "setattr"));
	TRY(expect_erofs(d, "setattr size 0", err));
	static const struct {
		u32 flags;
		const char *what;
	} opens[] = {
		{O_WRONLY, "open O_WRONLY"},
		{O_RDWR, "open O_RDWR"},
		{O_RDONLY | O_TRUNC, "open O_TRUNC"},
	};
	for (u32 k = 0; k < ARRAY_SIZE(opens); k++) {
		TRY(fuse_open(d, hello_node, opens[k].flags, &fh, &err, opens[k].what));
		TRY(expect_erofs(d, opens[k].what, err));
	}
	/* A read-only open is allowed; a WRITE through it is not. */
	TRY(fuse_open(d, hello_node, O_RDONLY, &fh, &err, "open read-only"));
	if (err)
		FAIL("dev %u: read-only open of hello.txt on a read-only share -> %d", d->index, err);
	u32 wrote = 0;
	TRY(fuse_write(d, hello_node, fh, O_RDONLY, payload, sizeof(payload), &wrote, &err,
		       "write"));
	TRY(expect_erofs(d, "write through a read-only handle", err));
	TRY(fuse_release(d, hello_node, fh, O_RDONLY, &err, "release"));
	if (err)
		FAIL("dev %u: release -> %d", d->index, err);
	return 0;
}

/* Opens `name` (a FIFO nobody writes to) read-only and says what came back. */
static int fs_fifo(struct dev *d, const char *name, usize len)
{
	static char buf[64];
	if (len >= sizeof(buf))
		FAIL("dev %u: virtiofs.fifo name too long", d->index);
	memcpy(buf, name, len);
	buf[len] = 0;
	struct fuse_entry_out e;
	int err;
	u64 fh;
	TRY(fuse_lookup(d, FUSE_ROOT_ID, buf, &e, &err));
	if (err)
		FAIL("dev %u: lookup %s -> %d", d->index, buf, err);
	kprintf("virtiofs %u: opening fifo %s\n", d->index, buf);
	TRY(fuse_open(d, e.nodeid, O_RDONLY, &fh, &err, "open fifo"));
	kprintf("virtiofs %u: open fifo -> %d\n", d->index, err);
	return 0;
}

static int fs_dev(struct dev *d)
{
	u32 i = d->index;
	char tag[37];
	u32 gen;
	int tries = 0;
	do {
		gen = rd(d, VM_CONFIG_GEN);
		for (u32 k = 0; k < 36; k++)
			tag[k] = (char)rd8(d, VM_CONFIG + k);
	} while (rd(d, VM_CONFIG_GEN) != gen && ++tries < 10);
	tag[36] = 0;
	u32 nreq = rd(d, VM_CONFIG + 36);
	kprintf("virtiofs: dev %u tag %s\n", i, tag);
	if (!tag[0])
		FAIL("dev %u: empty tag", i);
	if (nreq < 1)
		FAIL("dev %u: num_request_queues %u", i, nreq);

	TRY(vio_init(d, 0, NULL, qmems, 2));
	kprintf("virtiofs %u: request queues %u, queue sizes %u %u\n", i, nreq, d->q[0].num,
		d->q[1].num);

	/* FUSE_INIT: the first request (as Linux's virtio_fs sends it, offering
	 * MAX_PAGES so that the reply can allow writes larger than 4 KiB). */
	struct fuse_init_in ii = {.major = FUSE_MAJOR,
				  .minor = FUSE_MINOR,
				  .max_readahead = 65536,
				  .flags = FUSE_BIG_WRITES | FUSE_MAX_PAGES};
	int err;
	u32 blen;
	TRY(fuse_call(d, FUSE_INIT, 0, &ii, sizeof(ii), NULL, 0, sizeof(struct fuse_init_out), &err,
		      &blen, "init"));
	if (err)
		FAIL("dev %u: FUSE_INIT 7.%u -> %d", i, FUSE_MINOR, err);
	if (blen < 24)
		FAIL("dev %u: FUSE_INIT reply of %u bytes", i, blen);
	struct fuse_init_out *io = (struct fuse_init_out *)body;
	u32 minor = io->minor < FUSE_MINOR ? io->minor : FUSE_MINOR;
	kprintf("virtiofs %u: init server %u.%u negotiated %u.%u max_write %u max_pages %u%s\n",
		i, io->major, io->minor, io->major, minor, io->max_write,
		io->flags & FUSE_MAX_PAGES ? io->max_pages : 0,
		io->flags & FUSE_BIG_WRITES ? " big_writes" : "");
	if (io->major != FUSE_MAJOR)
		FAIL("dev %u: FUSE_INIT answered major %u", i, io->major);

	u64 hello_node;
	TRY(fs_reads(d, &hello_node));
	if (tag_is("virtiofs.rw", tag))
		TRY(fs_rw(d));
	if (tag_is("virtiofs.ro", tag))
		TRY(fs_ro(d, hello_node));
	usize flen;
	const char *fifo = cmdline_value("virtiofs.fifo", &flen);
	if (fifo && tag_is("virtiofs.rw", tag))
		TRY(fs_fifo(d, fifo, flen));
	return dev_reset(d);
}

/* A tag named on the command line that no device has. */
static int check_named(const char *key, const char *const *tags, u32 n)
{
	usize len;
	const char *v = cmdline_value(key, &len);
	if (!v)
		return 0;
	for (u32 k = 0; k < n; k++)
		if (strlen(tags[k]) == len && !memcmp(tags[k], v, len))
			return 0;
	con_puts("virtiofs: FAIL no share has the tag in ");
	con_puts(key);
	con_putc('=');
	while (len--)
		con_putc(*v++);
	con_putc('\n');
	return -1;
}

/* ---- Main ------------------------------------------------------------------ */

int guest_main(void)
{
	if (find_devices() < 0)
		return EXIT_FAIL;
	kprintf("virtiofs: found %u devices\n", ndevs);
	static char tags[MAX_DEVS][37];
	const char *named[MAX_DEVS];
	u32 nfs = 0;
	for (u32 k = 0; k < ndevs; k++) {
		struct dev *d = &devs[k];
		u32 magic = rd(d, VM_MAGIC), version = rd(d, VM_VERSION);
		d->id = rd(d, VM_DEVICE_ID);
		kprintf("virtiofs: dev %u at %#lx irq %u id %u\n", k, d->addr, d->irq, d->id);
		if (magic != VIRTIO_MAGIC) {
			kprintf("virtiofs: FAIL dev %u: MagicValue %#x, expected %#x\n", k, magic,
				VIRTIO_MAGIC);
			return EXIT_FAIL;
		}
		if (version != 2) {
			kprintf("virtiofs: FAIL dev %u: Version %u, expected 2\n", k, version);
			return EXIT_FAIL;
		}
		if (d->id == ID_FS) {
			for (u32 j = 0; j < 36; j++)
				tags[nfs][j] = (char)rd8(d, VM_CONFIG + j);
			named[nfs] = tags[nfs];
			nfs++;
		}
	}
	if (check_named("virtiofs.rw", named, nfs) < 0 || check_named("virtiofs.ro", named, nfs) < 0)
		return EXIT_FAIL;
	for (u32 k = 0; k < ndevs; k++)
		if (devs[k].id == ID_FS && fs_dev(&devs[k]) < 0)
			return EXIT_FAIL;
	if (!nfs)
		kprintf("virtiofs: no virtio-fs device\n");
	kprintf("virtiofs: ok\n");
	if (cmdline_is("virtiofs.end", "hlt"))
		for (;;)
			__asm__ volatile("cli; hlt");
	return EXIT_OK;
}
