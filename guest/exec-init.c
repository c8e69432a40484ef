/*
 * exec-init.c: /init of the initramfs that `minivmm exec` boots.
 *
 * Unlike the other programs in guest/, this is an ordinary static Linux program
 * (glibc, built with its own flags in the Makefile). The kernel runs it as
 * PID 1 once it has unpacked the initramfs. It:
 *   1. mounts /dev, /proc and /sys, opens /dev/console for progress lines;
 *   2. loads the kernel modules in /lib/minivmm/modules (virtio, virtiofs..);
 *   3. reads the command's spec from /minivmm/spec;
 *   4. opens /dev/hvc0, the virtio console that carries everything to the host;
 *   5, 6. builds the command's root file system from virtio-fs shares and
 *      makes it the root;
 *   7. sets the host name, brings up loopback;
 *   8. runs the command, forwarding its stdout and stderr as frames on hvc0,
 *      then its exit status;
 *   9. powers the VM off.
 *
 * Frames on hvc0: 1 byte type, 4 bytes little-endian length, the payload.
 *   1 stdout bytes, 2 stderr bytes, 3 exit code (u32), 4 signal (u32),
 *   5 errno of a failed exec/chdir (u32), 6 init error (one line of UTF-8).
 * Exactly one of 3..6 is sent, last.
 *
 * PID 1 must never exit: the kernel panics when it does ("Attempted to kill
 * init"). So every path, error or not, ends in finish(), which powers off.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <net/if.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

/* finit_module(2) flag: the file is compressed and the kernel decompresses it
 * itself (CONFIG_MODULE_DECOMPRESS, Linux 5.17+). Value from linux/module.h. */
#ifndef MODULE_INIT_COMPRESSED_FILE
#define MODULE_INIT_COMPRESSED_FILE 4
#endif

#define SPEC_PATH "/minivmm/spec"
#define MODULE_DIR "/lib/minivmm/modules"
#define HVC_PATH "/dev/hvc0"
#define PREFIX "minivmm-init: "

/* Frame types of the protocol on hvc0. */
enum {
	F_STDOUT = 1,
	F_STDERR = 2,
	F_EXIT = 3,
	F_SIGNAL = 4,
	F_NOSTART = 5,
	F_INITERR = 6,
};

#define FRAME_HDR 5
#define CHUNK (64 * 1024) /* largest payload of an output frame */
#define MSG_MAX 1024      /* longest init error message */
#define SPEC_MAX (8 << 20) /* execve takes at most ~2 MiB of args+env anyway */

static int console_fd = -1; /* /dev/console, for progress lines */
static int hvc_fd = -1;     /* /dev/hvc0, for frames to the host */
static int dev_ready;       /* /dev is mounted: device nodes can appear */
static int hvc_tried;       /* waited for hvc0 once already */
static int final_sent;      /* one of frames 3..6 went out: send no more */

static void finish(void) __attribute__((noreturn));
static void init_error(const char *fmt, ...)
	__attribute__((noreturn, format(printf, 1, 2)));

/* ---------------------------------------------------------------- output */

/* write(2) may write less than asked (a tty, a pipe) or be interrupted by a
 * signal (EINTR): loop until every byte is out. */
static int write_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;

	while (len > 0) {
		ssize_t n = write(fd, p, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/* One progress line on the console: "minivmm-init: ...\n". */
static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
	char line[MSG_MAX + 64];
	size_t pre = sizeof(PREFIX) - 1;
	va_list ap;
	int n;

	if (console_fd < 0)
		return;
	memcpy(line, PREFIX, pre);
	va_start(ap, fmt);
	n = vsnprintf(line + pre, sizeof(line) - pre - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	/* vsnprintf returns the length it wanted: clamp to what fits. */
	size_t len = pre + ((size_t)n < sizeof(line) - pre - 1 ?
			    (size_t)n : sizeof(line) - pre - 2);
	line[len++] = '\n';
	write_all(console_fd, line, len);
}

/* A frame is built in place: f[0..5) is the header, the payload follows, so
 * the whole frame goes out in one write. Little-endian by explicit shifts, so
 * the byte order does not depend on the CPU. */
static int write_frame(unsigned char *f, int type, uint32_t len)
{
	f[0] = (unsigned char)type;
	f[1] = (unsigned char)len;
	f[2] = (unsigned char)(len >> 8);
	f[3] = (unsigned char)(len >> 16);
	f[4] = (unsigned char)(len >> 24);
	if (hvc_fd < 0)
		return -1;
	return write_all(hvc_fd, f, FRAME_HDR + (size_t)len);
}

/* A final frame (3, 4 or 5) with a u32 payload. */
static void send_status(int type, uint32_t v)
{
	unsigned char f[FRAME_HDR + 4];

	if (final_sent)
		return;
	final_sent = 1;
	f[5] = (unsigned char)v;
	f[6] = (unsigned char)(v >> 8);
	f[7] = (unsigned char)(v >> 16);
	f[8] = (unsigned char)(v >> 24);
	if (write_frame(f, type, 4) != 0)
		say("cannot write the status to " HVC_PATH ": %s",
		    strerror(errno));
}

/* Length of the valid UTF-8 sequence at p, or 0 if it is not one (RFC 3629:
 * no overlong forms, no surrogates, nothing above U+10FFFF). Stops at the
 * first bad byte, so it never reads past a NUL. */
static size_t utf8_seq(const unsigned char *p)
{
	unsigned char c = p[0], lo = 0x80, hi = 0xbf;
	size_t n, i;

	if (c < 0x80)
		return 1;
	if (c >= 0xc2 && c <= 0xdf) {
		n = 2;
	} else if (c >= 0xe0 && c <= 0xef) {
		n = 3;
		if (c == 0xe0)
			lo = 0xa0;
		if (c == 0xed)
			hi = 0x9f;
	} else if (c >= 0xf0 && c <= 0xf4) {
		n = 4;
		if (c == 0xf0)
			lo = 0x90;
		if (c == 0xf4)
			hi = 0x8f;
	} else {
		return 0;
	}
	if (p[1] < lo || p[1] > hi)
		return 0;
	for (i = 2; i < n; i++)
		if (p[i] < 0x80 || p[i] > 0xbf)
			return 0;
	return n;
}

/* Frame 6 must be one line of UTF-8, but messages quote paths and tags: turn
 * control characters and invalid bytes into '?' (same length, in place). */
static void sanitize(char *s)
{
	unsigned char *p = (unsigned char *)s;

	while (*p) {
		size_t n = utf8_seq(p);
		if (n == 0 || (n == 1 && (*p < 0x20 || *p == 0x7f))) {
			*p++ = '?';
			continue;
		}
		p += n;
	}
}

/* ----------------------------------------------------- the virtio console */

/* Waits up to 5 s for /dev/hvc0: devtmpfs creates the node when
 * virtio_console binds the device, which may lag behind module loading. Then
 * raw mode (cfmakeraw): no \n -> \r\n translation, no echo, no special
 * characters, so frame bytes pass unchanged. Returns the fd or -1;
 * *raw_err is set to the errno of a failed raw-mode switch (0 if fine). */
static int open_hvc(int *raw_err)
{
	struct timespec start, now, tick = { 0, 10 * 1000 * 1000 };
	struct termios t;
	int fd;

	hvc_tried = 1;
	*raw_err = 0;
	clock_gettime(CLOCK_MONOTONIC, &start);
	for (;;) {
		/* O_NOCTTY: init must not acquire a controlling terminal (a
		 * hangup on it would then signal us). */
		fd = open(HVC_PATH, O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (fd >= 0)
			break;
		clock_gettime(CLOCK_MONOTONIC, &now);
		if ((now.tv_sec - start.tv_sec) * 1000 +
			    (now.tv_nsec - start.tv_nsec) / 1000000 >= 5000)
			return -1;
		nanosleep(&tick, NULL);
	}
	if (tcgetattr(fd, &t) != 0) {
		*raw_err = errno;
		return fd;
	}
	cfmakeraw(&t);
	if (tcsetattr(fd, TCSANOW, &t) != 0)
		*raw_err = errno;
	return fd;
}

/* ------------------------------------------------------------- the end */

/* sync(2) flushes the page cache (writes to rw shares go through virtio-fs,
 * but a tmpfs upper layer has nothing to flush; cheap anyway). tcdrain(3)
 * waits until the tty layer has handed every byte to the hvc driver, so the
 * host receives the last frame before the VM goes away. reboot(2) with
 * RB_POWER_OFF turns the machine off (ACPI). */
static void finish(void)
{
	sync();
	if (hvc_fd >= 0)
		tcdrain(hvc_fd);
	reboot(RB_POWER_OFF);
	say("power off failed: %s", strerror(errno));
	for (;;)
		pause();
}

/* Frame 6 to the host, the same line on the console, then power off. Errors
 * before step 4 (a bad spec) still try to reach the host: hvc0 is opened here
 * if it was not yet. */
static void init_error(const char *fmt, ...)
{
	static unsigned char f[FRAME_HDR + MSG_MAX];
	char *msg = (char *)f + FRAME_HDR;
	va_list ap;
	int raw_err;

	va_start(ap, fmt);
	vsnprintf(msg, MSG_MAX, fmt, ap);
	va_end(ap);
	sanitize(msg);
	if (hvc_fd < 0 && dev_ready && !hvc_tried) {
		hvc_fd = open_hvc(&raw_err);
		if (hvc_fd < 0)
			say("no " HVC_PATH
			    " (virtio console): is virtio_console loaded?");
	}
	if (!final_sent && hvc_fd >= 0) {
		final_sent = 1;
		write_frame(f, F_INITERR, (uint32_t)strlen(msg));
	}
	say("%s", msg);
	finish();
}

/* ------------------------------------------------------------- mounting */

/* mkdir -p: creates each missing component with `mode` (minus the umask).
 * EEXIST is fine; if the existing name is not a directory, the mount on it
 * fails later with ENOTDIR, which says why. Returns 0 or -1 with errno. */
static int mkdir_p(const char *path, mode_t mode)
{
	char buf[PATH_MAX];
	size_t len = strlen(path);
	char *p;

	if (len >= sizeof(buf)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	memcpy(buf, path, len + 1);
	for (p = buf + 1;; p++) {
		char c = *p;
		if (c != '/' && c != '\0')
			continue;
		if (p[-1] != '/') { /* skip empty components ("a//b") */
			*p = '\0';
			if (mkdir(buf, mode) != 0 && errno != EEXIST)
				return -1;
			*p = c;
		}
		if (c == '\0')
			return 0;
	}
}

/* Creates `target` and mounts there, or fails with a message naming the mount,
 * the type and the reason. mount(2) says ENODEV when no file system of that
 * type is registered: the module is missing (or was not loaded). virtio-fs
 * says EINVAL when no device has the tag. */
static void mount_or_die(const char *src, const char *target, const char *type,
			 unsigned long flags, const char *data)
{
	char what[PATH_MAX + 32];
	const char *hint = "";
	int e;

	if (mkdir_p(target, 0755) != 0)
		init_error("cannot create the mount point %s: %s", target,
			   strerror(errno));
	if (mount(src, target, type, flags, data) == 0)
		return;
	e = errno;
	/* The pseudo file systems are named by their type ("tmpfs"); a share
	 * by its tag, plus the type. */
	if (strcmp(type, "virtiofs") == 0)
		snprintf(what, sizeof(what),
			 "the virtio-fs share \"%s\" (type virtiofs)", src);
	else
		snprintf(what, sizeof(what), "%s", type);
	if (e == ENODEV)
		hint = " (the kernel lacks this file system: give minivmm exec "
		       "--modules DIR with its module)";
	else if (e == EINVAL && strcmp(type, "virtiofs") == 0)
		hint = " (no virtio-fs device has this tag)";
	init_error("cannot mount %s%s on %s: %s%s", what,
		   (flags & MS_RDONLY) ? " read-only" : "", target, strerror(e),
		   hint);
}

/* ------------------------------------------------------------- modules */

static int cmp_names(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

static int ends_with(const char *s, const char *suffix)
{
	size_t n = strlen(s), m = strlen(suffix);

	return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* Loads every file of MODULE_DIR in strcmp order (the host numbers them
 * NN-name so that dependencies come first: there is no modprobe here to read
 * modules.dep). finit_module(2) takes an fd, so no need to read the file into
 * memory. A failure is only reported: the module may be built in, and the
 * mount that needs it will say what is missing. */
static void load_modules(void)
{
	char **names = NULL;
	size_t n = 0, cap = 0, i;
	struct dirent *de;
	DIR *d;

	d = opendir(MODULE_DIR);
	if (!d) {
		if (errno != ENOENT)
			say("cannot open " MODULE_DIR ": %s", strerror(errno));
		return;
	}
	for (;;) {
		errno = 0;
		de = readdir(d);
		if (!de) {
			if (errno)
				say("cannot read " MODULE_DIR ": %s",
				    strerror(errno));
			break;
		}
		if (de->d_name[0] == '.') /* ".", ".." */
			continue;
		if (n == cap) {
			size_t ncap = cap ? 2 * cap : 16;
			char **nn = realloc(names, ncap * sizeof(*nn));
			if (!nn) {
				say("out of memory listing " MODULE_DIR);
				break;
			}
			names = nn;
			cap = ncap;
		}
		names[n] = strdup(de->d_name);
		if (!names[n]) {
			say("out of memory listing " MODULE_DIR);
			break;
		}
		n++;
	}
	if (n)
		qsort(names, n, sizeof(*names), cmp_names);
	for (i = 0; i < n; i++) {
		const char *name = names[i];
		int flags = 0, fd;
		struct stat st;

		fd = openat(dirfd(d), name, O_RDONLY | O_CLOEXEC);
		if (fd < 0) {
			say("module %s: %s", name, strerror(errno));
			continue;
		}
		if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
			close(fd);
			continue;
		}
		if (ends_with(name, ".xz") || ends_with(name, ".zst") ||
		    ends_with(name, ".gz"))
			flags = MODULE_INIT_COMPRESSED_FILE;
		/* glibc has no wrapper: call it by number. "" = no parameters.
		 * EEXIST: already loaded (or built in under the same name). */
		if (syscall(SYS_finit_module, fd, "", flags) != 0 &&
		    errno != EEXIST)
			say("module %s: %s", name, strerror(errno));
		close(fd);
	}
	for (i = 0; i < n; i++)
		free(names[i]);
	free(names);
	closedir(d);
}

/* ------------------------------------------------------------- the spec */

struct share {
	const char *tag;
	int rdonly;
	const char *path;
};

struct spec {
	char **argv; /* NULL-terminated */
	size_t argc;
	char **envp; /* NULL-terminated */
	size_t envc;
	const char *cwd;
	uid_t uid;
	gid_t gid;
	gid_t *groups;
	size_t ngroups;
	const char *root; /* virtio-fs tag of the lower layer, or NULL */
	struct share *mounts;
	size_t nmounts;
	const char *hostname;
};

/* Reads a whole file (at most `max` bytes) into a malloc'd buffer. */
static char *read_file(const char *path, size_t max, size_t *len)
{
	size_t cap = 4096, used = 0;
	char *buf = malloc(cap), *nb;
	int fd;

	if (!buf)
		return NULL;
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		free(buf);
		return NULL;
	}
	for (;;) {
		ssize_t r;

		if (used == cap) {
			if (cap >= max) {
				errno = EFBIG;
				goto fail;
			}
			cap *= 2;
			nb = realloc(buf, cap);
			if (!nb)
				goto fail;
			buf = nb;
		}
		r = read(fd, buf + used, cap - used);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			goto fail;
		}
		if (r == 0)
			break;
		used += (size_t)r;
	}
	close(fd);
	*len = used;
	return buf;
fail:
	{
		int e = errno;
		close(fd);
		free(buf);
		errno = e;
	}
	return NULL;
}

/* Strict decimal u32: digits only, no sign, no spaces, no overflow. */
static int parse_u32(const char *s, uint32_t *out)
{
	uint64_t v = 0;

	if (!*s)
		return -1;
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			return -1;
		v = v * 10 + (uint64_t)(*s - '0');
		if (v > UINT32_MAX)
			return -1;
	}
	*out = (uint32_t)v;
	return 0;
}

/* A uid or gid: (uid_t)-1 means "unchanged" to the set*id syscalls, so it is
 * refused rather than silently ignored. */
static int parse_id(const char *s, uint32_t *out)
{
	return parse_u32(s, out) != 0 || *out == UINT32_MAX ? -1 : 0;
}

static char spec_err[MSG_MAX];

static const char *spec_fail(const char *fmt, ...)
	__attribute__((format(printf, 1, 2)));
static const char *spec_fail(const char *fmt, ...)
{
	size_t pre = sizeof("bad " SPEC_PATH ": ") - 1;
	va_list ap;

	memcpy(spec_err, "bad " SPEC_PATH ": ", pre);
	va_start(ap, fmt);
	vsnprintf(spec_err + pre, sizeof(spec_err) - pre, fmt, ap);
	va_end(ap);
	return spec_err;
}

/* Parses the NUL-terminated key=value records in buf[0..len). The strings of
 * the result point into buf (records are NUL-terminated already; mount=
 * values are cut at their commas in place). Returns NULL, or a message. */
static const char *parse_spec(char *buf, size_t len, struct spec *s)
{
	size_t nrec = 0, off, rec;
	char *p;

	memset(s, 0, sizeof(*s));
	s->hostname = "minivmm";
	/* Count the records first, so every array is allocated once. */
	for (off = 0; off < len; nrec++) {
		p = memchr(buf + off, '\0', len - off);
		if (!p)
			return spec_fail("the last record has no NUL terminator");
		off = (size_t)(p - buf) + 1;
	}
	s->argv = calloc(nrec + 1, sizeof(*s->argv));
	s->envp = calloc(nrec + 1, sizeof(*s->envp));
	s->mounts = calloc(nrec + 1, sizeof(*s->mounts));
	if (!s->argv || !s->envp || !s->mounts)
		return spec_fail("out of memory");

	for (off = 0, rec = 1; off < len; rec++) {
		char *key = buf + off, *val = strchr(key, '=');
		off += strlen(key) + 1;
		if (!val)
			return spec_fail("record %zu (\"%.40s\") has no '='", rec,
					 key);
		*val++ = '\0'; /* key and value become two strings */

		if (strcmp(key, "arg") == 0) {
			s->argv[s->argc++] = val;
		} else if (strcmp(key, "env") == 0) {
			/* execve accepts anything, but an entry without a
			 * name would only confuse getenv. */
			if (val[0] == '=' || !strchr(val, '='))
				return spec_fail("env record %zu is not NAME=VALUE",
						 rec);
			s->envp[s->envc++] = val;
		} else if (strcmp(key, "cwd") == 0) {
			if (val[0] != '/')
				return spec_fail("cwd \"%.200s\" is not absolute",
						 val);
			s->cwd = val;
		} else if (strcmp(key, "uid") == 0) {
			uint32_t v;
			if (parse_id(val, &v) != 0)
				return spec_fail("uid \"%.40s\" is not a valid id",
						 val);
			s->uid = v;
		} else if (strcmp(key, "gid") == 0) {
			uint32_t v;
			if (parse_id(val, &v) != 0)
				return spec_fail("gid \"%.40s\" is not a valid id",
						 val);
			s->gid = v;
		} else if (strcmp(key, "groups") == 0) {
			size_t n = *val ? 1 : 0, i;
			char *q, *comma;
			for (q = val; *q; q++)
				n += *q == ',';
			if (n > NGROUPS_MAX)
				return spec_fail("more than %d groups",
						 NGROUPS_MAX);
			free(s->groups);
			s->groups = calloc(n + 1, sizeof(*s->groups));
			if (!s->groups)
				return spec_fail("out of memory");
			for (i = 0, q = val; i < n; i++, q = comma + 1) {
				uint32_t v;
				comma = strchr(q, ',');
				if (comma)
					*comma = '\0';
				if (parse_id(q, &v) != 0)
					return spec_fail(
						"group \"%.40s\" is not a valid id",
						q);
				s->groups[i] = v;
				if (!comma)
					break;
			}
			s->ngroups = n;
		} else if (strcmp(key, "root") == 0) {
			if (!*val)
				return spec_fail("root= has an empty tag");
			s->root = val;
		} else if (strcmp(key, "mount") == 0) {
			/* TAG,MODE,/path: the path is all after the 2nd comma,
			 * so it may hold commas itself. */
			char *c1 = strchr(val, ',');
			char *c2 = c1 ? strchr(c1 + 1, ',') : NULL;
			struct share *m = &s->mounts[s->nmounts];
			if (!c2)
				return spec_fail("mount \"%.200s\" is not TAG,MODE,PATH",
						 val);
			*c1 = *c2 = '\0';
			m->tag = val;
			m->path = c2 + 1;
			if (!*m->tag)
				return spec_fail("mount record %zu has an empty tag",
						 rec);
			if (strcmp(c1 + 1, "ro") == 0)
				m->rdonly = 1;
			else if (strcmp(c1 + 1, "rw") != 0)
				return spec_fail("mount mode \"%.20s\" is not ro or rw",
						 c1 + 1);
			if (m->path[0] != '/')
				return spec_fail("mount path \"%.200s\" is not absolute",
						 m->path);
			s->nmounts++;
		} else if (strcmp(key, "hostname") == 0) {
			/* sethostname(2) refuses more than HOST_NAME_MAX. */
			if (strlen(val) > HOST_NAME_MAX)
				return spec_fail("hostname longer than %d bytes",
						 HOST_NAME_MAX);
			if (*val)
				s->hostname = val;
		}
		/* Unknown keys: ignored, so a newer host can add some. */
	}
	if (s->argc == 0)
		return spec_fail("no arg= record (the command)");
	if (!s->cwd)
		return spec_fail("no cwd= record");
	return NULL; /* argv[argc] and envp[envc] are NULL: calloc */
}

/* ------------------------------------------------------------- the new root */

/* Mounts the file systems a program expects at /proc, /sys, /dev, /dev/pts,
 * /dev/shm, /tmp and /run, in the new root (which is "/" by now). */
static void mount_api_filesystems(void)
{
	static const char *const fd_links[][2] = {
		{ "/proc/self/fd", "/dev/fd" },
		{ "/proc/self/fd/0", "/dev/stdin" },
		{ "/proc/self/fd/1", "/dev/stdout" },
		{ "/proc/self/fd/2", "/dev/stderr" },
	};
	size_t i;

	mount_or_die("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
		     NULL);
	mount_or_die("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
		     NULL);
	/* devtmpfs is one file system kernel-wide: this is the same /dev as
	 * the initramfs's, with every device node the kernel knows. */
	mount_or_die("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	/* A new devpts instance; /dev/ptmx of devtmpfs finds it as "pts"
	 * beside itself. gid 5 is "tty" on the usual distributions. */
	mount_or_die("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
		     "gid=5,mode=0620,ptmxmode=0666");
	mount_or_die("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV,
		     "mode=1777");
	mount_or_die("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
		     "mode=1777");
	mount_or_die("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV,
		     "mode=0755");
	/* udev would add these; shells use /dev/fd for <(...), scripts use
	 * /dev/stdin. Not fatal: most commands never look. */
	for (i = 0; i < sizeof(fd_links) / sizeof(fd_links[0]); i++)
		if (symlink(fd_links[i][0], fd_links[i][1]) != 0 &&
		    errno != EEXIST)
			say("cannot create %s: %s", fd_links[i][1],
			    strerror(errno));
}

/* Builds the new root at /newroot and makes it "/".
 *
 * The shares and the API file systems are mounted after the switch, inside
 * the new root: then an absolute symlink on the way to a mount point (Debian's
 * /var/run -> /run, a /home -> /data/home) resolves inside the new root, not
 * in the initramfs. And the shares come after /tmp and /run, so a share at
 * /tmp/x (a host cwd under /tmp) is not hidden by the tmpfs on /tmp. */
static void build_root(const struct spec *s)
{
	static const char *const usr_links[][2] = {
		{ "usr/bin", "/bin" },
		{ "usr/sbin", "/sbin" },
		{ "usr/lib", "/lib" },
		{ "usr/lib64", "/lib64" },
	};
	struct stat st;
	size_t i;

	if (s->root) {
		/* overlayfs: reads come from the read-only share (lower),
		 * writes go to a tmpfs (upper), so the command may change
		 * anything without touching the host. The work dir must be on
		 * the same file system as the upper dir. */
		mount_or_die(s->root, "/lower", "virtiofs", MS_RDONLY, NULL);
		mount_or_die("tmpfs", "/upper", "tmpfs", 0, "mode=0755");
		if (mkdir("/upper/data", 0755) != 0 ||
		    mkdir("/upper/work", 0755) != 0)
			init_error("cannot create the overlay's directories in "
				   "/upper: %s", strerror(errno));
		mount_or_die("overlay", "/newroot", "overlay", 0,
			     "lowerdir=/lower,upperdir=/upper/data,"
			     "workdir=/upper/work");
	} else {
		mount_or_die("tmpfs", "/newroot", "tmpfs", 0, "mode=0755");
	}

	/* switch_root: the initramfs is the kernel's rootfs, which can never
	 * be unmounted, so pivot_root(2) refuses it (EINVAL). Instead move the
	 * new root's mount onto "/" (MS_MOVE) and chroot into it; the old
	 * contents stay in memory, unreachable. */
	if (chdir("/newroot") != 0)
		init_error("chdir /newroot: %s", strerror(errno));
	if (mount(".", "/", NULL, MS_MOVE, NULL) != 0)
		init_error("cannot move /newroot onto /: %s", strerror(errno));
	if (chroot(".") != 0)
		init_error("chroot into the new root: %s", strerror(errno));
	if (chdir("/") != 0)
		init_error("chdir / in the new root: %s", strerror(errno));

	mount_api_filesystems();

	for (i = 0; i < s->nmounts; i++) {
		const struct share *m = &s->mounts[i];
		mount_or_die(m->tag, m->path, "virtiofs",
			     m->rdonly ? MS_RDONLY : 0, NULL);
	}

	/* Merged /usr: with only /usr shared, programs still look for
	 * /bin/sh and the dynamic loader /lib64/ld-linux-x86-64.so.2. */
	if (!s->root && stat("/usr", &st) == 0 && S_ISDIR(st.st_mode)) {
		for (i = 0; i < sizeof(usr_links) / sizeof(usr_links[0]); i++) {
			const char *to = usr_links[i][0], *at = usr_links[i][1];
			if (lstat(at, &st) == 0)
				continue;
			if (errno != ENOENT || symlink(to, at) != 0)
				init_error("cannot create the symlink %s -> %s: %s",
					   at, to, strerror(errno));
		}
	}
}

/* Brings up "lo" (down at boot): programs that talk to localhost expect it.
 * Any socket serves as a handle for the interface ioctls. */
static void loopback_up(void)
{
	struct ifreq ifr;
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);

	if (fd < 0) {
		say("loopback: socket: %s", strerror(errno));
		return;
	}
	memset(&ifr, 0, sizeof(ifr));
	memcpy(ifr.ifr_name, "lo", 3);
	if (ioctl(fd, SIOCGIFFLAGS, &ifr) != 0) {
		say("loopback: SIOCGIFFLAGS: %s", strerror(errno));
	} else {
		ifr.ifr_flags |= IFF_UP;
		if (ioctl(fd, SIOCSIFFLAGS, &ifr) != 0)
			say("loopback: SIOCSIFFLAGS: %s", strerror(errno));
	}
	close(fd);
}

/* ------------------------------------------------------------- the command */

/* What the child reports on the exec-status pipe when it fails: the step and
 * errno. A failed exec or chdir is the user's (frame 5); the others are
 * init's (frame 6). */
enum {
	ST_EXEC,
	ST_CHDIR,
	ST_STDIO,
	ST_SETGROUPS,
	ST_SETGID,
	ST_SETUID,
};
struct child_err {
	int step;
	int err;
};

static void child_fail(int fd, int step) __attribute__((noreturn));
static void child_fail(int fd, int step)
{
	struct child_err ce = { step, errno };

	/* Less than PIPE_BUF bytes: one atomic write. */
	write_all(fd, &ce, sizeof(ce));
	_exit(127);
}

/* In the child, between fork and exec. */
static void child(const struct spec *s, int out_w, int err_w, int st_w)
{
	int null;

	/* A new session: no controlling terminal, and its own process group,
	 * like a CI job. */
	setsid(); /* cannot fail: a new child never leads a process group */
	null = open("/dev/null", O_RDONLY | O_CLOEXEC);
	if (null < 0)
		child_fail(st_w, ST_STDIO);
	/* dup2 clears FD_CLOEXEC on the new descriptor: 0, 1 and 2 survive
	 * exec, while the originals (and hvc0, the console, the status pipe's
	 * write end) close at exec. */
	if (dup2(null, 0) < 0 || dup2(out_w, 1) < 0 || dup2(err_w, 2) < 0)
		child_fail(st_w, ST_STDIO);
	/* Supplementary groups and gid first: after setuid to a non-root user
	 * we would no longer be allowed to change them. */
	if (setgroups(s->ngroups, s->groups) != 0)
		child_fail(st_w, ST_SETGROUPS);
	if (setgid(s->gid) != 0)
		child_fail(st_w, ST_SETGID);
	if (setuid(s->uid) != 0)
		child_fail(st_w, ST_SETUID);
	/* After setuid, so the directory is checked with the user's rights. */
	if (chdir(s->cwd) != 0)
		child_fail(st_w, ST_CHDIR);
	/* execvpe searches getenv("PATH") of the current environment, not of
	 * the envp it is given: make the spec's environment current first.
	 * Without PATH, glibc searches /bin:/usr/bin. */
	environ = s->envp;
	execvpe(s->argv[0], s->argv, s->envp);
	child_fail(st_w, ST_EXEC);
}

/* read(2) until `len` bytes or EOF; returns the count, or -1. */
static ssize_t read_full(int fd, void *buf, size_t len)
{
	size_t got = 0;

	while (got < len) {
		ssize_t r = read(fd, (char *)buf + got, len - got);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		if (r == 0)
			break;
		got += (size_t)r;
	}
	return (ssize_t)got;
}

static void wait_child(pid_t pid, int *status)
{
	while (waitpid(pid, status, 0) < 0)
		if (errno != EINTR)
			init_error("waitpid: %s", strerror(errno));
}

static void run(const struct spec *s)
{
	static unsigned char f[FRAME_HDR + CHUNK];
	static const char *const step_what[] = {
		[ST_STDIO] = "set up stdin, stdout and stderr",
		[ST_SETGROUPS] = "set the supplementary groups (setgroups)",
		[ST_SETGID] = "set the group id (setgid)",
		[ST_SETUID] = "set the user id (setuid)",
	};
	int out[2], err[2], st[2], status = 0, exited = 0, hvc_ok = 1;
	struct pollfd pfd[2];
	struct child_err ce;
	ssize_t n;
	pid_t pid;

	/* O_CLOEXEC on all: the command inherits only what dup2 puts on 0-2.
	 * The exec-status pipe then reports success by closing at exec
	 * (read gets EOF) and failure by carrying errno. */
	if (pipe2(out, O_CLOEXEC) != 0 || pipe2(err, O_CLOEXEC) != 0 ||
	    pipe2(st, O_CLOEXEC) != 0)
		init_error("pipe2: %s", strerror(errno));
	say("running %s", s->argv[0]);
	pid = fork();
	if (pid < 0)
		init_error("fork: %s", strerror(errno));
	if (pid == 0)
		child(s, out[1], err[1], st[1]);

	/* Close our copies of the write ends, or the reads would never see
	 * EOF. */
	close(out[1]);
	close(err[1]);
	close(st[1]);
	n = read_full(st[0], &ce, sizeof(ce));
	close(st[0]);
	if (n == (ssize_t)sizeof(ce)) {
		wait_child(pid, &status);
		if (ce.step == ST_EXEC || ce.step == ST_CHDIR) {
			say("cannot %s %s: %s",
			    ce.step == ST_EXEC ? "run" : "enter directory",
			    ce.step == ST_EXEC ? s->argv[0] : s->cwd,
			    strerror(ce.err));
			send_status(F_NOSTART, (uint32_t)ce.err);
			finish();
		}
		init_error("cannot %s for the command: %s",
			   ce.step >= ST_STDIO && ce.step <= ST_SETUID ?
				   step_what[ce.step] : "start it",
			   strerror(ce.err));
	}

	/* Forward output until both pipes are at EOF, or until the command has
	 * exited and nothing came for 200 ms: a background process it left may
	 * hold the pipes open forever. */
	pfd[0].fd = out[0];
	pfd[1].fd = err[0];
	pfd[0].events = pfd[1].events = POLLIN;
	while (pfd[0].fd >= 0 || pfd[1].fd >= 0) {
		int i, r = poll(pfd, 2, exited ? 200 : 100);

		if (r < 0) {
			if (errno == EINTR)
				continue;
			say("poll: %s", strerror(errno));
			break;
		}
		if (r == 0) {
			pid_t w;
			if (exited)
				break;
			w = waitpid(pid, &status, WNOHANG);
			if (w < 0 && errno != EINTR)
				init_error("waitpid: %s", strerror(errno));
			exited = w == pid;
			continue;
		}
		for (i = 0; i < 2; i++) {
			ssize_t got;
			/* POLLHUP too: the last bytes may still be there, and
			 * then read returns 0 (EOF). */
			if (pfd[i].fd < 0 ||
			    !(pfd[i].revents & (POLLIN | POLLHUP | POLLERR)))
				continue;
			got = read(pfd[i].fd, f + FRAME_HDR, CHUNK);
			if (got < 0 && (errno == EINTR || errno == EAGAIN))
				continue;
			if (got <= 0) {
				close(pfd[i].fd);
				pfd[i].fd = -1; /* poll skips negative fds */
				continue;
			}
			/* On a write failure keep draining, so the command is
			 * not blocked on a full pipe; the status may still go. */
			if (write_frame(f, i == 0 ? F_STDOUT : F_STDERR,
					(uint32_t)got) != 0 && hvc_ok) {
				hvc_ok = 0;
				say("cannot write to " HVC_PATH ": %s",
				    strerror(errno));
			}
		}
	}
	/* Closing the read ends makes leftover writers get EPIPE. */
	for (int i = 0; i < 2; i++)
		if (pfd[i].fd >= 0)
			close(pfd[i].fd);
	if (!exited)
		wait_child(pid, &status);

	if (WIFEXITED(status)) {
		say("%s exited with %d", s->argv[0], WEXITSTATUS(status));
		send_status(F_EXIT, (uint32_t)WEXITSTATUS(status));
	} else if (WIFSIGNALED(status)) {
		say("%s was killed by signal %d", s->argv[0], WTERMSIG(status));
		send_status(F_SIGNAL, (uint32_t)WTERMSIG(status));
	} else {
		init_error("unexpected wait status %#x", (unsigned)status);
	}
}

/* ------------------------------------------------------------- main */

int main(void)
{
	struct spec spec;
	const char *bad;
	size_t len;
	char *buf;
	int fd, raw_err;

	/* If the initramfs had a /dev/console node, the kernel opened it as
	 * fds 0-2 for us; ours has none, so they are usually closed. */
	if (fcntl(2, F_GETFD) >= 0)
		console_fd = 2;
	/* The kernel starts init with umask 022 already; say so explicitly,
	 * the command inherits it. */
	umask(022);

	/* 1. devtmpfs: the kernel creates a node here for every device it
	 * registers (no udev needed), including console and hvc0. */
	mount_or_die("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	dev_ready = 1;
	/* Occupy fds 0-2 (with /dev/null) if they are closed, so that the
	 * pipes below never get those numbers and dup2 in the child is not
	 * confused. open returns the lowest free fd. */
	while ((fd = open("/dev/null", O_RDWR)) >= 0 && fd <= 2) {
	}
	if (fd > 2)
		close(fd);
	fd = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
	if (fd >= 0)
		console_fd = fd;
	mount_or_die("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
		     NULL);
	mount_or_die("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
		     NULL);

	/* 2. */
	load_modules();

	/* 3. */
	buf = read_file(SPEC_PATH, SPEC_MAX, &len);
	if (!buf)
		init_error("cannot read " SPEC_PATH ": %s (minivmm exec passes "
			   "it in the initramfs)", strerror(errno));
	bad = parse_spec(buf, len, &spec);
	if (bad)
		init_error("%s (a minivmm bug: please report it)", bad);

	/* 4. Without hvc0 nothing can reach the host, which then notices
	 * the missing status. */
	hvc_fd = open_hvc(&raw_err);
	if (hvc_fd < 0) {
		say("no " HVC_PATH " (virtio console): is virtio_console loaded?");
		finish();
	}
	if (raw_err)
		init_error("cannot put " HVC_PATH " in raw mode: %s",
			   strerror(raw_err));

	/* 5, 6. */
	build_root(&spec);

	/* 7. The UTS name is per namespace; the command sees it in uname. */
	if (sethostname(spec.hostname, strlen(spec.hostname)) != 0)
		say("sethostname %s: %s", spec.hostname, strerror(errno));
	loopback_up();

	/* 8. */
	run(&spec);

	/* 9. */
	finish();
}
