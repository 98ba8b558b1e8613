/*
 * kvmpy-example: inter-VM transfer through a ring in shared memory (kvmpy ipc --mechanism
 *   shm-poll or shm-irq; needs a peer VM, so run it with `kvmpy ipc`)
 * kvmpy-modes: long-user
 *
 * One source for both shared-memory mechanisms: the ring code is the same, and the info page
 * the VMM fills in says whether the ends spin (shm-poll) or sleep until the peer's doorbell
 * (shm-irq). The sender writes the benchmark pattern straight into the ring and the receiver
 * checks it straight from the ring (zero copy), so neither needs a buffer as large as the
 * transfer: 1 GiB goes through a ring of a few hundred KiB. kvmpy_shm_send/_recv are the
 * copying form of the same API (see the ping-pong below).
 */
#include <kvmpy.h>
#include <kvmpy/ipc.h>
#include <kvmpy/smp.h>

/* Publish at most this much at a time, so the consumer starts on it while the producer
 * fills the next piece. */
#define CHUNK (16 * 1024)

static struct kvmpy_ipc_counters counters;
static unsigned char msg[4096];

static void send_stream(struct kvmpy_ring_end *tx, struct kvmpy_ipc_run *r, uint64_t size,
			uint64_t seed, volatile uint64_t *progress)
{
	struct kvmpy_pattern pat;
	kvmpy_pattern_init(&pat, seed);
	uint64_t left = size;
	while (left) {
		void *p;
		long room = kvmpy_ring_reserve(tx, &p);
		if (room < 0) {
			kvmpy_ipc_info()->error = KVMPY_EPROTO;
			return;
		}
		if (room == 0) {
			kvmpy_ring_wait_writable(tx);
			continue;
		}
		uint64_t n = (uint64_t)room;
		if (n > left)
			n = left;
		if (n > CHUNK)
			n = CHUNK;
		uint64_t t = rdtsc();
		kvmpy_pattern_fill(&pat, p, n);
		r->work_tsc += rdtsc() - t;
		kvmpy_ring_commit(tx, n);
		left -= n;
		*progress = size - left;
	}
	r->bytes = size;
}

static void receive_stream(struct kvmpy_ring_end *rx, struct kvmpy_ipc_run *r, uint64_t size,
			   uint64_t seed, volatile uint64_t *progress)
{
	struct kvmpy_pattern pat;
	kvmpy_pattern_init(&pat, seed);
	uint64_t left = size;
	while (left) {
		const void *p;
		long avail = kvmpy_ring_peek(rx, &p);
		if (avail < 0) {
			kvmpy_ipc_info()->error = KVMPY_EPROTO;
			return;
		}
		if (avail == 0) {
			kvmpy_ring_wait_readable(rx);
			continue;
		}
		uint64_t n = (uint64_t)avail;
		if (n > left)
			n = left;
		if (n > CHUNK)
			n = CHUNK;
		uint64_t t = rdtsc();
		kvmpy_pattern_check(&pat, p, n);
		r->work_tsc += rdtsc() - t;
		kvmpy_ring_release(rx, n);
		left -= n;
		*progress = size - left;
	}
	r->bytes = size;
	r->mismatches = pat.mismatches;
	kvmpy_pattern_sum(&pat, &r->csum_a, &r->csum_b);
}

/* Round trips of one message: the sender times each, the receiver echoes. */
static void pingpong(struct kvmpy_ring_end *tx, struct kvmpy_ring_end *rx,
		     struct kvmpy_ipc_run *r, uint64_t len, uint32_t rounds, uint64_t seed,
		     int sender, uint64_t *samples, uint64_t max_samples)
{
	struct kvmpy_pattern pat;
	for (uint32_t i = 0; i < rounds; i++) {
		if (sender) {
			kvmpy_pattern_init(&pat, seed + i);
			kvmpy_pattern_fill(&pat, msg, len);
			uint64_t t = rdtsc();
			if (kvmpy_shm_send(tx, msg, len) < 0 || kvmpy_shm_recv(rx, msg, len) < 0) {
				kvmpy_ipc_info()->error = KVMPY_EPROTO;
				return;
			}
			uint64_t rtt = rdtsc() - t;
			if (i < max_samples)
				samples[i] = rtt;
			kvmpy_pattern_init(&pat, seed + i);
			kvmpy_pattern_check(&pat, msg, len);
			r->mismatches += pat.mismatches;
		} else if (kvmpy_shm_recv(rx, msg, len) < 0 || kvmpy_shm_send(tx, msg, len) < 0) {
			kvmpy_ipc_info()->error = KVMPY_EPROTO;
			return;
		}
		r->bytes += len;
	}
}

/* Touch every page of the rings once: on shadow-paging hosts the first touch of a page
 * costs a fault (~11 us at CPL3 on KVM-PVM), which is not what a run should measure. */
static void touch(struct kvmpy_ring_end *e, int write)
{
	for (uint64_t off = 0; off < e->size; off += 4096) {
		if (write)
			((volatile unsigned char *)e->data)[off] = 0;
		else
			(void)((volatile unsigned char *)e->data)[off];
	}
}

static int run_all(void)
{
	struct kvmpy_ipc_info *info = kvmpy_ipc_info();
	if (!kvmpy_ipc_present() || info->shm_size == 0 ||
	    (info->ring_size & (info->ring_size - 1)) || info->runs >= KVMPY_IPC_MAX_RUNS) {
		kv_printf("ipc-shm: no kvmpy ipc info page here; run me with `kvmpy ipc`\n");
		return 2;
	}
	int sender = info->role == KVMPY_IPC_SENDER;
	struct kvmpy_ring_end tx, rx;
	kvmpy_ring_end_init(&tx, 1, &counters);
	kvmpy_ring_end_init(&rx, 0, &counters);
	uint64_t t = rdtsc();
	touch(&tx, 1);
	touch(&rx, 0);
	for (uint64_t off = 0; off < sizeof msg; off += 4096)
		msg[off] = 0;
	info->first_touch_tsc = rdtsc() - t;

	uint64_t *samples = kvmpy_ipc_samples();
	uint64_t max_samples = KVMPY_IPC_MAX_SAMPLES;
	if (info->pingpong && info->size > sizeof msg) {
		info->error = KVMPY_EINVAL;
		return 3;
	}
	for (uint32_t run = 0; run <= info->runs; run++) {
		struct kvmpy_ipc_run *r = &info->run[run];
		__builtin_memset(&counters, 0, sizeof counters);
		info->progress = 0;
		uint64_t seed = info->seed + run;
		kvmpy_ipc_barrier();
		/* The VMMs release the two barriers a little apart; meet here, in shared memory,
		 * so the run starts when both sides run (the consumer of a ring is ready before
		 * its producer writes). */
		__atomic_store_n(&rx.ctl->consumer_ready, run + 1, __ATOMIC_RELEASE);
		while (__atomic_load_n(&tx.ctl->consumer_ready, __ATOMIC_ACQUIRE) != run + 1)
			kvmpy_cpu_relax();
		r->t_start = rdtsc();
		if (info->pingpong) {
			/* Run 0 warms up and keeps no samples; run k's go at (k - 1) * rounds. */
			uint64_t base = run ? (uint64_t)(run - 1) * info->pingpong : max_samples;
			uint64_t room = base < max_samples ? max_samples - base : 0;
			pingpong(&tx, &rx, r, info->size, info->pingpong, seed, sender,
				 samples + (room ? base : 0), room);
		} else if (sender) {
			send_stream(&tx, r, info->size, seed, &info->progress);
		} else {
			receive_stream(&rx, r, info->size, seed, &info->progress);
		}
		r->t_end = rdtsc();
		r->waits = counters.waits;
		r->wait_tsc = counters.wait_tsc;
		r->blocks = counters.blocks;
		r->doorbells = counters.doorbells;
		r->doorbell_tsc = counters.doorbell_tsc;
		r->irq_lat_tsc = counters.irq_lat_tsc;
		r->irq_lat_n = counters.irq_lat_n;
		r->wake_tsc = counters.wake_tsc;
		info->runs_done = run + 1;
		kvmpy_ipc_run_done(run);
		if (info->error)
			return 4;
	}
	return 0;
}

static volatile int status;

static void on_irq_cpu(void *arg)
{
	(void)arg;
	status = run_all();
}

int main(void)
{
	/* The doorbells interrupt vCPU irq_cpu: run the ring loop there, where its wake-ups
	 * land (Xen's per-event-channel vCPU binding), while CPU 0 waits in the VMM. */
	uint32_t cpu = kvmpy_ipc_info()->irq_cpu;
	if (cpu == 0 || cpu >= smp_num_cpus())
		return run_all();
	smp_start(cpu, on_irq_cpu, 0);
	smp_wait(1ULL << cpu);
	return status;
}
