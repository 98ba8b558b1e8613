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
#define KV_VIRTIO_ID_VSOCK 19

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
	"	movl $0x802, %ecx\n" /* x2APIC ID: which CPU took it */
	"	rdmsr\n"
	"	movl %eax, kvmpy_virtio_irq_cpu(%rip)\n"
	/* Counted after the CPU is recorded: whoever sees the count change reads this one's
	 * CPU, not the last (x86 keeps stores in order; the locked add is a full barrier). */
	"	lock incq kvmpy_virtio_irqs(%rip)\n"
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

/* Nothing to do until the device uses a buffer of `q`: with interrupts (kvmpy installed the
 * handler), arm `q`'s, look once more, and sleep; otherwise spin a little. Interrupts are
 * off again afterwards: a busy queue is polled, not interrupted. */
static inline void kv_vq_idle(struct kv_vq *q)
{
	if (!kvmpy_virtio_irq_ready) {
		kv_cpu_relax();
		return;
	}
	uint64_t seen = kvmpy_virtio_irqs;
	kv_vq_interrupts(q, 1);
	kv_mb();
	if (kv_vq_used_idx(q) == q->last_used) {
		if (kvmpy_virtio_irq_ready == 1)
			kv_virtio_wait_irq(seen);
		else
			while (kvmpy_virtio_irqs == seen)
				kv_cpu_relax();
	}
	kv_vq_interrupts(q, 0);
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


/* --- copies ---------------------------------------------------------------------------- */

/* rep movsb: fast on every x86 since Ivy Bridge (ERMS), and one instruction at CPL3. */
static inline void kv_copy(void *dst, const void *src, uint64_t n)
{
	__asm__ volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(n) : : "memory");
}

/* --- net ------------------------------------------------------------------------------ */

#define KV_NET_F_MAC (1ULL << 5)
#define KV_NET_F_MRG_RXBUF (1ULL << 15)
#define KV_NET_F_STATUS (1ULL << 16)
#define KV_NET_S_LINK_UP 1
#define KV_NET_HDR_LEN 12 /* struct virtio_net_hdr_v1: flags .. num_buffers */
#define KV_NET_MAX_FRAME 1514
#define KV_NET_BUF (KV_NET_HDR_LEN + KV_NET_MAX_FRAME + 2) /* one frame, header included */

/*
 * A NIC with one receive and one transmit queue, polled. Frames are copied: into a transmit
 * slot (one per descriptor, KV_NET_BUF bytes each) on send, out of a receive buffer on
 * receive, so callers own their buffers. No offloads, no mergeable buffers: every receive
 * buffer holds a whole frame.
 */
struct kv_net {
	struct kv_virtio_dev dev;
	struct kv_vq rx, tx;
	uint8_t mac[6];
	unsigned char *rx_bufs, *tx_bufs; /* qsize slots of KV_NET_BUF bytes each */
	uint64_t sent, received;
};

/* Bytes of memory kv_net_init needs in `mem` (page-aligned) for queues of `qsize`. */
#define kv_net_bytes_const(qsize) \
	(2 * kv_vq_bytes_const(qsize) + 2ULL * (qsize) * ((KV_NET_BUF + 63) & ~63ULL))

static inline unsigned char *kv_net_slot(unsigned char *base, uint16_t i)
{
	return base + (uint64_t)i * ((KV_NET_BUF + 63) & ~63ULL);
}

/* Find the n-th virtio-net device, bring it up with `qsize`-entry queues in `mem`
 * (kv_net_bytes_const(qsize), page-aligned), and post every receive buffer. `msix`: on PCI,
 * MSI-X vectors 0 (receive) and 1 (transmit) to KV_VIRTIO_VECTOR on APIC 0 (for
 * kv_vq_wait_irq; interrupts stay off until a queue asks). 0, or -1. */
static inline int kv_net_init(struct kv_net *n, int index, void *mem, uint16_t qsize, int msix)
{
	if (kv_virtio_find(&n->dev, KV_VIRTIO_ID_NET, index) < 0)
		return -1;
	if (kv_virtio_init(&n->dev, KV_VIRTIO_F_EVENT_IDX | KV_NET_F_MAC | KV_NET_F_STATUS) < 0)
		return -1;
	unsigned char *m = mem;
	uint64_t ring = kv_vq_bytes(qsize);
	int pci = msix && n->dev.transport == KV_VIRTIO_TRANSPORT_PCI;
	if (kv_vq_setup(&n->dev, &n->rx, 0, m, qsize, pci ? 0 : -1) < 0 ||
	    kv_vq_setup(&n->dev, &n->tx, 1, m + ring, qsize, pci ? 1 : -1) < 0)
		return -1;
	if (pci) {
		kv_virtio_msix(&n->dev, 0, 0);
		kv_virtio_msix(&n->dev, 1, 0);
	}
	n->rx_bufs = m + 2 * ring;
	n->tx_bufs = kv_net_slot(n->rx_bufs, n->rx.size);
	kv_vq_interrupts(&n->rx, 0);
	kv_vq_interrupts(&n->tx, 0);
	uintptr_t cfg = kv_virtio_config(&n->dev);
	for (int i = 0; i < 6; i++)
		n->mac[i] = kv_mmio_r8(cfg + i);
	for (uint16_t i = 0; i < n->rx.size; i++) {
		struct kv_buf b = {kv_net_slot(n->rx_bufs, i), KV_NET_BUF};
		kv_vq_add(&n->rx, &b, 0, 1);
	}
	n->sent = n->received = 0;
	kv_virtio_ready(&n->dev);
	kv_vq_kick(&n->rx);
	return 0;
}

static inline int kv_net_link_up(struct kv_net *n)
{
	return kv_mmio_r16(kv_virtio_config(&n->dev) + 6) & KV_NET_S_LINK_UP;
}

/* Take back transmit slots the device has finished with. */
static inline void kv_net_reclaim(struct kv_net *n)
{
	while (kv_vq_poll(&n->tx, 0) >= 0)
		;
}

/* Queue one frame (at most KV_NET_MAX_FRAME bytes) for transmission without notifying;
 * -1 if every slot is in flight (kv_net_kick, then try again). */
static inline int kv_net_queue(struct kv_net *n, const void *frame, uint32_t len)
{
	if (len > KV_NET_MAX_FRAME)
		return -1;
	if (!n->tx.num_free)
		kv_net_reclaim(n);
	if (!n->tx.num_free)
		return -1;
	unsigned char *slot = kv_net_slot(n->tx_bufs, n->tx.free_head);
	__builtin_memset(slot, 0, KV_NET_HDR_LEN);
	kv_copy(slot + KV_NET_HDR_LEN, frame, len);
	struct kv_buf b = {slot, KV_NET_HDR_LEN + len};
	if (kv_vq_add(&n->tx, &b, 1, 0) < 0)
		return -1;
	n->sent++;
	return 0;
}

static inline void kv_net_kick(struct kv_net *n) { kv_vq_kick(&n->tx); }

/* Send one frame, waiting for a free slot if needed. */
static inline void kv_net_send(struct kv_net *n, const void *frame, uint32_t len)
{
	while (kv_net_queue(n, frame, len) < 0) {
		kv_net_kick(n);
		kv_cpu_relax();
	}
	kv_net_kick(n);
}

/* A received frame copied into `buf` (at most `cap` bytes): its length, or -1 if none is
 * waiting. The receive buffer goes straight back to the device. */
static inline int kv_net_recv(struct kv_net *n, void *buf, uint32_t cap)
{
	uint32_t len;
	int head = kv_vq_poll(&n->rx, &len);
	if (head < 0)
		return -1;
	unsigned char *slot = (unsigned char *)(uintptr_t)n->rx.desc[head].addr;
	int got = -1;
	if (len >= KV_NET_HDR_LEN && len <= KV_NET_BUF) {
		got = (int)(len - KV_NET_HDR_LEN);
		if ((uint32_t)got > cap)
			got = (int)cap;
		kv_copy(buf, slot + KV_NET_HDR_LEN, (uint64_t)got);
		n->received++;
	}
	struct kv_buf b = {slot, KV_NET_BUF};
	kv_vq_add(&n->rx, &b, 0, 1);
	kv_vq_kick(&n->rx);
	return got < 0 ? 0 : got;
}

/* --- vsock ---------------------------------------------------------------------------- */

#define KV_VSOCK_HOST_CID 2
#define KV_VSOCK_HDR_LEN 44
#define KV_VSOCK_OP_REQUEST 1
#define KV_VSOCK_OP_RESPONSE 2
#define KV_VSOCK_OP_RST 3
#define KV_VSOCK_OP_SHUTDOWN 4
#define KV_VSOCK_OP_RW 5
#define KV_VSOCK_OP_CREDIT_UPDATE 6
#define KV_VSOCK_OP_CREDIT_REQUEST 7
/* Receive buffers (a guest may define bigger ones before the #include: fewer packets for a
 * stream), transmit slots, and what we advertise as buf_alloc (bytes we accept unconsumed
 * per connection). */
#ifndef KV_VSOCK_RX_BUF
#define KV_VSOCK_RX_BUF (KV_VSOCK_HDR_LEN + 4096)
#endif
#define KV_VSOCK_TX_BUF (KV_VSOCK_HDR_LEN + 65536)
#define KV_VSOCK_QSIZE 64
#ifndef KV_VSOCK_BUF_ALLOC
#define KV_VSOCK_BUF_ALLOC (256 * 1024)
#endif

struct kv_vsock_hdr {
	uint64_t src_cid, dst_cid;
	uint32_t src_port, dst_port, len;
	uint16_t type, op;
	uint32_t flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

enum { KV_VSOCK_CLOSED, KV_VSOCK_CONNECTING, KV_VSOCK_LISTENING, KV_VSOCK_CONNECTED };

/* One stream connection. */
struct kv_vsock_conn {
	uint32_t local_port, peer_port;
	int state;
	uint32_t peer_shutdown;                 /* SHUTDOWN flags the host sent */
	uint32_t peer_buf_alloc, peer_fwd_cnt;  /* the host's credit */
	uint32_t tx_cnt;                        /* bytes we sent */
	uint32_t fwd_cnt, fwd_told;             /* bytes we consumed, and what the host knows */
};

/*
 * The device, polled: received packets wait in a small queue (their receive buffers held)
 * until kv_vsock_recv consumes their data; control packets are handled as they come.
 * One connection at a time is served (packets for other ports are answered with RST).
 */
struct kv_vsock {
	struct kv_virtio_dev dev;
	struct kv_vq rx, tx, ev;
	uint64_t cid;
	unsigned char *rx_bufs, *tx_bufs, *ev_bufs;
	/* received data packets not yet consumed, in order: their buffers (a used chain's
	 * descriptor is free again at once, and reposting another buffer may reuse it) */
	unsigned char *held[KV_VSOCK_QSIZE];
	uint16_t held_first, held_count;
	uint32_t held_off; /* bytes of the first held packet already consumed */
	uint64_t resets; /* TRANSPORT_RESET events seen */
};

#define kv_vsock_bytes_const \
	(3 * kv_vq_bytes_const(KV_VSOCK_QSIZE) + KV_VSOCK_QSIZE * (KV_VSOCK_RX_BUF + KV_VSOCK_TX_BUF) + 4096)

/* `msix`: on PCI, MSI-X vectors 0, 1, 2 for the receive, transmit and event queues. */
static inline int kv_vsock_init(struct kv_vsock *v, void *mem, int msix)
{
	if (kv_virtio_find(&v->dev, KV_VIRTIO_ID_VSOCK, 0) < 0)
		return -1;
	if (kv_virtio_init(&v->dev, KV_VIRTIO_F_EVENT_IDX) < 0)
		return -1;
	unsigned char *m = mem;
	uint64_t ring = kv_vq_bytes(KV_VSOCK_QSIZE);
	int pci = msix && v->dev.transport == KV_VIRTIO_TRANSPORT_PCI;
	if (kv_vq_setup(&v->dev, &v->rx, 0, m, KV_VSOCK_QSIZE, pci ? 0 : -1) < 0 ||
	    kv_vq_setup(&v->dev, &v->tx, 1, m + ring, KV_VSOCK_QSIZE, pci ? 1 : -1) < 0 ||
	    kv_vq_setup(&v->dev, &v->ev, 2, m + 2 * ring, 0, pci ? 2 : -1) < 0)
		return -1;
	for (uint32_t k = 0; pci && k < 3; k++)
		kv_virtio_msix(&v->dev, k, 0);
	if (v->rx.size != KV_VSOCK_QSIZE || v->tx.size != KV_VSOCK_QSIZE)
		return -1;
	v->ev_bufs = m + 3 * ring;
	v->rx_bufs = v->ev_bufs + 4096;
	v->tx_bufs = v->rx_bufs + KV_VSOCK_QSIZE * KV_VSOCK_RX_BUF;
	kv_vq_interrupts(&v->rx, 0);
	kv_vq_interrupts(&v->tx, 0);
	kv_vq_interrupts(&v->ev, 0);
	v->cid = kv_virtio_cfg64(&v->dev, 0);
	v->held_first = v->held_count = 0;
	v->held_off = 0;
	v->resets = 0;
	for (uint16_t i = 0; i < KV_VSOCK_QSIZE; i++) {
		struct kv_buf b = {v->rx_bufs + (uint64_t)i * KV_VSOCK_RX_BUF, KV_VSOCK_RX_BUF};
		kv_vq_add(&v->rx, &b, 0, 1);
	}
	for (uint16_t i = 0; i < v->ev.size && i < 16; i++) {
		struct kv_buf b = {v->ev_bufs + 8 * i, 8};
		kv_vq_add(&v->ev, &b, 0, 1);
	}
	kv_virtio_ready(&v->dev);
	kv_vq_kick(&v->rx);
	kv_vq_kick(&v->ev);
	return 0;
}

/* Queue one packet (header and `len` payload bytes), waiting for a free slot; notify unless
 * `batch` (the caller kicks after the last of a batch). */
static inline void kv_vsock_queue(struct kv_vsock *v, struct kv_vsock_conn *c, uint16_t op,
				  uint32_t flags, const void *data, uint32_t len, int batch)
{
	while (!v->tx.num_free) {
		while (kv_vq_poll(&v->tx, 0) >= 0)
			;
		if (!v->tx.num_free)
			kv_vq_idle(&v->tx);
	}
	unsigned char *slot = v->tx_bufs + (uint64_t)v->tx.free_head * KV_VSOCK_TX_BUF;
	struct kv_vsock_hdr *h = (struct kv_vsock_hdr *)slot;
	h->src_cid = v->cid;
	h->dst_cid = KV_VSOCK_HOST_CID;
	h->src_port = c->local_port;
	h->dst_port = c->peer_port;
	h->len = len;
	h->type = 1; /* stream */
	h->op = op;
	h->flags = flags;
	h->buf_alloc = KV_VSOCK_BUF_ALLOC;
	h->fwd_cnt = c->fwd_cnt;
	c->fwd_told = c->fwd_cnt;
	if (len)
		kv_copy(slot + KV_VSOCK_HDR_LEN, data, len);
	struct kv_buf b = {slot, KV_VSOCK_HDR_LEN + len};
	kv_vq_add(&v->tx, &b, 1, 0);
	if (!batch)
		kv_vq_kick(&v->tx);
}

static inline void kv_vsock_xmit(struct kv_vsock *v, struct kv_vsock_conn *c, uint16_t op,
				 uint32_t flags, const void *data, uint32_t len)
{
	kv_vsock_queue(v, c, op, flags, data, len, 0);
}

static inline void kv_vsock_repost(struct kv_vsock *v, unsigned char *buf)
{
	struct kv_buf b = {buf, KV_VSOCK_RX_BUF};
	kv_vq_add(&v->rx, &b, 0, 1);
	kv_vq_kick(&v->rx);
}

/* Handle what the device sent since the last call, for connection `c`. A REQUEST for a
 * listening `c` makes it connected (RESPONSE sent); data packets are held for
 * kv_vsock_recv. Returns the number of packets handled. */
static inline int kv_vsock_poll(struct kv_vsock *v, struct kv_vsock_conn *c)
{
	int handled = 0;
	uint32_t len;
	int head;
	while (kv_vq_poll(&v->ev, &len) >= 0) {
		/* TRANSPORT_RESET (the VM was restored): every connection is gone. */
		v->resets++;
		v->cid = kv_virtio_cfg64(&v->dev, 0);
		if (c->state != KV_VSOCK_LISTENING)
			c->state = KV_VSOCK_CLOSED;
		while (v->held_count) { /* data of connections that no longer exist */
			kv_vsock_repost(v, v->held[v->held_first]);
			v->held_first = (uint16_t)((v->held_first + 1) % KV_VSOCK_QSIZE);
			v->held_count--;
		}
		v->held_off = 0;
		struct kv_buf b = {v->ev_bufs, 8};
		kv_vq_add(&v->ev, &b, 0, 1);
		kv_vq_kick(&v->ev);
	}
	while (v->held_count < KV_VSOCK_QSIZE && (head = kv_vq_poll(&v->rx, &len)) >= 0) {
		handled++;
		unsigned char *rb = (unsigned char *)(uintptr_t)v->rx.desc[head].addr;
		struct kv_vsock_hdr *h = (struct kv_vsock_hdr *)rb;
		int mine = len >= KV_VSOCK_HDR_LEN && h->src_cid == KV_VSOCK_HOST_CID &&
			   h->dst_port == c->local_port &&
			   (c->state == KV_VSOCK_LISTENING || h->src_port == c->peer_port);
		if (!mine) {
			if (len >= KV_VSOCK_HDR_LEN && h->op != KV_VSOCK_OP_RST) {
				struct kv_vsock_conn other = {h->dst_port, h->src_port};
				kv_vsock_repost(v, rb);
				kv_vsock_xmit(v, &other, KV_VSOCK_OP_RST, 0, 0, 0);
			} else {
				kv_vsock_repost(v, rb);
			}
			continue;
		}
		c->peer_buf_alloc = h->buf_alloc;
		c->peer_fwd_cnt = h->fwd_cnt;
		uint16_t op = h->op;
		if (op == KV_VSOCK_OP_RW && c->state == KV_VSOCK_CONNECTED && h->len &&
		    h->len <= len - KV_VSOCK_HDR_LEN) {
			v->held[(v->held_first + v->held_count) % KV_VSOCK_QSIZE] = rb;
			v->held_count++;
			continue;
		}
		if (op == KV_VSOCK_OP_REQUEST && c->state == KV_VSOCK_LISTENING) {
			c->peer_port = h->src_port;
			c->state = KV_VSOCK_CONNECTED;
			c->tx_cnt = c->fwd_cnt = c->fwd_told = 0;
			c->peer_shutdown = 0;
			kv_vsock_repost(v, rb);
			kv_vsock_xmit(v, c, KV_VSOCK_OP_RESPONSE, 0, 0, 0);
			continue;
		}
		if (op == KV_VSOCK_OP_RESPONSE && c->state == KV_VSOCK_CONNECTING)
			c->state = KV_VSOCK_CONNECTED;
		else if (op == KV_VSOCK_OP_RST)
			c->state = KV_VSOCK_CLOSED;
		else if (op == KV_VSOCK_OP_SHUTDOWN)
			c->peer_shutdown |= h->flags & 3;
		kv_vsock_repost(v, rb);
		if (op == KV_VSOCK_OP_CREDIT_REQUEST)
			kv_vsock_xmit(v, c, KV_VSOCK_OP_CREDIT_UPDATE, 0, 0, 0);
	}
	return handled;
}

/* Connect to host port `port` from local port `local`. 0 when connected, -1 if reset. */
static inline int kv_vsock_connect(struct kv_vsock *v, struct kv_vsock_conn *c, uint32_t local,
				   uint32_t port)
{
	__builtin_memset(c, 0, sizeof(*c));
	c->local_port = local;
	c->peer_port = port;
	c->state = KV_VSOCK_CONNECTING;
	kv_vsock_xmit(v, c, KV_VSOCK_OP_REQUEST, 0, 0, 0);
	while (c->state == KV_VSOCK_CONNECTING)
		if (!kv_vsock_poll(v, c))
			kv_cpu_relax();
	return c->state == KV_VSOCK_CONNECTED ? 0 : -1;
}

/* Wait for the host to connect to our port `port` (a host client's "CONNECT port"). */
static inline void kv_vsock_accept(struct kv_vsock *v, struct kv_vsock_conn *c, uint32_t port)
{
	__builtin_memset(c, 0, sizeof(*c));
	c->local_port = port;
	c->state = KV_VSOCK_LISTENING;
	while (c->state == KV_VSOCK_LISTENING)
		if (!kv_vsock_poll(v, c))
			kv_cpu_relax();
}

/* Send `len` bytes, in packets of at most 64 KiB within the host's credit, notifying once
 * per KV_VSOCK_BATCH packets (each notify may wake the device's thread: tens of µs on a
 * nested host). 0, or -1 if the connection was reset. */
#define KV_VSOCK_BATCH 8
static inline int kv_vsock_send(struct kv_vsock *v, struct kv_vsock_conn *c, const void *data,
				uint64_t len)
{
	const unsigned char *p = data;
	int queued = 0;
	while (len) {
		if (c->state != KV_VSOCK_CONNECTED)
			return -1;
		uint32_t credit = c->peer_buf_alloc - (c->tx_cnt - c->peer_fwd_cnt);
		if ((int32_t)credit <= 0) {
			if (queued) {
				kv_vq_kick(&v->tx);
				queued = 0;
			}
			/* no credit: sleep until the host's update arrives (a spinning vCPU takes
			 * the CPU the device's thread needs to forward the data and send it) */
			if (!kv_vsock_poll(v, c))
				kv_vq_idle(&v->rx);
			continue;
		}
		uint32_t n = len < credit ? (uint32_t)len : credit;
		if (n > KV_VSOCK_TX_BUF - KV_VSOCK_HDR_LEN)
			n = KV_VSOCK_TX_BUF - KV_VSOCK_HDR_LEN;
		if (!v->tx.num_free && queued) {
			kv_vq_kick(&v->tx);
			queued = 0;
		}
		kv_vsock_queue(v, c, KV_VSOCK_OP_RW, 0, p, n, 1);
		c->tx_cnt += n;
		p += n;
		len -= n;
		if (++queued >= KV_VSOCK_BATCH) {
			kv_vq_kick(&v->tx);
			queued = 0;
		}
		kv_vsock_poll(v, c);
	}
	if (queued)
		kv_vq_kick(&v->tx);
	return 0;
}

/* Up to `cap` received bytes into `buf` (NULL: consume without copying): how many, 0 at the
 * end of the stream (the host shut down or reset), or -1 if nothing has arrived yet. */
static inline long kv_vsock_recv(struct kv_vsock *v, struct kv_vsock_conn *c, void *buf,
				 uint64_t cap)
{
	kv_vsock_poll(v, c);
	if (!v->held_count) {
		if (c->state != KV_VSOCK_CONNECTED || (c->peer_shutdown & 2))
			return 0;
		return -1;
	}
	unsigned char *rb = v->held[v->held_first];
	struct kv_vsock_hdr *h = (struct kv_vsock_hdr *)rb;
	uint32_t left = h->len - v->held_off;
	uint32_t n = cap < left ? (uint32_t)cap : left;
	if (buf)
		kv_copy(buf, (unsigned char *)h + KV_VSOCK_HDR_LEN + v->held_off, n);
	v->held_off += n;
	if (v->held_off == h->len) {
		v->held_first = (uint16_t)((v->held_first + 1) % KV_VSOCK_QSIZE);
		v->held_count--;
		v->held_off = 0;
		kv_vsock_repost(v, rb);
	}
	c->fwd_cnt += n;
	/* Tell the host about the room we made before it runs out of credit. */
	if (c->fwd_cnt - c->fwd_told >= KV_VSOCK_BUF_ALLOC / 4)
		kv_vsock_xmit(v, c, KV_VSOCK_OP_CREDIT_UPDATE, 0, 0, 0);
	return (long)n;
}

/* Shut down both directions and wait (a bounded number of polls) for the host's RST. */
static inline void kv_vsock_close(struct kv_vsock *v, struct kv_vsock_conn *c)
{
	if (c->state == KV_VSOCK_CONNECTED) {
		kv_vsock_xmit(v, c, KV_VSOCK_OP_SHUTDOWN, 3, 0, 0);
	}
	for (long i = 0; c->state == KV_VSOCK_CONNECTED && i < 100000000L; i++) {
		if (v->held_count) /* data that came before the RST: drop it */
			kv_vsock_recv(v, c, 0, ~0ULL);
		else if (!kv_vsock_poll(v, c))
			kv_cpu_relax();
	}
	c->state = KV_VSOCK_CLOSED;
}

#endif /* KVMPY_VIRTIO_H */
