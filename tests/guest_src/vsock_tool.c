/* A vsock tool for the Linux guest of tests/test_api_linux.py. No libc: it is built on the
 * host with gcc -nostdlib and put on the guest's ext4 drive, so the shared initramfs stays
 * as it is (and busybox has no AF_VSOCK).
 *   vs l PORT        listen on PORT, accept one connection, answer "echo:" + what it read
 *   vs c PORT MSG    connect to the host (CID 2) on PORT, send MSG, print the answer */
typedef unsigned long u64;
struct sockaddr_vm {
    unsigned short family, reserved;
    unsigned int port, cid;
    unsigned char zero[4];
};

static long sc(long n, long a, long b, long c) {
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
}
static unsigned int num(const char *s) {
    unsigned int v = 0;
    while (*s >= '0' && *s <= '9') v = v * 10 + (unsigned)(*s++ - '0');
    return v;
}
static u64 len(const char *s) {
    u64 n = 0;
    while (s[n]) n++;
    return n;
}
static void out(const char *s) { sc(1, 1, (long)s, (long)len(s)); }
static void die(const char *s) {
    out(s);
    sc(60, 1, 0, 0);
}

int main(int argc, char **argv) {
    char buf[300];
    if (argc < 3) die("usage: vs l PORT | vs c PORT MSG\n");
    struct sockaddr_vm a = {40 /* AF_VSOCK */, 0, num(argv[2]), 0, {0}};
    long s = sc(41 /* socket */, 40, 1 /* SOCK_STREAM */, 0);
    if (s < 0) die("vs: socket failed\n");
    if (argv[1][0] == 'l') {
        a.cid = 0xffffffffu; /* VMADDR_CID_ANY */
        if (sc(49 /* bind */, s, (long)&a, sizeof a) < 0 || sc(50 /* listen */, s, 1, 0) < 0)
            die("vs: bind/listen failed\n");
        out("vs: listening\n");
        long c = sc(43 /* accept */, s, 0, 0);
        if (c < 0) die("vs: accept failed\n");
        long n = sc(0 /* read */, c, (long)buf + 5, 256);
        if (n <= 0) die("vs: read failed\n");
        buf[0] = 'e', buf[1] = 'c', buf[2] = 'h', buf[3] = 'o', buf[4] = ':';
        sc(1 /* write */, c, (long)buf, n + 5);
        sc(3 /* close */, c, 0, 0);
        out("vs: answered\n");
        return 0;
    }
    if (argc < 4) die("usage: vs c PORT MSG\n");
    a.cid = 2; /* the host */
    if (sc(42 /* connect */, s, (long)&a, sizeof a) < 0) die("vs: connect failed\n");
    sc(1, s, (long)argv[3], (long)len(argv[3]));
    long n = sc(0, s, (long)buf, 256);
    if (n <= 0) die("vs: no answer\n");
    buf[n] = 0;
    out("vs: got ");
    out(buf);
    out("\n");
    return 0;
}

void __attribute__((naked)) _start(void) {
    __asm__("mov (%rsp), %rdi\n lea 8(%rsp), %rsi\n and $-16, %rsp\n call main\n"
            "mov %eax, %edi\n mov $60, %eax\n syscall");
}
