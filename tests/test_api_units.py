"""The API's translation of Firecracker's configuration into a VmConfig, and its parser of
Firecracker config files under hostile input (hypothesis): one ApiError, never a traceback."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.api import models as M
from kvmpy.api.config_file import load
from kvmpy.api.errors import ApiError
from kvmpy.api.resources import PathPolicy, Resources, kernel_kind, rate_of

from .api_harness import ticker_image


def test_vm_config_from_firecracker_resources(tmp_path):
    disk = tmp_path / "root.img"
    disk.write_bytes(b"\0" * 4096)
    data = tmp_path / "data.img"
    data.write_bytes(b"\0" * 4096)
    r = Resources(paths=PathPolicy(cwd=str(tmp_path)))
    r.set_machine(M.MachineConfiguration(vcpu_count=2, mem_size_mib=64, virtio_transport="pci",
                                         console="virtio"))  # fmt: skip
    r.set_boot(M.BootSource(kernel_image_path=ticker_image()))
    r.put_drive("data", M.Drive(drive_id="data", is_root_device=False, path_on_host="data.img",
                                is_read_only=True))  # fmt: skip
    r.put_drive("root", M.Drive(drive_id="root", is_root_device=True, path_on_host="root.img"))
    r.put_entropy(M.EntropyDevice(rate_limiter=M.RateLimiter(
        bandwidth=M.TokenBucket(size=500, refill_time=250))))  # fmt: skip
    cfg = r.vm_config("vm7")
    assert cfg.machine.vcpus == 2 and cfg.machine.memory == 64 << 20 and cfg.machine.irqchip
    assert cfg.machine.name == "vm7" and str(cfg.machine.mode) == "long"  # the image's hint
    kinds = [(d.kind, d.id) for d in cfg.devices]
    assert kinds == [("virtio-blk", "root"), ("virtio-blk", "data"), ("virtio-rng", "rng0"),
                     ("virtio-console", "hvc0")]  # fmt: skip
    blk = dict(cfg.devices[1].args)
    assert blk == {"path": str(data), "readonly": True, "serial": "data", "transport": "pci"}
    assert dict(cfg.devices[2].args)["rate"] == 2000
    full = r.full()
    assert [d["drive_id"] for d in full["drives"]] == ["data", "root"]
    assert full["machine-config"]["virtio_transport"] == "pci"


def test_refusals_name_what_is_missing(tmp_path):
    r = Resources(paths=PathPolicy(cwd=str(tmp_path)))
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * 512)
    r.put_drive("a", M.Drive(drive_id="a", is_root_device=True, path_on_host="d.img"))
    with pytest.raises(ApiError, match="root device already"):
        r.put_drive("b", M.Drive(drive_id="b", is_root_device=True, path_on_host="d.img"))
    with pytest.raises(ApiError, match="SDK image"):
        r.set_boot(M.BootSource(kernel_image_path=ticker_image(), boot_args="console=ttyS0"))
    with pytest.raises(ApiError, match="rate limiter"):
        r.put_drive("c", M.Drive(drive_id="c", is_root_device=False, path_on_host="d.img",
                                 rate_limiter=M.RateLimiter()))  # fmt: skip
    with pytest.raises(ApiError, match="one_time_burst"):
        rate_of(M.EntropyDevice(rate_limiter=M.RateLimiter(
            bandwidth=M.TokenBucket(size=1, refill_time=1, one_time_burst=5))))  # fmt: skip
    assert list(r.drives) == ["a"]  # the refused ones left nothing behind


def test_kernel_kind(tmp_path):
    bz = bytearray(0x400)
    bz[0x202:0x206] = b"HdrS"
    (tmp_path / "bzImage").write_bytes(bytes(bz))
    assert kernel_kind(str(tmp_path / "bzImage")) == "linux"
    assert kernel_kind(ticker_image()) == "image"
    (tmp_path / "raw").write_bytes(b"\x90" * 100)
    assert kernel_kind(str(tmp_path / "raw")) == "image"


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["boot-source", "machine-config", "drives", "network-interfaces",
                         "vsock", "entropy", "balloon", "logger", "metrics", "mmds-config",
                         "kernel_image_path", "vcpu_count", "mem_size_mib", "drive_id",
                         "path_on_host", "is_root_device", "x"]) | st.text(max_size=8),
        inner, max_size=5),
    max_leaves=20,
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])  # fmt: skip
@given(doc=_json, raw=st.binary(max_size=64), as_json=st.booleans())
def test_config_file_parser_never_crashes(tmp_path, doc, raw, as_json):
    path = tmp_path / "vm.json"
    path.write_bytes(json.dumps(doc).encode() if as_json else raw)
    try:
        load(str(path), PathPolicy(str(tmp_path)))
    except ApiError as e:
        assert str(e) and "\n" not in str(e).strip()
