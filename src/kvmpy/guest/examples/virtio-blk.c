/*
 * kvmpy-example: virtio-blk at CPL3: write a pattern, flush, read it back and check it, read
 *   the disk's id (kvmpy run virtio-blk --disk IMAGE [--transport mmio|pci]; the first 64 KiB
 *   of the image are overwritten)
 * kvmpy-modes: long long-user
 *
 * Exit code 0 when every check passed. On a machine with an irqchip, completions come as
 * interrupts (MSI-X on PCI) through a ring-0 stub; otherwise the used ring is polled.
 */
#include <kvmpy.h>
#include <kvmpy/virtio.h>

#define N_SECTORS 128 /* 64 KiB */

static unsigned char ring[2 * 4096 + 4096] __attribute__((aligned(4096)));
static unsigned char wbuf[N_SECTORS * 512] __attribute__((aligned(4096)));
static unsigned char rbuf[N_SECTORS * 512] __attribute__((aligned(4096)));
static struct kv_blk_req hdr;
static volatile uint8_t status;
static char id[21];

static int io(struct kv_vq *q, int use_irq, uint32_t type, uint64_t sector, void *buf,
	      uint32_t len)
{
	if (kv_blk_submit(q, &hdr, type, sector, buf, len, &status) < 0)
		return -1;
	kv_vq_kick(q);
	if (use_irq)
		kv_vq_wait_irq(q, 0);
	else
		kv_vq_wait(q, 0);
	return status;
}

int main(void)
{
	struct kv_virtio_dev d;
	struct kv_vq q;
	if (kv_virtio_find(&d, KV_VIRTIO_ID_BLOCK, 0) < 0) {
		kv_printf("virtio-blk: no block device (run with --disk IMAGE)\n");
		return 2;
	}
	const char *t = d.transport == KV_VIRTIO_TRANSPORT_MMIO ? "mmio" : "pci";
	if (kv_virtio_init(&d, KV_VIRTIO_F_EVENT_IDX | KV_BLK_F_RO | KV_BLK_F_FLUSH) < 0) {
		kv_printf("virtio-blk: feature negotiation failed\n");
		return 3;
	}
	/* Interrupts when the machine can take them (kvmpy installed the handler: a machine
	 * with an irqchip): MSI-X on PCI, the IOAPIC pin kvmpy routed on virtio-mmio. */
	int use_irq = kvmpy_virtio_irq_ready &&
		      (d.transport == KV_VIRTIO_TRANSPORT_MMIO || d.msix_vectors);
	if (kv_vq_setup(&d, &q, 0, ring, 64, use_irq ? 0 : -1) < 0)
		return 4;
	if (use_irq)
		kv_virtio_msix(&d, 0, 0);
	kv_vq_interrupts(&q, use_irq);
	kv_virtio_ready(&d);
	uint64_t capacity = kv_virtio_cfg64(&d, 0);
	int ro = !!(d.features & KV_BLK_F_RO);
	kv_printf("virtio-blk on %s: %lu sectors%s, %s\n", t, (unsigned long)capacity,
		  ro ? " (read-only)" : "",
		  !use_irq ? "polling" : d.transport == KV_VIRTIO_TRANSPORT_PCI ? "MSI-X interrupts"
									 : "interrupts");
	if (capacity < N_SECTORS)
		return 5;
	int failures = 0;
	uint64_t seed = rdtsc();
	for (unsigned i = 0; i < sizeof(wbuf); i++)
		wbuf[i] = (unsigned char)((seed >> (8 * (i % 8))) + i * 7);
	int st = io(&q, use_irq, KV_BLK_T_OUT, 0, wbuf, sizeof(wbuf));
	if (ro) {
		if (st != 1) {
			kv_printf("FAIL: a read-only disk accepted a write (status %d)\n", st);
			failures++;
		} else {
			kv_printf("write refused (read-only): ok\n");
		}
	} else {
		failures += st != 0;
		kv_printf("write 64 KiB: %s\n", st == 0 ? "ok" : "FAIL");
		st = io(&q, use_irq, KV_BLK_T_FLUSH, 0, 0, 0);
		failures += st != 0;
		kv_printf("flush: %s\n", st == 0 ? "ok" : "FAIL");
	}
	st = io(&q, use_irq, KV_BLK_T_IN, 0, rbuf, sizeof(rbuf));
	int same = memcmp(rbuf, wbuf, sizeof(rbuf)) == 0;
	if (st != 0 || same == ro) {
		kv_printf("FAIL: read back (status %d, %s)\n", st, same ? "same" : "different");
		failures++;
	} else {
		kv_printf("read back 64 KiB: %s\n", ro ? "unchanged" : "identical");
	}
	st = io(&q, use_irq, KV_BLK_T_GET_ID, 0, id, 20);
	kv_printf("id: %s (status %d)\n", id, st);
	if (use_irq)
		kv_printf("interrupts: %lu, the last on CPU %u\n", (unsigned long)kvmpy_virtio_irqs,
			  kvmpy_virtio_irq_cpu);
	kv_printf("%s\n", failures ? "virtio-blk: FAILED" : "virtio-blk: all checks passed");
	return failures;
}
