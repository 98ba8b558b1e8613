/*
 * kvmpy-example: a long deterministic SMP computation (kvmpy run smp-chain --vcpus 4): every
 * step, each vCPU advances its own hash chain; CPU 0 prints the combined state. The output
 * depends only on the vCPU count, never on timing, so a snapshot or migration taken anywhere
 * must give output identical to an uninterrupted run.
 * kvmpy-modes: long-user long
 * kvmpy-vcpus: 2
 */
#include <kvmpy.h>
#include <kvmpy/smp.h>

#define STEPS 500
#define WORK (1u << 17)

struct lane {
	uint64_t x;
	uint64_t pad[7]; /* one cache line per CPU */
};
static struct lane lanes[KVMPY_SMP_MAX_CPUS];

static uint64_t mix(uint64_t x)
{
	x ^= x >> 31;
	x *= 0x7fb5d329728ea185ULL;
	x ^= x >> 27;
	x *= 0x81dadef4bc2dd44dULL;
	return x ^ (x >> 33);
}

static void step(void *arg)
{
	uint32_t s = (uint32_t)(unsigned long)arg, me = smp_cpu_id();
	uint64_t x = lanes[me].x;
	for (uint32_t i = 0; i < WORK; i++)
		x = mix(x + i + s);
	lanes[me].x = x;
}

int main(void)
{
	uint32_t n = smp_num_cpus();
	for (uint32_t i = 0; i < n; i++)
		lanes[i].x = 0x243f6a8885a308d3ULL * (i + 1);
	kv_printf("smp-chain: %u vCPUs, %u steps\n", n, STEPS);
	for (uint32_t s = 1; s <= STEPS; s++) {
		smp_run_all(step, (void *)(unsigned long)s);
		uint64_t all = 0;
		for (uint32_t i = 0; i < n; i++)
			all ^= mix(lanes[i].x + i);
		kv_printf("step %u state %08x%08x\n", s, (uint32_t)(all >> 32), (uint32_t)all);
	}
	kv_printf("smp-chain: done\n");
	return 0;
}
