/*
 * kvmpy-example: virtio-blk interrupts on the vCPU kvmpy routes them to (kvmpy run virtio-smp
 *   --vcpus 2 --transport pci --disk IMAGE,irq-cpu=1): CPU 1 spins with interrupts on while
 *   CPU 0 reads and waits on the interrupt count; prints which CPU took each interrupt
 * kvmpy-modes: long-user
 * kvmpy-vcpus: 2
 */
#include <kvmpy.h>
#include <kvmpy/smp.h>
#include <kvmpy/virtio.h>

#define READS 16

static unsigned char ring[3 * 4096] __attribute__((aligned(4096)));
static unsigned char buf[4096] __attribute__((aligned(4096)));
static struct kv_blk_req hdr;
static volatile uint8_t status;
static volatile uint32_t stop;
static uint32_t on_cpu[8];

static void spin(void *arg)
{
	(void)arg;
	while (!stop)
		kv_cpu_relax();
}

int main(void)
{
	struct kv_virtio_dev d;
	struct kv_vq q;
	if (smp_num_cpus() < 2 || !kvmpy_virtio_irq_ready) {
		kv_printf("virtio-smp needs 2 vCPUs (--vcpus 2)\n");
		return 2;
	}
	if (kv_virtio_find(&d, KV_VIRTIO_ID_BLOCK, 0) < 0) {
		kv_printf("virtio-smp: no block device (--disk IMAGE)\n");
		return 2;
	}
	/* No EVENT_IDX: every completion interrupts (one request in flight at a time). */
	if (kv_virtio_init(&d, 0) < 0 || kv_vq_setup(&d, &q, 0, ring, 16, 0) < 0)
		return 3;
	kv_virtio_msix(&d, 0, 0); /* the guest asks for CPU 0; kvmpy's irq-cpu may say otherwise */
	kv_virtio_ready(&d);
	smp_start(1, spin, 0);
	for (int i = 0; i < READS; i++) {
		uint64_t seen = kvmpy_virtio_irqs;
		kv_blk_submit(&q, &hdr, KV_BLK_T_IN, (uint64_t)i * 8, buf, sizeof(buf), &status);
		kv_vq_kick(&q);
		kv_vq_wait_irq(&q, 0);
		while (kvmpy_virtio_irqs == seen) /* completion seen by polling first: wait for it */
			kv_cpu_relax();
		on_cpu[kvmpy_virtio_irq_cpu & 7]++;
	}
	stop = 1;
	smp_wait(smp_others_mask());
	kv_printf("interrupts on CPU 0: %u, on CPU 1: %u\n", on_cpu[0], on_cpu[1]);
	return 0;
}
