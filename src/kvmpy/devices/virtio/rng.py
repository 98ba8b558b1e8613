"""virtio-entropy (VIRTIO 1.2, 5.4): one request queue; the device fills each buffer it is
given with bytes from the host's getrandom().

Rate limits, per request size: a request gets at most `max_request` bytes (a guest that posts
a 1 GiB buffer gets 64 KiB, not a 1 GiB read), and with `rate` (bytes per second) a token
bucket holding one second's worth decides how much each request gets; when it holds less than
1 KiB the queue waits (a timer on the I/O thread) instead of spinning or handing out crumbs.
"""

from __future__ import annotations

import os
import time

from .constants import ID_ENTROPY
from .device import VirtioDevice
from .queue import Virtqueue

QUEUE_SIZE = 256
MAX_REQUEST = 64 * 1024
MIN_GRANT = 1024


class VirtioRng(VirtioDevice):
    device_id = ID_ENTROPY

    def __init__(self, name: str = "rng0", max_request: int = MAX_REQUEST, rate: int = 0):
        super().__init__(name, [QUEUE_SIZE])
        self.max_request = max(1, max_request)
        self.rate = max(0, rate)
        self._tokens = float(self.rate)
        self._stamp = time.monotonic()
        self._waiting = False
        self._min_grant = max(1, min(MIN_GRANT, self.rate)) if self.rate else 1
        self.bytes = 0

    def _budget(self, want: int) -> int:
        if not self.rate:
            return want
        now = time.monotonic()
        self._tokens = min(float(self.rate), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        return min(want, int(self._tokens))

    def handle(self, q: Virtqueue) -> None:
        pushed = False
        while True:
            # With a rate, a request waits until the bucket holds MIN_GRANT bytes (or what
            # the rate allows in a second, if less), so the guest gets useful amounts.
            if self.rate and self._budget(self._min_grant) < self._min_grant:
                self._retry_later(q)
                break
            chain = self.next_chain(q)
            if chain is None:
                break
            want = min(chain.writable_len, self.max_request)
            n = self._budget(want)
            written = 0
            if n:
                written = chain.write(os.getrandom(n))
                self._tokens -= written
            self.bytes += written
            self.requests += 1
            q.push(chain, written)
            pushed = True
        if pushed:
            self.signal_used(q)

    def _retry_later(self, q: Virtqueue) -> None:
        if self.loop is None or self._waiting:
            return
        self._waiting = True

        def again() -> None:
            self._waiting = False
            self.process(q.index)

        self.loop.call_later(min(1.0, self._min_grant / self.rate), again)

    def on_reset(self) -> None:
        self._tokens = float(self.rate)

    def stats(self) -> dict:
        return {**super().stats(), "bytes": self.bytes}
