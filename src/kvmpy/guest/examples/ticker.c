/*
 * kvmpy-example: a small VM that idles: prints a numbered line on every tick of its LAPIC
 * timer (10 per second) and sleeps in `hlt` in between, so it costs almost no host CPU
 * (kvmpy run ticker --irqchip). Runs until stopped; the management API's tests and load
 * benchmark run many of them. With --irqchip only: without the in-kernel LAPIC there is no
 * timer and `hlt` would stop the VM.
 * kvmpy-modes: long
 */
#include <kvmpy.h>
#include <kvmpy/smp.h>

/* x2APIC registers (MSR 0x800 + offset/16). */
#define X2APIC_LVT_TIMER 0x832
#define X2APIC_TIMER_INIT 0x838
#define X2APIC_TIMER_DIV 0x83E
#define LVT_PERIODIC (1u << 17)

/* KVM's LAPIC timer counts at 1 GHz with divide-by-1: 100,000,000 counts are 100 ms. */
#define TICK_COUNTS 100000000u

static inline void wrmsr(uint32_t msr, uint64_t value)
{
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((uint32_t)value), "d"((uint32_t)(value >> 32))
			 : "memory");
}

int main(void)
{
	/* A running checksum over every line printed: a line lost or printed twice shows in
	 * all the lines after it. */
	uint64_t sum = 0x6b766d7079ULL;
	wrmsr(X2APIC_TIMER_DIV, 0xB); /* divide by 1 */
	wrmsr(X2APIC_LVT_TIMER, LVT_PERIODIC | KVMPY_SMP_IPI_VECTOR);
	wrmsr(X2APIC_TIMER_INIT, TICK_COUNTS);
	for (uint64_t line = 1;; line++) {
		uint64_t seen = smp_ipis();
		while (smp_ipis() == seen)
			smp_wait_ipi(seen);
		sum = (sum ^ line) * 0x100000001b3ULL;
		kv_printf("tick %lu sum %016lx\n", (unsigned long)line, (unsigned long)sum);
	}
}
