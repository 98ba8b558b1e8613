/*
 * kvmpy-example: virtio-vsock at CPL3: an echo both ways with host Unix sockets
 *   (kvmpy run virtio-vsock --vsock 3,uds=/tmp/v.sock; tests/test_virtio_vsock_kvm.py plays
 *   the host side)
 * kvmpy-modes: long long-user
 *
 * 1. The guest connects to host port 1234 (the host's Unix socket PATH_1234), sends a
 *    message of 100,000 bytes (a pattern, in packets of up to 64 KiB within the host's
 *    credit), reads back what the host echoes and compares; then closes.
 * 2. The guest listens on port 5000; a host client connects to PATH with "CONNECT 5000\n";
 *    the guest echoes everything it receives until the host shuts its side down. If the VM
 *    is restored from a snapshot meanwhile (a TRANSPORT_RESET event), it listens again.
 * Exit code 0 when both went right.
 */
#include <kvmpy.h>
#include <kvmpy/virtio.h>

#define HOST_PORT 1234
#define LISTEN_PORT 5000
#define MSG 100000

static unsigned char mem[kv_vsock_bytes_const] __attribute__((aligned(4096)));
static unsigned char msg[MSG], back[MSG];
static unsigned char buf[8192];

static int guest_to_host(struct kv_vsock *v)
{
	struct kv_vsock_conn c;
	if (kv_vsock_connect(v, &c, 40000, HOST_PORT) < 0) {
		kv_printf("virtio-vsock: connect to host port %d refused\n", HOST_PORT);
		return 1;
	}
	for (uint32_t i = 0; i < MSG; i++)
		msg[i] = (unsigned char)(i * 31 + (i >> 8));
	if (kv_vsock_send(v, &c, msg, MSG) < 0)
		return 2;
	uint32_t got = 0;
	while (got < MSG) {
		long n = kv_vsock_recv(v, &c, back + got, MSG - got);
		if (n == 0)
			break;
		if (n < 0) {
			kv_cpu_relax();
			continue;
		}
		got += (uint32_t)n;
	}
	int same = got == MSG;
	for (uint32_t i = 0; same && i < MSG; i++)
		same = msg[i] == back[i];
	kv_vsock_close(v, &c);
	kv_printf("virtio-vsock: guest -> host port %d: sent %d bytes, echoed %u: %s\n", HOST_PORT,
		  MSG, got, same ? "ok" : "FAIL");
	return !same;
}

static int host_to_guest(struct kv_vsock *v)
{
	struct kv_vsock_conn c;
	uint64_t total = 0;
	for (;;) {
		uint64_t resets = v->resets;
		kv_vsock_accept(v, &c, LISTEN_PORT);
		for (;;) {
			long n = kv_vsock_recv(v, &c, buf, sizeof(buf));
			if (n == 0)
				break;
			if (n < 0) {
				kv_cpu_relax();
				continue;
			}
			if (kv_vsock_send(v, &c, buf, (uint64_t)n) < 0)
				break;
			total += (uint64_t)n;
		}
		if (v->resets == resets)
			break;
		/* The VM was restored from a snapshot: the connection is gone (TRANSPORT_RESET).
		 * Listen again. */
		kv_printf("virtio-vsock: connection reset by a restore; listening again\n");
	}
	kv_vsock_close(v, &c);
	kv_printf("virtio-vsock: host -> guest port %d: echoed %lu bytes\n", LISTEN_PORT,
		  (unsigned long)total);
	return total == 0;
}

int main(void)
{
	struct kv_vsock v;
	if (kv_vsock_init(&v, mem, 0) < 0) {
		kv_printf("virtio-vsock: no vsock device (run with --vsock CID,uds=PATH)\n");
		return 2;
	}
	kv_printf("virtio-vsock on %s: guest cid %lu\n",
		  v.dev.transport == KV_VIRTIO_TRANSPORT_MMIO ? "mmio" : "pci", (unsigned long)v.cid);
	int rc = guest_to_host(&v);
	rc |= host_to_guest(&v) << 1;
	if (!rc)
		kv_printf("virtio-vsock: all checks passed\n");
	return rc;
}
