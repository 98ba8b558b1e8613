/*
 * exitloop: the smallest VMM that runs kvmpy's exit benchmark guest, as a reference.
 *
 * It loads a raw image at guest-physical 0, enters it in 64-bit mode at CPL0 ("long") or CPL3
 * ("long-user", IOPL=3 and a TSS whose I/O bitmap allows every port), and answers the
 * hypercalls the guest makes through `out dx, eax` on port 0x500 exactly as kvmpy does:
 * registers from the kvm_run page (KVM_CAP_SYNC_REGS), result written back to rax there.
 *   0 exit(code)   3 num_exits() -> exits before this one
 * It prints one JSON line: {"exits": N, "seconds": S, "ns_per_exit": X, "exit_code": C}.
 *
 * usage: exitloop IMAGE long|long-user
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE (16u << 20)
#define PML4 (MEM_SIZE - 0x10000)
#define PDPT (PML4 + 0x1000)
#define PD (PML4 + 0x2000)
#define GDT (PML4 + 0x3000)
#define TSS (PML4 + 0x4000) /* 104 bytes + 8192-byte I/O bitmap + terminator: 3 pages */
#define STACK_TOP (PML4 - 0x1000)

static void die(const char *what) {
	perror(what);
	exit(2);
}

static uint64_t seg_desc(uint32_t type, int dpl, int l, int db) {
	/* flat: base 0, limit 0xfffff with 4 KiB granularity */
	uint64_t access = type | (1u << 4) | ((uint64_t)dpl << 5) | (1u << 7);
	uint64_t flags = ((uint64_t)l << 1) | ((uint64_t)db << 2) | (1u << 3);
	return 0xffffull | (access << 40) | (0xfull << 48) | (flags << 52);
}

static struct kvm_segment seg(uint16_t sel, uint8_t type, int dpl, int l, int db) {
	struct kvm_segment s = {.base = 0, .limit = 0xffffffff, .selector = sel, .type = type,
				.present = 1, .dpl = dpl, .db = db, .s = 1, .l = l, .g = 1};
	return s;
}

int main(int argc, char **argv) {
	if (argc != 3) {
		fprintf(stderr, "usage: %s IMAGE long|long-user\n", argv[0]);
		return 2;
	}
	int user = strcmp(argv[2], "long-user") == 0;
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) die("/dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0) die("KVM_CREATE_VM");
	if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000) < 0) die("KVM_SET_TSS_ADDR");
	uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE,
			    MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED) die("mmap");
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE, .userspace_addr = (uintptr_t)mem};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");

	FILE *f = fopen(argv[1], "rb");
	if (!f) die(argv[1]);
	size_t n = fread(mem, 1, PML4 - 0x20000, f);
	int too_big = fgetc(f) != EOF;
	fclose(f);
	if (n == 0 || too_big) { /* not errno failures: perror would print "Success" */
		fprintf(stderr, "%s: %s\n", argv[1], n ? "image too large" : "empty image");
		return 2;
	}

	/* Identity map of all memory with 2 MiB pages, user-accessible. */
	uint64_t *pml4 = (uint64_t *)(mem + PML4), *pdpt = (uint64_t *)(mem + PDPT),
		 *pd = (uint64_t *)(mem + PD);
	pml4[0] = PDPT | 7;
	pdpt[0] = PD | 7;
	for (unsigned i = 0; i < MEM_SIZE >> 21; i++) pd[i] = ((uint64_t)i << 21) | 0x87;

	uint64_t *gdt = (uint64_t *)(mem + GDT);
	gdt[1] = seg_desc(0xb, 0, 1, 0); /* 0x08 kernel code64 */
	gdt[2] = seg_desc(0x3, 0, 0, 1); /* 0x10 kernel data */
	gdt[4] = seg_desc(0x3, 3, 0, 1); /* 0x23 user data */
	gdt[5] = seg_desc(0xb, 3, 1, 0); /* 0x2b user code64 */
	uint32_t tss_limit = 104 + 8192;
	gdt[6] = (tss_limit & 0xffff) | ((uint64_t)(TSS & 0xffffff) << 16) | (0x89ull << 40) |
		 ((uint64_t)(TSS >> 24) << 56);
	gdt[7] = 0;
	uint8_t *tss = mem + TSS;
	*(uint64_t *)(tss + 4) = STACK_TOP - 0x8000; /* rsp0 */
	*(uint16_t *)(tss + 102) = 104;		  /* I/O bitmap right after the TSS: all ports */
	tss[104 + 8192] = 0xff;

	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0) die("KVM_CREATE_VCPU");
	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED) die("mmap kvm_run");

	struct {
		struct kvm_cpuid2 c;
		struct kvm_cpuid_entry2 e[256];
	} cpuid = {.c.nent = 256};
	if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid) < 0) die("KVM_GET_SUPPORTED_CPUID");
	if (ioctl(vcpu, KVM_SET_CPUID2, &cpuid) < 0) die("KVM_SET_CPUID2");

	struct kvm_sregs sregs;
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
	sregs.cs = user ? seg(0x2b, 0xb, 3, 1, 0) : seg(0x08, 0xb, 0, 1, 0);
	sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss =
		user ? seg(0x23, 0x3, 3, 0, 1) : seg(0x10, 0x3, 0, 0, 1);
	struct kvm_segment tr = {.base = TSS, .limit = tss_limit, .selector = 0x30, .type = 0xb,
				 .present = 1};
	sregs.tr = tr;
	sregs.gdt.base = GDT;
	sregs.gdt.limit = 8 * 8 - 1;
	sregs.cr3 = PML4;
	sregs.cr4 = (1 << 5) | (1 << 9) | (1 << 10); /* PAE, OSFXSR, OSXMMEXCPT */
	sregs.cr0 = 0x80010033;			     /* PG, WP, NE, ET, MP, PE */
	sregs.efer = 0x500;			     /* LME, LMA */
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
	struct kvm_regs regs = {.rip = 0, .rsp = STACK_TOP, .rflags = 2 | (user ? 0x3000 : 0)};
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

	run->kvm_valid_regs = KVM_SYNC_X86_REGS;
	uint64_t exits = 0;
	int code = -1;
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
		exits++;
		if (run->exit_reason != KVM_EXIT_IO || run->io.port != 0x500 ||
		    run->io.direction != KVM_EXIT_IO_OUT || run->io.size != 4) {
			fprintf(stderr, "unexpected exit %u at rip %#llx\n", run->exit_reason,
				(unsigned long long)run->s.regs.regs.rip);
			return 3;
		}
		uint32_t nr = *(uint32_t *)((uint8_t *)run + run->io.data_offset);
		if (nr == 0) {
			code = run->s.regs.regs.rdi & 0xff;
			break;
		}
		run->s.regs.regs.rax = nr == 3 ? exits - 1 : (uint64_t)-38;
		run->kvm_dirty_regs = KVM_SYNC_X86_REGS;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
	printf("{\"exits\": %llu, \"seconds\": %.9f, \"ns_per_exit\": %.1f, \"exit_code\": %d}\n",
	       (unsigned long long)exits, s, s * 1e9 / exits, code);
	return 0;
}
