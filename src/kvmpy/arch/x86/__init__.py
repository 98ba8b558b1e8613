"""x86 CPU modes, descriptor tables, page tables and CPUID."""
