"""kv_printf in every mode matches C's printf for the flags, widths and precisions it supports
(the expected strings are glibc's output for the same calls)."""

from __future__ import annotations

import pytest

from kvmpy.result import StopReason

pytestmark = pytest.mark.kvm

SOURCE = r"""
#include <kvmpy.h>
void main(void)
{
    kv_printf("[%-5d|%5d|%05d|%+d|% d|%x|%#x|%#o|%X]\n", 42, 42, 42, 42, 42, 255, 255, 8, 255);
    kv_printf("[%-6s|%6s|%.2s|%*d|%-*d|%.3d|%c|%-3c|%%]\n", "ab", "ab", "abcdef", 4, 7, 4, 7, 5,
          'z', 'y');
    kv_printf("[%ld|%lld|%lu|%zu|%hhd|%hd|%08.3d|%-08d|%-5d|%5u]\n", -5L, -6LL, 7UL, (size_t)8,
          300, 70000, 9, 9, -3, 3u);
    char buf[16];
    int n = kv_snprintf(buf, sizeof buf, "%-4x|%+.2d", 0xab, 3);
    kv_printf("%s %d %p %p\n", buf, n, (void *)0, (void *)0x1234);
}
"""

EXPECTED = (
    b"[42   |   42|00042|+42| 42|ff|0xff|010|FF]\n"
    b"[ab    |    ab|ab|   7|7   |005|z|y  |%]\n"
    b"[-5|-6|7|8|44|4464|     009|9       |-3   |    3]\n"
    b"ab  |+03 8 0x0 0x1234\n"
)


@pytest.mark.parametrize("mode", ["real", "protected", "long", "long-user"])
def test_kv_printf_flags_widths_precisions(build_guest, run_guest, mode):
    result = run_guest(build_guest(SOURCE, mode), mode)
    assert result.stop_reason in (StopReason.EXIT, StopReason.HLT), result.message
    assert result.output == EXPECTED
