/*
 * The references `kvmpy bench persist` compares snapshot, restore and migration with: the same
 * bytes moved by the plainest C code, in the same run.
 *
 *   persist_ref write FILE BYTES  write BYTES of non-zero data to FILE sequentially, fsync
 *   persist_ref read FILE         read every data extent of the sparse FILE (SEEK_DATA) into a
 *                                 fresh shared anonymous mapping as large as the file
 *   persist_ref tcp BYTES         send BYTES over a loopback TCP connection to a child that
 *                                 receives them into a fresh mapping and acknowledges
 *
 * Each prints one line: "<nanoseconds> <bytes>".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BLOCK (1 << 20)

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static void *fresh(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (p == MAP_FAILED)
		die("mmap");
	return p;
}

static int do_write(const char *path, uint64_t bytes)
{
	char *buf = malloc(BLOCK);
	if (!buf)
		die("malloc");
	memset(buf, 0xA5, BLOCK);
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0)
		die("open");
	uint64_t t0 = now_ns(), done = 0;
	while (done < bytes) {
		size_t n = bytes - done < BLOCK ? bytes - done : BLOCK;
		ssize_t w = write(fd, buf, n);
		if (w <= 0)
			die("write");
		done += w;
	}
	if (fsync(fd))
		die("fsync");
	uint64_t t1 = now_ns();
	close(fd);
	printf("%llu %llu\n", (unsigned long long)(t1 - t0), (unsigned long long)done);
	return 0;
}

static int do_read(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		die("open");
	struct stat st;
	if (fstat(fd, &st))
		die("fstat");
	uint64_t t0 = now_ns(), total = 0;
	char *mem = fresh(st.st_size);
	off_t pos = 0;
	for (;;) {
		off_t data = lseek(fd, pos, SEEK_DATA);
		if (data < 0)
			break;
		off_t hole = lseek(fd, data, SEEK_HOLE);
		for (off_t at = data; at < hole;) {
			ssize_t r = pread(fd, mem + at, hole - at, at);
			if (r <= 0)
				die("pread");
			at += r;
			total += r;
		}
		pos = hole;
	}
	uint64_t t1 = now_ns();
	printf("%llu %llu\n", (unsigned long long)(t1 - t0), (unsigned long long)total);
	return 0;
}

static int do_tcp(uint64_t bytes)
{
	int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t alen = sizeof a;
	if (ls < 0 || bind(ls, (void *)&a, sizeof a) || listen(ls, 1) ||
	    getsockname(ls, (void *)&a, &alen))
		die("listen");
	pid_t pid = fork();
	if (pid < 0)
		die("fork");
	if (pid == 0) {
		int c = accept(ls, NULL, NULL);
		char *mem = fresh(bytes);
		uint64_t got = 0;
		while (got < bytes) {
			ssize_t r = recv(c, mem + got, bytes - got, 0);
			if (r <= 0)
				_exit(1);
			got += r;
		}
		char ack = 1;
		_exit(send(c, &ack, 1, 0) == 1 ? 0 : 1);
	}
	close(ls);
	char *buf = malloc(BLOCK);
	if (!buf)
		die("malloc");
	memset(buf, 0x5A, BLOCK);
	int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	int one = 1;
	setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	if (connect(s, (void *)&a, sizeof a))
		die("connect");
	uint64_t t0 = now_ns(), sent = 0;
	while (sent < bytes) {
		size_t n = bytes - sent < BLOCK ? bytes - sent : BLOCK;
		ssize_t w = send(s, buf, n, 0);
		if (w <= 0)
			die("send");
		sent += w;
	}
	char ack;
	if (recv(s, &ack, 1, 0) != 1)
		die("ack");
	uint64_t t1 = now_ns();
	int status;
	waitpid(pid, &status, 0);
	printf("%llu %llu\n", (unsigned long long)(t1 - t0), (unsigned long long)sent);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 4 && !strcmp(argv[1], "write"))
		return do_write(argv[2], strtoull(argv[3], NULL, 10));
	if (argc == 3 && !strcmp(argv[1], "read"))
		return do_read(argv[2]);
	if (argc == 3 && !strcmp(argv[1], "tcp"))
		return do_tcp(strtoull(argv[2], NULL, 10));
	fprintf(stderr, "usage: persist_ref write FILE BYTES | read FILE | tcp BYTES\n");
	return 2;
}
