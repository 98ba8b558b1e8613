/*
 * kvmpy/sched.h: how a guest tells `kvmpy sched` how much work it has done (docs/sched.md).
 *
 * A guest defines one page-aligned `struct kvmpy_progress` named `kvmpy_progress`
 * (KVMPY_DEFINE_PROGRESS) and adds to its counter as it works. The VMM finds the page through
 * the image's ELF symbol table, reads the counter between time slices and reports each VM's
 * share of the progress made, next to its share of host time. Nothing else is needed: no
 * hypercall, no exit, so a guest that never exits can be measured too.
 *
 * The symbol's address is taken as a guest-physical address: SDK images are linked at their
 * physical addresses and kvmpy maps RAM one to one. The VMM checks that the counter is
 * 8-byte aligned and lies in guest RAM; a guest that publishes nonsense only gets nonsense
 * figures for itself.
 */
#ifndef KVMPY_SCHED_H
#define KVMPY_SCHED_H

#include <kvmpy.h>

#define KVMPY_PROGRESS_SYMBOL "kvmpy_progress"

struct kvmpy_progress {
	/*
	 * Units of work done so far, in whatever unit the guest chooses (loop iterations,
	 * requests); only differences matter. The VMM reads it with one aligned 8-byte load,
	 * which is atomic in 64-bit guests; a 32-bit guest updates it in two halves, so a read
	 * that lands between them is off by 2^32 once every 2^32 increments.
	 */
	volatile uint64_t count;
	/* Zero; later versions of the ABI may give them a meaning. */
	uint64_t reserved[511];
};

/* Put this once, at file scope, in one source file of the guest. */
#define KVMPY_DEFINE_PROGRESS \
	struct kvmpy_progress kvmpy_progress __attribute__((aligned(4096), used))

extern struct kvmpy_progress kvmpy_progress;

static inline void kvmpy_progress_add(uint64_t n) { kvmpy_progress.count += n; }

/*
 * A port-I/O exit that changes nothing (the num_exits hypercall, result ignored): a point
 * where `kvmpy sched --policy on-io` may hand the CPU to the next VM. On hosts where an exit
 * from CPL3 is expensive (about 70 µs on KVM-PVM) use it sparingly.
 */
static inline void kvmpy_io_point(void) { (void)hc_num_exits(); }

#endif /* KVMPY_SCHED_H */
