/*
 * kvmpy-example: virtio-net at CPL3: raw Ethernet frames to and from the host TAP (kvmpy run
 *   virtio-net --net tap=auto; tests/test_virtio_net_kvm.py plays the host side)
 * kvmpy-modes: long long-user
 *
 * Frames use the local experimental EtherType 0x88B5; their payload is "KVN", a kind byte,
 * a sequence number and a pattern derived from it, so either side can check every byte.
 *
 * Default mode (no parameters): send 16 "hello" frames (kind 'H', 60 to 1410 bytes) to the
 * broadcast address, then answer every 'P' frame with an 'R' frame of the same sequence,
 * length and pattern back to its sender, until a 'B' (bye) frame, which is answered too.
 * Modes set by the VMM in `kvmpy_net_params` (two VMs on one bridge): ping sends `count`
 * 'P' frames to `peer` one at a time (re-sent until answered); pong answers `count` of them.
 */
#include <kvmpy.h>
#include <kvmpy/virtio.h>

#define ETHERTYPE 0x88B5
#define PARAMS_MAGIC 0x54454E4F59504D4BULL /* "KMPYONET" */
#define QSIZE 64

struct net_params {
	uint64_t magic;
	uint32_t mode; /* 1 ping, 2 pong */
	uint32_t count;
	uint8_t peer[6];
	uint8_t pad[2];
	/* results */
	uint64_t done, resent, bad;
};
struct net_params kvmpy_net_params __attribute__((used));

static unsigned char mem[kv_net_bytes_const(QSIZE)] __attribute__((aligned(4096)));
static unsigned char frame[KV_NET_MAX_FRAME];
static unsigned char out[KV_NET_MAX_FRAME];
static const uint8_t broadcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

static uint32_t build(unsigned char *f, const uint8_t *dst, const uint8_t *src, char kind,
		      uint32_t seq, uint32_t len)
{
	kv_copy(f, dst, 6);
	kv_copy(f + 6, src, 6);
	f[12] = ETHERTYPE >> 8;
	f[13] = ETHERTYPE & 0xff;
	unsigned char *p = f + 14;
	p[0] = 'K', p[1] = 'V', p[2] = 'N', p[3] = (unsigned char)kind;
	kv_copy(p + 4, &seq, 4);
	for (uint32_t j = 8; j < len - 14; j++)
		p[j] = (unsigned char)(seq * 7 + j);
	return len;
}

/* The kind of a well-formed frame of ours, 0 for anything else (ARP, IPv6 from the host...). */
static char check(const unsigned char *f, int len, uint32_t *seq)
{
	if (len < 14 + 8 || f[12] != (ETHERTYPE >> 8) || f[13] != (ETHERTYPE & 0xff))
		return 0;
	const unsigned char *p = f + 14;
	if (p[0] != 'K' || p[1] != 'V' || p[2] != 'N')
		return 0;
	kv_copy(seq, p + 4, 4);
	for (int j = 8; j < len - 14; j++)
		if (p[j] != (unsigned char)(*seq * 7 + j))
			return 'X';
	return (char)p[3];
}

static int mac_eq(const unsigned char *a, const uint8_t *b)
{
	for (int i = 0; i < 6; i++)
		if (a[i] != b[i])
			return 0;
	return 1;
}

static int ping(struct kv_net *n, struct net_params *prm)
{
	for (uint32_t seq = 0; seq < prm->count; seq++) {
		uint32_t len = 60 + (seq * 97) % 1400;
		for (;;) {
			kv_net_send(n, out, build(out, prm->peer, n->mac, 'P', seq, len));
			int answered = 0;
			for (long spin = 0; spin < 20000000L && !answered; spin++) {
				int got = kv_net_recv(n, frame, sizeof(frame));
				if (got < 0) {
					kv_cpu_relax();
					continue;
				}
				uint32_t s;
				char k = check(frame, got, &s);
				if (k == 'X')
					prm->bad++;
				if (k == 'R' && s == seq && (uint32_t)got == len && mac_eq(frame, n->mac))
					answered = 1;
			}
			if (answered)
				break;
			prm->resent++;
		}
		prm->done++;
	}
	return prm->bad ? 1 : 0;
}

static int pong(struct kv_net *n, struct net_params *prm)
{
	while (prm->done < prm->count) {
		int got = kv_net_recv(n, frame, sizeof(frame));
		if (got < 0) {
			kv_cpu_relax();
			continue;
		}
		uint32_t s;
		char k = check(frame, got, &s);
		if (k == 'X')
			prm->bad++;
		if (k != 'P' || !mac_eq(frame, n->mac))
			continue;
		kv_net_send(n, out, build(out, frame + 6, n->mac, 'R', s, (uint32_t)got));
		prm->done++;
	}
	return prm->bad ? 1 : 0;
}

int main(void)
{
	struct kv_net n;
	struct net_params *prm = &kvmpy_net_params;
	if (kv_net_init(&n, 0, mem, QSIZE, 0) < 0) {
		kv_printf("virtio-net: no network device (run with --net tap=NAME)\n");
		return 2;
	}
	kv_printf("virtio-net on %s: mac %02x:%02x:%02x:%02x:%02x:%02x, link %s\n",
		  n.dev.transport == KV_VIRTIO_TRANSPORT_MMIO ? "mmio" : "pci", n.mac[0], n.mac[1],
		  n.mac[2], n.mac[3], n.mac[4], n.mac[5], kv_net_link_up(&n) ? "up" : "down");
	if (prm->magic == PARAMS_MAGIC && prm->mode == 1)
		return ping(&n, prm);
	if (prm->magic == PARAMS_MAGIC && prm->mode == 2)
		return pong(&n, prm);

	for (uint32_t i = 0; i < 16; i++)
		kv_net_send(&n, out, build(out, broadcast, n.mac, 'H', i, 60 + i * 90));
	uint32_t echoed = 0, bad = 0, other = 0;
	for (;;) {
		int got = kv_net_recv(&n, frame, sizeof(frame));
		if (got < 0) {
			kv_cpu_relax();
			continue;
		}
		uint32_t s;
		char k = check(frame, got, &s);
		if (k == 'X')
			bad++;
		if (k != 'P' && k != 'B') {
			other += k == 0;
			continue;
		}
		kv_net_send(&n, out, build(out, frame + 6, n.mac, 'R', s, (uint32_t)got));
		if (k == 'B')
			break;
		echoed++;
	}
	kv_printf("virtio-net: sent %lu frames, echoed %u, %u bad, %u others ignored: %s\n",
		  (unsigned long)n.sent, echoed, bad, other, bad ? "FAIL" : "all checks passed");
	return bad ? 1 : 0;
}
