"""Booting guest operating systems: the Linux x86 boot protocol (`linux`), busybox initramfs
images (`initramfs`), guest kernels (`kernels`: the distribution's, or kvmpy's minimal config
built from the distribution's source), and the software-host profile (`swhost`)."""
