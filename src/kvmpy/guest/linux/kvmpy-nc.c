/* kvmpy-nc: a netcat for busybox guests. Busybox has no AF_VSOCK tool, and its nc moves data
 * in small reads and writes, each a system call, which on a software-KVM host is a VMM round
 * trip: 10 MiB host -> guest took 144 s through busybox nc there, 56 s with this tool's
 * 256 KiB buffers (guest -> host: 210 s and 122 s; the rest is the guest's TCP stack, emulated
 * ring-0 code).
 *
 *   kvmpy-nc connect CID PORT   vsock: stdin -> the connection, the connection -> stdout
 *   kvmpy-nc listen PORT        vsock: the same for the first connection to PORT
 *   kvmpy-nc echo PORT [N]      vsock: send back what each connection sends, N connections
 *                               (0: forever), one after another
 *   kvmpy-nc tcp IPV4 PORT      TCP: like connect
 *
 * The end of stdin shuts down the sending side (the peer sees end of file); the program ends
 * when the peer closes. Built static by kvmpy (kvmpy.boot.tools) and put into an initramfs
 * with 'kvmpy initramfs --tools'; docs/virtio.md.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <linux/vm_sockets.h>

static void die(const char *what)
{
	fprintf(stderr, "kvmpy-nc: %s: %s\n", what, strerror(errno));
	exit(1);
}

static unsigned parse(const char *s, const char *what)
{
	char *end;
	unsigned long v = strtoul(s, &end, 0);
	if (!*s || *end || v > 0xffffffffUL) {
		fprintf(stderr, "kvmpy-nc: bad %s: %s\n", what, s);
		exit(2);
	}
	return (unsigned)v;
}

static int write_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

static char buf[256 * 1024];

/* stdin -> s, s -> stdout, until the peer closes. */
static void relay(int s)
{
	struct pollfd p[2] = { { .fd = 0, .events = POLLIN }, { .fd = s, .events = POLLIN } };
	for (;;) {
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (p[1].revents) {
			ssize_t n = read(s, buf, sizeof buf);
			if (n < 0)
				die("read");
			if (n == 0)
				return;
			if (write_all(1, buf, (size_t)n) < 0)
				die("write stdout");
		}
		if (p[0].revents) {
			ssize_t n = read(0, buf, sizeof buf);
			if (n <= 0) {
				shutdown(s, SHUT_WR);
				p[0].fd = -1; /* poll ignores it from now on */
			} else if (write_all(s, buf, (size_t)n) < 0) {
				die("write");
			}
		}
	}
}

static int listener(unsigned port)
{
	struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY,
				 .svm_port = port };
	int s = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (s < 0)
		die("socket");
	if (bind(s, (struct sockaddr *)&a, sizeof a) < 0)
		die("bind");
	if (listen(s, 8) < 0)
		die("listen");
	return s;
}

int main(int argc, char **argv)
{
	if (argc == 4 && !strcmp(argv[1], "connect")) {
		struct sockaddr_vm a = { .svm_family = AF_VSOCK,
					 .svm_cid = parse(argv[2], "CID"),
					 .svm_port = parse(argv[3], "port") };
		int s = socket(AF_VSOCK, SOCK_STREAM, 0);
		if (s < 0)
			die("socket");
		if (connect(s, (struct sockaddr *)&a, sizeof a) < 0)
			die("connect");
		relay(s);
		return 0;
	}
	if (argc == 4 && !strcmp(argv[1], "tcp")) {
		struct sockaddr_in a = { .sin_family = AF_INET,
					 .sin_port = htons((unsigned short)parse(argv[3], "port")) };
		if (inet_pton(AF_INET, argv[2], &a.sin_addr) != 1) {
			fprintf(stderr, "kvmpy-nc: bad IPv4 address: %s\n", argv[2]);
			return 2;
		}
		int s = socket(AF_INET, SOCK_STREAM, 0);
		if (s < 0)
			die("socket");
		if (connect(s, (struct sockaddr *)&a, sizeof a) < 0)
			die("connect");
		relay(s);
		return 0;
	}
	if (argc == 3 && !strcmp(argv[1], "listen")) {
		int l = listener(parse(argv[2], "port"));
		int s = accept(l, NULL, NULL);
		if (s < 0)
			die("accept");
		close(l);
		relay(s);
		return 0;
	}
	if ((argc == 3 || argc == 4) && !strcmp(argv[1], "echo")) {
		int l = listener(parse(argv[2], "port"));
		unsigned count = argc == 4 ? parse(argv[3], "count") : 0;
		for (unsigned i = 0; count == 0 || i < count; i++) {
			int s = accept(l, NULL, NULL);
			if (s < 0)
				die("accept");
			for (;;) {
				ssize_t n = read(s, buf, sizeof buf);
				if (n < 0)
					die("read");
				if (n == 0)
					break;
				if (write_all(s, buf, (size_t)n) < 0)
					die("write");
			}
			close(s);
		}
		return 0;
	}
	fprintf(stderr, "usage: kvmpy-nc connect CID PORT | listen PORT | echo PORT [N] | tcp IPV4 PORT\n");
	return 2;
}
