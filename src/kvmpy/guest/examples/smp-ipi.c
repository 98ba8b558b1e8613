/*
 * kvmpy-example: IPI ping-pong between CPU 0 and CPU 1 through the in-kernel LAPIC in x2APIC
 * mode (kvmpy run smp-ipi --vcpus 2): no exit to the VMM per IPI. Prints the round trip in TSC
 * ticks and the VMM exits the ping-pong took.
 * kvmpy-modes: long-user long
 * kvmpy-vcpus: 2
 */
#include <kvmpy.h>
#include <kvmpy/smp.h>

#define ROUNDS 2000

static volatile uint32_t ready, done;
static volatile long exits_cpu1;
static uint64_t best = ~0ULL, total;

/* CPU 1: answer every IPI with one back, sleeping in between. */
static void pong(void *arg)
{
	(void)arg;
	long e0 = hc_num_exits();
	uint64_t seen = smp_ipis();
	ready = 1;
	for (uint32_t r = 0; r < ROUNDS; r++) {
		while (smp_ipis() == seen)
			smp_wait_ipi(seen);
		seen = smp_ipis();
		smp_send_ipi(0);
	}
	exits_cpu1 = hc_num_exits() - e0 - 1;
	done = 1;
}

int main(void)
{
	if (smp_num_cpus() < 2) {
		kv_printf("smp-ipi needs 2 vCPUs: kvmpy run smp-ipi --vcpus 2\n");
		return 2;
	}
	smp_start(1, pong, 0);
	while (!ready)
		smp_relax();
	long e0 = hc_num_exits();
	uint64_t seen = smp_ipis();
	for (uint32_t r = 0; r < ROUNDS; r++) {
		uint64_t t0 = rdtsc();
		smp_send_ipi(1);
		/* Spin (no sleep) on this side: the round trip is then the IPIs' own cost. */
		while (smp_ipis() == seen)
			smp_relax();
		seen = smp_ipis();
		uint64_t dt = rdtsc() - t0;
		total += dt;
		if (dt < best)
			best = dt;
	}
	long exits_cpu0 = hc_num_exits() - e0 - 1;
	smp_wait(1ULL << 1);
	kv_printf("smp-ipi: %u round trips, mean %lu ticks, best %lu ticks\n", ROUNDS,
		  (unsigned long)(total / ROUNDS), (unsigned long)best);
	kv_printf("exits during the ping-pong: cpu0 %ld, cpu1 %ld\n", exits_cpu0, exits_cpu1);
	return done ? 0 : 1;
}
