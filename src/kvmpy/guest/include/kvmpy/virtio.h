/*
 * kvmpy/virtio.h: a small freestanding virtio 1.2 driver library for kvmpy guests
 * (docs/virtio.md). 64-bit modes (long, long-user); at CPL3 in long-user mode, because kvmpy
 * maps the device windows of the MMIO hole user-accessible and uncached.
 *
 *   struct kv_virtio_dev d;
 *   kv_virtio_find(&d, KV_VIRTIO_ID_BLOCK, 0);          -- virtio-mmio windows, then PCI
 *   kv_virtio_init(&d, KV_VIRTIO_F_EVENT_IDX);          -- reset, negotiate, FEATURES_OK
 *   kv_vq_setup(&d, &vq, 0, ring_memory, 64, -1);       -- a split queue of 64 entries
 *   kv_virtio_ready(&d);                                -- DRIVER_OK
 *   kv_vq_add(&vq, bufs, n_out, n_in); kv_vq_kick(&vq); -- notify: an ioeventfd, no exit
 *   while ((head = kv_vq_poll(&vq, &len)) < 0) kv_cpu_relax();
 *
 * Discovery. virtio-mmio: kvmpy places the windows one after another from
 * KV_VIRTIO_MMIO_BASE (4 KiB each); the scan stops at the first window without the magic
 * value. PCI: bus 0 through ECAM at KV_PCI_ECAM (kvmpy's fixed MMCONFIG address), vendor
 * 0x1AF4, devices 0x1040 + id, structures found through the vendor capabilities.
 *
 * Interrupts or polling. Polling needs nothing from the VMM: the used ring is in guest
 * memory. Interrupts (PCI MSI-X): the guest programs each vector's table entry with
 * KV_VIRTIO_VECTOR on APIC 0; kvmpy installs kvmpy_virtio_irq_entry (below) as that vector's
 * ring-0 handler and kvmpy_virtio_wait_gate as the DPL-3 `int3` gate, as the ipc guests do:
 * CPL3 cannot `hlt`, and on KVM-PVM only `int3` reaches a DPL-3 gate. The handler counts the
 * interrupt and signals EOI through the x2APIC (wrmsr 0x80B). A guest that includes both this
 * header and kvmpy/ipc.h must choose one of their wait gates.
 *
 * Every register access here is an MMIO exit except the queue notify, which kvmpy serves with
 * an ioeventfd: set-up costs exits, the data path does not.
 */
#ifndef KVMPY_VIRTIO_H
#define KVMPY_VIRTIO_H

#include <kvmpy.h>

#if !defined(__x86_64__)
#error "kvmpy/virtio.h is for 64-bit guests (modes long and long-user)"
#endif

#define KV_VIRTIO_MMIO_BASE 0xC0000000UL
#define KV_VIRTIO_MMIO_SIZE 0x1000UL
#define KV_VIRTIO_MMIO_MAX 64
#define KV_PCI_ECAM 0xE0000000UL
#define KV_VIRTIO_VECTOR 0x50 /* the IDT vector kvmpy installs kvmpy_virtio_irq_entry at */

#define KV_VIRTIO_ID_NET 1
#define KV_VIRTIO_ID_BLOCK 2
#define KV_VIRTIO_ID_CONSOLE 3
#define KV_VIRTIO_ID_ENTROPY 4

#define KV_VIRTIO_F_INDIRECT_DESC (1ULL << 28)
#define KV_VIRTIO_F_EVENT_IDX (1ULL << 29)
#define KV_VIRTIO_F_VERSION_1 (1ULL << 32)

#define KV_VIRTIO_S_ACKNOWLEDGE 1
#define KV_VIRTIO_S_DRIVER 2
#define KV_VIRTIO_S_DRIVER_OK 4
#define KV_VIRTIO_S_FEATURES_OK 8
#define KV_VIRTIO_S_NEEDS_RESET 64
#define KV_VIRTIO_S_FAILED 128

#define KV_VIRTIO_TRANSPORT_MMIO 1
#define KV_VIRTIO_TRANSPORT_PCI 2

#define KV_VIRTQ_DESC_F_NEXT 1
#define KV_VIRTQ_DESC_F_WRITE 2
#define KV_VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define KV_VIRTIO_NO_VECTOR 0xFFFF

/* --- register access ------------------------------------------------------------------ */

static inline uint8_t kv_mmio_r8(uintptr_t a) { return *(volatile uint8_t *)a; }
static inline uint16_t kv_mmio_r16(uintptr_t a) { return *(volatile uint16_t *)a; }
static inline uint32_t kv_mmio_r32(uintptr_t a) { return *(volatile uint32_t *)a; }
static inline void kv_mmio_w8(uintptr_t a, uint8_t v) { *(volatile uint8_t *)a = v; }
static inline void kv_mmio_w16(uintptr_t a, uint16_t v) { *(volatile uint16_t *)a = v; }
static inline void kv_mmio_w32(uintptr_t a, uint32_t v) { *(volatile uint32_t *)a = v; }
static inline void kv_mmio_w64(uintptr_t a, uint64_t v)
{
	kv_mmio_w32(a, (uint32_t)v);
	kv_mmio_w32(a + 4, (uint32_t)(v >> 32));
}

static inline void kv_cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void kv_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

/* virtio-mmio registers (4.2.2) */
enum {
	KV_MMIO_MAGIC = 0x000, KV_MMIO_VERSION = 0x004, KV_MMIO_DEVICE_ID = 0x008,
	KV_MMIO_DEVICE_FEATURES = 0x010, KV_MMIO_DEVICE_FEATURES_SEL = 0x014,
	KV_MMIO_DRIVER_FEATURES = 0x020, KV_MMIO_DRIVER_FEATURES_SEL = 0x024,
	KV_MMIO_QUEUE_SEL = 0x030, KV_MMIO_QUEUE_NUM_MAX = 0x034, KV_MMIO_QUEUE_NUM = 0x038,
	KV_MMIO_QUEUE_READY = 0x044, KV_MMIO_QUEUE_NOTIFY = 0x050,
	KV_MMIO_INTERRUPT_STATUS = 0x060, KV_MMIO_INTERRUPT_ACK = 0x064, KV_MMIO_STATUS = 0x070,
	KV_MMIO_QUEUE_DESC = 0x080, KV_MMIO_QUEUE_DRIVER = 0x090, KV_MMIO_QUEUE_DEVICE = 0x0A0,
	KV_MMIO_CONFIG_GENERATION = 0x0FC, KV_MMIO_CONFIG = 0x100,
};

/* struct virtio_pci_common_cfg (4.1.4.3) */
enum {
	KV_PCI_DFSELECT = 0x00, KV_PCI_DF = 0x04, KV_PCI_GFSELECT = 0x08, KV_PCI_GF = 0x0C,
	KV_PCI_MSIX_CONFIG = 0x10, KV_PCI_NUM_QUEUES = 0x12, KV_PCI_STATUS = 0x14,
	KV_PCI_CFG_GENERATION = 0x15, KV_PCI_Q_SELECT = 0x16, KV_PCI_Q_SIZE = 0x18,
	KV_PCI_Q_MSIX = 0x1A, KV_PCI_Q_ENABLE = 0x1C, KV_PCI_Q_NOTIFY_OFF = 0x1E,
	KV_PCI_Q_DESC = 0x20, KV_PCI_Q_DRIVER = 0x28, KV_PCI_Q_DEVICE = 0x30,
};

struct kv_virtio_dev {
	int transport;
	uint32_t device_id;
	uint64_t features; /* negotiated */
	/* virtio-mmio */
	uintptr_t base;
	/* virtio-pci */
	int slot;
	uintptr_t cfg; /* this function's ECAM space */
	uintptr_t common, isr, device, notify, msix_table;
	uint32_t notify_mult, msix_vectors;
};

/* --- discovery ------------------------------------------------------------------------ */

/* The n-th virtio-mmio device with `device_id` (0: any). 0 if found. */
static inline int kv_virtio_find_mmio(struct kv_virtio_dev *d, uint32_t device_id, int n)
{
	for (int i = 0; i < KV_VIRTIO_MMIO_MAX; i++) {
		uintptr_t b = KV_VIRTIO_MMIO_BASE + i * KV_VIRTIO_MMIO_SIZE;
		if (kv_mmio_r32(b + KV_MMIO_MAGIC) != 0x74726976)
			break;
		uint32_t id = kv_mmio_r32(b + KV_MMIO_DEVICE_ID);
		if (kv_mmio_r32(b + KV_MMIO_VERSION) != 2 || id == 0)
			continue;
		if ((device_id && id != device_id) || n-- > 0)
			continue;
		__builtin_memset(d, 0, sizeof(*d));
		d->transport = KV_VIRTIO_TRANSPORT_MMIO;
		d->device_id = id;
		d->base = b;
		return 0;
	}
	return -1;
}

static inline uint32_t kv_pci_bar(uintptr_t cfg, int bar)
{
	return kv_mmio_r32(cfg + 0x10 + 4 * bar) & ~0xFu;
}

/* The n-th virtio-pci device with `device_id` (0: any) on bus 0. 0 if found. */
static inline int kv_virtio_find_pci(struct kv_virtio_dev *d, uint32_t device_id, int n)
{
	for (int slot = 0; slot < 32; slot++) {
		uintptr_t cfg = KV_PCI_ECAM + ((uintptr_t)slot << 15);
		uint32_t ids = kv_mmio_r32(cfg);
		if ((ids & 0xFFFF) != 0x1AF4 || (ids >> 16) < 0x1040 || (ids >> 16) > 0x107F)
			continue;
		uint32_t id = (ids >> 16) - 0x1040;
		if ((device_id && id != device_id) || n-- > 0)
			continue;
		__builtin_memset(d, 0, sizeof(*d));
		d->transport = KV_VIRTIO_TRANSPORT_PCI;
		d->device_id = id;
		d->slot = slot;
		d->cfg = cfg;
		/* memory decoding and bus mastering on */
		kv_mmio_w16(cfg + 0x04, kv_mmio_r16(cfg + 0x04) | 0x6);
		uint8_t ptr = kv_mmio_r8(cfg + 0x34);
		for (int guard = 0; ptr && guard < 48; guard++) {
			uint8_t cap = kv_mmio_r8(cfg + ptr);
			if (cap == 0x09) {
				uint8_t type = kv_mmio_r8(cfg + ptr + 3);
				uint8_t bar = kv_mmio_r8(cfg + ptr + 4);
				uintptr_t where = kv_pci_bar(cfg, bar) + kv_mmio_r32(cfg + ptr + 8);
				if (type == 1 && !d->common)
					d->common = where;
				else if (type == 2 && !d->notify) {
					d->notify = where;
					d->notify_mult = kv_mmio_r32(cfg + ptr + 16);
				} else if (type == 3 && !d->isr)
					d->isr = where;
				else if (type == 4 && !d->device)
					d->device = where;
			} else if (cap == 0x11) {
				uint16_t ctl = kv_mmio_r16(cfg + ptr + 2);
				uint32_t table = kv_mmio_r32(cfg + ptr + 4);
				d->msix_vectors = (ctl & 0x7FF) + 1;
				d->msix_table = kv_pci_bar(cfg, table & 7) + (table & ~7u);
			}
			ptr = kv_mmio_r8(cfg + ptr + 1);
		}
		if (!d->common || !d->notify)
			return -1;
		return 0;
	}
	return -1;
}

/* The n-th device with `device_id`, virtio-mmio first, then PCI. */
static inline int kv_virtio_find(struct kv_virtio_dev *d, uint32_t device_id, int n)
{
	if (kv_virtio_find_mmio(d, device_id, n) == 0)
		return 0;
	return kv_virtio_find_pci(d, device_id, n);
}

/* --- status, features, config --------------------------------------------------------- */

static inline uint8_t kv_virtio_status(struct kv_virtio_dev *d)
{
	if (d->transport == KV_VIRTIO_TRANSPORT_MMIO)
		return (uint8_t)kv_mmio_r32(d->base + KV_MMIO_STATUS);
	return kv_mmio_r8(d->common + KV_PCI_STATUS);
}

static inline void kv_virtio_set_status(struct kv_virtio_dev *d, uint8_t s)
{
	if (d->transport == KV_VIRTIO_TRANSPORT_MMIO)
		kv_mmio_w32(d->base + KV_MMIO_STATUS, s);
	else
		kv_mmio_w8(d->common + KV_PCI_STATUS, s);
}

static inline uint64_t kv_virtio_device_features(struct kv_virtio_dev *d)
{
	uint64_t f = 0;
	for (uint32_t sel = 0; sel < 2; sel++) {
		uint32_t w;
		if (d->transport == KV_VIRTIO_TRANSPORT_MMIO) {
			kv_mmio_w32(d->base + KV_MMIO_DEVICE_FEATURES_SEL, sel);
			w = kv_mmio_r32(d->base + KV_MMIO_DEVICE_FEATURES);
		} else {
			kv_mmio_w32(d->common + KV_PCI_DFSELECT, sel);
			w = kv_mmio_r32(d->common + KV_PCI_DF);
		}
		f |= (uint64_t)w << (32 * sel);
	}
	return f;
}

static inline void kv_virtio_set_driver_features(struct kv_virtio_dev *d, uint64_t f)
{
	for (uint32_t sel = 0; sel < 2; sel++) {
		if (d->transport == KV_VIRTIO_TRANSPORT_MMIO) {
			kv_mmio_w32(d->base + KV_MMIO_DRIVER_FEATURES_SEL, sel);
			kv_mmio_w32(d->base + KV_MMIO_DRIVER_FEATURES, (uint32_t)(f >> (32 * sel)));
		} else {
			kv_mmio_w32(d->common + KV_PCI_GFSELECT, sel);
			kv_mmio_w32(d->common + KV_PCI_GF, (uint32_t)(f >> (32 * sel)));
		}
	}
}

/* Reset, acknowledge, and agree on `wanted` (plus VERSION_1) among what the device offers
 * (3.1.1 steps 1-6). Returns 0, or -1 if the device refused FEATURES_OK. */
static inline int kv_virtio_init(struct kv_virtio_dev *d, uint64_t wanted)
{
	kv_virtio_set_status(d, 0);
	while (kv_virtio_status(d) != 0)
		kv_cpu_relax();
	kv_virtio_set_status(d, KV_VIRTIO_S_ACKNOWLEDGE);
	kv_virtio_set_status(d, KV_VIRTIO_S_ACKNOWLEDGE | KV_VIRTIO_S_DRIVER);
	uint64_t offered = kv_virtio_device_features(d);
	if (!(offered & KV_VIRTIO_F_VERSION_1))
		return -1;
	d->features = (offered & wanted) | KV_VIRTIO_F_VERSION_1;
	kv_virtio_set_driver_features(d, d->features);
	uint8_t s = KV_VIRTIO_S_ACKNOWLEDGE | KV_VIRTIO_S_DRIVER | KV_VIRTIO_S_FEATURES_OK;
	kv_virtio_set_status(d, s);
	if (!(kv_virtio_status(d) & KV_VIRTIO_S_FEATURES_OK)) {
		kv_virtio_set_status(d, s | KV_VIRTIO_S_FAILED);
		return -1;
	}
	return 0;
}

static inline void kv_virtio_ready(struct kv_virtio_dev *d)
{
	kv_virtio_set_status(d, kv_virtio_status(d) | KV_VIRTIO_S_DRIVER_OK);
}

static inline uintptr_t kv_virtio_config(struct kv_virtio_dev *d)
{
	return d->transport == KV_VIRTIO_TRANSPORT_MMIO ? d->base + KV_MMIO_CONFIG : d->device;
}

static inline uint32_t kv_virtio_cfg32(struct kv_virtio_dev *d, uint32_t off)
{
	return kv_mmio_r32(kv_virtio_config(d) + off);
}

static inline uint64_t kv_virtio_cfg64(struct kv_virtio_dev *d, uint32_t off)
{
	return kv_virtio_cfg32(d, off) | (uint64_t)kv_virtio_cfg32(d, off + 4) << 32;
}

/* --- split virtqueues ----------------------------------------------------------------- */

struct kv_vring_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags, next;
};

struct kv_buf {
	void *addr;
	uint32_t len;
};

#define KV_VQ_MAX 256

struct kv_vq {
	uint16_t index, size, num_free, free_head;
	uint16_t avail_idx, last_used, kicked_idx;
	int event_idx;
	struct kv_vring_desc *desc;
	volatile uint16_t *avail; /* flags, idx, ring[size], used_event */
	volatile uint8_t *used;   /* flags, idx, ring[size] of {id, len}, avail_event */
	uintptr_t notify_addr;
	int notify_mmio; /* write the index as 32 bits (virtio-mmio) rather than 16 */
	uint16_t chain_len[KV_VQ_MAX];
};

/* Bytes of ring memory a queue of `size` entries needs (page-aligned parts); the macro is
 * for static buffers. */
#define kv_vq_bytes_const(size)                                                        \
	(((16ULL * (size) + 6 + 2ULL * (size) + 4095) & ~4095ULL) +                         \
	 ((6 + 8ULL * (size) + 4095) & ~4095ULL))
static inline uint64_t kv_vq_bytes(uint16_t size)
{
	uint64_t a = 16ULL * size, b = 6 + 2ULL * size, c = 6 + 8ULL * size;
	return ((a + b + 4095) & ~4095ULL) + ((c + 4095) & ~4095ULL);
}

static inline uint16_t kv_vq_used_idx(struct kv_vq *q)
{
	return __atomic_load_n((volatile uint16_t *)(q->used + 2), __ATOMIC_ACQUIRE);
}

/* Set up queue `index` with `size` entries (0: the device's maximum, capped at KV_VQ_MAX)
 * in `mem` (kv_vq_bytes(size), page-aligned, zeroed here). `vector`: its MSI-X vector on
 * PCI, or -1 for none. Returns 0, or -1. */
static inline int kv_vq_setup(struct kv_virtio_dev *d, struct kv_vq *q, uint16_t index, void *mem,
			      uint16_t size, int vector)
{
	uint16_t max;
	if (d->transport == KV_VIRTIO_TRANSPORT_MMIO) {
		kv_mmio_w32(d->base + KV_MMIO_QUEUE_SEL, index);
		max = (uint16_t)kv_mmio_r32(d->base + KV_MMIO_QUEUE_NUM_MAX);
	} else {
		kv_mmio_w16(d->common + KV_PCI_Q_SELECT, index);
		max = kv_mmio_r16(d->common + KV_PCI_Q_SIZE);
	}
	if (!max)
		return -1;
	if (!size || size > max)
		size = max;
	if (size > KV_VQ_MAX)
		size = KV_VQ_MAX;
	__builtin_memset(q, 0, sizeof(*q));
	q->index = index;
	q->size = size;
	q->event_idx = !!(d->features & KV_VIRTIO_F_EVENT_IDX);
	unsigned char *m = mem;
	__builtin_memset(m, 0, kv_vq_bytes(size));
	q->desc = (struct kv_vring_desc *)m;
	q->avail = (volatile uint16_t *)(m + 16 * size);
	q->used = m + ((16ULL * size + 6 + 2ULL * size + 4095) & ~4095ULL);
	for (uint16_t i = 0; i < size; i++)
		q->desc[i].next = (uint16_t)(i + 1);
	q->num_free = size;
	uintptr_t desc = (uintptr_t)q->desc, avail = (uintptr_t)q->avail, used = (uintptr_t)q->used;
	if (d->transport == KV_VIRTIO_TRANSPORT_MMIO) {
		uintptr_t b = d->base;
		kv_mmio_w32(b + KV_MMIO_QUEUE_NUM, size);
		kv_mmio_w64(b + KV_MMIO_QUEUE_DESC, desc);
		kv_mmio_w64(b + KV_MMIO_QUEUE_DRIVER, avail);
		kv_mmio_w64(b + KV_MMIO_QUEUE_DEVICE, used);
		kv_mmio_w32(b + KV_MMIO_QUEUE_READY, 1);
		q->notify_addr = b + KV_MMIO_QUEUE_NOTIFY;
		q->notify_mmio = 1;
	} else {
		uintptr_t c = d->common;
		kv_mmio_w16(c + KV_PCI_Q_SIZE, size);
		kv_mmio_w16(c + KV_PCI_Q_MSIX, vector < 0 ? KV_VIRTIO_NO_VECTOR : (uint16_t)vector);
		kv_mmio_w64(c + KV_PCI_Q_DESC, desc);
		kv_mmio_w64(c + KV_PCI_Q_DRIVER, avail);
		kv_mmio_w64(c + KV_PCI_Q_DEVICE, used);
		kv_mmio_w16(c + KV_PCI_Q_ENABLE, 1);
		q->notify_addr = d->notify + kv_mmio_r16(c + KV_PCI_Q_NOTIFY_OFF) * d->notify_mult;
	}
	return 0;
}

/* Ask for used-buffer interrupts (on) or not (off). */
static inline void kv_vq_interrupts(struct kv_vq *q, int on)
{
	if (q->event_idx)
		q->avail[2 + q->size] = on ? q->last_used : (uint16_t)(q->last_used - 1 + 0x8000);
	else
		q->avail[0] = on ? 0 : KV_VIRTQ_AVAIL_F_NO_INTERRUPT;
}

/* Chain n_out device-readable buffers then n_in device-writable ones and make the chain
 * available (not yet notified). Returns its head, or -1 if the queue is full. */
static inline int kv_vq_add(struct kv_vq *q, const struct kv_buf *bufs, int n_out, int n_in)
{
	int n = n_out + n_in;
	if (n <= 0 || n > q->num_free)
		return -1;
	uint16_t head = q->free_head, i = head, last = head;
	for (int k = 0; k < n; k++) {
		struct kv_vring_desc *dsc = &q->desc[i];
		dsc->addr = (uint64_t)(uintptr_t)bufs[k].addr;
		dsc->len = bufs[k].len;
		dsc->flags = (uint16_t)((k >= n_out ? KV_VIRTQ_DESC_F_WRITE : 0) |
					(k + 1 < n ? KV_VIRTQ_DESC_F_NEXT : 0));
		last = i;
		i = dsc->next;
	}
	q->free_head = q->desc[last].next;
	q->num_free = (uint16_t)(q->num_free - n);
	q->chain_len[head] = (uint16_t)n;
	q->avail[2 + q->avail_idx % q->size] = head;
	q->avail_idx++;
	__atomic_store_n(&q->avail[1], q->avail_idx, __ATOMIC_RELEASE);
	return head;
}

/* Notify the device of what was added, unless (EVENT_IDX) it said it needs no notify. */
static inline void kv_vq_kick(struct kv_vq *q)
{
	uint16_t old = q->kicked_idx, new_idx = q->avail_idx;
	q->kicked_idx = new_idx;
	if (q->event_idx) {
		kv_mb(); /* our avail index store before the load of avail_event (2.7.10) */
		uint16_t ev = *(volatile uint16_t *)(q->used + 4 + 8 * q->size);
		if ((uint16_t)(new_idx - ev - 1) >= (uint16_t)(new_idx - old))
			return;
	} else {
		kv_mb();
		if (*(volatile uint16_t *)q->used & 1) /* VIRTQ_USED_F_NO_NOTIFY */
			return;
	}
	if (q->notify_mmio)
		kv_mmio_w32(q->notify_addr, q->index);
	else
		kv_mmio_w16(q->notify_addr, q->index);
}

/* A chain the device has finished: its head (len: bytes it wrote), or -1 if none yet. */
static inline int kv_vq_poll(struct kv_vq *q, uint32_t *len)
{
	if (q->last_used == kv_vq_used_idx(q))
		return -1;
	volatile uint8_t *e = q->used + 4 + 8 * (q->last_used % q->size);
	uint32_t id = *(volatile uint32_t *)e;
	if (len)
		*len = *(volatile uint32_t *)(e + 4);
	q->last_used++;
	if (id >= q->size)
		return -1; /* a device bug; drop it */
	uint16_t n = q->chain_len[id], tail = (uint16_t)id;
	for (uint16_t k = 1; k < n; k++)
		tail = q->desc[tail].next;
	q->desc[tail].next = q->free_head;
	q->free_head = (uint16_t)id;
	q->num_free = (uint16_t)(q->num_free + n);
	return (int)id;
}

/* Spin until a chain comes back. */
static inline int kv_vq_wait(struct kv_vq *q, uint32_t *len)
{
	int head;
	while ((head = kv_vq_poll(q, len)) < 0)
		kv_cpu_relax();
	return head;
}

/* --- interrupts ----------------------------------------------------------------------- */

/* Interrupts the ring-0 handler has counted. */
extern volatile uint64_t kvmpy_virtio_irqs;
/* Set by kvmpy when it has installed the handler (a machine with an in-kernel irqchip):
 * interrupts can be used. 1: the wait gate too; 2: no wait gate (kvmpy/smp.h or ipc.h owns
 * the int3 gate in this image), so waiting spins on the interrupt count. */
extern volatile uint64_t kvmpy_virtio_irq_ready;
/* The x2APIC ID (kvmpy: the vCPU index) of the CPU that took the last interrupt. */
extern volatile uint32_t kvmpy_virtio_irq_cpu;

__asm__(".pushsection .text.kvmpy_virtio_irq,\"axG\",@progbits,kvmpy_virtio_irq,comdat\n"
	".globl kvmpy_virtio_irq_entry\n"
	"kvmpy_virtio_irq_entry:\n"
	"	pushq %rax\n"
	"	pushq %rcx\n"
	"	pushq %rdx\n"
	"	lock incq kvmpy_virtio_irqs(%rip)\n"
	"	movl $0x802, %ecx\n" /* x2APIC ID: which CPU took it */
	"	rdmsr\n"
	"	movl %eax, kvmpy_virtio_irq_cpu(%rip)\n"
	"	movl $0x80B, %ecx\n"
	"	xorl %eax, %eax\n"
	"	xorl %edx, %edx\n"
	"	wrmsr\n"
	"	popq %rdx\n"
	"	popq %rcx\n"
	"	popq %rax\n"
	"	iretq\n"
	".globl kvmpy_virtio_wait_gate\n"
	"kvmpy_virtio_wait_gate:\n"
	"	cmpq %rax, kvmpy_virtio_irqs(%rip)\n"
	"	jne 1f\n"
	"	sti\n"
	"	hlt\n"
	"1:	iretq\n"
	".popsection\n"
	".pushsection .bss.kvmpy_virtio_irqs,\"awG\",@nobits,kvmpy_virtio_irqs,comdat\n"
	".balign 8\n"
	".globl kvmpy_virtio_irqs\n"
	"kvmpy_virtio_irqs: .zero 8\n"
	".globl kvmpy_virtio_irq_ready\n"
	"kvmpy_virtio_irq_ready: .zero 8\n"
	".globl kvmpy_virtio_irq_cpu\n"
	"kvmpy_virtio_irq_cpu: .zero 8\n"
	".popsection\n");

/* Sleep until an interrupt arrives, unless one arrived since the count was `seen`. */
static inline void kv_virtio_wait_irq(uint64_t seen)
{
	__asm__ volatile("int3" : : "a"(seen) : "memory");
}

/* PCI: point MSI-X vector `v` at IDT vector KV_VIRTIO_VECTOR on APIC `apic`, unmask it and
 * enable MSI-X. */
static inline void kv_virtio_msix(struct kv_virtio_dev *d, uint32_t v, uint32_t apic)
{
	if (d->transport != KV_VIRTIO_TRANSPORT_PCI || v >= d->msix_vectors)
		return;
	uintptr_t e = d->msix_table + 16 * v;
	kv_mmio_w32(e, 0xFEE00000u | apic << 12);
	kv_mmio_w32(e + 4, 0);
	kv_mmio_w32(e + 8, KV_VIRTIO_VECTOR);
	kv_mmio_w32(e + 12, 0);
	uintptr_t cfg = d->cfg;
	uint8_t ptr = kv_mmio_r8(cfg + 0x34);
	for (int guard = 0; ptr && guard < 48; guard++) {
		if (kv_mmio_r8(cfg + ptr) == 0x11) {
			kv_mmio_w16(cfg + ptr + 2, 0x8000);
			return;
		}
		ptr = kv_mmio_r8(cfg + ptr + 1);
	}
}

/* Wait for a chain with interrupts: re-arm (EVENT_IDX: used_event = what we have seen, so
 * the next completion interrupts), look, and sleep in the gate if nothing came. The fence
 * orders the used_event store before the used index load (2.7.10). */
static inline int kv_vq_wait_irq(struct kv_vq *q, uint32_t *len)
{
	int head;
	for (;;) {
		uint64_t seen = kvmpy_virtio_irqs;
		kv_vq_interrupts(q, 1);
		kv_mb();
		if ((head = kv_vq_poll(q, len)) >= 0)
			return head;
		if (kvmpy_virtio_irq_ready == 1)
			kv_virtio_wait_irq(seen);
		else
			while (kvmpy_virtio_irqs == seen)
				kv_cpu_relax();
	}
}

/* --- block ---------------------------------------------------------------------------- */

#define KV_BLK_T_IN 0
#define KV_BLK_T_OUT 1
#define KV_BLK_T_FLUSH 4
#define KV_BLK_T_GET_ID 8
#define KV_BLK_F_RO (1ULL << 5)
#define KV_BLK_F_FLUSH (1ULL << 9)

struct kv_blk_req {
	uint32_t type, reserved;
	uint64_t sector;
};

/* Queue one block request (header, optional data, status byte) without notifying. */
static inline int kv_blk_submit(struct kv_vq *q, struct kv_blk_req *hdr, uint32_t type,
				uint64_t sector, void *data, uint32_t len, volatile uint8_t *status)
{
	hdr->type = type;
	hdr->reserved = 0;
	hdr->sector = sector;
	*status = 0xFF;
	struct kv_buf b[3];
	int n = 0;
	b[n].addr = hdr;
	b[n++].len = sizeof(*hdr);
	int writes = type == KV_BLK_T_OUT;
	if (len && writes) {
		b[n].addr = data;
		b[n++].len = len;
	}
	int n_out = n;
	if (len && !writes) {
		b[n].addr = data;
		b[n++].len = len;
	}
	b[n].addr = (void *)status;
	b[n++].len = 1;
	return kv_vq_add(q, b, n_out, n - n_out);
}

/* One block request, waited for by polling; returns the device's status (0: OK). */
static inline int kv_blk_io(struct kv_vq *q, uint32_t type, uint64_t sector, void *data,
			    uint32_t len)
{
	static struct kv_blk_req hdr;
	static volatile uint8_t status;
	if (kv_blk_submit(q, &hdr, type, sector, data, len, &status) < 0)
		return -1;
	kv_vq_kick(q);
	kv_vq_wait(q, 0);
	return status;
}

#endif /* KVMPY_VIRTIO_H */
