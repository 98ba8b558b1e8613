"""kvmpy initramfs and kvmpy kernel, through a subprocess as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from kvmpy.boot.kernels import check_config, microvm_config_text


def kvmpy(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "kvmpy", *args],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def fake_busybox(tmp_path):
    bb = tmp_path / "busybox"
    bb.write_text("#!/bin/sh\nprintf 'bin/sh\\nbin/ls\\n'\n")
    bb.chmod(0o755)
    return bb


def test_initramfs_command(tmp_path):
    init = tmp_path / "init.sh"
    init.write_text("#!/bin/sh\necho custom\n")
    (tmp_path / "f").write_text("payload")
    out = tmp_path / "out.cpio"
    r = kvmpy(
        "initramfs", "-o", str(out), "--busybox", str(fake_busybox(tmp_path)),
        "--init", str(init), "--add", f"{tmp_path}/f:/etc/f",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = out.read_bytes()
    assert data.startswith(b"070701") and b"echo custom" in data and b"payload" in data


def test_initramfs_bad_input_is_one_line(tmp_path):
    for args, message in [
        (["--add", "nocolon"], "HOST_PATH:GUEST_PATH"),
        (["--add", f"{tmp_path}/missing:/x"], "does not exist"),
        (["--init", f"{tmp_path}/missing"], "cannot read --init"),
        (["--busybox", f"{tmp_path}/missing"], "no such file"),
    ]:
        r = kvmpy("initramfs", "-o", str(tmp_path / "x.cpio"), *args)
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr.startswith("kvmpy: error:") and message in r.stderr
        assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_kernel_list_empty_cache(tmp_path):
    r = kvmpy("kernel", "list", "--json", env={"KVMPY_CACHE_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


def test_check_config_reports_dropped_options():
    fragment = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=64\n"
    assert check_config(fragment, "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=64\n") == []
    problems = check_config(fragment, "CONFIG_B=y\nCONFIG_C=32\n")
    assert problems == ["CONFIG_A=y became unset", "CONFIG_B should be off but is y",
                        "CONFIG_C=64 became 32"]  # fmt: skip


def test_shipped_config_has_what_the_issue_asks():
    text = microvm_config_text()
    for line in (
        "CONFIG_SERIAL_8250_CONSOLE=y", "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y",
        "CONFIG_VIRTIO_PCI=y", "CONFIG_VIRTIO_BLK=y", "CONFIG_VIRTIO_NET=y",
        "CONFIG_VIRTIO_CONSOLE=y", "CONFIG_HW_RANDOM_VIRTIO=y", "CONFIG_VIRTIO_VSOCKETS=y",
        "CONFIG_VIRTIO_BALLOON=y", "CONFIG_EXT4_FS=y", "CONFIG_BLK_DEV_INITRD=y",
        "CONFIG_DEVTMPFS=y", "CONFIG_X86_MPPARSE=y", "CONFIG_KVM_GUEST=y",
        "CONFIG_RANDOM_TRUST_CPU=y", "# CONFIG_FTRACE is not set", "# CONFIG_KPROBES is not set",
        "# CONFIG_BPF_SYSCALL is not set", "# CONFIG_UNWINDER_ORC is not set",
        "# CONFIG_RETPOLINE is not set", "# CONFIG_RANDOMIZE_BASE is not set",
        "# CONFIG_MODULES is not set", "# CONFIG_X86_KERNEL_IBT is not set",
        "# CONFIG_JUMP_LABEL is not set", "# CONFIG_LEGACY_PTYS is not set",
    ):  # fmt: skip
        assert line in text.splitlines(), line


def test_boot_speed_cmdline_option(tmp_path):
    """--no-speed-cmdline reaches the machine's config (the speed line is on by default)."""
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    seen = {}
    for flag in ("--no-speed-cmdline", None):
        args = ["boot", str(kernel), "--no-initrd", "--dump-config"] + ([flag] if flag else [])
        r = kvmpy(*args)
        assert r.returncode == 0, r.stderr
        seen[flag] = json.loads(r.stdout)["boot"].get("speed_cmdline", True)
    assert seen == {"--no-speed-cmdline": False, None: True}


def test_boot_mergeable_option(tmp_path):
    """--mergeable on kvmpy boot marks the Linux guest's RAM mergeable, as on kvmpy run."""
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    seen = {}
    for flag in ("--mergeable", None):
        args = ["boot", str(kernel), "--no-initrd", "--dump-config"] + ([flag] if flag else [])
        r = kvmpy(*args)
        assert r.returncode == 0, r.stderr
        seen[flag] = json.loads(r.stdout)["machine"]["mergeable"]
    assert seen == {"--mergeable": True, None: False}
