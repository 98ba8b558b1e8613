/*
 * kvmpy-example: virtio-console at CPL3: print through the transmit queue and echo what
 *   arrives on the receive queue (kvmpy run virtio-console --console virtio; type a line, or
 *   pipe one in)
 * kvmpy-modes: long long-user
 *
 * Prints a greeting on hvc0, then waits for one line of input and echoes it back upper-cased.
 * Exit code 0 once the echo is out.
 */
#include <kvmpy.h>
#include <kvmpy/virtio.h>

static unsigned char rx_ring[3 * 4096] __attribute__((aligned(4096)));
static unsigned char tx_ring[3 * 4096] __attribute__((aligned(4096)));
static char rx_buf[4][64];
static char out[160];

static void put(struct kv_vq *tx, const char *s, uint32_t n)
{
	struct kv_buf b = {(void *)s, n};
	kv_vq_add(tx, &b, 1, 0);
	kv_vq_kick(tx);
	kv_vq_wait(tx, 0);
}

int main(void)
{
	struct kv_virtio_dev d;
	struct kv_vq rx, tx;
	if (kv_virtio_find(&d, KV_VIRTIO_ID_CONSOLE, 0) < 0) {
		kv_printf("virtio-console: no console device (run with --console virtio)\n");
		return 2;
	}
	if (kv_virtio_init(&d, KV_VIRTIO_F_EVENT_IDX) < 0 ||
	    kv_vq_setup(&d, &rx, 0, rx_ring, 8, -1) < 0 || kv_vq_setup(&d, &tx, 1, tx_ring, 8, -1) < 0)
		return 3;
	kv_vq_interrupts(&rx, 0);
	kv_vq_interrupts(&tx, 0);
	for (int i = 0; i < 4; i++) {
		struct kv_buf b = {rx_buf[i], sizeof(rx_buf[i])};
		kv_vq_add(&rx, &b, 0, 1);
	}
	kv_virtio_ready(&d);
	kv_vq_kick(&rx);
	static const char hello[] = "hello from virtio-console: type a line\n";
	put(&tx, hello, sizeof(hello) - 1);
	uint32_t n = 0;
	int full = 0;
	while (n < sizeof(out) - 8) {
		uint32_t len;
		int head = kv_vq_wait(&rx, &len);
		char *p = 0;
		for (int i = 0; i < 4; i++)
			if ((uintptr_t)rx.desc[head].addr == (uintptr_t)rx_buf[i])
				p = rx_buf[i];
		if (!p || len > sizeof(rx_buf[0]))
			return 4;
		for (uint32_t i = 0; i < len && n < sizeof(out) - 8; i++) {
			char c = p[i];
			out[n++] = (c >= 'a' && c <= 'z') ? (char)(c - 32) : c;
			if (c == '\n')
				full = 1;
		}
		struct kv_buf b = {p, sizeof(rx_buf[0])};
		kv_vq_add(&rx, &b, 0, 1);
		kv_vq_kick(&rx);
		if (full)
			break;
	}
	put(&tx, "echo: ", 6);
	put(&tx, out, n);
	return 0;
}
