/*
 * kvmpy-example: virtio-entropy at CPL3: fetch random bytes from the host and check they
 *   look random (kvmpy run virtio-rng --rng [--transport mmio|pci])
 * kvmpy-modes: long long-user
 */
#include <kvmpy.h>
#include <kvmpy/virtio.h>

static unsigned char ring[3 * 4096] __attribute__((aligned(4096)));
static unsigned char buf[4096];

int main(void)
{
	struct kv_virtio_dev d;
	struct kv_vq q;
	if (kv_virtio_find(&d, KV_VIRTIO_ID_ENTROPY, 0) < 0) {
		kv_printf("virtio-rng: no entropy device (run with --rng)\n");
		return 2;
	}
	if (kv_virtio_init(&d, KV_VIRTIO_F_EVENT_IDX) < 0 || kv_vq_setup(&d, &q, 0, ring, 16, -1) < 0)
		return 3;
	kv_vq_interrupts(&q, 0);
	kv_virtio_ready(&d);
	struct kv_buf b = {buf, sizeof(buf)};
	kv_vq_add(&q, &b, 0, 1);
	kv_vq_kick(&q);
	uint32_t len = 0;
	kv_vq_wait(&q, &len);
	/* 4096 random bytes: every byte value about 16 times, none wildly off. */
	unsigned counts[256] = {0};
	for (uint32_t i = 0; i < len; i++)
		counts[buf[i]]++;
	unsigned seen = 0, max = 0;
	for (int i = 0; i < 256; i++) {
		seen += counts[i] != 0;
		if (counts[i] > max)
			max = counts[i];
	}
	int ok = len == sizeof(buf) && seen > 240 && max < 48;
	kv_printf("virtio-rng on %s: %u bytes, %u distinct values, most frequent %u times: %s\n",
		  d.transport == KV_VIRTIO_TRANSPORT_MMIO ? "mmio" : "pci", len, seen, max,
		  ok ? "ok" : "FAIL");
	return !ok;
}
