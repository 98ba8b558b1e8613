/*
 * kvmpy guest runtime: the little libc a freestanding guest needs, for every code size.
 *
 * gcc may call memcpy/memset/memmove/memcmp even in freestanding code (structure copies,
 * initializers), and 32-bit code divides 64-bit integers through __udivdi3 and friends, which
 * normally come from a 32-bit libgcc that most hosts do not install; so they are here.
 */
#include <kvmpy.h>
#include <stdarg.h>

void *memcpy(void *dst, const void *src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;
	while (n--)
		*d++ = *s++;
	return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;
	if (d < s) {
		while (n--)
			*d++ = *s++;
	} else {
		while (n--)
			d[n] = s[n];
	}
	return dst;
}

void *memset(void *dst, int c, size_t n)
{
	unsigned char *d = dst;
	while (n--)
		*d++ = (unsigned char)c;
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const unsigned char *x = a, *y = b;
	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x - *y;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

#if !defined(__x86_64__)
/* 64-bit division for 32- and 16-bit code (what libgcc would provide). */
static uint64_t udivmod64(uint64_t n, uint64_t d, uint64_t *rem)
{
	uint64_t q = 0, r = 0;
	if (d == 0) {
		/* Divide by zero: trap like the hardware would. */
		__asm__ volatile("ud2");
	}
	for (int i = 63; i >= 0; i--) {
		r = (r << 1) | ((n >> i) & 1);
		if (r >= d) {
			r -= d;
			q |= (uint64_t)1 << i;
		}
	}
	if (rem)
		*rem = r;
	return q;
}

uint64_t __udivdi3(uint64_t n, uint64_t d) { return udivmod64(n, d, 0); }

uint64_t __udivmoddi4(uint64_t n, uint64_t d, uint64_t *rem) { return udivmod64(n, d, rem); }

int64_t __divmoddi4(int64_t n, int64_t d, int64_t *rem)
{
	uint64_t r;
	uint64_t q = udivmod64(n < 0 ? -(uint64_t)n : (uint64_t)n,
			       d < 0 ? -(uint64_t)d : (uint64_t)d, &r);
	if (rem)
		*rem = n < 0 ? -(int64_t)r : (int64_t)r;
	return (n < 0) != (d < 0) ? -(int64_t)q : (int64_t)q;
}

uint64_t __umoddi3(uint64_t n, uint64_t d)
{
	uint64_t r;
	udivmod64(n, d, &r);
	return r;
}

int64_t __divdi3(int64_t n, int64_t d)
{
	int neg = (n < 0) != (d < 0);
	uint64_t q = udivmod64(n < 0 ? -(uint64_t)n : (uint64_t)n,
			       d < 0 ? -(uint64_t)d : (uint64_t)d, 0);
	return neg ? -(int64_t)q : (int64_t)q;
}

int64_t __moddi3(int64_t n, int64_t d)
{
	uint64_t r;
	udivmod64(n < 0 ? -(uint64_t)n : (uint64_t)n, d < 0 ? -(uint64_t)d : (uint64_t)d, &r);
	return n < 0 ? -(int64_t)r : (int64_t)r;
}
#endif

/* --- formatting ------------------------------------------------------------------------- */

struct out {
	char *buf;
	size_t size;  /* capacity including the NUL */
	size_t len;   /* characters in buf (may exceed size when truncating) */
	size_t total; /* characters produced */
	int flush;    /* print with hc_print_str whenever the buffer fills */
};

static void emit(struct out *o, char c)
{
	if (o->flush && o->len + 1 >= o->size) {
		o->buf[o->len] = 0;
		hc_print_str(o->buf);
		o->len = 0;
	}
	if (o->len + 1 < o->size)
		o->buf[o->len] = c;
	o->len++;
	o->total++;
}

static void emit_number(struct out *o, uint64_t v, unsigned base, int upper, int width, char pad,
			int negative)
{
	char tmp[24];
	const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	int n = 0;
	do {
		tmp[n++] = digits[v % base];
		v /= base;
	} while (v);
	if (negative && pad == '0')
		emit(o, '-');
	int total = n + (negative ? 1 : 0);
	for (; width > total; width--)
		emit(o, pad);
	if (negative && pad != '0')
		emit(o, '-');
	while (n)
		emit(o, tmp[--n]);
}

static void format(struct out *o, const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			emit(o, *fmt);
			continue;
		}
		fmt++;
		char pad = ' ';
		int width = 0, longs = 0;
		if (*fmt == '0') {
			pad = '0';
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l' || *fmt == 'z') {
			longs += *fmt == 'z' ? (sizeof(size_t) == 8 ? 2 : 0) : 1;
			fmt++;
		}
		switch (*fmt) {
		case 'c':
			emit(o, (char)va_arg(ap, int));
			break;
		case 's': {
			const char *s = va_arg(ap, const char *);
			if (!s)
				s = "(null)";
			size_t len = strlen(s);
			for (; width > (int)len; width--)
				emit(o, ' ');
			while (*s)
				emit(o, *s++);
			break;
		}
		case 'd':
		case 'i': {
			int64_t v = longs >= 2 ? va_arg(ap, long long)
				   : longs == 1 ? va_arg(ap, long)
						: va_arg(ap, int);
			emit_number(o, v < 0 ? -(uint64_t)v : (uint64_t)v, 10, 0, width, pad, v < 0);
			break;
		}
		case 'u':
		case 'x':
		case 'X': {
			uint64_t v = longs >= 2 ? va_arg(ap, unsigned long long)
				    : longs == 1 ? va_arg(ap, unsigned long)
						 : va_arg(ap, unsigned int);
			emit_number(o, v, *fmt == 'u' ? 10 : 16, *fmt == 'X', width, pad, 0);
			break;
		}
		case 'p':
			emit(o, '0');
			emit(o, 'x');
			emit_number(o, (uintptr_t)va_arg(ap, void *), 16, 0, width, pad, 0);
			break;
		case '%':
			emit(o, '%');
			break;
		case 0:
			return;
		default:
			emit(o, '%');
			emit(o, *fmt);
		}
	}
}

int kv_snprintf(char *buf, size_t size, const char *fmt, ...)
{
	struct out o = {buf, size, 0, 0, 0};
	va_list ap;
	va_start(ap, fmt);
	format(&o, fmt, ap);
	va_end(ap);
	if (size)
		buf[o.len < size ? o.len : size - 1] = 0;
	return (int)o.total;
}

int kv_printf(const char *fmt, ...)
{
	char buf[256];
	struct out o = {buf, sizeof buf, 0, 0, 1};
	va_list ap;
	va_start(ap, fmt);
	format(&o, fmt, ap);
	va_end(ap);
	buf[o.len] = 0;
	if (o.len)
		hc_print_str(buf);
	return (int)o.total;
}

void kv_puts(const char *s)
{
	hc_print_str(s);
	hc_putc('\n');
}
