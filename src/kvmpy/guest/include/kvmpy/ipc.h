/*
 * kvmpy/ipc.h: channels between two kvmpy VMs (docs/ipc.md).
 *
 * Three mechanisms, one per `kvmpy ipc --mechanism`:
 *
 *   pio       bytes go through a data port: `out`/`rep outs` to send, `in`/`rep ins` to
 *             receive. Each VMM relays them to the other over a unix socket. Every item is
 *             a trip through the hypervisor, so this is the slow, naive channel.
 *   shm-poll  a single-producer single-consumer ring in a memory region both VMs map at
 *             KVMPY_IPC_SHM_GPA; both sides spin on the ring's indices. No exit at all.
 *   shm-irq   the same ring, plus doorbells: writing (peer << 16 | vector) to the doorbell
 *             port raises that interrupt vector in the peer VM without leaving the kernel
 *             (ioeventfd -> irqfd -> MSI), as QEMU's ivshmem-doorbell does. A side with
 *             nothing to do sleeps in `hlt` until the peer rings.
 *
 * Everything here is for 64-bit guests (kvmpy build --mode long-user, or long). The VMM
 * writes this VM's parameters (its peer ID, which rings are its own, their sizes, the
 * benchmark's size) into a private info page at KVMPY_IPC_INFO_GPA before the guest starts;
 * the guest trusts that page and never the shared region's contents, which the other VM can
 * rewrite at any time: ring sizes and positions come from the info page, and indices read
 * from the shared region are checked before they are used (kvmpy_ring_peek returns
 * -KVMPY_EPROTO for indices no honest peer can produce).
 *
 * Interrupts (shm-irq): the VMM installs kvmpy_ipc_irq_vec<N> (below) as the ring-0 handler
 * of IDT vector KVMPY_IPC_VECTOR_BASE + N and kvmpy_ipc_wait_gate as the handler of vector 3
 * with DPL 3: CPL3 code cannot execute `hlt` (#GP) and, on some software hypervisors
 * (KVM-PVM), not `int n` either, but `int3` reaches a DPL-3 gate everywhere, so `int3` with
 * rax = the interrupt count last seen is how a CPL3 guest sleeps until the next interrupt.
 * The handlers are a handful of instructions because ring-0 code is emulated on such hosts.
 */
#ifndef KVMPY_IPC_H
#define KVMPY_IPC_H

#include <kvmpy.h>

#if !defined(__x86_64__)
#error "kvmpy/ipc.h is for 64-bit guests (modes long and long-user)"
#endif

/* --- layout and ABI (mirrored in src/kvmpy/ipc/layout.py) ------------------------------- */

/* Identity-mapped like all guest memory, so these are virtual addresses too. Guest RAM must
 * end below KVMPY_IPC_INFO_GPA (kvmpy ipc gives each VM 32 MiB). */
#define KVMPY_IPC_INFO_GPA 0x40000000UL
#define KVMPY_IPC_INFO_SIZE 0x10000UL
#define KVMPY_IPC_SHM_GPA 0x40200000UL

#define KVMPY_IPC_PORT_DATA 0x600     /* pio: out = send; in = receive, waits for the peer */
#define KVMPY_IPC_PORT_FLUSH 0x604    /* pio: out: hand everything sent so far to the peer */
#define KVMPY_IPC_PORT_SYNC 0x608     /* in: wait for the peer (start barrier); out: run done */
#define KVMPY_IPC_PORT_DOORBELL 0x60C /* out dx, eax with eax = (peer << 16) | vector;
					 * in: this VM's peer ID (ivshmem's IVPosition) */

#define KVMPY_IPC_VECTOR_BASE 0x40 /* IDT vector of doorbell vector 0 */
#define KVMPY_IPC_MAX_VECTORS 4
#define KVMPY_IPC_VEC_DATA 0  /* the producer rings this: there is data to read */
#define KVMPY_IPC_VEC_SPACE 1 /* the consumer rings this: there is room to write */

#define KVMPY_IPC_MAGIC 0x3143504959504D4BULL /* "KMPYIPC1" */
#define KVMPY_IPC_VERSION 1
#define KVMPY_EPROTO 71

enum kvmpy_ipc_mechanism { KVMPY_IPC_PIO = 1, KVMPY_IPC_SHM_POLL = 2, KVMPY_IPC_SHM_IRQ = 3 };
enum kvmpy_ipc_role { KVMPY_IPC_SENDER = 0, KVMPY_IPC_RECEIVER = 1 };
/* How pio moves bytes: one `out`/`in` per byte or per dword, or string I/O (rep outsl/insl,
 * rep outsb/insb for the tail). */
enum kvmpy_pio_width { KVMPY_PIO_STRING = 0, KVMPY_PIO_BYTE = 1, KVMPY_PIO_DWORD = 4 };
/* How a shm-irq ring user waits for the peer's doorbell: asleep in hlt, or spinning on the
 * interrupt count its handler keeps. (shm-poll always spins on the ring.) */
enum kvmpy_ipc_wait_mode { KVMPY_WAIT_BLOCK = 0, KVMPY_WAIT_SPIN = 1 };

/* One ring's control block in the shared region: each index on its own cache line so the
 * producer and the consumer never write the same line. Indices count bytes since the start
 * and never wrap back (2^64 bytes is centuries at memory speed); the data byte of index i is
 * data[i & (size - 1)]. */
struct kvmpy_ring {
	volatile uint64_t head; /* bytes produced; written by the producer only */
	volatile uint64_t notify_tsc; /* rdtsc just before the producer's last doorbell */
	uint64_t pad0[6];
	volatile uint64_t tail; /* bytes consumed; written by the consumer only */
	volatile uint64_t space_tsc; /* rdtsc just before the consumer's last doorbell */
	volatile uint64_t consumer_ready; /* run + 1 once the consumer is at its start line */
	uint64_t pad1[5];
	volatile uint32_t consumer_waiting; /* set by a consumer about to sleep (shm-irq) */
	uint32_t pad2[15];
	volatile uint32_t producer_waiting; /* set by a producer about to sleep (shm-irq) */
	uint32_t pad3[15];
};

/* What one run of a benchmark guest measured; the VMM reads these from the info page. */
struct kvmpy_ipc_run {
	uint64_t t_start, t_end; /* rdtsc after the start barrier, after the last byte */
	uint64_t bytes;          /* bytes this side moved */
	uint64_t mismatches;     /* receiver: words (bytes at unaligned edges) unlike the pattern */
	uint64_t csum_a, csum_b; /* receiver: checksum of what arrived (kvmpy_pattern) */
	uint64_t waits;          /* times the ring was empty (receiver) or full (sender) */
	uint64_t wait_tsc;       /* TSC ticks spent waiting for the peer */
	uint64_t blocks;         /* of the waits, those that waited for an interrupt (shm-irq) */
	uint64_t doorbells;      /* doorbells rung */
	uint64_t doorbell_tsc;   /* ticks spent in the doorbell `out` */
	uint64_t io_tsc;         /* pio: ticks spent in `out`/`in` instructions */
	uint64_t work_tsc;       /* ticks spent generating or verifying the pattern */
	uint64_t irq_lat_tsc;    /* shm-irq: sum of (handler entry - peer's rdtsc before ringing) */
	uint64_t irq_lat_n;      /* how many wake-ups that sum covers */
	uint64_t wake_tsc;       /* sum of (wait returned - handler entry) over those wake-ups */
};

#define KVMPY_IPC_MAX_RUNS 32
#define KVMPY_IPC_SAMPLES_OFFSET 0x2000
#define KVMPY_IPC_MAX_SAMPLES ((KVMPY_IPC_INFO_SIZE - KVMPY_IPC_SAMPLES_OFFSET) / 8)

/* The private info page. Offsets are ABI: the VMM and the interrupt handlers use them. */
struct kvmpy_ipc_info {
	/* 0x000: written by the VMM before the guest starts */
	uint64_t magic;
	uint32_t version, mechanism;
	uint32_t peer_id, peer;   /* this VM's doorbell peer ID and the other VM's */
	uint32_t role;            /* benchmark guests: KVMPY_IPC_SENDER or _RECEIVER */
	uint32_t pio_width;       /* enum kvmpy_pio_width */
	uint32_t wait_mode;       /* enum kvmpy_ipc_wait_mode */
	uint32_t vectors;         /* doorbell vectors per peer */
	uint64_t size;            /* benchmark: bytes per run, or ping-pong message size */
	uint32_t runs;            /* benchmark: measured runs (after one warm-up run) */
	uint32_t pingpong;        /* benchmark: round trips per run, 0 for a bulk transfer */
	uint64_t tsc_khz;
	uint64_t shm_size;        /* bytes of the shared region, 0 for pio */
	uint64_t tx_ring, tx_data; /* offsets in the shared region: this VM's send ring */
	uint64_t rx_ring, rx_data; /* and its receive ring */
	uint64_t ring_size;       /* data bytes per ring, a power of two */
	uint64_t seed;            /* benchmark: pattern seed of run 0 */
	uint32_t irq_cpu;         /* the vCPU the doorbells interrupt (kvmpy ipc --irq-cpu) */
	uint32_t vmm_pad;
	uint64_t vmm_reserved[16];
	/* 0x100: written by the interrupt handlers (ring 0) */
	volatile uint64_t irq_total;
	volatile uint64_t irq_count[KVMPY_IPC_MAX_VECTORS];
	volatile uint64_t irq_last_tsc;
	volatile uint32_t irq_last_cpu;   /* the vCPU that took the last one (its %gs:0) */
	uint32_t irq_reserved32;
	uint64_t irq_reserved[1];
	/* 0x140: written by the guest */
	volatile uint64_t progress;       /* bytes moved so far in this run (the VMM watches it) */
	volatile uint64_t first_touch_tsc; /* ticks spent touching the ring and buffers first */
	volatile uint64_t runs_done;
	volatile uint64_t error;          /* nonzero: what went wrong (guest-defined code) */
	uint64_t guest_reserved[20];
	/* 0x200 */
	struct kvmpy_ipc_run run[KVMPY_IPC_MAX_RUNS]; /* index 0 is the warm-up run */
	/* KVMPY_IPC_SAMPLES_OFFSET: ping-pong round trips in TSC ticks, every run in turn */
};

_Static_assert(__builtin_offsetof(struct kvmpy_ipc_info, irq_total) == 0x100, "ABI");
_Static_assert(__builtin_offsetof(struct kvmpy_ipc_info, progress) == 0x140, "ABI");
_Static_assert(__builtin_offsetof(struct kvmpy_ipc_info, run) == 0x200, "ABI");
_Static_assert(sizeof(struct kvmpy_ipc_run) == 128, "ABI");
_Static_assert(0x200 + KVMPY_IPC_MAX_RUNS * 128 <= KVMPY_IPC_SAMPLES_OFFSET, "ABI");
_Static_assert(sizeof(struct kvmpy_ring) == 256, "ABI");

static inline struct kvmpy_ipc_info *kvmpy_ipc_info(void)
{
	return (struct kvmpy_ipc_info *)KVMPY_IPC_INFO_GPA;
}

static inline uint64_t *kvmpy_ipc_samples(void)
{
	return (uint64_t *)(KVMPY_IPC_INFO_GPA + KVMPY_IPC_SAMPLES_OFFSET);
}

/* This VM's peer ID, or -1 without an ipc VMM (an unassigned port reads all ones). One exit. */
static inline long kvmpy_ipc_peer_id(void)
{
	uint32_t id = inl(KVMPY_IPC_PORT_DOORBELL);
	return id == 0xFFFFFFFFu ? -1 : (long)id;
}

/* Is an ipc VMM there, with an info page of this version? (Without one the info page is
 * not mapped, so look at the port first.) */
static inline int kvmpy_ipc_present(void)
{
	if (kvmpy_ipc_peer_id() < 0)
		return 0;
	struct kvmpy_ipc_info *i = kvmpy_ipc_info();
	return i->magic == KVMPY_IPC_MAGIC && i->version == KVMPY_IPC_VERSION;
}

/* Start barrier: returns once the peer has reached its barrier too (one exit). */
static inline void kvmpy_ipc_barrier(void) { (void)inl(KVMPY_IPC_PORT_SYNC); }

/* Tell the VMM a measured run is over (one exit); it counts the exits in between. */
static inline void kvmpy_ipc_run_done(uint32_t run) { outl(KVMPY_IPC_PORT_SYNC, run); }

/* --- interrupts (shm-irq) -------------------------------------------------------------- */

/*
 * The handlers, emitted once per image whatever the number of files including this header
 * (a COMDAT group). A doorbell handler counts the interrupt in the info page, notes when it
 * ran and signals end of interrupt to the x2APIC (MSR 0x80B; xAPIC MMIO is not usable on
 * every host). The wait gate sleeps only if no interrupt came since the caller looked
 * (rax = irq_total then): it runs with IF clear (interrupt gate), so the check and `sti;
 * hlt` cannot miss one, and `sti` delays interrupts until `hlt` has started.
 */
__asm__(".pushsection .text.kvmpy_ipc_irq,\"axG\",@progbits,kvmpy_ipc_irq,comdat\n"
	".macro kvmpy_ipc_irq_vec n\n"
	".globl kvmpy_ipc_irq_vec\\n\n"
	"kvmpy_ipc_irq_vec\\n:\n"
	"	pushq %rax\n"
	"	pushq %rcx\n"
	"	pushq %rdx\n"
	"	incq 0x40000100\n"
	"	incq 0x40000108 + 8 * \\n\n"
	"	rdtsc\n"
	"	movl %eax, 0x40000128\n"
	"	movl %edx, 0x4000012C\n"
	"	movl %gs:0, %eax\n"
	"	movl %eax, 0x40000130\n"
	"	movl $0x80B, %ecx\n"
	"	xorl %eax, %eax\n"
	"	xorl %edx, %edx\n"
	"	wrmsr\n"
	"	popq %rdx\n"
	"	popq %rcx\n"
	"	popq %rax\n"
	"	iretq\n"
	".endm\n"
	"kvmpy_ipc_irq_vec 0\n"
	"kvmpy_ipc_irq_vec 1\n"
	"kvmpy_ipc_irq_vec 2\n"
	"kvmpy_ipc_irq_vec 3\n"
	".globl kvmpy_ipc_wait_gate\n"
	"kvmpy_ipc_wait_gate:\n"
	"	cmpq %rax, 0x40000100\n"
	"	jne 1f\n"
	"	sti\n"
	"	hlt\n"
	"1:	iretq\n"
	".popsection\n");

/* Interrupts this VM has taken on its doorbell vectors. */
static inline uint64_t kvmpy_ipc_irq_total(void) { return kvmpy_ipc_info()->irq_total; }

/* Sleep until an interrupt arrives, unless one arrived since irq_total was `seen`. Needs the
 * VMM to have installed kvmpy_ipc_wait_gate (kvmpy ipc does so for shm-irq). */
static inline void kvmpy_ipc_wait_irq(uint64_t seen)
{
	__asm__ volatile("int3" : : "a"(seen) : "memory");
}

/* Raise doorbell `vector` of peer `peer` (ivshmem-doorbell's register format). */
static inline void kvmpy_ipc_doorbell(uint32_t peer, uint32_t vector)
{
	outl(KVMPY_IPC_PORT_DOORBELL, (peer << 16) | (vector & 0xFFFF));
}

/* --- rings (shm-poll, shm-irq) --------------------------------------------------------- */

/* Counters a ring user keeps for itself (guest-private memory). */
struct kvmpy_ipc_counters {
	uint64_t waits, wait_tsc, blocks, doorbells, doorbell_tsc;
	uint64_t irq_lat_tsc, irq_lat_n, wake_tsc;
};

/* One end of a ring, set up from the trusted info page. */
struct kvmpy_ring_end {
	struct kvmpy_ring *ctl;
	unsigned char *data;
	uint64_t size, mask;
	uint32_t peer;   /* whom to ring */
	int notify;      /* ring doorbells (shm-irq) */
	int wait_mode;   /* enum kvmpy_ipc_wait_mode */
	struct kvmpy_ipc_counters *counters;
};

static inline void kvmpy_ring_end_init(struct kvmpy_ring_end *e, int tx,
				       struct kvmpy_ipc_counters *counters)
{
	struct kvmpy_ipc_info *i = kvmpy_ipc_info();
	unsigned char *shm = (unsigned char *)KVMPY_IPC_SHM_GPA;
	e->ctl = (struct kvmpy_ring *)(shm + (tx ? i->tx_ring : i->rx_ring));
	e->data = shm + (tx ? i->tx_data : i->rx_data);
	e->size = i->ring_size;
	e->mask = i->ring_size - 1;
	e->peer = i->peer;
	e->notify = i->mechanism == KVMPY_IPC_SHM_IRQ;
	e->wait_mode = (int)i->wait_mode;
	e->counters = counters;
}

static inline void kvmpy_cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

/* Producer: how many bytes can be written now without wrapping, and where. 0: ring full.
 * Negative (-KVMPY_EPROTO): the consumer's index is impossible. */
static inline long kvmpy_ring_reserve(struct kvmpy_ring_end *e, void **p)
{
	uint64_t head = e->ctl->head; /* ours: only we write it */
	uint64_t tail = __atomic_load_n(&e->ctl->tail, __ATOMIC_ACQUIRE);
	uint64_t used = head - tail;
	if (used > e->size)
		return -KVMPY_EPROTO;
	uint64_t off = head & e->mask;
	uint64_t free = e->size - used, to_end = e->size - off;
	*p = e->data + off;
	return (long)(free < to_end ? free : to_end);
}

/* Consumer: how many bytes can be read now without wrapping, and where. 0: ring empty. */
static inline long kvmpy_ring_peek(struct kvmpy_ring_end *e, const void **p)
{
	uint64_t tail = e->ctl->tail;
	uint64_t head = __atomic_load_n(&e->ctl->head, __ATOMIC_ACQUIRE);
	uint64_t avail = head - tail;
	if (avail > e->size)
		return -KVMPY_EPROTO;
	uint64_t off = tail & e->mask, to_end = e->size - off;
	*p = e->data + off;
	return (long)(avail < to_end ? avail : to_end);
}

static inline void kvmpy_ring_ring(struct kvmpy_ring_end *e, volatile uint64_t *stamp,
				   uint32_t vector)
{
	uint64_t t = rdtsc();
	*stamp = t;
	kvmpy_ipc_doorbell(e->peer, vector);
	e->counters->doorbells++;
	e->counters->doorbell_tsc += rdtsc() - t;
}

/* Producer: publish n bytes written at the reserved place; wake the consumer if it sleeps.
 * The full fence orders our index store before the load of the consumer's flag, and the
 * consumer's fence orders its flag store before its index load (Dekker): one of the two sees
 * the other's store, so the consumer never sleeps on data it was not told about. */
static inline void kvmpy_ring_commit(struct kvmpy_ring_end *e, uint64_t n)
{
	__atomic_store_n(&e->ctl->head, e->ctl->head + n, __ATOMIC_RELEASE);
	if (e->notify) {
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		if (e->ctl->consumer_waiting &&
		    __atomic_exchange_n(&e->ctl->consumer_waiting, 0, __ATOMIC_SEQ_CST))
			kvmpy_ring_ring(e, &e->ctl->notify_tsc, KVMPY_IPC_VEC_DATA);
	}
}

/* Consumer: hand n read bytes back to the producer; wake it if it waits for room. */
static inline void kvmpy_ring_release(struct kvmpy_ring_end *e, uint64_t n)
{
	__atomic_store_n(&e->ctl->tail, e->ctl->tail + n, __ATOMIC_RELEASE);
	if (e->notify) {
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		if (e->ctl->producer_waiting &&
		    __atomic_exchange_n(&e->ctl->producer_waiting, 0, __ATOMIC_SEQ_CST))
			kvmpy_ring_ring(e, &e->ctl->space_tsc, KVMPY_IPC_VEC_SPACE);
	}
}

/* Wait until `ready(e)` holds. Without doorbells (shm-poll) spin on the ring itself. With
 * them, raise our waiting flag in the ring (`flag`), look once more, then wait for the
 * interrupt: asleep in hlt (KVMPY_WAIT_BLOCK) or spinning on the handler's count
 * (KVMPY_WAIT_SPIN). `stamp` is the peer's rdtsc before its doorbell, for the latency
 * figures. */
static inline void kvmpy_ring_wait(struct kvmpy_ring_end *e, int (*ready)(struct kvmpy_ring_end *),
				   volatile uint32_t *flag, volatile uint64_t *stamp)
{
	struct kvmpy_ipc_counters *c = e->counters;
	uint64_t t0 = rdtsc();
	c->waits++;
	if (!e->notify) {
		while (!ready(e))
			kvmpy_cpu_relax();
	} else {
		struct kvmpy_ipc_info *info = kvmpy_ipc_info();
		while (!ready(e)) {
			uint64_t seen = info->irq_total;
			__atomic_store_n(flag, 1, __ATOMIC_SEQ_CST);
			if (ready(e))
				break;
			c->blocks++;
			if (e->wait_mode == KVMPY_WAIT_BLOCK)
				kvmpy_ipc_wait_irq(seen);
			else
				while (info->irq_total == seen)
					kvmpy_cpu_relax();
			uint64_t woke = rdtsc(), irq = info->irq_last_tsc, rang = *stamp;
			if (info->irq_total != seen && irq >= rang && woke >= irq) {
				c->irq_lat_tsc += irq - rang;
				c->wake_tsc += woke - irq;
				c->irq_lat_n++;
			}
		}
		__atomic_store_n(flag, 0, __ATOMIC_RELAXED);
	}
	c->wait_tsc += rdtsc() - t0;
}

static inline int kvmpy__ring_readable(struct kvmpy_ring_end *e)
{
	return __atomic_load_n(&e->ctl->head, __ATOMIC_ACQUIRE) != e->ctl->tail;
}

static inline int kvmpy__ring_writable(struct kvmpy_ring_end *e)
{
	return e->ctl->head - __atomic_load_n(&e->ctl->tail, __ATOMIC_ACQUIRE) < e->size;
}

/* Wait until the ring has data (consumer) or room (producer). */
static inline void kvmpy_ring_wait_readable(struct kvmpy_ring_end *e)
{
	if (!kvmpy__ring_readable(e))
		kvmpy_ring_wait(e, kvmpy__ring_readable, &e->ctl->consumer_waiting,
				&e->ctl->notify_tsc);
}

static inline void kvmpy_ring_wait_writable(struct kvmpy_ring_end *e)
{
	if (!kvmpy__ring_writable(e))
		kvmpy_ring_wait(e, kvmpy__ring_writable, &e->ctl->producer_waiting,
				&e->ctl->space_tsc);
}

/* `rep movsb`: native at CPL3 and fast on CPUs with ERMS; the runtime's memcpy is a byte
 * loop (it must also run emulated in ring 0 and in 16-bit code). */
static inline void kvmpy_copy(void *dst, const void *src, uint64_t n)
{
	__asm__ volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(n) : : "memory");
}

/* Send all n bytes through the ring, waiting for room as needed. 0, or -KVMPY_EPROTO. */
static inline long kvmpy_shm_send(struct kvmpy_ring_end *e, const void *buf, uint64_t n)
{
	const unsigned char *s = buf;
	while (n) {
		void *p;
		long room = kvmpy_ring_reserve(e, &p);
		if (room < 0)
			return room;
		if (room == 0) {
			kvmpy_ring_wait_writable(e);
			continue;
		}
		uint64_t k = (uint64_t)room < n ? (uint64_t)room : n;
		kvmpy_copy(p, s, k);
		kvmpy_ring_commit(e, k);
		s += k;
		n -= k;
	}
	return 0;
}

/* Receive exactly n bytes from the ring, waiting for data as needed. 0, or -KVMPY_EPROTO. */
static inline long kvmpy_shm_recv(struct kvmpy_ring_end *e, void *buf, uint64_t n)
{
	unsigned char *d = buf;
	while (n) {
		const void *p;
		long avail = kvmpy_ring_peek(e, &p);
		if (avail < 0)
			return avail;
		if (avail == 0) {
			kvmpy_ring_wait_readable(e);
			continue;
		}
		uint64_t k = (uint64_t)avail < n ? (uint64_t)avail : n;
		kvmpy_copy(d, p, k);
		kvmpy_ring_release(e, k);
		d += k;
		n -= k;
	}
	return 0;
}

/* --- port I/O (pio) -------------------------------------------------------------------- */

/*
 * Send n bytes through the data port, then flush so the VMM hands them to the peer now
 * (kvmpy collects data-port writes in KVM's coalesced ring, which only reaches the VMM at the
 * next exit). `rep outs` makes one trip to the hypervisor per item on KVM (its emulator
 * handles string `out` one item at a time), so string I/O moves dwords and only the tail in
 * bytes.
 */
static inline void kvmpy_pio_send_noflush(const void *buf, uint64_t n, int width)
{
	const unsigned char *s = buf;
	if (width == KVMPY_PIO_BYTE) {
		for (uint64_t i = 0; i < n; i++)
			outb(KVMPY_IPC_PORT_DATA, s[i]);
		return;
	}
	uint64_t dwords = n / 4;
	if (width == KVMPY_PIO_DWORD) {
		for (uint64_t i = 0; i < dwords; i++) {
			uint32_t v;
			__builtin_memcpy(&v, s + 4 * i, 4);
			outl(KVMPY_IPC_PORT_DATA, v);
		}
		s += 4 * dwords;
	} else if (dwords) {
		__asm__ volatile("rep outsl"
				 : "+S"(s), "+c"(dwords)
				 : "d"(KVMPY_IPC_PORT_DATA)
				 : "memory");
	}
	uint64_t rest = n & 3;
	if (rest)
		__asm__ volatile("rep outsb"
				 : "+S"(s), "+c"(rest)
				 : "d"(KVMPY_IPC_PORT_DATA)
				 : "memory");
}

static inline void kvmpy_pio_flush(void) { outl(KVMPY_IPC_PORT_FLUSH, 0); }

static inline void kvmpy_pio_send(const void *buf, uint64_t n, int width)
{
	kvmpy_pio_send_noflush(buf, n, width);
	kvmpy_pio_flush();
}

/* Receive exactly n bytes; each `in` waits in the VMM until the peer's bytes are there.
 * `rep ins` is batched by KVM: up to 1 KiB per exit (its read-ahead buffer). */
static inline void kvmpy_pio_recv(void *buf, uint64_t n, int width)
{
	unsigned char *d = buf;
	if (width == KVMPY_PIO_BYTE) {
		for (uint64_t i = 0; i < n; i++)
			d[i] = inb(KVMPY_IPC_PORT_DATA);
		return;
	}
	uint64_t dwords = n / 4;
	if (width == KVMPY_PIO_DWORD) {
		for (uint64_t i = 0; i < dwords; i++) {
			uint32_t v = inl(KVMPY_IPC_PORT_DATA);
			__builtin_memcpy(d + 4 * i, &v, 4);
		}
		d += 4 * dwords;
	} else if (dwords) {
		__asm__ volatile("rep insl"
				 : "+D"(d), "+c"(dwords)
				 : "d"(KVMPY_IPC_PORT_DATA)
				 : "memory");
	}
	uint64_t rest = n & 3;
	if (rest)
		__asm__ volatile("rep insb"
				 : "+D"(d), "+c"(rest)
				 : "d"(KVMPY_IPC_PORT_DATA)
				 : "memory");
}

/* --- the benchmark pattern ------------------------------------------------------------- */

/*
 * The byte stream of a transfer: little-endian 64-bit words w_0, w_1, ... with
 * w_0 = kvmpy_pattern_first(seed) and w_{i+1} = w_i + KVMPY_PATTERN_STEP (odd, so no word
 * repeats for 2^64 words). A lost, repeated or reordered 8-byte unit changes the words the
 * receiver sees. The receiver also sums what arrived, Fletcher style over the words
 * (a += w; b += a, a final partial word padded with zeros), which the VMM compares with the
 * closed form for the sizes and seed it chose.
 */
#define KVMPY_PATTERN_STEP 0x9E3779B97F4A7C15ULL

static inline uint64_t kvmpy_pattern_first(uint64_t seed)
{
	return seed * 0xD6E8FEB86659FD93ULL + 0x0123456789ABCDEFULL;
}

struct kvmpy_pattern {
	uint64_t offset; /* stream bytes so far */
	uint64_t word;   /* the word that holds byte `offset` */
	uint64_t acc;    /* receiver: bytes of the current word received so far */
	uint64_t a, b, mismatches;
};

static inline void kvmpy_pattern_init(struct kvmpy_pattern *p, uint64_t seed)
{
	p->offset = 0;
	p->word = kvmpy_pattern_first(seed);
	p->acc = p->a = p->b = p->mismatches = 0;
}

/* Write the next n bytes of the stream to dst. */
static inline void kvmpy_pattern_fill(struct kvmpy_pattern *p, void *dst, uint64_t n)
{
	unsigned char *d = dst;
	uint64_t w = p->word, o = p->offset;
	while (n && (o & 7)) {
		*d++ = (unsigned char)(w >> (8 * (o & 7)));
		n--;
		if ((++o & 7) == 0)
			w += KVMPY_PATTERN_STEP;
	}
	uint64_t words = n / 8;
	uint64_t *q = (uint64_t *)d;
	for (uint64_t i = 0; i < words; i++) {
		q[i] = w;
		w += KVMPY_PATTERN_STEP;
	}
	d += 8 * words;
	o += 8 * words;
	n &= 7;
	while (n--) {
		*d++ = (unsigned char)(w >> (8 * (o & 7)));
		o++;
	}
	p->word = w;
	p->offset = o;
}

/* Check the next n bytes of the stream at src against the pattern and add them to the
 * checksum. */
static inline void kvmpy_pattern_check(struct kvmpy_pattern *p, const void *src, uint64_t n)
{
	const unsigned char *s = src;
	uint64_t w = p->word, o = p->offset, a = p->a, b = p->b, bad = p->mismatches;
	uint64_t acc = p->acc;
	while (n && (o & 7)) {
		unsigned sh = 8 * (o & 7);
		bad += *s != (unsigned char)(w >> sh);
		acc |= (uint64_t)*s++ << sh;
		n--;
		if ((++o & 7) == 0) {
			a += acc;
			b += a;
			acc = 0;
			w += KVMPY_PATTERN_STEP;
		}
	}
	uint64_t words = n / 8, i = 0;
	const uint64_t *q = (const uint64_t *)s;
	const uint64_t k = KVMPY_PATTERN_STEP;
	/* Four words a step, their differences OR-ed and counted only when nonzero: this loop
	 * is what limits a shared-memory receiver (a quarter faster than counting every word). */
	for (; i + 4 <= words; i += 4) {
		uint64_t v0 = q[i], v1 = q[i + 1], v2 = q[i + 2], v3 = q[i + 3];
		if ((v0 ^ w) | (v1 ^ (w + k)) | (v2 ^ (w + 2 * k)) | (v3 ^ (w + 3 * k)))
			bad += (v0 != w) + (v1 != w + k) + (v2 != w + 2 * k) + (v3 != w + 3 * k);
		a += v0;
		b += a;
		a += v1;
		b += a;
		a += v2;
		b += a;
		a += v3;
		b += a;
		w += 4 * k;
	}
	for (; i < words; i++) {
		uint64_t v = q[i];
		bad += v != w;
		a += v;
		b += a;
		w += k;
	}
	s += 8 * words;
	o += 8 * words;
	n &= 7;
	while (n--) {
		unsigned sh = 8 * (o & 7);
		bad += *s != (unsigned char)(w >> sh);
		acc |= (uint64_t)*s++ << sh;
		o++;
	}
	p->word = w;
	p->offset = o;
	p->a = a;
	p->b = b;
	p->acc = acc;
	p->mismatches = bad;
}

/* The checksum of everything checked so far, a trailing partial word included. */
static inline void kvmpy_pattern_sum(const struct kvmpy_pattern *p, uint64_t *a, uint64_t *b)
{
	uint64_t x = p->a, y = p->b;
	if (p->offset & 7) {
		x += p->acc;
		y += x;
	}
	*a = x;
	*b = y;
}

#endif /* KVMPY_IPC_H */
