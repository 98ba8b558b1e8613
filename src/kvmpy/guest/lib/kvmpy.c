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

/* One conversion's flags, width and precision (prec < 0: none given). */
struct spec {
	int left, plus, space, alt, zero;
	int width, prec;
};

static void emit_pad(struct out *o, char c, int n)
{
	for (; n > 0; n--)
		emit(o, c);
}

/* prefix (sign, 0x) + zeros to the precision + digits, padded to the width. */
static void emit_field(struct out *o, const struct spec *sp, const char *prefix, const char *digits,
		       int ndigits, int prec_zeros)
{
	int plen = (int)strlen(prefix);
	int len = plen + prec_zeros + ndigits;
	int pad = sp->width > len ? sp->width - len : 0;
	if (!sp->left && !sp->zero)
		emit_pad(o, ' ', pad);
	while (*prefix)
		emit(o, *prefix++);
	if (!sp->left && sp->zero)
		emit_pad(o, '0', pad);
	emit_pad(o, '0', prec_zeros);
	while (ndigits)
		emit(o, digits[--ndigits]); /* digits are stored backwards */
	if (sp->left)
		emit_pad(o, ' ', pad);
}

static void emit_number(struct out *o, const struct spec *sp, uint64_t v, unsigned base, int upper,
			int negative)
{
	char tmp[24], prefix[4];
	const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	int n = 0, p = 0;
	if (!(v == 0 && sp->prec == 0)) /* "%.0d" of 0 prints no digits */
		do {
			tmp[n++] = digits[v % base];
			v /= base;
		} while (v);
	if (negative)
		prefix[p++] = '-';
	else if (sp->plus)
		prefix[p++] = '+';
	else if (sp->space)
		prefix[p++] = ' ';
	if (sp->alt && base == 16 && n && !(n == 1 && tmp[0] == '0')) {
		prefix[p++] = '0';
		prefix[p++] = upper ? 'X' : 'x';
	}
	int zeros = sp->prec > n ? sp->prec - n : 0;
	if (sp->alt && base == 8 && zeros == 0 && (n == 0 || tmp[n - 1] != '0'))
		zeros = 1;
	prefix[p] = 0;
	struct spec s = *sp;
	if (s.prec >= 0)
		s.zero = 0; /* a precision turns '0' padding off, as in C */
	emit_field(o, &s, prefix, tmp, n, zeros);
}

static void format(struct out *o, const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			emit(o, *fmt);
			continue;
		}
		const char *start = fmt++;
		struct spec sp = {0, 0, 0, 0, 0, 0, -1};
		for (;; fmt++) {
			if (*fmt == '-')
				sp.left = 1;
			else if (*fmt == '+')
				sp.plus = 1;
			else if (*fmt == ' ')
				sp.space = 1;
			else if (*fmt == '#')
				sp.alt = 1;
			else if (*fmt == '0')
				sp.zero = 1;
			else
				break;
		}
		if (*fmt == '*') {
			sp.width = va_arg(ap, int);
			if (sp.width < 0) {
				sp.left = 1;
				sp.width = -sp.width;
			}
			fmt++;
		} else
			while (*fmt >= '0' && *fmt <= '9')
				sp.width = sp.width * 10 + (*fmt++ - '0');
		if (*fmt == '.') {
			fmt++;
			sp.prec = 0;
			if (*fmt == '*') {
				sp.prec = va_arg(ap, int);
				if (sp.prec < 0)
					sp.prec = -1;
				fmt++;
			} else
				while (*fmt >= '0' && *fmt <= '9')
					sp.prec = sp.prec * 10 + (*fmt++ - '0');
		}
		if (sp.left)
			sp.zero = 0;
		/* Length: 0 int, 1 long, 2 long long; -1 short, -2 char. */
		int longs = 0;
		for (;; fmt++) {
			if (*fmt == 'l')
				longs++;
			else if (*fmt == 'h')
				longs--;
			else if (*fmt == 'z' || *fmt == 't')
				longs = sizeof(size_t) == 8 ? 2 : 0;
			else if (*fmt == 'j')
				longs = 2;
			else
				break;
		}
		switch (*fmt) {
		case 'c': {
			char c = (char)va_arg(ap, int);
			emit_field(o, &(struct spec){sp.left, 0, 0, 0, 0, sp.width, -1}, "", &c, 1, 0);
			break;
		}
		case 's': {
			const char *s = va_arg(ap, const char *);
			if (!s)
				s = "(null)";
			int len = 0;
			while (s[len] && (sp.prec < 0 || len < sp.prec))
				len++;
			int pad = sp.width > len ? sp.width - len : 0;
			if (!sp.left)
				emit_pad(o, ' ', pad);
			for (int i = 0; i < len; i++)
				emit(o, s[i]);
			if (sp.left)
				emit_pad(o, ' ', pad);
			break;
		}
		case 'd':
		case 'i': {
			int64_t v = longs >= 2 ? va_arg(ap, long long)
				   : longs == 1 ? va_arg(ap, long)
						: va_arg(ap, int);
			if (longs == -1)
				v = (short)v;
			else if (longs <= -2)
				v = (signed char)v;
			emit_number(o, &sp, v < 0 ? -(uint64_t)v : (uint64_t)v, 10, 0, v < 0);
			break;
		}
		case 'u':
		case 'x':
		case 'X':
		case 'o': {
			uint64_t v = longs >= 2 ? va_arg(ap, unsigned long long)
				    : longs == 1 ? va_arg(ap, unsigned long)
						 : va_arg(ap, unsigned int);
			if (longs == -1)
				v = (unsigned short)v;
			else if (longs <= -2)
				v = (unsigned char)v;
			unsigned base = *fmt == 'u' ? 10 : *fmt == 'o' ? 8 : 16;
			emit_number(o, &sp, v, base, *fmt == 'X', 0);
			break;
		}
		case 'p': {
			struct spec p = sp;
			p.alt = 1;
			uintptr_t v = (uintptr_t)va_arg(ap, void *);
			if (v == 0) { /* "0x0", where glibc prints "(nil)" */
				p.zero = 0;
				emit_field(o, &p, "0x", "0", 1, 0);
				break;
			}
			emit_number(o, &p, v, 16, 0, 0);
			break;
		}
		case '%':
			emit(o, '%');
			break;
		case 0:
			return;
		default: /* not a conversion kvmpy knows: print it as written */
			while (start <= fmt)
				emit(o, *start++);
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
