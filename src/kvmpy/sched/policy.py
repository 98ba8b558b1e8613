"""Who runs next: the scheduling policies as plain objects (no KVM, no clock, no signals).

The scheduler loop (kvmpy.sched.scheduler) asks a policy which runnable VM gets the CPU
(`pick`) and tells it how long that VM actually ran (`charge`). Keeping the decision sans-IO
lets the tests drive it with made-up slice lengths, the way the device models are tested.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence

from .errors import SchedError


class Policy(enum.StrEnum):
    #: Switch to the next VM at every port-I/O exit (a VM that never exits keeps the CPU).
    ON_IO = "on-io"
    #: Round robin, each VM preempted by a host timer after one quantum.
    TIMER = "timer"
    #: Shares in proportion to the weights, one quantum at a time, deficit-based.
    WEIGHTED = "weighted"
    #: One host thread per vCPU, pinned to one CPU: the host's scheduler decides (baseline).
    THREADS = "threads"

    @classmethod
    def parse(cls, text: str | Policy) -> Policy:
        try:
            return cls(text)
        except ValueError:
            names = ", ".join(p.value for p in cls)
            raise SchedError(f"unknown scheduling policy {text!r}: choose one of {names}") from None

    @property
    def uses_weights(self) -> bool:
        """Whether the policy aims at the weights (the others aim at equal shares)."""
        return self in (Policy.WEIGHTED, Policy.THREADS)


def check_weights(weights: Sequence[float]) -> list[float]:
    if not weights:
        raise SchedError("no VMs to schedule")
    out = []
    for i, w in enumerate(weights):
        try:
            w = float(w)
        except (TypeError, ValueError):
            raise SchedError(f"weight of VM {i} is not a number: {w!r}") from None
        if not (math.isfinite(w) and w > 0):
            raise SchedError(f"weights must be positive numbers (VM {i} has {w:g})")
        out.append(w)
    return out


def target_shares(policy: Policy, weights: Sequence[float]) -> list[float]:
    """The share of host time each VM should get under `policy` while all of them run."""
    if policy.uses_weights:
        total = sum(weights)
        return [w / total for w in weights]
    return [1 / len(weights)] * len(weights)


def _after(runnable: Sequence[int], prev: int | None) -> list[int]:
    """`runnable` in round-robin order, starting with the first VM after `prev`."""
    if prev is None:
        return list(runnable)
    later = [i for i in runnable if i > prev]
    return later + [i for i in runnable if i <= prev]


class RoundRobin:
    """The next runnable VM after the previous one (on-io and timer)."""

    def pick(self, runnable: Sequence[int], prev: int | None) -> int:
        return _after(runnable, prev)[0]

    def charge(self, vm: int, ns: float, runnable: Sequence[int]) -> None:
        pass


class DeficitShares:
    """Weighted shares without accumulating error (the weighted policy).

    Every VM holds a credit in nanoseconds. After each slice, every runnable VM earns its
    fraction of the slice's *measured* length and the VM that ran pays the whole of it; the
    next slice goes to the VM with the most credit (ties: round-robin order). Credits always
    sum to zero, a slice that overran is paid back by the VM that overran it, and so no VM
    drifts away from its share: the lag stays within a slice or two however long the run.

    Every slice is one quantum long, also when the same VM runs twice in a row. Merging those
    slices would save timer interrupts, but then the heavier VM would pay the per-slice cost
    (leaving and re-entering the guest, ~0.1 ms on KVM-PVM) less often per unit of time than
    the lighter one and pull ahead in guest progress; equal slices make each VM pay it in
    proportion to its share, so progress shares match host shares too.
    """

    def __init__(self, weights: Sequence[float]):
        self.weights = check_weights(weights)
        self.credit = [0.0] * len(self.weights)
        # Credits that differ by rounding only are a tie (equal weights then alternate).
        self._epsilon = 0.0

    def pick(self, runnable: Sequence[int], prev: int | None) -> int:
        credit, eps = self.credit, self._epsilon
        best = None
        for i in _after(runnable, prev):
            if best is None or credit[i] > credit[best] + eps:
                best = i
        if best is None:
            raise SchedError("no runnable VM to pick")
        return best

    def charge(self, vm: int, ns: float, runnable: Sequence[int]) -> None:
        """`vm` ran for `ns`; `runnable` are the VMs that could have run (including `vm`).

        VMs that have stopped are left out of `runnable`, so the survivors split the CPU
        in proportion to their own weights."""
        weights, credit = self.weights, self.credit
        self._epsilon = max(self._epsilon, abs(ns) * 1e-9)
        total = sum(weights[i] for i in runnable)
        for i in runnable:
            credit[i] += ns * weights[i] / total
        credit[vm] -= ns
