/*
 * kvmpy-example: inter-VM transfer through port I/O (kvmpy ipc --mechanism pio; needs a peer
 *   VM, so run it with `kvmpy ipc`)
 * kvmpy-modes: long-user
 *
 * The sender writes the benchmark pattern into a buffer and pushes it through the data port
 * (byte `out`, dword `out` or string `rep outsl`, as the info page says); its VMM hands the
 * bytes to the receiver's VMM over a unix socket, and the receiver's `in`/`rep insl` wait
 * there until they arrive. The receiver checks every byte against the pattern.
 */
#include <kvmpy.h>
#include <kvmpy/ipc.h>

/* The buffer each side fills or checks per step; 64 KiB of a larger transfer at a time. */
#define CHUNK (64 * 1024)

static unsigned char buf[CHUNK];

static void send_stream(struct kvmpy_ipc_info *info, struct kvmpy_ipc_run *r, uint64_t seed)
{
	struct kvmpy_pattern pat;
	kvmpy_pattern_init(&pat, seed);
	uint64_t left = info->size;
	while (left) {
		uint64_t n = left < CHUNK ? left : CHUNK;
		uint64_t t0 = rdtsc();
		kvmpy_pattern_fill(&pat, buf, n);
		uint64_t t1 = rdtsc();
		kvmpy_pio_send_noflush(buf, n, (int)info->pio_width);
		r->io_tsc += rdtsc() - t1;
		r->work_tsc += t1 - t0;
		left -= n;
		info->progress = info->size - left;
	}
	uint64_t t = rdtsc();
	kvmpy_pio_flush();
	r->io_tsc += rdtsc() - t;
	r->bytes = info->size;
}

static void receive_stream(struct kvmpy_ipc_info *info, struct kvmpy_ipc_run *r, uint64_t seed)
{
	struct kvmpy_pattern pat;
	kvmpy_pattern_init(&pat, seed);
	uint64_t left = info->size;
	while (left) {
		uint64_t n = left < CHUNK ? left : CHUNK;
		uint64_t t0 = rdtsc();
		kvmpy_pio_recv(buf, n, (int)info->pio_width);
		uint64_t t1 = rdtsc();
		kvmpy_pattern_check(&pat, buf, n);
		r->work_tsc += rdtsc() - t1;
		r->io_tsc += t1 - t0;
		left -= n;
		info->progress = info->size - left;
	}
	r->bytes = info->size;
	r->mismatches = pat.mismatches;
	kvmpy_pattern_sum(&pat, &r->csum_a, &r->csum_b);
}

static void pingpong(struct kvmpy_ipc_info *info, struct kvmpy_ipc_run *r, uint64_t seed,
		     uint64_t *samples, uint64_t max_samples)
{
	struct kvmpy_pattern pat;
	uint64_t len = info->size;
	int width = (int)info->pio_width;
	for (uint32_t i = 0; i < info->pingpong; i++) {
		if (info->role == KVMPY_IPC_SENDER) {
			kvmpy_pattern_init(&pat, seed + i);
			kvmpy_pattern_fill(&pat, buf, len);
			uint64_t t = rdtsc();
			kvmpy_pio_send(buf, len, width);
			kvmpy_pio_recv(buf, len, width);
			uint64_t rtt = rdtsc() - t;
			if (i < max_samples)
				samples[i] = rtt;
			kvmpy_pattern_init(&pat, seed + i);
			kvmpy_pattern_check(&pat, buf, len);
			r->mismatches += pat.mismatches;
		} else {
			kvmpy_pio_recv(buf, len, width);
			kvmpy_pio_send(buf, len, width);
		}
		r->bytes += len;
	}
}

int main(void)
{
	struct kvmpy_ipc_info *info = kvmpy_ipc_info();
	if (!kvmpy_ipc_present() || info->runs >= KVMPY_IPC_MAX_RUNS) {
		kv_printf("ipc-pio: no kvmpy ipc info page here; run me with `kvmpy ipc`\n");
		return 2;
	}
	if (info->pingpong && info->size > CHUNK) {
		info->error = KVMPY_EINVAL;
		return 3;
	}
	/* First touch of the buffer, measured apart from the runs. */
	uint64_t t = rdtsc();
	for (uint64_t off = 0; off < CHUNK; off += 4096)
		buf[off] = 0;
	info->first_touch_tsc = rdtsc() - t;

	uint64_t *samples = kvmpy_ipc_samples();
	uint64_t max_samples = KVMPY_IPC_MAX_SAMPLES;
	for (uint32_t run = 0; run <= info->runs; run++) {
		struct kvmpy_ipc_run *r = &info->run[run];
		info->progress = 0;
		uint64_t seed = info->seed + run;
		kvmpy_ipc_barrier();
		r->t_start = rdtsc();
		if (info->pingpong) {
			uint64_t base = run ? (uint64_t)(run - 1) * info->pingpong : max_samples;
			uint64_t room = base < max_samples ? max_samples - base : 0;
			pingpong(info, r, seed, samples + (room ? base : 0), room);
		} else if (info->role == KVMPY_IPC_SENDER) {
			send_stream(info, r, seed);
		} else {
			receive_stream(info, r, seed);
		}
		r->t_end = rdtsc();
		info->runs_done = run + 1;
		kvmpy_ipc_run_done(run);
	}
	return 0;
}
