"""The smoke run of the virtio fuzz harness (the long run: python -m kvmpy.devices.virtio.fuzz,
see docs/virtio.md): hypothesis-generated and seeded-random guest programs against every
device on both transports. Any exception, device internal error, access outside RAM or hang
fails."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.devices.virtio.fuzz import DEVICES, Harness


@pytest.fixture(scope="module", params=DEVICES)
def harness(request):
    h = Harness(request.param)
    yield h
    h.close()


def test_fuzz_smoke_random(harness):
    rng = random.Random(harness.kind)
    for _ in range(400):
        harness.one(rng.randbytes(rng.randrange(0, 800)))
    rep = harness.report()
    assert rep["accesses_outside_ram"] == 0
    assert rep["inputs_ending_in_needs_reset"] > 0  # the harness does reach the error paths


@given(data=st.binary(max_size=1024))
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_fuzz_smoke_hypothesis(harness, data):
    harness.one(data)
