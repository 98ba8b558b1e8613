/*
 * Same-run references for `kvmpy ipc` and `kvmpy lab ipc` (built with gcc -O2 on first use).
 *
 *   ipcref memcpy SIZE RUNS CPU      host memcpy of SIZE bytes, buffers touched beforehand;
 *                                    prints {"ns": [one value per run]}, each the time of one
 *                                    memcpy (small sizes: the mean of a batch of >= 1 ms)
 *   ipcref eventfd ROUNDS RUNS CPU0 CPU1
 *                                    two threads on CPU0 and CPU1 bounce a token through two
 *                                    eventfds; prints {"ns": [mean round trip of each run]}
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void pin(int cpu)
{
	if (cpu < 0)
		return;
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	sched_setaffinity(0, sizeof set, &set);
}

static int do_memcpy(size_t size, int runs, int cpu)
{
	pin(cpu);
	unsigned char *src = malloc(size), *dst = malloc(size);
	if (!src || !dst) {
		fprintf(stderr, "ipcref: cannot allocate 2 x %zu bytes\n", size);
		return 1;
	}
	memset(src, 0x5a, size);
	memset(dst, 0xa5, size);
	/* Enough copies per run that the clock's resolution and call overhead vanish. */
	size_t batch = size >= (1u << 20) ? 1 : ((size_t)1 << 20) / size;
	memcpy(dst, src, size);
	printf("{\"ns\": [");
	for (int r = 0; r < runs; r++) {
		uint64_t t0 = now_ns();
		for (size_t i = 0; i < batch; i++) {
			memcpy(dst, src, size);
			__asm__ volatile("" : : "r"(dst) : "memory");
		}
		uint64_t t1 = now_ns();
		printf("%s%.1f", r ? ", " : "", (double)(t1 - t0) / (double)batch);
	}
	printf("], \"batch\": %zu, \"check\": %d}\n", batch, dst[size - 1]);
	return 0;
}

struct pong {
	int ping, pong, rounds, cpu;
};

static void *ponger(void *arg)
{
	struct pong *p = arg;
	pin(p->cpu);
	uint64_t v;
	for (int i = 0; i < p->rounds; i++) {
		if (read(p->ping, &v, 8) != 8)
			break;
		v = 1;
		if (write(p->pong, &v, 8) != 8)
			break;
	}
	return NULL;
}

static int do_eventfd(int rounds, int runs, int cpu0, int cpu1)
{
	printf("{\"ns\": [");
	for (int r = 0; r < runs; r++) {
		struct pong p = {eventfd(0, 0), eventfd(0, 0), rounds, cpu1};
		pthread_t t;
		pin(cpu0);
		pthread_create(&t, NULL, ponger, &p);
		uint64_t v = 1;
		/* One round to let the thread start. */
		write(p.ping, &v, 8);
		read(p.pong, &v, 8);
		uint64_t t0 = now_ns();
		for (int i = 1; i < rounds; i++) {
			v = 1;
			if (write(p.ping, &v, 8) != 8 || read(p.pong, &v, 8) != 8)
				return 1;
		}
		uint64_t t1 = now_ns();
		pthread_join(t, NULL);
		close(p.ping);
		close(p.pong);
		printf("%s%.1f", r ? ", " : "", (double)(t1 - t0) / (rounds - 1));
	}
	printf("]}\n");
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 5 && !strcmp(argv[1], "memcpy"))
		return do_memcpy(strtoull(argv[2], 0, 0), atoi(argv[3]), atoi(argv[4]));
	if (argc >= 6 && !strcmp(argv[1], "eventfd"))
		return do_eventfd(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
	fprintf(stderr, "usage: ipcref memcpy SIZE RUNS CPU | eventfd ROUNDS RUNS CPU0 CPU1\n");
	return 2;
}
