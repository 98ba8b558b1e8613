/*
 * kvmpy-example: the guest of `kvmpy bench net`: virtio-net frames and vsock streams at
 *   full speed, timed with the TSC (run it through the benchmark, which drives it)
 * kvmpy-modes: long-user
 *
 * The VMM fills `kvmpy_nbench` with jobs before the guest starts and plays the host side of
 * each. The guest announces each job (`ready`), waits until the host says its side is set
 * (`go`), and runs it:
 *   net-tx     send `count` frames of `size` bytes (EtherType 0x88B5) as fast as the queue
 *              takes them; the job ends when every one is back from the device
 *   net-rx     count frames until the host sets `stop`; TSC of the first and last one
 *   vsock-tx   connect to host port `port`, send `bytes` in 64 KiB packets, close
 *   vsock-rx   accept on `port`, read until the host closes, count bytes
 * Frames and packets are polled while they come; an idle guest sleeps until an interrupt
 * (kv_vq_idle), so on a small host the spinning vCPU does not take the CPU the device's I/O
 * thread needs. No exit on the data path (notifies are ioeventfds, interrupts irqfds).
 */
#include <kvmpy.h>
/* 64 KiB receive buffers and a 4 MiB window: a stream in few, large packets. */
#define KV_VSOCK_RX_BUF (44 + 65536)
#define KV_VSOCK_BUF_ALLOC (4 << 20)
#include <kvmpy/virtio.h>

#define MAGIC 0x484342544E59504BULL /* "KPYNTBCH" */
#define MAX_JOBS 16
#define QSIZE 256

enum { NET_TX = 1, NET_RX = 2, VSOCK_TX = 3, VSOCK_RX = 4 };

struct job {
	uint32_t kind, size;
	uint64_t count, bytes;
	uint32_t port, pad;
	/* results */
	uint64_t t_start, t_end, done, errors;
};

struct nbench {
	uint64_t magic;
	uint32_t n_jobs, current;
	volatile uint64_t ready; /* job index + 1 once the guest is ready for the host's side */
	volatile uint64_t stop;  /* set by the host: the net-rx job is over */
	uint64_t status;         /* 0 running, 1 done, >1 error */
	volatile uint64_t go;    /* set by the host to job index + 1: its side is ready */
	struct job jobs[MAX_JOBS];
};

struct nbench kvmpy_nbench __attribute__((used));

static unsigned char netmem[kv_net_bytes_const(QSIZE)] __attribute__((aligned(4096)));
static unsigned char vsmem[kv_vsock_bytes_const] __attribute__((aligned(4096)));
static unsigned char frame[KV_NET_MAX_FRAME];
static unsigned char chunk[1 << 20];

static void net_tx(struct kv_net *n, struct job *j)
{
	for (uint32_t i = 0; i < 12; i++)
		frame[i] = i < 6 ? 0xff : n->mac[i - 6];
	frame[12] = 0x88, frame[13] = 0xb5;
	for (uint32_t i = 14; i < j->size; i++)
		frame[i] = (unsigned char)i;
	uint64_t sent = 0;
	j->t_start = rdtsc();
	while (sent < j->count) {
		int queued = 0;
		while (sent < j->count && kv_net_queue(n, frame, j->size) == 0) {
			sent++;
			queued++;
		}
		if (queued)
			kv_net_kick(n);
		else
			kv_vq_idle(&n->tx); /* every slot in flight: sleep until some come back */
	}
	while (n->tx.num_free != n->tx.size) { /* every frame back from the device */
		kv_net_reclaim(n);
		kv_cpu_relax();
	}
	j->t_end = rdtsc();
	j->done = sent;
}

static void net_rx(struct kv_net *n, struct job *j, struct nbench *b)
{
	uint64_t got = 0, first = 0, last = 0;
	int idle = 0;
	while (!b->stop) {
		int len = kv_net_recv(n, 0, 0);
		if (len < 0) {
			/* nothing for a while: sleep until a frame comes (the host sends one more after
			 * setting `stop`) */
			if (++idle > 4096) {
				kv_vq_idle(&n->rx);
				idle = 0;
			} else {
				kv_cpu_relax();
			}
			continue;
		}
		idle = 0;
		/* the benchmark's frames only (the host may send something of its own) */
		last = rdtsc();
		if (!got)
			first = last;
		got++;
	}
	j->t_start = first;
	j->t_end = last;
	j->done = got;
}

static void vsock_tx(struct kv_vsock *v, struct job *j)
{
	struct kv_vsock_conn c;
	for (uint32_t i = 0; i < sizeof(chunk); i++)
		chunk[i] = (unsigned char)(i * 13);
	if (kv_vsock_connect(v, &c, 30000 + (uint32_t)(j - kvmpy_nbench.jobs), j->port) < 0) {
		j->errors++;
		return;
	}
	j->t_start = rdtsc();
	uint64_t left = j->bytes;
	while (left) {
		uint64_t n = left < sizeof(chunk) ? left : sizeof(chunk);
		if (kv_vsock_send(v, &c, chunk, n) < 0) {
			j->errors++;
			break;
		}
		left -= n;
	}
	kv_vsock_close(v, &c);
	j->t_end = rdtsc();
	j->done = j->bytes - left;
}

static void vsock_rx(struct kv_vsock *v, struct job *j)
{
	struct kv_vsock_conn c;
	kv_vsock_accept(v, &c, j->port);
	uint64_t got = 0;
	j->t_start = rdtsc();
	for (;;) {
		long n = kv_vsock_recv(v, &c, 0, ~0ULL);
		if (n == 0)
			break;
		if (n < 0) {
			kv_vq_idle(&v->rx);
			continue;
		}
		got += (uint64_t)n;
	}
	j->t_end = rdtsc();
	kv_vsock_close(v, &c);
	j->done = got;
}

int main(void)
{
	struct nbench *b = &kvmpy_nbench;
	if (b->magic != MAGIC || b->n_jobs > MAX_JOBS) {
		kv_printf("virtio-netbench: run me through `kvmpy bench net`\n");
		return 2;
	}
	struct kv_net n;
	struct kv_vsock v;
	int have_net = 0, have_vsock = 0;
	for (uint32_t i = 0; i < b->n_jobs; i++) {
		struct job *j = &b->jobs[i];
		if ((j->kind == NET_TX || j->kind == NET_RX) && !have_net) {
			if (kv_net_init(&n, 0, netmem, QSIZE, 1) < 0)
				return (int)(b->status = 3);
			have_net = 1;
		}
		if ((j->kind == VSOCK_TX || j->kind == VSOCK_RX) && !have_vsock) {
			if (kv_vsock_init(&v, vsmem, 1) < 0)
				return (int)(b->status = 4);
			have_vsock = 1;
		}
		if (j->size > KV_NET_MAX_FRAME || j->size < 60)
			j->size = 60;
		b->current = i;
		b->stop = 0;
		b->ready = i + 1;
		while (b->go != i + 1)
			kv_cpu_relax();
		if (j->kind == NET_TX)
			net_tx(&n, j);
		else if (j->kind == NET_RX)
			net_rx(&n, j, b);
		else if (j->kind == VSOCK_TX)
			vsock_tx(&v, j);
		else if (j->kind == VSOCK_RX)
			vsock_rx(&v, j);
		else
			return (int)(b->status = 5);
	}
	b->status = 1;
	return 0;
}
