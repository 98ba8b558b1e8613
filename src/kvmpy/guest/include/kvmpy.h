/*
 * kvmpy guest SDK: the hypercall ABI (docs/abi.md) for freestanding C guests.
 *
 * The same source builds for every CPU mode kvmpy runs (real: gcc -m16, protected and paged32:
 * -m32, long and long-user: -m64); `kvmpy build` picks the flags. A hypercall is
 * `out dx, eax` with dx = 0x500 and eax = its number; arguments in rdi, rsi, rcx, rbx (edi,
 * esi, ecx, ebx outside 64-bit mode); the result comes back in rax (eax). Errors are negative
 * errno values (-14 EFAULT, -22 EINVAL, -38 ENOSYS).
 *
 * Both naming styles are offered: hc_* (kvmpy) and the CS695 names (HC_print8bit, ...).
 */
#ifndef KVMPY_H
#define KVMPY_H

#include <stddef.h>
#include <stdint.h>

#define KVMPY_HYPERCALL_PORT 0x500
#define KVMPY_DEBUGCON_PORT 0xE9

enum kvmpy_hypercall_nr {
	KVMPY_HC_EXIT = 0,
	KVMPY_HC_PUTC = 1,
	KVMPY_HC_PRINT32 = 2,
	KVMPY_HC_NUM_EXITS = 3,
	KVMPY_HC_PRINT_STR = 4,
	KVMPY_HC_NUM_EXITS_BY_TYPE = 5,
	KVMPY_HC_GVA_TO_HVA = 6,
};

#define KVMPY_EFAULT 14
#define KVMPY_EINVAL 22
#define KVMPY_ENOSYS 38
/* hc_print_str reads at most this many bytes looking for the NUL. */
#define KVMPY_MAX_STRING 4096

/* The raw hypercall: any number, four arguments, the VMM's result. */
static inline long kvmpy_hypercall(unsigned long nr, unsigned long a0, unsigned long a1,
				   unsigned long a2, unsigned long a3)
{
	long ret;
	__asm__ volatile("outl %%eax, %%dx"
			 : "=a"(ret)
			 : "0"(nr), "d"(KVMPY_HYPERCALL_PORT), "D"(a0), "S"(a1), "c"(a2), "b"(a3)
			 : "memory");
	return ret;
}

static inline void outb(uint16_t port, uint8_t value)
{
	__asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline void outl(uint16_t port, uint32_t value)
{
	__asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port));
}

static inline uint32_t inl(uint16_t port)
{
	uint32_t v;
	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

/* --- kvmpy names ------------------------------------------------------------------------- */

/* Stop the VM; `kvmpy run` exits with code & 0xff. */
static inline __attribute__((noreturn)) void hc_exit(int code)
{
	kvmpy_hypercall(KVMPY_HC_EXIT, (unsigned long)code, 0, 0, 0);
	for (;;)
		;
}

static inline long hc_putc(char c) { return kvmpy_hypercall(KVMPY_HC_PUTC, (uint8_t)c, 0, 0, 0); }

/* Prints the unsigned decimal value and a newline. */
static inline long hc_print32(uint32_t value)
{
	return kvmpy_hypercall(KVMPY_HC_PRINT32, value, 0, 0, 0);
}

/* Exits this VM has taken before this hypercall. */
static inline long hc_num_exits(void) { return kvmpy_hypercall(KVMPY_HC_NUM_EXITS, 0, 0, 0, 0); }

/* Prints a NUL-terminated string (at most KVMPY_MAX_STRING bytes); -EINVAL, -EFAULT. */
static inline long hc_print_str(const char *s)
{
	return kvmpy_hypercall(KVMPY_HC_PRINT_STR, (unsigned long)s, 0, 0, 0);
}

/* Writes "IO in: <n>\nIO out: <m>\n" into buf; returns its length or -EINVAL/-EFAULT. */
static inline long hc_num_exits_by_type(char *buf, size_t len)
{
	return kvmpy_hypercall(KVMPY_HC_NUM_EXITS_BY_TYPE, (unsigned long)buf, len, 0, 0);
}

/* The host virtual address backing a guest virtual address, or -EFAULT. In 32- and 16-bit
 * modes only the low 32 bits come back (the ABI returns eax there). */
static inline long hc_gva_to_hva(const void *gva)
{
	return kvmpy_hypercall(KVMPY_HC_GVA_TO_HVA, (unsigned long)gva, 0, 0, 0);
}

/* One byte to the debug console (port 0xE9), without a hypercall. */
static inline void debugcon_putc(char c) { outb(KVMPY_DEBUGCON_PORT, (uint8_t)c); }

/* --- CS695 names ------------------------------------------------------------------------- */

static inline void HC_print8bit(uint8_t val) { hc_putc((char)val); }
static inline void HC_print32bit(uint32_t val) { hc_print32(val); }
static inline uint32_t HC_numExits(void) { return (uint32_t)hc_num_exits(); }
static inline void HC_printStr(char *str) { hc_print_str(str); }
static inline char *HC_numExitsByType(void)
{
	static char buf[64];
	if (hc_num_exits_by_type(buf, sizeof buf) < 0)
		buf[0] = 0;
	return buf;
}
static inline unsigned long HC_gvaToHva(unsigned long gva)
{
	return (unsigned long)hc_gva_to_hva((const void *)gva);
}

/* --- the runtime library (lib/kvmpy.c) --------------------------------------------------- */

/* printf subset: %c %s %d %i %u %x %X %o %p %%; flags '-' '+' ' ' '#' '0'; width and precision
 * (numbers or '*'); sizes hh h l ll z t j. An unknown conversion is printed as written.
 * Output is buffered and printed with hc_print_str, so a line costs one exit. */
int kv_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int kv_snprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void kv_puts(const char *s);

void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

#endif /* KVMPY_H */
