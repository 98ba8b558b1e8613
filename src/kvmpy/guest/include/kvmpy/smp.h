/*
 * kvmpy/smp.h: SMP for kvmpy guests (kvmpy run --vcpus N; docs/sdk.md).
 *
 * CPU 0 runs the image from its entry point; the other vCPUs wait, parked in the VMM, until
 * smp_start() hands one a function to run (a paravirtual start, like Xen's VCPUOP_up: there is
 * no real-mode INIT/SIPI dance in kvmpy's 32- and 64-bit modes). A started CPU runs fn(arg) on
 * its own stack and parks again when fn returns. smp_wait() blocks the caller in the VMM until
 * the given CPUs are parked: waiting costs no host CPU, which matters when vCPUs outnumber
 * host CPUs.
 *
 *   static void work(void *arg) { ... smp_cpu_id() ... }
 *   smp_run_all(work, &data);          // every CPU, this one included; returns when all did
 *
 * Each CPU finds its own `struct kvmpy_cpu` through its GS base (kvmpy sets it per vCPU):
 * smp_cpu_id() is one load, no exit. Spinlocks and barriers are plain shared memory.
 *
 * IPIs go through the in-kernel LAPIC in x2APIC mode (ICR: MSR 0x830, EOI: MSR 0x80B), so no
 * IPI leaves the kernel. `wrmsr` and `hlt` need ring 0: in long-user mode (CPL3) they run in
 * kvmpy_smp_gate, a ring-0 handler reached with `int3` (the one software interrupt that
 * reaches a DPL-3 gate on every host; `int n` from CPL3 raises #UD on KVM-PVM), which kvmpy
 * installs on vector 3 when the image has it. In the ring-0 modes the same instructions run
 * inline. An IPI lands in kvmpy_smp_ipi (vector KVMPY_SMP_IPI_VECTOR), which counts it in the
 * receiving CPU's block and signals end of interrupt. Both handlers are a few instructions:
 * ring-0 code is emulated on software hypervisors.
 *
 * Real mode has no SMP. A guest using smp.h cannot also use kvmpy/ipc.h's wait gate (both
 * need vector 3).
 */
#ifndef KVMPY_SMP_H
#define KVMPY_SMP_H

#include <kvmpy.h>

#if defined(KVMPY_CODE16)
#error "kvmpy/smp.h needs a 32- or 64-bit mode"
#endif

#define KVMPY_HC_CPU_START 7
#define KVMPY_HC_CPU_PARK 8
#define KVMPY_HC_CPU_WAIT 9
#define KVMPY_EBUSY 16

#define KVMPY_SMP_IPI_VECTOR 0xF0
#define KVMPY_SMP_MAX_CPUS 16

/* One per CPU, 256 bytes each, contiguous (mirrored in src/kvmpy/arch/x86/modes.py). */
struct kvmpy_cpu {
	uint32_t id, ncpus;            /* written by the VMM */
	uint64_t self;                 /* this block's address */
	volatile uint64_t ipis;        /* IPIs this CPU took (kvmpy_smp_ipi counts them) */
	volatile uint64_t ipi_tsc;     /* rdtsc when the last one arrived */
	uint64_t user[24];             /* the guest's own per-CPU data */
	/* Paravirtual scheduling (kvmpy/spinlock.h; docs/abi.md), read and written by the VMM
	 * only while this vCPU is out of the guest: */
	volatile uint32_t locks_held;  /* guest: spinlocks this CPU holds (the announcement) */
	volatile uint32_t yield_pending; /* VMM: your slice was stretched because you hold a
					  * lock: vcpu_yield once you release it, and clear this */
	volatile uint32_t preempted;   /* VMM: 1 while this vCPU could run but kvmpy's scheduler
					  * runs another (single-thread scheduler only; else 0) */
	uint32_t pv_reserved[5];
};
_Static_assert(sizeof(struct kvmpy_cpu) == 256, "ABI");
_Static_assert(__builtin_offsetof(struct kvmpy_cpu, locks_held) == 224, "ABI");

static inline uint32_t smp_cpu_id(void)
{
	uint32_t id;
	__asm__ volatile("movl %%gs:0, %0" : "=r"(id));
	return id;
}

static inline uint32_t smp_num_cpus(void)
{
	uint32_t n;
	__asm__ volatile("movl %%gs:4, %0" : "=r"(n));
	return n;
}

static inline struct kvmpy_cpu *smp_this_cpu(void)
{
	unsigned long p;
#if defined(__x86_64__)
	__asm__ volatile("movq %%gs:8, %0" : "=r"(p));
#else
	__asm__ volatile("movl %%gs:8, %0" : "=r"(p));
#endif
	return (struct kvmpy_cpu *)p;
}

static inline struct kvmpy_cpu *smp_cpu(uint32_t cpu)
{
	return smp_this_cpu() - smp_cpu_id() + cpu;
}

static inline void smp_relax(void) { __asm__ volatile("pause" ::: "memory"); }

/* --- starting and waiting ------------------------------------------------------------------ */

typedef void (*smp_fn)(void *arg);

/* Where a started CPU begins (crt0-like, in every image that includes this header): fn in
 * rdi/edi, arg in rsi/esi, its own stack. Calls fn(arg), then parks. */
__asm__(".pushsection .text.kvmpy_smp_entry,\"axG\",@progbits,kvmpy_smp_entry,comdat\n"
	".globl kvmpy_smp_entry\n"
	"kvmpy_smp_entry:\n"
#if defined(__x86_64__)
	"	andq $-16, %rsp\n"
	"	movq %rdi, %rax\n"
	"	movq %rsi, %rdi\n"
	"	call *%rax\n"
	"1:	movl $8, %eax\n"
	"	movw $0x500, %dx\n"
	"	outl %eax, %dx\n"
	"	jmp 1b\n"
#else
	"	andl $-16, %esp\n"
	"	subl $12, %esp\n"
	"	pushl %esi\n"
	"	call *%edi\n"
	"1:	movl $8, %eax\n"
	"	movw $0x500, %dx\n"
	"	outl %eax, %dx\n"
	"	jmp 1b\n"
#endif
	".popsection\n");
void kvmpy_smp_entry(void);

/* Run fn(arg) on CPU `cpu` (parked until now). 0, -EINVAL (no such CPU, or the caller),
 * -EBUSY (it is running). */
static inline long smp_start(uint32_t cpu, smp_fn fn, void *arg)
{
	return kvmpy_hypercall(KVMPY_HC_CPU_START, cpu, (unsigned long)kvmpy_smp_entry,
			       (unsigned long)fn, (unsigned long)arg);
}

/* Block until every CPU in `mask` (bit i: CPU i) is parked again. 0 or -EINVAL. */
static inline long smp_wait(uint64_t mask)
{
	return kvmpy_hypercall(KVMPY_HC_CPU_WAIT, mask, 0, 0, 0);
}

static inline uint64_t smp_others_mask(void)
{
	uint32_t n = smp_num_cpus();
	uint64_t all = n >= 64 ? ~0ULL : (1ULL << n) - 1;
	return all & ~(1ULL << smp_cpu_id());
}

/* fn(arg) on every CPU, this one included; returns when all are done. */
static inline void smp_run_all(smp_fn fn, void *arg)
{
	uint32_t n = smp_num_cpus(), me = smp_cpu_id();
	for (uint32_t i = 0; i < n; i++)
		if (i != me)
			smp_start(i, fn, arg);
	fn(arg);
	if (n > 1)
		smp_wait(smp_others_mask());
}

/* --- spinlocks and barriers ---------------------------------------------------------------- */

/* A ticket lock: FIFO, so no CPU starves. */
typedef struct {
	volatile uint32_t next, owner;
} smp_spinlock_t;
#define SMP_SPINLOCK_INIT {0, 0}

static inline void smp_lock(smp_spinlock_t *l)
{
	uint32_t ticket = __atomic_fetch_add(&l->next, 1, __ATOMIC_RELAXED);
	while (__atomic_load_n(&l->owner, __ATOMIC_ACQUIRE) != ticket)
		smp_relax();
}

static inline void smp_unlock(smp_spinlock_t *l)
{
	__atomic_store_n(&l->owner, l->owner + 1, __ATOMIC_RELEASE);
}

/* A sense-reversing barrier for `n` CPUs. */
typedef struct {
	volatile uint32_t count, sense;
} smp_barrier_t;

static inline void smp_barrier(smp_barrier_t *b, uint32_t n)
{
	uint32_t sense = __atomic_load_n(&b->sense, __ATOMIC_ACQUIRE);
	if (__atomic_add_fetch(&b->count, 1, __ATOMIC_ACQ_REL) == n) {
		b->count = 0;
		__atomic_store_n(&b->sense, !sense, __ATOMIC_RELEASE);
	} else {
		while (__atomic_load_n(&b->sense, __ATOMIC_ACQUIRE) == sense)
			smp_relax();
	}
}

/* --- IPIs ---------------------------------------------------------------------------------- */

/* The ring-0 handlers (one copy per image, however many files include this header). */
#if defined(__x86_64__)
__asm__(".pushsection .text.kvmpy_smp_r0,\"axG\",@progbits,kvmpy_smp_r0,comdat\n"
	".globl kvmpy_smp_ipi\n"
	"kvmpy_smp_ipi:\n"
	"	pushq %rax\n"
	"	pushq %rcx\n"
	"	pushq %rdx\n"
	"	incq %gs:16\n"
	"	rdtsc\n"
	"	movl %eax, %gs:24\n"
	"	movl %edx, %gs:28\n"
	"	movl $0x80B, %ecx\n"
	"	xorl %eax, %eax\n"
	"	xorl %edx, %edx\n"
	"	wrmsr\n"
	"	popq %rdx\n"
	"	popq %rcx\n"
	"	popq %rax\n"
	"	iretq\n"
	/* int3 from CPL3: rax = 1: IPI to CPU edi; rax = 2: sleep unless the IPI count moved
	 * from rdi (IF is clear in here, so the check and `sti; hlt` cannot miss one). */
	".globl kvmpy_smp_gate\n"
	"kvmpy_smp_gate:\n"
	"	cmpq $1, %rax\n"
	"	jne 2f\n"
	"	pushq %rcx\n"
	"	pushq %rdx\n"
	"	movl $0x830, %ecx\n"
	"	movl %edi, %edx\n"
	"	movl $0x40F0, %eax\n"
	"	wrmsr\n"
	"	popq %rdx\n"
	"	popq %rcx\n"
	"	iretq\n"
	"2:	cmpq %rdi, %gs:16\n"
	"	jne 3f\n"
	"	sti\n"
	"	hlt\n"
	"3:	iretq\n"
	".popsection\n");
#else
__asm__(".pushsection .text.kvmpy_smp_r0,\"axG\",@progbits,kvmpy_smp_r0,comdat\n"
	".globl kvmpy_smp_ipi\n"
	"kvmpy_smp_ipi:\n"
	"	pushl %eax\n"
	"	pushl %ecx\n"
	"	pushl %edx\n"
	"	incl %gs:16\n"
	"	adcl $0, %gs:20\n"
	"	rdtsc\n"
	"	movl %eax, %gs:24\n"
	"	movl %edx, %gs:28\n"
	"	movl $0x80B, %ecx\n"
	"	xorl %eax, %eax\n"
	"	xorl %edx, %edx\n"
	"	wrmsr\n"
	"	popl %edx\n"
	"	popl %ecx\n"
	"	popl %eax\n"
	"	iret\n"
	".popsection\n");
#endif
void kvmpy_smp_ipi(void);
void kvmpy_smp_gate(void);

/* Interrupt CPU `cpu` with KVMPY_SMP_IPI_VECTOR (no exit to the VMM). */
static inline void smp_send_ipi(uint32_t cpu)
{
#if defined(KVMPY_MODE_LONG_USER)
	unsigned long rax = 1;
	__asm__ volatile("int3" : "+a"(rax) : "D"((unsigned long)cpu) : "memory");
#else
	__asm__ volatile("wrmsr" : : "c"(0x830), "a"(0x40F0), "d"(cpu) : "memory");
#endif
}

/* IPIs this CPU has taken. */
static inline uint64_t smp_ipis(void)
{
	uint64_t n;
#if defined(__x86_64__)
	__asm__ volatile("movq %%gs:16, %0" : "=r"(n) : : "memory");
#else
	uint32_t lo, hi;
	__asm__ volatile("movl %%gs:16, %0\n\tmovl %%gs:20, %1" : "=r"(lo), "=r"(hi) : : "memory");
	n = ((uint64_t)hi << 32) | lo;
#endif
	return n;
}

/* Sleep until this CPU takes an IPI, unless it took one since smp_ipis() returned `seen`. */
static inline void smp_wait_ipi(uint64_t seen)
{
#if defined(KVMPY_MODE_LONG_USER)
	unsigned long rax = 2;
	__asm__ volatile("int3" : "+a"(rax) : "D"(seen) : "memory");
#else
	__asm__ volatile("cli" ::: "memory");
	if (smp_ipis() == seen)
		__asm__ volatile("sti; hlt" ::: "memory");
	else
		__asm__ volatile("sti" ::: "memory");
#endif
}

#endif
