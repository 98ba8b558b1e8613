/*
 * kvmpy-example: a virtio-balloon driver at CPL3: uses memory, frees it, and gives it back to
 *   the host by free page reporting, or by inflating its balloon when the host asks
 *   (kvmpy run virtio-balloon --balloon --irqchip --control SOCK; kvmpy ctl SOCK balloon 16M)
 * kvmpy-modes: long-user
 */
#include <kvmpy.h>
#include <kvmpy/virtio.h>

/*
 * Parameters (the ELF symbol `balloon_params`; kvmpy.ksm.guest writes them for the lab).
 * The guest uses `work_pages` pages after its image (touches them all), frees them, and then:
 *   report      1: reports the freed pages to the host (free page reporting, 2 MiB at a time),
 *               `report_delay` TSC cycles after freeing them
 *   hold        1: serves the balloon forever (inflate and deflate to the host's target,
 *               memory statistics on request); 0: exits after freeing (and reporting)
 * Inflating takes free pages, deflating gives them back; the guest never touches a page while
 * it is in the balloon.
 */
#define BALLOON_MAGIC 0x316E6F6F6C6C6142ull /* "Balloon1" */
#define MAX_WORK_PAGES 65536

struct balloon_params {
	uint64_t magic;
	uint64_t work_pages;
	uint64_t report;
	uint64_t report_delay;
	uint64_t hold;
	uint64_t ram_bytes; /* what the statistics call total memory (0: the work area) */
};

volatile struct balloon_params balloon_params = {
	.magic = BALLOON_MAGIC,
	.work_pages = 4096,
	.report = 1,
	.report_delay = 0,
	.hold = 1,
	.ram_bytes = 0,
};

#define F_STATS_VQ (1ULL << 1)
#define F_PAGE_REPORTING (1ULL << 5)
#define QSIZE 64
#define PFNS_PER_BUFFER 256
#define REPORT_PAGES 512 /* 2 MiB per reported range, as Linux reports pageblocks */

static unsigned char rings[4][kv_vq_bytes_const(QSIZE)] __attribute__((aligned(4096)));
static uint32_t pfn_buf[PFNS_PER_BUFFER];
static uint32_t free_stack[MAX_WORK_PAGES], balloon_stack[MAX_WORK_PAGES];
static uint64_t n_free, n_balloon;
struct stat_entry {
	uint16_t tag;
	uint64_t value;
} __attribute__((packed));
static struct stat_entry stats[4];

extern char __kvmpy_image_end[];

static struct kv_virtio_dev d;
static struct kv_vq inflateq, deflateq, statsq, reportq;
static int have_stats, have_report;
static uint64_t total_bytes;

static void ack_interrupts(void)
{
	if (d.transport == KV_VIRTIO_TRANSPORT_MMIO) {
		uint32_t st = kv_mmio_r32(d.base + KV_MMIO_INTERRUPT_STATUS);
		if (st)
			kv_mmio_w32(d.base + KV_MMIO_INTERRUPT_ACK, st);
	}
}

/* Wait for the device to finish a chain on `q`: interrupts when kvmpy gave us the handler. */
static void wait_used(struct kv_vq *q)
{
	if (kvmpy_virtio_irq_ready)
		kv_vq_wait_irq(q, 0);
	else
		kv_vq_wait(q, 0);
	ack_interrupts();
}

static void post_stats(void)
{
	stats[0] = (struct stat_entry){4, n_free * 4096};       /* free memory */
	stats[1] = (struct stat_entry){5, total_bytes};          /* total memory */
	stats[2] = (struct stat_entry){6, n_free * 4096};       /* available memory */
	stats[3] = (struct stat_entry){7, 0};                    /* disk caches */
	struct kv_buf b = {stats, sizeof(stats)};
	kv_vq_add(&statsq, &b, 1, 0);
	kv_vq_kick(&statsq);
}

/* Move up to `n` pages between the free pool and the balloon through `q`. */
static uint64_t move_pages(struct kv_vq *q, uint32_t *from, uint64_t *n_from, uint32_t *to,
			   uint64_t *n_to, uint64_t n)
{
	if (n > PFNS_PER_BUFFER)
		n = PFNS_PER_BUFFER;
	if (n > *n_from)
		n = *n_from;
	if (!n)
		return 0;
	for (uint64_t i = 0; i < n; i++) {
		uint32_t pfn = from[--*n_from];
		pfn_buf[i] = pfn;
		to[(*n_to)++] = pfn;
	}
	struct kv_buf b = {pfn_buf, (uint32_t)(n * 4)};
	kv_vq_add(q, &b, 1, 0);
	kv_vq_kick(q);
	wait_used(q);
	return n;
}

static void set_actual(uint32_t pages)
{
	kv_mmio_w32(kv_virtio_config(&d) + 4, pages);
}

static void report_free(void)
{
	uint64_t reported = 0;
	/* Free pages are consecutive in the work area: 2 MiB ranges, one chain each. */
	for (uint64_t i = 0; i < n_free; i += REPORT_PAGES) {
		uint64_t n = n_free - i < REPORT_PAGES ? n_free - i : REPORT_PAGES;
		uint32_t lowest = free_stack[i + n - 1]; /* the stack runs downwards */
		struct kv_buf b = {(void *)((uintptr_t)lowest << 12), (uint32_t)(n * 4096)};
		kv_vq_add(&reportq, &b, 0, 1);
		kv_vq_kick(&reportq);
		wait_used(&reportq);
		reported += n;
	}
	kv_printf("virtio-balloon: reported %lu free pages\n", (unsigned long)reported);
}

int main(void)
{
	struct balloon_params p = {balloon_params.magic,        balloon_params.work_pages,
				   balloon_params.report,       balloon_params.report_delay,
				   balloon_params.hold,         balloon_params.ram_bytes};
	if (p.magic != BALLOON_MAGIC || p.work_pages == 0 || p.work_pages > MAX_WORK_PAGES) {
		kv_printf("virtio-balloon: bad parameters\n");
		return 2;
	}
	if (kv_virtio_find(&d, 5, 0) < 0) {
		kv_printf("virtio-balloon: no balloon device (run with --balloon)\n");
		return 2;
	}
	uint64_t want = KV_VIRTIO_F_EVENT_IDX | F_STATS_VQ | (p.report ? F_PAGE_REPORTING : 0);
	if (kv_virtio_init(&d, want) < 0)
		return 3;
	have_stats = !!(d.features & F_STATS_VQ);
	have_report = !!(d.features & F_PAGE_REPORTING);
	/* Queues are numbered in order among those the features bring (Linux's numbering). */
	int vec = kvmpy_virtio_irq_ready && d.transport == KV_VIRTIO_TRANSPORT_PCI ? 0 : -1;
	uint16_t idx = 0;
	if (kv_vq_setup(&d, &inflateq, idx++, rings[0], QSIZE, vec) < 0 ||
	    kv_vq_setup(&d, &deflateq, idx++, rings[1], QSIZE, vec) < 0 ||
	    (have_stats && kv_vq_setup(&d, &statsq, idx++, rings[2], QSIZE, vec) < 0) ||
	    (have_report && kv_vq_setup(&d, &reportq, idx++, rings[3], QSIZE, vec) < 0))
		return 3;
	if (vec == 0) {
		kv_mmio_w16(d.common + KV_PCI_MSIX_CONFIG, 0); /* config changes: vector 0 too */
		kv_virtio_msix(&d, 0, 0);
	}
	kv_virtio_ready(&d);

	uintptr_t area = ((uintptr_t)__kvmpy_image_end + 4095) & ~4095ul;
	total_bytes = p.ram_bytes ? p.ram_bytes : p.work_pages * 4096;
	kv_printf("virtio-balloon: %s, statistics %s, free page reporting %s, interrupts %s; "
		  "using %lu pages\n",
		  d.transport == KV_VIRTIO_TRANSPORT_MMIO ? "mmio" : "pci", have_stats ? "on" : "off",
		  have_report ? "on" : "off", kvmpy_virtio_irq_ready ? "on" : "off (polling)",
		  (unsigned long)p.work_pages);
	/* The work: every page used. */
	for (uint64_t i = 0; i < p.work_pages; i++) {
		volatile uint64_t *page = (volatile uint64_t *)(area + i * 4096);
		for (int w = 0; w < 512; w += 8)
			page[w] = i * 512 + w + 1;
	}
	kv_printf("virtio-balloon: touched %lu pages\n", (unsigned long)p.work_pages);
	/* ... done with: all of it free (highest address on the bottom of the stack). */
	for (uint64_t i = 0; i < p.work_pages; i++)
		free_stack[n_free++] = (uint32_t)((area >> 12) + p.work_pages - 1 - i);
	kv_printf("virtio-balloon: freed %lu pages\n", (unsigned long)n_free);
	if (have_stats)
		post_stats();
	if (have_report) {
		uint64_t t0 = rdtsc();
		while (rdtsc() - t0 < p.report_delay)
			kv_cpu_relax();
		report_free();
	}
	if (!p.hold)
		return 0;

	uint32_t reported_actual = 0;
	for (;;) {
		uint64_t seen = kvmpy_virtio_irqs;
		ack_interrupts();
		int busy = 0;
		if (have_stats && kv_vq_poll(&statsq, 0) >= 0) {
			post_stats(); /* the device asked for fresh figures */
			busy = 1;
		}
		uint32_t target = kv_virtio_cfg32(&d, 0);
		if (target > n_balloon && n_free)
			busy |= !!move_pages(&inflateq, free_stack, &n_free, balloon_stack, &n_balloon,
					    target - n_balloon);
		else if (target < n_balloon)
			busy |= !!move_pages(&deflateq, balloon_stack, &n_balloon, free_stack, &n_free,
					    n_balloon - target);
		if (n_balloon != reported_actual) {
			set_actual((uint32_t)n_balloon);
			reported_actual = (uint32_t)n_balloon;
			if (n_balloon == target || (target > n_balloon && !n_free))
				kv_printf("virtio-balloon: balloon at %lu pages (target %u)\n",
					  (unsigned long)n_balloon, target);
		}
		if (busy)
			continue;
		if (kvmpy_virtio_irq_ready == 1) {
			if (have_stats)
				kv_vq_interrupts(&statsq, 1);
			kv_mb();
			if (kv_virtio_cfg32(&d, 0) == target && !(have_stats && statsq.last_used !=
								   kv_vq_used_idx(&statsq)))
				kv_virtio_wait_irq(seen); /* hlt until the host changes something */
		} else {
			for (int i = 0; i < 1000; i++)
				kv_cpu_relax();
		}
	}
}
