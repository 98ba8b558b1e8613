/*
 * kvmpy-example: spins at CPL3 counting in its progress page and never exits: only a
 * host timer gets the CPU back ('kvmpy sched --policy timer'). Runs until stopped.
 * kvmpy-modes: protected long long-user
 */
#include <kvmpy.h>
#include <kvmpy/sched.h>

KVMPY_DEFINE_PROGRESS;

int main(void)
{
	for (;;)
		kvmpy_progress_add(1);
}
