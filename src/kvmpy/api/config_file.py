"""Firecracker's config-file format (`kvmpy serve --config-file FILE.json`, and the body of
`PUT /vms/{id}` in multi mode): every resource of a VM in one JSON object, applied in the order
Firecracker applies them; the whole file is refused if any part is."""

from __future__ import annotations

import json

from pydantic import ValidationError

from . import models as M
from .errors import ApiError
from .resources import PathPolicy, Resources

MAX_BYTES = 1 << 20


def resources_from(cfg: M.FullVmConfiguration, paths: PathPolicy) -> Resources:
    if cfg.cpu_config is not None:
        raise ApiError("cpu-config: kvmpy has no CPU configuration templates")
    if cfg.mmds_config is not None:
        raise ApiError("mmds-config: kvmpy has no MMDS")
    r = Resources(paths=paths)
    if cfg.logger is not None:
        r.put_logger(cfg.logger)
    if cfg.metrics is not None:
        r.put_metrics(cfg.metrics)
    if cfg.machine_config is not None:
        r.set_machine(cfg.machine_config)
    if cfg.boot_source is not None:
        r.set_boot(cfg.boot_source)
    for d in cfg.drives:
        if d.drive_id in r.drives:
            raise ApiError(f"drives: two drives have the id {d.drive_id!r}")
        r.put_drive(d.drive_id, d)
    for n in cfg.network_interfaces:
        if n.iface_id in r.nets:
            raise ApiError(f"network-interfaces: two interfaces have the id {n.iface_id!r}")
        r.put_net(n.iface_id, n)
    if cfg.vsock is not None:
        r.put_vsock(cfg.vsock)
    if cfg.entropy is not None:
        r.put_entropy(cfg.entropy)
    if cfg.balloon is not None:
        r.put_balloon(cfg.balloon)
    return r


def load(path: str, paths: PathPolicy) -> Resources:
    """A config file, checked: ApiError (a KvmpyError) with one sentence otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise ApiError(f"cannot read the config file {path}: {e.strerror}") from None
    if len(data) > MAX_BYTES:
        raise ApiError(f"{path} is larger than 1 MiB: not a config file")
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise ApiError(f"{path} is not valid JSON: {e}") from None
    try:
        cfg = M.FullVmConfiguration.model_validate(doc)
    except ValidationError as e:
        err = e.errors()[0]
        # A key from the file may hold a newline or other control characters: escape them, so
        # the error stays one line.
        where = ".".join(str(x) for x in err.get("loc", ())).encode("unicode_escape").decode()
        raise ApiError(f"{path}: {where}: {err.get('msg')}") from None
    if cfg.boot_source is None:
        raise ApiError(f"{path} has no boot-source")
    return resources_from(cfg, paths)
