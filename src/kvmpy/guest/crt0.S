/*
 * kvmpy guest start-up, for every code size (preprocessed with the mode's -m16/-m32/-m64).
 * _start calls main() and passes its return value to the exit hypercall.
 *
 * In 32- and 64-bit modes kvmpy enters with a valid stack outside the image (docs/abi.md);
 * in real mode we set our own, because gcc -m16 code assumes SS = DS = 0.
 * KVMPY_MODE (a string) is recorded in a .note.kvmpy note so `kvmpy run` knows the mode.
 */
	.section .text.start, "ax"
	.globl _start
_start:
#if defined(__x86_64__)
	andq	$-16, %rsp
	call	main
	movl	%eax, %edi
#elif defined(KVMPY_CODE16)
	.code16
	cli
	xorw	%ax, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	movl	$__kvmpy_stack_top, %esp
	calll	main
	movl	%eax, %edi
#else
	andl	$-16, %esp
	call	main
	movl	%eax, %edi
#endif
	xorl	%eax, %eax
	movw	$0x500, %dx
	outl	%eax, %dx
1:	hlt
	jmp	1b

#if defined(KVMPY_CODE16)
	.section .bss.stack, "aw", @nobits
	.balign 16
	.space 4096
__kvmpy_stack_top:
#endif

	.section .note.kvmpy, "", @note
	.balign 4
	.long	6			/* name size: "kvmpy\0" */
	.long	3f - 2f			/* desc size */
	.long	1			/* type 1: CPU mode */
	.asciz	"kvmpy"
	.balign 4
2:	.asciz	KVMPY_MODE
3:	.balign 4

	.section .note.GNU-stack, "", @progbits
