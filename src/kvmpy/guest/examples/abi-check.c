/*
 * kvmpy-example: checks the hypercall ABI from inside the guest, error cases included; prints
 * one "ok"/"not ok" line per check and exits with the number of failures.
 * kvmpy-modes: real protected paged32 long long-user
 */
#include <kvmpy.h>

static int failures, checks;

static void check(int ok, const char *what, long got)
{
	checks++;
	if (!ok)
		failures++;
	kv_printf("%s %d - %s (got %ld)\n", ok ? "ok" : "not ok", checks, what, got);
}

/* An address that is not guest RAM: above 4 GiB in 64-bit mode, high in 32-bit modes. In real
 * mode, linear addresses stop at 1 MiB + 64 KiB, so use the top of the 32-bit space there too. */
#if defined(__x86_64__)
#define BAD_PTR ((char *)0x7000000000ull)
#else
#define BAD_PTR ((char *)0xF0000000u)
#endif

static char big[KVMPY_MAX_STRING + 16];

int main(void)
{
	long r;

	r = hc_print_str("hello, ABI\n");
	check(r == 0, "print_str returns 0", r);
	r = hc_print_str(BAD_PTR);
	check(r == -KVMPY_EFAULT, "print_str of an unmapped pointer is -EFAULT", r);
	memset(big, 'A', sizeof big);
	r = hc_print_str(big);
	check(r == -KVMPY_EINVAL, "print_str without a NUL in 4096 bytes is -EINVAL", r);
	big[KVMPY_MAX_STRING - 1] = 0;
	big[0] = '\n';
	r = hc_print_str(big + KVMPY_MAX_STRING - 2);
	check(r == 0, "print_str of a string ending at the limit", r);

	long a = hc_num_exits(), b = hc_num_exits();
	check(b == a + 1, "num_exits counts the previous hypercall", b - a);

	char buf[64];
	r = hc_num_exits_by_type(buf, sizeof buf);
	check(r > 0 && (size_t)r == strlen(buf), "num_exits_by_type returns the text length", r);
	check(memcmp(buf, "IO in: ", 7) == 0, "num_exits_by_type text starts with 'IO in: '", 0);
	r = hc_num_exits_by_type(buf, 4);
	check(r == -KVMPY_EINVAL, "num_exits_by_type into a short buffer is -EINVAL", r);
	r = hc_num_exits_by_type(BAD_PTR, 64);
	check(r == -KVMPY_EFAULT, "num_exits_by_type into an unmapped buffer is -EFAULT", r);

	r = hc_gva_to_hva(buf);
	check(r != 0 && r != -KVMPY_EFAULT, "gva_to_hva of a stack buffer", r);
	r = hc_gva_to_hva(BAD_PTR);
	check(r == -KVMPY_EFAULT, "gva_to_hva of an unmapped address is -EFAULT", r);

	r = kvmpy_hypercall(99, 0, 0, 0, 0);
	check(r == -KVMPY_ENOSYS, "an unknown hypercall is -ENOSYS", r);

	uint64_t big_num = 12345678901234ull;
	kv_snprintf(buf, sizeof buf, "%llu %x %d", (unsigned long long)big_num, 0xbeefu, -7);
	check(memcmp(buf, "12345678901234 beef -7", 23) == 0, "kv_snprintf formats numbers", 0);

	kv_printf("%d checks, %d failures\n", checks, failures);
	return failures;
}
