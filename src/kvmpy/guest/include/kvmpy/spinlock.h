/*
 * kvmpy/spinlock.h: spinlocks for SMP guests whose vCPUs the host may deschedule (docs/lhp.md,
 * docs/sdk.md, the hypercalls in docs/abi.md).
 *
 * When a vCPU that holds a spinlock loses its host CPU, the others spin on the lock for the
 * rest of their time slices (lock-holder preemption); with a FIFO ticket lock it is enough for
 * the *next* ticket's vCPU to be descheduled (lock-waiter preemption). Three locks:
 *
 *   kv_ticket_lock    the naive ticket lock: FIFO, spins without end.
 *   kv_pvticket_lock  a paravirtual ticket lock (Linux's pv ticketlocks of 2013): a waiter
 *                     spins for kv_spin_config.spin_limit TSC cycles, then sleeps in the VMM
 *                     (vcpu_wait); the unlock kicks the vCPU holding the next ticket
 *                     (vcpu_kick). Still FIFO, so every hand-over waits for that vCPU to run.
 *   kv_pv_lock        a paravirtual test-and-set lock: the same bounded spin and sleep, but the
 *                     lock goes to whoever takes it first (no hand-over to a descheduled
 *                     waiter, as Linux allows lock stealing under a hypervisor); an unlock
 *                     kicks one sleeper, and not another until that one has run. With
 *                     kv_spin_config.yield_to_holder, a waiter that sees the holder marked
 *                     preempted gives its CPU to it at once (vcpu_yield naming the holder: a
 *                     directed yield, where the host's scheduler supports it).
 *
 * kv_pv_lock and kv_pvticket_lock announce the holder: the CPU's `locks_held` word counts the
 * locks it holds, so a scheduler can avoid preempting it (kvmpy sched's holder grace), and
 * when the scheduler stretched its slice for that reason (`yield_pending`), the last unlock
 * gives the CPU back (vcpu_yield). Per-CPU statistics are in kv_spin_stats[] (the VMM reads
 * them through the ELF symbol, no exit). Every lock uses smp_cpu_id(): one load through %gs.
 *
 * The hypercalls work in every kvmpy mode and at CPL3; each is one exit to the VMM (about
 * 70 us from CPL3 on a software-virtualizing host such as KVM-PVM, 1-2 us on VT-x/AMD-V), so
 * spin_limit is the break-even: spin about as long as sleeping and waking costs.
 */
#ifndef KVMPY_SPINLOCK_H
#define KVMPY_SPINLOCK_H

#include <kvmpy.h>
#include <kvmpy/smp.h>

#define KVMPY_HC_VCPU_WAIT 10
#define KVMPY_HC_VCPU_KICK 11
#define KVMPY_HC_VCPU_YIELD 12
#define KVMPY_YIELD_ANY 0xFFFFFFFFu
#define KVMPY_EAGAIN 11

/* --- the hypercalls -------------------------------------------------------------------------- */

/* Sleep in the VMM until another vCPU kicks this one; returns at once (0) if a kick came
 * since the last wait, or (-EAGAIN) if the u32 at `addr` no longer holds `expected` (addr may
 * be 0: no check). -EINVAL: misaligned addr; -EFAULT: addr not mapped. A wait may also end for
 * no reason: check the condition again. */
static inline long kv_vcpu_wait(const volatile uint32_t *addr, uint32_t expected)
{
	return kvmpy_hypercall(KVMPY_HC_VCPU_WAIT, (unsigned long)addr, expected, 0, 0);
}

/* Wake vCPU `cpu` from its wait, or make its next wait return at once. 0 or -EINVAL. */
static inline long kv_vcpu_kick(uint32_t cpu)
{
	return kvmpy_hypercall(KVMPY_HC_VCPU_KICK, cpu, 0, 0, 0);
}

/* Give up the host CPU, to vCPU `cpu` if the scheduler can (KVMPY_YIELD_ANY: to anyone).
 * 0, or -EINVAL (no such vCPU, or the caller). */
static inline long kv_vcpu_yield(uint32_t cpu)
{
	return kvmpy_hypercall(KVMPY_HC_VCPU_YIELD, cpu, 0, 0, 0);
}

/* --- configuration and statistics ------------------------------------------------------------ */

struct kv_spin_config {
	uint64_t spin_limit;      /* TSC cycles a pv waiter spins before it sleeps */
	uint64_t gap;             /* a TSC step above this while spinning: the vCPU was off
				   * its CPU (counted in gap_cycles, not spin_cycles); 0: none */
	uint32_t yield_to_holder; /* kv_pv_lock: directed yield to a preempted holder */
	uint32_t reserved;
};

/* One per CPU, one cache line each. */
struct kv_spin_stats {
	uint64_t acquires;         /* locks taken */
	uint64_t contended;        /* of which the first attempt failed */
	uint64_t spin_cycles;      /* TSC cycles spent spinning on a lock */
	uint64_t gap_cycles;       /* TSC cycles this vCPU was off its CPU while spinning */
	uint64_t waits;            /* vcpu_wait calls */
	uint64_t kicks;            /* vcpu_kick calls */
	uint64_t yields;           /* vcpu_yield calls */
	uint64_t holder_preempted; /* times a waiter saw the holder marked preempted */
};
_Static_assert(sizeof(struct kv_spin_stats) == 64, "one cache line");

/* Weak: one copy per image however many files include this header. */
__attribute__((weak)) struct kv_spin_config kv_spin_config = {1u << 16, 0, 0, 0};
__attribute__((weak, aligned(64))) struct kv_spin_stats kv_spin_stats[KVMPY_SMP_MAX_CPUS];

static inline uint64_t kv__spin_step(struct kv_spin_stats *st, uint64_t *last)
{
	uint64_t now = rdtsc(), d = now - *last;
	*last = now;
	if (kv_spin_config.gap && d > kv_spin_config.gap)
		st->gap_cycles += d;
	else
		st->spin_cycles += d;
	return now;
}

/* --- the lock-holder announcement ------------------------------------------------------------- */

static inline void kv_holder_enter(void)
{
	__asm__ volatile("incl %%gs:224" ::: "memory");
}

static inline void kv_holder_exit(void)
{
	__asm__ volatile("decl %%gs:224" ::: "memory");
	struct kvmpy_cpu *c = smp_this_cpu();
	if (c->locks_held == 0 && c->yield_pending) {
		c->yield_pending = 0;
		kv_spin_stats[c->id].yields++;
		kv_vcpu_yield(KVMPY_YIELD_ANY);
	}
}

/* Whether kvmpy's scheduler has descheduled vCPU `cpu` while it could run. */
static inline int kv_cpu_preempted(uint32_t cpu)
{
	return cpu < smp_num_cpus() && smp_cpu(cpu)->preempted;
}

/* --- the naive ticket lock ------------------------------------------------------------------- */

typedef struct {
	volatile uint32_t next, owner;
} kv_ticketlock_t;
#define KV_TICKETLOCK_INIT {0, 0}

static inline void kv_ticket_lock(kv_ticketlock_t *l)
{
	struct kv_spin_stats *st = &kv_spin_stats[smp_cpu_id()];
	uint32_t ticket = __atomic_fetch_add(&l->next, 1, __ATOMIC_RELAXED);
	st->acquires++;
	if (__atomic_load_n(&l->owner, __ATOMIC_ACQUIRE) == ticket)
		return;
	st->contended++;
	uint64_t last = rdtsc();
	while (__atomic_load_n(&l->owner, __ATOMIC_ACQUIRE) != ticket) {
		smp_relax();
		kv__spin_step(st, &last);
	}
}

static inline void kv_ticket_unlock(kv_ticketlock_t *l)
{
	__atomic_store_n(&l->owner, l->owner + 1, __ATOMIC_RELEASE);
}

/* --- the paravirtual ticket lock ---------------------------------------------------------------- */

typedef struct {
	volatile uint32_t next, owner;
	volatile uint32_t sleepers; /* bit i: CPU i sleeps (or is about to) in the VMM */
	uint32_t pad;
} kv_pvticket_t;
#define KV_PVTICKET_INIT {0, 0, 0, 0}

/* The ticket each sleeping CPU waits for. */
__attribute__((weak)) volatile uint32_t kv__pvticket_want[KVMPY_SMP_MAX_CPUS];

static inline void kv_pvticket_lock(kv_pvticket_t *l)
{
	uint32_t me = smp_cpu_id();
	struct kv_spin_stats *st = &kv_spin_stats[me];
	uint32_t ticket = __atomic_fetch_add(&l->next, 1, __ATOMIC_RELAXED);
	st->acquires++;
	if (__atomic_load_n(&l->owner, __ATOMIC_ACQUIRE) != ticket) {
		st->contended++;
		for (;;) {
			uint64_t start = rdtsc(), last = start;
			while (__atomic_load_n(&l->owner, __ATOMIC_ACQUIRE) != ticket) {
				smp_relax();
				if (kv__spin_step(st, &last) - start >= kv_spin_config.spin_limit)
					break;
			}
			if (__atomic_load_n(&l->owner, __ATOMIC_ACQUIRE) == ticket)
				break;
			kv__pvticket_want[me] = ticket;
			__atomic_fetch_or(&l->sleepers, 1u << me, __ATOMIC_SEQ_CST);
			uint32_t owner = __atomic_load_n(&l->owner, __ATOMIC_SEQ_CST);
			if (owner != ticket) {
				st->waits++;
				kv_vcpu_wait(&l->owner, owner);
			}
			__atomic_fetch_and(&l->sleepers, ~(1u << me), __ATOMIC_SEQ_CST);
			if (__atomic_load_n(&l->owner, __ATOMIC_ACQUIRE) == ticket)
				break;
		}
	}
	kv_holder_enter();
}

static inline void kv_pvticket_unlock(kv_pvticket_t *l)
{
	uint32_t next = l->owner + 1;
	__atomic_store_n(&l->owner, next, __ATOMIC_SEQ_CST);
	uint32_t s = __atomic_load_n(&l->sleepers, __ATOMIC_SEQ_CST);
	for (uint32_t cpu = 0; s; cpu++, s >>= 1) {
		if ((s & 1) && kv__pvticket_want[cpu] == next) {
			kv_spin_stats[smp_cpu_id()].kicks++;
			kv_vcpu_kick(cpu);
			break;
		}
	}
	kv_holder_exit();
}

/* --- the paravirtual test-and-set lock ---------------------------------------------------------- */

typedef struct {
	volatile uint32_t locked;   /* 0: free; else the holder's CPU + 1 */
	volatile uint32_t sleepers; /* bit i: CPU i sleeps (or is about to) in the VMM */
	volatile uint32_t kicked;   /* a kicked sleeper that has not run yet: its CPU + 1 */
	uint32_t pad;
} kv_pvlock_t;
#define KV_PVLOCK_INIT {0, 0, 0, 0}

static inline int kv__pv_try(kv_pvlock_t *l, uint32_t me)
{
	uint32_t free = 0;
	return __atomic_compare_exchange_n(&l->locked, &free, me + 1, 0, __ATOMIC_ACQUIRE,
					   __ATOMIC_RELAXED);
}

static inline void kv_pv_lock(kv_pvlock_t *l)
{
	uint32_t me = smp_cpu_id();
	struct kv_spin_stats *st = &kv_spin_stats[me];
	st->acquires++;
	if (kv__pv_try(l, me))
		goto got;
	st->contended++;
	for (;;) {
		uint64_t start = rdtsc(), last = start;
		for (;;) {
			uint32_t holder = l->locked;
			if (holder == 0) {
				if (kv__pv_try(l, me))
					goto got;
			} else if (kv_spin_config.yield_to_holder && kv_cpu_preempted(holder - 1)) {
				/* Spinning is useless until the holder runs: run it now. */
				st->holder_preempted++;
				st->yields++;
				kv_vcpu_yield(holder - 1);
				start = last = rdtsc();
				continue;
			}
			smp_relax();
			if (kv__spin_step(st, &last) - start >= kv_spin_config.spin_limit)
				break;
		}
		/* Sleep until an unlock kicks this CPU; the check after registering as a sleeper
		 * (and the VMM's own check of `locked`) means no unlock goes unseen. */
		__atomic_fetch_or(&l->sleepers, 1u << me, __ATOMIC_SEQ_CST);
		uint32_t holder = __atomic_load_n(&l->locked, __ATOMIC_SEQ_CST);
		if (holder != 0) {
			st->waits++;
			kv_vcpu_wait(&l->locked, holder);
		}
		__atomic_fetch_and(&l->sleepers, ~(1u << me), __ATOMIC_SEQ_CST);
		/* This CPU runs again: the next unlock may kick another sleeper. */
		uint32_t mine = me + 1;
		__atomic_compare_exchange_n(&l->kicked, &mine, 0, 0, __ATOMIC_SEQ_CST,
					    __ATOMIC_RELAXED);
		if (kv__pv_try(l, me))
			goto got;
	}
got:
	kv_holder_enter();
}

static inline void kv_pv_unlock(kv_pvlock_t *l)
{
	uint32_t me = smp_cpu_id();
	__atomic_store_n(&l->locked, 0, __ATOMIC_SEQ_CST);
	uint32_t s = __atomic_load_n(&l->sleepers, __ATOMIC_SEQ_CST);
	if (s && __atomic_load_n(&l->kicked, __ATOMIC_RELAXED) == 0) {
		/* The next sleeper after this CPU, round robin, so none is passed over. */
		uint32_t n = smp_num_cpus(), w = me;
		for (uint32_t i = 1; i <= n; i++) {
			uint32_t c = (me + i) % n;
			if (s & (1u << c)) {
				w = c;
				break;
			}
		}
		uint32_t none = 0;
		if (w != me && __atomic_compare_exchange_n(&l->kicked, &none, w + 1, 0,
							   __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
			kv_spin_stats[me].kicks++;
			kv_vcpu_kick(w);
		}
	}
	kv_holder_exit();
}

#endif
