/*
 * kvmpy-example: the lock-holder preemption workload (kvmpy lab lhp; docs/lhp.md): every vCPU
 * takes a spinlock, updates a shared counter in a critical section of tunable length, releases
 * it and "thinks" for a tunable time, until the VMM sets lhp_control.stop (or each CPU has
 * done lhp_control.rounds critical sections). Exit code 0 when the counter is exact.
 * kvmpy-modes: long-user long
 * kvmpy-vcpus: 4
 */
#include <kvmpy.h>
#include <kvmpy/smp.h>
#include <kvmpy/spinlock.h>

enum { LHP_TICKET = 0, LHP_PV = 1, LHP_PVTICKET = 2, LHP_CALIBRATE = 3 };

/* Written by the VMM before the run (kvmpy.lab.lhp), read by the guest. */
struct lhp_control {
	uint32_t lock;          /* LHP_TICKET, LHP_PV or LHP_PVTICKET; LHP_CALIBRATE: CPU 0
				 * times `rounds` hypercalls (cs_cycles: their TSC cycles) */
	uint32_t cs_iters;      /* work inside the critical section */
	uint32_t think_iters;   /* work between two critical sections */
	volatile uint32_t stop; /* the VMM sets it to end the run */
	uint64_t rounds;        /* critical sections per CPU; 0: until stop */
	uint64_t lhp_gap;       /* a critical section longer than this many TSC cycles lost its
				 * CPU: a lock-holder preemption */
};
volatile struct lhp_control lhp_control = {LHP_TICKET, 200, 2000, 0, 0, 1ull << 62};

/* Per CPU, read by the VMM while the guest runs. */
struct lhp_cpu {
	volatile uint64_t done;     /* critical sections */
	volatile uint64_t lhp;      /* of which the holder lost its CPU inside */
	volatile uint64_t cs_cycles;
	uint64_t pad[5];
};
__attribute__((aligned(64))) struct lhp_cpu lhp_cpus[KVMPY_SMP_MAX_CPUS];

static kv_ticketlock_t ticket = KV_TICKETLOCK_INIT;
static kv_pvlock_t pv = KV_PVLOCK_INIT;
static kv_pvticket_t pvticket = KV_PVTICKET_INIT;
static volatile uint64_t counter;

static inline void work(uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		__asm__ volatile("" ::: "memory");
}

static void worker(void *arg)
{
	(void)arg;
	struct lhp_cpu *me = &lhp_cpus[smp_cpu_id()];
	uint32_t lock = lhp_control.lock, cs = lhp_control.cs_iters, think = lhp_control.think_iters;
	uint64_t rounds = lhp_control.rounds, gap = lhp_control.lhp_gap;
	while (!lhp_control.stop && (!rounds || me->done < rounds)) {
		if (lock == LHP_PV)
			kv_pv_lock(&pv);
		else if (lock == LHP_PVTICKET)
			kv_pvticket_lock(&pvticket);
		else
			kv_ticket_lock(&ticket);
		uint64_t t0 = rdtsc();
		/* Read, work, write: without mutual exclusion, updates get lost. */
		uint64_t c = counter;
		work(cs);
		counter = c + 1;
		uint64_t dt = rdtsc() - t0;
		if (lock == LHP_PV)
			kv_pv_unlock(&pv);
		else if (lock == LHP_PVTICKET)
			kv_pvticket_unlock(&pvticket);
		else
			kv_ticket_unlock(&ticket);
		me->cs_cycles += dt;
		if (dt > gap)
			me->lhp++;
		me->done++;
		work(think);
	}
}

/* What one exit to the VMM costs this guest: the price of sleeping in vcpu_wait. */
static void calibrate(void)
{
	uint64_t rounds = lhp_control.rounds ? lhp_control.rounds : 100;
	uint64_t t0 = rdtsc();
	for (uint64_t i = 0; i < rounds; i++)
		hc_num_exits();
	lhp_cpus[0].cs_cycles = rdtsc() - t0;
	lhp_cpus[0].done = rounds;
}

int main(void)
{
	uint32_t n = smp_num_cpus();
	if (lhp_control.lock == LHP_CALIBRATE) {
		calibrate();
		return 0;
	}
	smp_run_all(worker, 0);
	uint64_t total = 0, lhp = 0;
	for (uint32_t i = 0; i < n; i++) {
		total += lhp_cpus[i].done;
		lhp += lhp_cpus[i].lhp;
	}
	int ok = counter == total;
	kv_printf("lhp: %u vCPUs, lock %u: counter %lu of %lu, %lu holder preemptions\n", n,
		  lhp_control.lock, (unsigned long)counter, (unsigned long)total,
		  (unsigned long)lhp);
	kv_printf("lhp: %s\n", ok ? "OK" : "MISMATCH");
	return ok ? 0 : 1;
}
