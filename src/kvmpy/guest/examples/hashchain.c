/*
 * kvmpy-example: a long deterministic computation for snapshot, restore and migration checks:
 * a hash chain over a few MiB of memory, with an accumulator kept in an SSE register, that
 * prints one checkpoint line per step (docs/persist.md)
 * kvmpy-modes: long-user
 */
#include <kvmpy.h>

/*
 * Parameters. The VMM may overwrite them before the guest starts: the ELF symbol
 * `hashchain_params` gives their address (kvmpy.persist.guest writes them for tests and for
 * `kvmpy bench persist`). Every value is checked; a bad one stops the guest with exit code 2.
 */
#define HASHCHAIN_MAGIC 0x3176434843485348ull /* "HSHCHCv1" */

struct hashchain_params {
	uint64_t magic;
	uint64_t work_bytes;      /* memory the chain walks, placed after the image (a 4 KiB multiple) */
	uint64_t lines;           /* checkpoint lines (0: none) */
	uint64_t rounds_per_line; /* chain steps between two lines */
	uint64_t memsum_every;    /* every this many lines, also print a sum over all of the memory */
	uint64_t dirty_pages;     /* then: pages written per tick (0: an idle loop that writes nothing) */
	uint64_t tick_cycles;     /* TSC cycles per tick */
	uint64_t ticks;           /* ticks before exiting (0: no tick loop; ~0: forever) */
};

volatile struct hashchain_params hashchain_params = {
	.magic = HASHCHAIN_MAGIC,
	.work_bytes = 4 << 20,
	.lines = 400,
	.rounds_per_line = 100000,
	.memsum_every = 25,
	.dirty_pages = 0,
	.tick_cycles = 1000000,
	.ticks = 0,
};

extern char __kvmpy_image_end[];

static uint64_t splitmix(uint64_t *s)
{
	uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}

/* xmm1 is the accumulator. -mgeneral-regs-only keeps gcc away from SSE registers, so nothing
 * else touches it: if a restore lost the vCPU's XSAVE state, the printed value would differ. */
static inline void xmm_add(uint64_t v)
{
	__asm__ volatile("movq %0, %%xmm2\n\tpaddq %%xmm2, %%xmm1\n\tpshufd $0x4e, %%xmm1, %%xmm1"
			 :
			 : "r"(v));
}

static inline uint64_t xmm_get(void)
{
	uint64_t v;
	__asm__ volatile("movq %%xmm1, %0" : "=r"(v));
	return v;
}

static void dirty_loop(uint64_t *work, uint64_t pages)
{
	uint64_t per_tick = hashchain_params.dirty_pages, ticks = hashchain_params.ticks;
	uint64_t cycles = hashchain_params.tick_cycles, page = 0, next = rdtsc();
	for (uint64_t t = 0; ticks == ~0ull || t < ticks; t++) {
		for (uint64_t i = 0; i < per_tick; i++) {
			work[page * 512] += t + 1;
			page = page + 1 == pages ? 0 : page + 1;
		}
		next += cycles;
		while ((int64_t)(rdtsc() - next) < 0)
			__asm__ volatile("pause");
	}
}

int main(void)
{
	struct hashchain_params p = {
		hashchain_params.magic, hashchain_params.work_bytes, hashchain_params.lines,
		hashchain_params.rounds_per_line, hashchain_params.memsum_every,
		hashchain_params.dirty_pages, hashchain_params.tick_cycles, hashchain_params.ticks,
	};
	if (p.magic != HASHCHAIN_MAGIC || p.work_bytes < 4096 || p.work_bytes % 4096 ||
	    p.tick_cycles == 0) {
		kv_printf("hashchain: bad parameters\n");
		return 2;
	}
	uint64_t *work = (uint64_t *)(((uintptr_t)__kvmpy_image_end + 4095) & ~4095ul);
	uint64_t words = p.work_bytes / 8, state = 1;

	/* Touch every page first: a snapshot then holds all of it, and lazy restore has work. */
	for (uint64_t i = 0; i < words; i++)
		work[i] = splitmix(&state);
	kv_printf("hashchain: %lu KiB at %p, %lu lines\n", (unsigned long)(p.work_bytes >> 10),
		  (void *)work, (unsigned long)p.lines);

	for (uint64_t line = 1; line <= p.lines; line++) {
		for (uint64_t r = 0; r < p.rounds_per_line; r++) {
			uint64_t z = splitmix(&state);
			uint64_t i = (z >> 11) % words;
			uint64_t v = (work[i] ^ z) * 0xD6E8FEB86659FD93ull;
			work[i] = (v << 17) | (v >> 47);
			state ^= work[i];
		}
		xmm_add(state);
		kv_printf("step %lu state %016lx xmm %016lx exits %ld\n", (unsigned long)line,
			  (unsigned long)state, (unsigned long)xmm_get(), hc_num_exits());
		if (p.memsum_every && line % p.memsum_every == 0) {
			uint64_t sum = 0;
			for (uint64_t i = 0; i < words; i++)
				sum = (sum ^ work[i]) * 0x100000001B3ull;
			kv_printf("memsum %016lx\n", (unsigned long)sum);
		}
	}
	if (p.ticks) {
		kv_printf("hashchain: ready\n");
		dirty_loop(work, p.work_bytes / 4096);
	}
	kv_printf("hashchain: done\n");
	return 0;
}
