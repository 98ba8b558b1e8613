"""Device kinds by name, so a `VmConfig` can list devices and a snapshot can rebuild them.

A kind is a factory `factory(machine, id, **args)` that builds the device, claims its ports,
windows and interrupts from the machine and registers it (kvmtool's "one file per device,
registered at init"):

    @device_kind("my-uart")
    def make_uart(machine, id, *, port=0x3F8, irq=4):
        uart = Uart(machine.interrupts.pin(id, irq))
        machine.add_pio_device(port, 8, uart)
        return uart

`Machine.add_device("my-uart", port=0x2F8)` then builds one and records it in the machine's
`VmConfig`; `kvmpy restore` rebuilds it from the snapshot's config. Arguments must be JSON-able
(they are saved); a factory checks their values and raises ConfigError for bad ones.

kvmpy's own kinds live in the modules listed in BUILTIN_MODULES, imported on first use.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..machine import Machine

Factory = Callable[..., Any]

_KINDS: dict[str, Factory] = {}
#: Modules that register kvmpy's own device kinds.
BUILTIN_MODULES: list[str] = ["kvmpy.vmm.virtio", "kvmpy.vmm.legacy"]
_loaded = False


def device_kind(kind: str) -> Callable[[Factory], Factory]:
    def register(factory: Factory) -> Factory:
        if kind in _KINDS and _KINDS[kind] is not factory:
            raise ConfigError(f"device kind {kind!r} is registered twice")
        _KINDS[kind] = factory
        return factory

    return register


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for name in BUILTIN_MODULES:
            importlib.import_module(name)


def kinds() -> list[str]:
    _load_builtins()
    return sorted(_KINDS)


def create(machine: Machine, kind: str, id: str, args: dict[str, Any]) -> Any:
    _load_builtins()
    factory = _KINDS.get(kind)
    if factory is None:
        known = ", ".join(sorted(_KINDS)) or "none"
        raise ConfigError(f"unknown device kind {kind!r} (known: {known})")
    try:
        inspect.signature(factory).bind(machine, id, **args)
    except TypeError as e:
        raise ConfigError(f"device {id} ({kind}): {e}") from None
    return factory(machine, id, **args)
