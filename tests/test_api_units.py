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


def _fake_bzimage(path) -> str:
    bz = bytearray(0x400)
    bz[0x202:0x206] = b"HdrS"
    path.write_bytes(bytes(bz))
    return str(path)


def test_linux_vm_config_from_firecracker_resources(tmp_path):
    """A Linux kernel with an initrd, a root drive, a network interface, vsock and the balloon
    become LinuxBoot and the device kinds, with Firecracker's root= rule."""
    r = Resources(paths=PathPolicy(cwd=str(tmp_path)))
    (tmp_path / "root.ext4").write_bytes(b"\0" * 4096)
    (tmp_path / "initrd").write_bytes(b"07070100")
    r.set_machine(M.MachineConfiguration(vcpu_count=2, mem_size_mib=128, console="virtio"))
    r.set_boot(M.BootSource(kernel_image_path=_fake_bzimage(tmp_path / "bzImage"),
                            initrd_path="initrd", boot_args="console=ttyS0 reboot=k"))  # fmt: skip
    r.put_drive("rootfs", M.Drive(drive_id="rootfs", is_root_device=True,
                                  path_on_host="root.ext4", is_read_only=True))  # fmt: skip
    r.put_net("eth0", M.NetworkInterface(iface_id="eth0", host_dev_name="tap0",
                                         guest_mac="06:00:AC:10:00:02"))  # fmt: skip
    r.put_vsock(M.Vsock(guest_cid=3, uds_path="v.sock"))
    r.put_balloon(M.Balloon(amount_mib=16, deflate_on_oom=True, stats_polling_interval_s=2))
    cfg = r.vm_config("lin")
    assert cfg.boot.initrd == str(tmp_path / "initrd")
    # Firecracker's root drive rule; the virtio console's hvc0 last, so it is /dev/console.
    assert cfg.boot.cmdline == "console=ttyS0 reboot=k root=/dev/vda ro console=hvc0"
    assert cfg.machine.irqchip and cfg.machine.vcpus == 2
    devs = {d.kind: dict(d.args) for d in cfg.devices}
    assert devs["virtio-net"] == {"tap": "tap0", "mac": "06:00:AC:10:00:02", "transport": "mmio"}
    assert devs["virtio-vsock"] == {"cid": 3, "uds": str(tmp_path / "v.sock"),
                                    "transport": "mmio"}  # fmt: skip
    assert devs["virtio-balloon"] == {"transport": "mmio", "stats_interval": 2}
    full = r.full()
    assert full["network-interfaces"][0]["host_dev_name"] == "tap0"
    assert full["balloon"]["amount_mib"] == 16
    # ... and back: a restored VM's Firecracker view has them too.
    from kvmpy.api.resources import from_vm_config

    back = from_vm_config(cfg, r.paths)
    assert back.boot_kind == "linux" and back.vsock.guest_cid == 3
    assert back.balloon is not None and back.balloon.stats_polling_interval_s == 2
    assert back.nets["eth0"].host_dev_name == "tap0"


def test_linux_device_refusals(tmp_path):
    r = Resources(paths=PathPolicy(cwd=str(tmp_path)))
    r.set_boot(M.BootSource(kernel_image_path=_fake_bzimage(tmp_path / "bzImage")))
    with pytest.raises(ApiError, match="chooses its own CPU mode"):
        r.set_machine(M.MachineConfiguration(vcpu_count=1, mem_size_mib=64, mode="long"))
    net = M.NetworkInterface(iface_id="eth0", host_dev_name="tap0", guest_mac="06:00:AC:10:00:02")
    r.put_net("eth0", net)
    cases = [
        (dict(iface_id="eth1", host_dev_name="tap0"), "in use by interface eth0"),
        (dict(iface_id="eth1", host_dev_name="tap1", guest_mac="06:00:ac:10:00:02"),
         "in use by interface eth0"),
        (dict(iface_id="eth1", host_dev_name="tap/1"), "host_dev_name"),
        (dict(iface_id="eth1", host_dev_name="tap1", guest_mac="01:00:00:00:00:01"), "multicast"),
        (dict(iface_id="eth1", host_dev_name="tap1", guest_mac="nonsense"), "guest_mac"),
        (dict(iface_id="eth1", host_dev_name="tap1", mtu=1500), "mtu"),
        (dict(iface_id="eth1", host_dev_name="tap1", rx_rate_limiter={}), "rate limiter"),
        (dict(iface_id="eth2", host_dev_name="tap1"), "differ"),
    ]  # fmt: skip
    for body, match in cases:
        with pytest.raises(ApiError, match=match):
            r.put_net("eth1", M.NetworkInterface(**body))
    r.put_net("eth0", net.model_copy(update={"guest_mac": "06:00:ac:10:00:03"}))  # a new MAC
    assert list(r.nets) == ["eth0"]
    (tmp_path / "file").write_text("x")
    for uds, match in (("x" * 100, "too long"), ("nodir/v.sock", "no such directory"),
                       ("file", "not a socket")):  # fmt: skip
        with pytest.raises(ApiError, match=match):
            r.put_vsock(M.Vsock(guest_cid=3, uds_path=uds))
    r.set_machine(M.MachineConfiguration(vcpu_count=1, mem_size_mib=64))
    for body, match in ((dict(free_page_hinting=True), "free_page_hinting"),
                        (dict(free_page_reporting=False), "free_page_reporting"),
                        (dict(deflate_on_oom=False), "deflate_on_oom"),
                        (dict(amount_mib=65), "more than the VM's memory")):  # fmt: skip
        with pytest.raises(ApiError, match=match):
            r.put_balloon(M.Balloon(**{"amount_mib": 0, "deflate_on_oom": True, **body}))
    assert r.vsock is None and r.balloon is None


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
