/*
 * The host reference of `kvmpy bench virtio`: pread or pwrite on the disk image, one request
 * at a time, the same sizes and offsets as the guest's jobs (sequential, or xorshift-random
 * with the same seed). Prints: total_ns requests mean_ns p99_ns
 *
 *   blkref FILE BLOCK_SIZE seq|rand read|write REQUESTS SEED
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
	if (argc != 7) {
		fprintf(stderr, "usage: %s FILE BLOCK_SIZE seq|rand read|write REQUESTS SEED\n", argv[0]);
		return 2;
	}
	size_t bs = strtoul(argv[2], 0, 10);
	int rnd = argv[3][0] == 'r', wr = argv[4][0] == 'w';
	uint64_t n = strtoull(argv[5], 0, 10), state = strtoull(argv[6], 0, 10) | 1;
	int fd = open(argv[1], wr ? O_RDWR : O_RDONLY);
	if (fd < 0) {
		perror(argv[1]);
		return 1;
	}
	off_t size = lseek(fd, 0, SEEK_END);
	uint64_t blocks = (uint64_t)size / bs;
	char *buf = aligned_alloc(4096, bs);
	uint64_t *lat = malloc(n * sizeof(*lat));
	if (!buf || !lat || !blocks)
		return 1;
	for (size_t i = 0; i < bs; i++)
		buf[i] = (char)i;
	uint64_t t0 = now_ns();
	for (uint64_t i = 0; i < n; i++) {
		uint64_t blk;
		if (rnd) {
			state ^= state << 13;
			state ^= state >> 7;
			state ^= state << 17;
			blk = state % blocks;
		} else {
			blk = i % blocks;
		}
		uint64_t s = now_ns();
		ssize_t r = wr ? pwrite(fd, buf, bs, (off_t)(blk * bs)) : pread(fd, buf, bs, (off_t)(blk * bs));
		if (r != (ssize_t)bs) {
			perror("io");
			return 1;
		}
		lat[i] = now_ns() - s;
	}
	uint64_t total = now_ns() - t0;
	qsort(lat, n, sizeof(*lat), cmp);
	uint64_t sum = 0;
	for (uint64_t i = 0; i < n; i++)
		sum += lat[i];
	printf("%llu %llu %llu %llu\n", (unsigned long long)total, (unsigned long long)n,
	       (unsigned long long)(sum / n), (unsigned long long)lat[(n * 99) / 100]);
	return 0;
}
