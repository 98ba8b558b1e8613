/*
 * The host references (and host sides) of `kvmpy bench net`.
 *
 *   netref tx TAP COUNT SIZE      open TAP (IFF_VNET_HDR, as kvmpy does) and write COUNT frames
 *                                 of SIZE bytes, each behind a zero 12-byte virtio_net_hdr:
 *                                 what kvmpy's device does for a guest's frames.
 *                                 Prints: elapsed_ns frames_written
 *   netref rx TAP IDLE_MS         read frames from TAP until none came for IDLE_MS after the
 *                                 first. Prints: first_to_last_ns frames bytes
 *   netref inject IFNAME COUNT SIZE   send COUNT frames of SIZE bytes into the interface through
 *                                 an AF_PACKET socket (the host side of host -> guest), as
 *                                 fast as the socket takes them; the TAP drops what its
 *                                 reader does not take in time (its tx_dropped counter).
 *                                 Prints: elapsed_ns frames_sent
 *   netref uds-read PATH          listen on the Unix socket PATH, take one connection, read
 *                                 it to the end. Prints: first_byte_to_end_ns bytes
 *   netref uds-write PATH PORT BYTES   connect to PATH, "CONNECT PORT\n", wait for "OK ...",
 *                                 write BYTES in 64 KiB writes, close. Prints: elapsed_ns bytes
 *   netref pair BYTES             a Unix stream socket pair, a writer process and a reader
 *                                 (64 KiB writes, 256 KiB reads). Prints: elapsed_ns bytes
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
	fprintf(stderr, "netref: %s: %s\n", what, strerror(errno));
	exit(1);
}

static int open_tap(const char *name)
{
	int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		die("/dev/net/tun");
	struct ifreq ifr;
	memset(&ifr, 0, sizeof(ifr));
	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
	ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
	if (ioctl(fd, TUNSETIFF, &ifr) < 0)
		die("TUNSETIFF");
	int hdr = 12;
	if (ioctl(fd, TUNSETVNETHDRSZ, &hdr) < 0)
		die("TUNSETVNETHDRSZ");
	return fd;
}

static void fill(unsigned char *f, unsigned size)
{
	memset(f, 0xff, 6);
	unsigned char src[6] = {0x02, 0, 0, 0, 0, 0x42};
	memcpy(f + 6, src, 6);
	f[12] = 0x88, f[13] = 0xb5;
	for (unsigned i = 14; i < size; i++)
		f[i] = (unsigned char)i;
}

static int tx(const char *tap, long count, unsigned size)
{
	int fd = open_tap(tap);
	static unsigned char buf[12 + 1514];
	memset(buf, 0, 12);
	fill(buf + 12, size);
	long done = 0;
	uint64_t t0 = now_ns();
	for (long i = 0; i < count; i++)
		if (write(fd, buf, 12 + size) == (ssize_t)(12 + size))
			done++;
	uint64_t t1 = now_ns();
	printf("%llu %ld\n", (unsigned long long)(t1 - t0), done);
	return 0;
}

static int rx(const char *tap, int idle_ms)
{
	int fd = open_tap(tap);
	static unsigned char buf[65536 + 12];
	long frames = 0;
	long long bytes = 0;
	uint64_t first = 0, last = 0;
	printf("ready\n");
	fflush(stdout);
	struct pollfd p = {fd, POLLIN, 0};
	for (;;) {
		int r = poll(&p, 1, frames ? idle_ms : 30000);
		if (r <= 0)
			break;
		ssize_t n = read(fd, buf, sizeof(buf));
		if (n <= 12)
			continue;
		last = now_ns();
		if (!frames)
			first = last;
		frames++;
		bytes += n - 12;
	}
	printf("%llu %ld %lld\n", (unsigned long long)(last - first), frames, bytes);
	return 0;
}

static int inject(const char *ifname, long count, unsigned size)
{
	int s = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
	if (s < 0)
		die("AF_PACKET");
	struct sockaddr_ll sll;
	memset(&sll, 0, sizeof(sll));
	sll.sll_family = AF_PACKET;
	sll.sll_protocol = htons(ETH_P_ALL);
	sll.sll_ifindex = (int)if_nametoindex(ifname);
	if (!sll.sll_ifindex || bind(s, (struct sockaddr *)&sll, sizeof(sll)) < 0)
		die(ifname);
	int one = 1; /* straight to the driver: no qdisc between us and the TAP */
	setsockopt(s, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one));
	static unsigned char f[1514];
	fill(f, size);
	enum { BATCH = 64 };
	struct mmsghdr msgs[BATCH];
	struct iovec iov[BATCH];
	for (int i = 0; i < BATCH; i++) {
		iov[i].iov_base = f;
		iov[i].iov_len = size;
		memset(&msgs[i], 0, sizeof(msgs[i]));
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	long sent = 0;
	uint64_t t0 = now_ns();
	while (sent < count) {
		int want = count - sent < BATCH ? (int)(count - sent) : BATCH;
		int r = sendmmsg(s, msgs, (unsigned)want, 0);
		if (r < 0) {
			if (errno == ENOBUFS || errno == EAGAIN) {
				sched_yield(); /* our socket's buffer is full: offer them again */
				continue;
			}
			die("sendmmsg");
		}
		sent += r;
	}
	uint64_t t1 = now_ns();
	printf("%llu %ld\n", (unsigned long long)(t1 - t0), sent);
	return 0;
}

static int uds_listen(const char *path)
{
	int s = socket(AF_UNIX, SOCK_STREAM, 0);
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	snprintf(a.sun_path, sizeof(a.sun_path), "%s", path);
	unlink(path);
	if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(s, 4) < 0)
		die(path);
	return s;
}

static long long drain(int c, uint64_t *first)
{
	static char buf[256 * 1024];
	long long total = 0;
	for (;;) {
		ssize_t n = read(c, buf, sizeof(buf));
		if (n <= 0)
			break;
		if (!total)
			*first = now_ns();
		total += n;
	}
	return total;
}

static int uds_read(const char *path)
{
	int s = uds_listen(path);
	printf("ready\n");
	fflush(stdout);
	int c = accept(s, 0, 0);
	if (c < 0)
		die("accept");
	uint64_t first = 0;
	long long total = drain(c, &first);
	uint64_t end = now_ns();
	printf("%llu %lld\n", (unsigned long long)(end - first), total);
	unlink(path);
	return 0;
}

static long long pump(int s, long long bytes)
{
	static char buf[65536];
	memset(buf, 0x5a, sizeof(buf));
	long long left = bytes;
	while (left > 0) {
		ssize_t n = write(s, buf, left < (long long)sizeof(buf) ? (size_t)left : sizeof(buf));
		if (n <= 0)
			break;
		left -= n;
	}
	return bytes - left;
}

static int uds_write(const char *path, const char *port, long long bytes)
{
	for (int tries = 0; tries < 3000; tries++) {
		int s = socket(AF_UNIX, SOCK_STREAM, 0);
		struct sockaddr_un a = {.sun_family = AF_UNIX};
		snprintf(a.sun_path, sizeof(a.sun_path), "%s", path);
		if (connect(s, (struct sockaddr *)&a, sizeof(a)) == 0) {
			char line[64];
			int k = snprintf(line, sizeof(line), "CONNECT %s\n", port);
			if (write(s, line, (size_t)k) == k) {
				int got = 0;
				char ch;
				while (got < (int)sizeof(line) - 1 && read(s, &ch, 1) == 1) {
					line[got++] = ch;
					if (ch == '\n')
						break;
				}
				if (got > 3 && !strncmp(line, "OK ", 3)) {
					uint64_t t0 = now_ns();
					long long done = pump(s, bytes);
					shutdown(s, SHUT_WR);
					char tmp[16];
					while (read(s, tmp, sizeof(tmp)) > 0)
						; /* the guest closes once it has everything */
					uint64_t t1 = now_ns();
					printf("%llu %lld\n", (unsigned long long)(t1 - t0), done);
					return 0;
				}
			}
		}
		close(s);
		usleep(2000); /* the guest does not listen yet: it answered RST */
	}
	fprintf(stderr, "netref: the guest never accepted\n");
	return 1;
}

static int pair(long long bytes)
{
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0)
		die("socketpair");
	uint64_t t0 = now_ns();
	pid_t pid = fork();
	if (pid == 0) {
		close(sv[0]);
		pump(sv[1], bytes);
		_exit(0);
	}
	close(sv[1]);
	uint64_t first = 0;
	long long total = drain(sv[0], &first);
	uint64_t t1 = now_ns();
	waitpid(pid, 0, 0);
	printf("%llu %lld\n", (unsigned long long)(t1 - t0), total);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 5 && !strcmp(argv[1], "tx"))
		return tx(argv[2], atol(argv[3]), (unsigned)atoi(argv[4]));
	if (argc >= 4 && !strcmp(argv[1], "rx"))
		return rx(argv[2], atoi(argv[3]));
	if (argc >= 5 && !strcmp(argv[1], "inject"))
		return inject(argv[2], atol(argv[3]), (unsigned)atoi(argv[4]));
	if (argc >= 3 && !strcmp(argv[1], "uds-read"))
		return uds_read(argv[2]);
	if (argc >= 5 && !strcmp(argv[1], "uds-write"))
		return uds_write(argv[2], argv[3], atoll(argv[4]));
	if (argc >= 3 && !strcmp(argv[1], "pair"))
		return pair(atoll(argv[2]));
	fprintf(stderr, "usage: netref tx|rx|inject|uds-read|uds-write|pair ...\n");
	return 2;
}
