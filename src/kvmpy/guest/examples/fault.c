/*
 * kvmpy-example: touches memory that is not mapped, to show how a guest fault is reported
 * (stop reason, vector, faulting address, registers and the disassembled instruction).
 * kvmpy-modes: long long-user
 */
#include <kvmpy.h>

int main(void)
{
	hc_print_str("About to write to 0x7000000000, which is not mapped...\n");
	*(volatile uint64_t *)0x7000000000ull = 1;
	hc_print_str("not reached\n");
	return 0;
}
