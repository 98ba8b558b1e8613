/*
 * kvmpy-example: the KSM lab's guest: fills memory with pages identical in every VM, nearly
 * identical ones and distinct ones, then times reading and writing them (a write to a page
 * the host merged takes a copy-on-write fault) (docs/memory.md)
 * kvmpy-modes: long-user
 */
#include <kvmpy.h>

/*
 * Parameters: the ELF symbol `ksmfill_params`; `kvmpy lab ksm` overwrites them before the guest
 * starts (kvmpy.ksm.guest). Every value is checked; a bad one stops the guest with exit code 2.
 *
 * Memory after the image, page-aligned, in three parts:
 *   identical  page i holds the same 4 KiB in every VM (a function of i and `seed` only), and
 *              differs from every other page: only pages of other VMs can merge with it
 *   partial    as identical, but the first word is this VM's own: the same page except 8 bytes,
 *              which KSM (whole pages only) can never merge
 *   distinct   a function of i, `seed` and `vm_id`: nothing to merge
 */
#define KSMFILL_MAGIC 0x31764C49464D534Bull /* "KSMFILv1" */

struct ksmfill_params {
	uint64_t magic;
	uint64_t vm_id;
	uint64_t seed;
	uint64_t identical_pages;
	uint64_t partial_pages;
	uint64_t distinct_pages;
	uint64_t timed_pages; /* pages each timed pass touches (at most identical and distinct) */
};

volatile struct ksmfill_params ksmfill_params = {
	.magic = KSMFILL_MAGIC,
	.vm_id = 0,
	.seed = 0x6b736d2d66696c6cull,
	.identical_pages = 1024,
	.partial_pages = 256,
	.distinct_pages = 256,
	.timed_pages = 256,
};

/*
 * The lab's hypercall (registered by kvmpy.ksm.labvm, not part of the base ABI): report the
 * end of `step` with three values and ask whether to go on. The VMM waits up to ~50 ms and
 * answers 1 (go on) or 0 (ask again), so a guest waiting for the host costs one exit per
 * 50 ms instead of a spinning CPU. Without the lab it is -ENOSYS and the guest runs through.
 */
#define KSMFILL_HC_SYNC 0x4B534D01ul

enum { STEP_FILLED = 1, STEP_BASELINE = 2, STEP_MERGED = 3, STEP_REFERENCE = 4 };

static int lab = 1;

static void sync(uint64_t step, uint64_t a, uint64_t b, uint64_t c)
{
	while (lab) {
		long r = kvmpy_hypercall(KSMFILL_HC_SYNC, step, a, b, c);
		if (r < 0)
			lab = 0;
		else if (r == 1)
			return;
	}
}

extern char __kvmpy_image_end[];

static uint64_t mix(uint64_t z)
{
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}

static void fill_page(uint64_t *page, uint64_t key)
{
	uint64_t s = mix(key);
	for (int w = 0; w < 512; w++)
		page[w] = mix(s += 0x9E3779B97F4A7C15ull);
}

/* One word of each of `pages` pages: the first touch of a page, or a copy-on-write fault, is
 * then nearly all a pass costs. Every VM writes the same values, so identical pages stay
 * identical across VMs. */
static uint64_t write_pass(uint64_t *base, uint64_t pages, uint64_t value)
{
	uint64_t t0 = rdtsc();
	for (uint64_t i = 0; i < pages; i++)
		((volatile uint64_t *)base)[i * 512 + 1] = value ^ i;
	return rdtsc() - t0;
}

static uint64_t read_pass(uint64_t *base, uint64_t pages, uint64_t *sum)
{
	uint64_t t0 = rdtsc(), s = 0;
	for (uint64_t i = 0; i < pages; i++)
		s += ((volatile uint64_t *)base)[i * 512 + 2];
	*sum += s;
	return rdtsc() - t0;
}

int main(void)
{
	struct ksmfill_params p = {
		ksmfill_params.magic,           ksmfill_params.vm_id,
		ksmfill_params.seed,            ksmfill_params.identical_pages,
		ksmfill_params.partial_pages,   ksmfill_params.distinct_pages,
		ksmfill_params.timed_pages,
	};
	if (p.magic != KSMFILL_MAGIC || p.timed_pages > p.identical_pages ||
	    p.timed_pages > p.distinct_pages) {
		kv_printf("ksm-fill: bad parameters\n");
		return 2;
	}
	uint64_t *identical = (uint64_t *)(((uintptr_t)__kvmpy_image_end + 4095) & ~4095ul);
	uint64_t *partial = identical + p.identical_pages * 512;
	uint64_t *distinct = partial + p.partial_pages * 512;
	uint64_t sum = 0, vm = mix(p.vm_id + 1) | 1;

	uint64_t t0 = rdtsc();
	for (uint64_t i = 0; i < p.identical_pages; i++)
		fill_page(identical + i * 512, p.seed ^ (i << 2));
	for (uint64_t i = 0; i < p.partial_pages; i++) {
		fill_page(partial + i * 512, p.seed ^ (i << 2 | 1));
		partial[i * 512] = vm ^ i;
	}
	for (uint64_t i = 0; i < p.distinct_pages; i++)
		fill_page(distinct + i * 512, p.seed ^ (i << 2 | 2) ^ (vm << 32));
	uint64_t fill = rdtsc() - t0;
	kv_printf("ksm-fill: vm %lu: %lu identical, %lu partly identical, %lu distinct pages at %p\n",
		  (unsigned long)p.vm_id, (unsigned long)p.identical_pages,
		  (unsigned long)p.partial_pages, (unsigned long)p.distinct_pages, (void *)identical);
	sync(STEP_FILLED, fill, p.identical_pages + p.partial_pages + p.distinct_pages, 0);

	/* Before merging: the pages are this VM's own and mapped. */
	uint64_t r0 = read_pass(identical, p.timed_pages, &sum);
	uint64_t w0 = write_pass(identical, p.timed_pages, 1);
	sync(STEP_BASELINE, r0, w0, p.timed_pages);

	/* After the lab saw them merged: reading a merged page is allowed, writing one breaks the
	 * sharing (the host copies the page); the second write finds the copy in place. */
	uint64_t r1 = read_pass(identical, p.timed_pages, &sum);
	uint64_t w1 = write_pass(identical, p.timed_pages, 2);
	uint64_t w2 = write_pass(identical, p.timed_pages, 3);
	sync(STEP_MERGED, r1, w1, w2);

	/* The same write on pages KSM scanned but never merged. */
	uint64_t w3 = write_pass(distinct, p.timed_pages, 4);
	sync(STEP_REFERENCE, w3, sum, 0);

	kv_printf("ksm-fill: fill %lu cycles/page; per page, in cycles: read %lu, write %lu before "
		  "merging; read %lu, write %lu, again %lu after; write %lu unmerged\n",
		  (unsigned long)(fill / (p.identical_pages + p.partial_pages + p.distinct_pages)),
		  (unsigned long)(r0 / (p.timed_pages ? p.timed_pages : 1)),
		  (unsigned long)(w0 / (p.timed_pages ? p.timed_pages : 1)),
		  (unsigned long)(r1 / (p.timed_pages ? p.timed_pages : 1)),
		  (unsigned long)(w1 / (p.timed_pages ? p.timed_pages : 1)),
		  (unsigned long)(w2 / (p.timed_pages ? p.timed_pages : 1)),
		  (unsigned long)(w3 / (p.timed_pages ? p.timed_pages : 1)));
	return 0;
}
