/*
 * kvmpy-example: the SMP benchmark's workload (kvmpy bench smp): a fixed amount of CPL3
 * compute, 256 chunks handed out to every vCPU as they come (so an over-committed vCPU that
 * the host runs less takes fewer), checked against a known answer.
 * kvmpy-modes: long-user
 * kvmpy-vcpus: 2
 */
#include <kvmpy.h>
#include <kvmpy/smp.h>

#define CHUNKS 256
#define STEPS (1u << 17)

static uint64_t results[CHUNKS];
static volatile uint32_t next_chunk;
static volatile uint32_t chunks_by_cpu[KVMPY_SMP_MAX_CPUS];

static uint64_t mix(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ULL;
	return x ^ (x >> 33);
}

static void worker(void *arg)
{
	(void)arg;
	uint32_t me = smp_cpu_id();
	for (;;) {
		uint32_t c = __atomic_fetch_add(&next_chunk, 1, __ATOMIC_RELAXED);
		if (c >= CHUNKS)
			break;
		uint64_t x = c;
		for (uint32_t i = 0; i < STEPS; i++)
			x = mix(x + i);
		results[c] = x;
		chunks_by_cpu[me]++;
	}
}

int main(void)
{
	uint32_t n = smp_num_cpus();
	uint64_t t0 = rdtsc();
	smp_run_all(worker, 0);
	uint64_t t1 = rdtsc();
	uint64_t all = 0;
	for (uint32_t c = 0; c < CHUNKS; c++)
		all ^= results[c];
	kv_printf("smp-bench: %u vCPUs, %lu ticks, result %08x%08x, chunks", n,
		  (unsigned long)(t1 - t0), (uint32_t)(all >> 32), (uint32_t)all);
	for (uint32_t i = 0; i < n; i++)
		kv_printf(" %u", chunks_by_cpu[i]);
	kv_printf("\n");
	return 0;
}
