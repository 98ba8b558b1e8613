/*
 * kvmpy-example: the guest of `kvmpy bench virtio`: block I/O at queue depths 1-32, polled,
 *   timed with the TSC (run it through the benchmark, which writes its parameters)
 * kvmpy-modes: long-user
 *
 * The VMM fills `kvmpy_vbench` (jobs: block size, queue depth, sequential or random, read or
 * write, how many requests) before the guest starts; the guest runs each job against the
 * first virtio-blk device, keeping `qd` requests in flight, and records per job the TSC at
 * start and end, the exits taken (hc_num_exits before and after; the calls themselves are
 * subtracted), and each request's latency (submit to completion seen, TSC ticks) in
 * `kvmpy_vbench_lat`. Completions are polled, so neither side of a request needs an exit:
 * the notify is an ioeventfd and the used ring is guest memory.
 */
#include <kvmpy.h>
#include <kvmpy/virtio.h>

#define MAX_JOBS 16
#define MAX_QD 32
#define QSIZE 128 /* 3 descriptors per request */
#define MAX_BS (64 * 1024)
#define MAX_LAT (1 << 20)
#define VBENCH_MAGIC 0x48434E4542565456ULL /* "VTVBENCH" */

struct vbench_job {
	uint32_t block_size, qd, random, write;
	uint64_t requests;
	/* results */
	uint64_t t_start, t_end, exits, errors, done, lat_first;
};

struct vbench {
	uint64_t magic;
	uint32_t n_jobs, transport; /* transport: written by the guest (1 mmio, 2 pci) */
	uint64_t seed;
	uint64_t sectors; /* written by the guest */
	uint64_t status;  /* 0 running, 1 done, >1 error code */
	struct vbench_job jobs[MAX_JOBS];
};

struct vbench kvmpy_vbench __attribute__((used));
uint32_t kvmpy_vbench_lat[MAX_LAT] __attribute__((used));

static unsigned char ring[kv_vq_bytes_const(QSIZE)] __attribute__((aligned(4096)));
static unsigned char bufs[MAX_QD][MAX_BS] __attribute__((aligned(4096)));
static struct kv_blk_req hdrs[MAX_QD];
static volatile uint8_t statuses[MAX_QD];
static uint64_t submitted_at[QSIZE];
static int slot_of_head[QSIZE];

static uint64_t rng_state;
static uint64_t next_rand(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

static int run_job(struct kv_vq *q, struct vbench_job *j, uint64_t sectors, uint64_t *lat_pos)
{
	uint32_t bs = j->block_size, qd = j->qd;
	uint64_t span = bs / 512, blocks = sectors / span, next_block = 0;
	uint64_t issued = 0, done = 0;
	int free_slots[MAX_QD], n_free = 0;
	for (uint32_t s = 0; s < qd; s++)
		free_slots[n_free++] = (int)s;
	j->lat_first = *lat_pos;
	long e0 = hc_num_exits();
	j->t_start = rdtsc();
	while (done < j->requests) {
		int added = 0;
		while (issued < j->requests && n_free > 0) {
			int s = free_slots[--n_free];
			uint64_t blk = j->random ? next_rand() % blocks : next_block++ % blocks;
			int head = kv_blk_submit(q, &hdrs[s], j->write ? KV_BLK_T_OUT : KV_BLK_T_IN,
						 blk * span, bufs[s], bs, &statuses[s]);
			if (head < 0)
				return 10;
			slot_of_head[head] = s;
			submitted_at[head] = rdtsc();
			issued++;
			added = 1;
		}
		if (added)
			kv_vq_kick(q);
		int head;
		while ((head = kv_vq_poll(q, 0)) >= 0) {
			uint64_t now = rdtsc();
			int s = slot_of_head[head];
			if (statuses[s] != 0)
				j->errors++;
			if (*lat_pos < MAX_LAT) {
				uint64_t l = now - submitted_at[head];
				kvmpy_vbench_lat[(*lat_pos)++] = l > 0xFFFFFFFFu ? 0xFFFFFFFFu : (uint32_t)l;
			}
			free_slots[n_free++] = s;
			done++;
		}
		if (n_free == 0 || issued == j->requests)
			kv_cpu_relax();
	}
	j->t_end = rdtsc();
	j->exits = (uint64_t)(hc_num_exits() - e0 - 1);
	j->done = done;
	return 0;
}

int main(void)
{
	struct vbench *b = &kvmpy_vbench;
	if (b->magic != VBENCH_MAGIC || b->n_jobs > MAX_JOBS) {
		kv_printf("virtio-bench: run me through `kvmpy bench virtio`\n");
		return 2;
	}
	struct kv_virtio_dev d;
	struct kv_vq q;
	if (kv_virtio_find(&d, KV_VIRTIO_ID_BLOCK, 0) < 0)
		return b->status = 3;
	if (kv_virtio_init(&d, KV_VIRTIO_F_EVENT_IDX) < 0)
		return b->status = 4;
	if (kv_vq_setup(&d, &q, 0, ring, QSIZE, -1) < 0)
		return b->status = 5;
	kv_vq_interrupts(&q, 0);
	kv_virtio_ready(&d);
	b->transport = (uint32_t)d.transport;
	b->sectors = kv_virtio_cfg64(&d, 0);
	rng_state = b->seed | 1;
	/* First touch of the buffers here, not inside a measurement. */
	for (int s = 0; s < MAX_QD; s++)
		for (int i = 0; i < MAX_BS; i += 4096)
			bufs[s][i] = (unsigned char)i;
	uint64_t lat_pos = 0;
	for (uint32_t i = 0; i < b->n_jobs; i++) {
		struct vbench_job *j = &b->jobs[i];
		if (j->block_size == 0 || j->block_size > MAX_BS || j->block_size % 512 ||
		    j->qd == 0 || j->qd > MAX_QD)
			return b->status = 6;
		int rc = run_job(&q, j, b->sectors, &lat_pos);
		if (rc)
			return b->status = (uint64_t)rc;
	}
	b->status = 1;
	return 0;
}
