/*
 * kvmpy-example: greets through the hypercall ABI: a string, a number, the exit count and
 * the exit counts by type. Builds and runs in every mode.
 * kvmpy-modes: real protected paged32 long long-user
 */
#include <kvmpy.h>

int main(void)
{
	hc_print_str("Hello from a kvmpy guest (" KVMPY_MODE " mode)!\n");
	hc_print_str("The answer is ");
	hc_print32(42);

	long before = hc_num_exits();
	kv_printf("Exits so far: %ld\n", before);

	char buf[64];
	long len = hc_num_exits_by_type(buf, sizeof buf);
	if (len < 0) {
		kv_printf("hc_num_exits_by_type failed: %ld\n", len);
		return 1;
	}
	hc_print_str(buf);

	/* Per character: one exit each, through the debug console. */
	const char *bye = "Goodbye.\n";
	for (const char *p = bye; *p; p++)
		hc_putc(*p);
	return 0;
}
