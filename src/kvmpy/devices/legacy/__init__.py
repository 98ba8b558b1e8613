"""Legacy PC platform devices (sans-IO): the 16550A UART, the i8042 keyboard controller and
the CMOS RTC, at their ISA ports, as Linux expects to find them."""
