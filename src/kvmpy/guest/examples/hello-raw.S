/*
 * kvmpy-example: a raw image (load at 0, entry 0) whose bytes decode identically in 16-, 32-
 * and 64-bit code, so the same file runs in every mode; prints through port 0xE9 and exits
 * through a 16/32-bit hypercall.
 * kvmpy-modes: real protected paged32 long long-user
 * kvmpy-default-mode: long
 * kvmpy-format: raw
 *
 * Only instructions without operand-size dependence are used: 8-bit immediates and registers,
 * `out imm8, al`, `xor r32, r32` (xor r16, r16 in real mode) and `out dx, eax` (out dx, ax).
 */
	.code32
	.text
	.globl _start
_start:
	.macro putc byte
	movb	$\byte, %al
	outb	%al, $0xe9
	.endm

	putc	72		/* 'H' */
	putc	101		/* 'e' */
	putc	108		/* 'l' */
	putc	108		/* 'l' */
	putc	111		/* 'o' */
	putc	44		/* ',' */
	putc	32		/* ' ' */
	putc	114		/* 'r' */
	putc	97		/* 'a' */
	putc	119		/* 'w' */
	putc	32		/* ' ' */
	putc	119		/* 'w' */
	putc	111		/* 'o' */
	putc	114		/* 'r' */
	putc	108		/* 'l' */
	putc	100		/* 'd' */
	putc	33		/* '!' */
	putc	10		/* newline */

	/* hc_exit(0): dx = 0x500, eax = 0, edi = 0 (registers are zero at entry). */
	movb	$0x05, %dh
	movb	$0x00, %dl
	xorl	%eax, %eax
	xorl	%edi, %edi
	outl	%eax, %dx
1:	hlt
	jmp	1b
