/*
 * kvmpy-example: two VMs greet each other through pio, shm-poll or shm-irq; the smallest use
 *   of kvmpy/ipc.h (kvmpy ipc --guest ipc-hello --mechanism pio|shm-poll|shm-irq)
 * kvmpy-modes: long-user
 *
 * The same image runs in both VMs; the info page the VMM wrote says which one this is and how
 * the two are connected. Peer 0 sends a greeting and waits for the answer, peer 1 answers.
 */
#include <kvmpy.h>
#include <kvmpy/ipc.h>

#define MSG 64

static struct kvmpy_ipc_counters counters;

static const char *mechanism(uint32_t m)
{
	return m == KVMPY_IPC_PIO ? "pio" : m == KVMPY_IPC_SHM_POLL ? "shm-poll" : "shm-irq";
}

/* One message each way, over whichever channel this VM has. */
static int send(const char *buf)
{
	struct kvmpy_ipc_info *i = kvmpy_ipc_info();
	if (i->mechanism == KVMPY_IPC_PIO) {
		kvmpy_pio_send(buf, MSG, KVMPY_PIO_STRING);
		return 0;
	}
	struct kvmpy_ring_end tx;
	kvmpy_ring_end_init(&tx, 1, &counters);
	return kvmpy_shm_send(&tx, buf, MSG) < 0;
}

static int receive(char *buf)
{
	struct kvmpy_ipc_info *i = kvmpy_ipc_info();
	if (i->mechanism == KVMPY_IPC_PIO) {
		kvmpy_pio_recv(buf, MSG, KVMPY_PIO_STRING);
		return 0;
	}
	struct kvmpy_ring_end rx;
	kvmpy_ring_end_init(&rx, 0, &counters);
	return kvmpy_shm_recv(&rx, buf, MSG) < 0;
}

int main(void)
{
	if (!kvmpy_ipc_present()) {
		kv_printf("ipc-hello: no peer here; run me with `kvmpy ipc --guest ipc-hello`\n");
		return 2;
	}
	struct kvmpy_ipc_info *i = kvmpy_ipc_info();
	char out[MSG] = {0}, in[MSG] = {0};
	if (i->peer_id == 0) {
		kv_snprintf(out, MSG, "hello from peer %u over %s", i->peer_id, mechanism(i->mechanism));
		if (send(out) || receive(in))
			return 1;
	} else {
		if (receive(in))
			return 1;
		kv_snprintf(out, MSG, "hello back from peer %u", i->peer_id);
		if (send(out))
			return 1;
	}
	in[MSG - 1] = 0;
	kv_printf("peer %u got: %s\n", i->peer_id, in);
	return 0;
}
