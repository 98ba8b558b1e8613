/*
 * kvmpy-example: counts in its progress page and makes a hypercall every 16 iterations,
 * so most of its time goes to exits. Runs until stopped.
 * kvmpy-modes: protected long long-user
 */
#include <kvmpy.h>
#include <kvmpy/sched.h>

KVMPY_DEFINE_PROGRESS;

#define IO_EVERY 16

int main(void)
{
	for (;;) {
		for (int i = 0; i < IO_EVERY; i++)
			kvmpy_progress_add(1);
		kvmpy_io_point();
	}
}
