/*
 * kvmpy-example: Neo, of the Matrix scheduling experiment: a CPU-bound counter at CPL3
 * that publishes its progress (kvmpy/sched.h) and passes an I/O point every 2^22
 * iterations. Runs until stopped: 'kvmpy sched --vm neo --vm morpheus'.
 * kvmpy-modes: protected long long-user
 */
#include <kvmpy.h>
#include <kvmpy/sched.h>

KVMPY_DEFINE_PROGRESS;

/* Work between I/O points: long enough that the ~70 µs an exit costs at CPL3 on KVM-PVM is
 * under 1 % of the time, short enough that the on-io policy switches several times per
 * 100 ms. */
#define IO_EVERY (1u << 22)

int main(void)
{
	for (;;) {
		for (uint32_t i = 0; i < IO_EVERY; i++)
			kvmpy_progress_add(1);
		kvmpy_io_point();
	}
}
