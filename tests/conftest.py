"""Shared fixtures. Tests that need /dev/kvm are marked `kvm`.

On a machine without /dev/kvm those tests are skipped with the reason. On a machine that has
/dev/kvm, or in CI (CI=true, as CI services set it), a KVM test that cannot run is a failure,
not a skip: CI must not go green because the interesting half of the suite quietly did nothing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from kvmpy.errors import KvmpyError

KVM_PATH = os.environ.get("KVMPY_DEV", "/dev/kvm")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
GUESTS = Path(__file__).parent / "guests"

_kvm_problem: str | None = None
_kvm_checked = False


def kvm_problem() -> str | None:
    """None if KVM is usable, else why not."""
    global _kvm_problem, _kvm_checked
    if not _kvm_checked:
        _kvm_checked = True
        try:
            from kvmpy.kvm import Kvm

            Kvm(KVM_PATH).close()
        except KvmpyError as e:
            _kvm_problem = str(e)
    return _kvm_problem


def pytest_collection_modifyitems(config, items):
    problem = kvm_problem()
    if problem is None:
        return
    exists = os.path.exists(KVM_PATH) or IN_CI
    for item in items:
        if "kvm" in item.keywords:
            if exists:
                item.add_marker(
                    pytest.mark.usefixtures("_kvm_must_work"),
                )
            else:
                item.add_marker(pytest.mark.skip(reason=f"needs KVM: {problem}"))


@pytest.fixture
def _kvm_must_work():
    pytest.fail(
        f"KVM is not usable ({KVM_PATH} exists, or CI is set), so the KVM tests cannot run: "
        f"{kvm_problem()}"
    )


def pytest_sessionfinish(session, exitstatus):
    """Belt and braces: on a KVM machine or in CI, any skipped KVM test fails the run."""
    if not os.path.exists(KVM_PATH) and not IN_CI:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    skipped_kvm = [
        r.nodeid for r in reporter.stats.get("skipped", []) if "kvm" in getattr(r, "keywords", {})
    ]
    if skipped_kvm:
        reporter.write_line(
            f"FAILED: {len(skipped_kvm)} KVM test(s) were skipped on a machine with {KVM_PATH}"
            f"{' (CI)' if IN_CI else ''}: " + ", ".join(skipped_kvm[:5]),
            red=True,
        )
        session.exitstatus = 1


@pytest.fixture(scope="session")
def kvm():
    from kvmpy.kvm import Kvm

    k = Kvm(KVM_PATH)
    yield k
    k.close()


@pytest.fixture(scope="session")
def gcc_available():
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build guests")


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("guests")


@pytest.fixture(scope="session")
def build_guest(build_dir, gcc_available):
    """build_guest(source_text_or_path, mode) -> Path of an ELF built with the SDK (memoized)."""
    from kvmpy.sdk import build

    cache: dict[tuple[str, str], Path] = {}

    def _build(source: str | Path, mode: str = "long-user") -> Path:
        if isinstance(source, Path):
            src = source
            text = source.read_text()
        else:
            text = source
            src = build_dir / f"src{len(cache)}.c"
            src.write_text(text)
        key = (text, mode)
        if key not in cache:
            out = build_dir / f"guest{len(cache)}-{mode}.elf"
            cache[key] = build([src], out, mode)
        return cache[key]

    return _build


@pytest.fixture
def run_guest(kvm):
    """run_guest(image_path_or_Image, mode, memory="16M", timeout=30, **config) -> RunResult."""
    from kvmpy.loader import Image
    from kvmpy.machine import Machine, MachineConfig

    def _run(image, mode="long-user", memory="16M", timeout=30, setup=None, **config):
        with Machine(MachineConfig(mode=mode, memory=memory, **config), kvm=kvm) as m:
            if isinstance(image, Image):
                m.load(image)
            else:
                m.load_file(image)
            if setup is not None:
                setup(m)
            return m.run(timeout=timeout)

    return _run


@pytest.fixture(scope="session")
def assemble(build_dir, gcc_available):
    """assemble(text, bits=64) -> raw bytes of the snippet, linked at address 0."""
    import subprocess

    cache: dict[tuple[str, int], bytes] = {}

    def _asm(text: str, bits: int = 64) -> bytes:
        key = (text, bits)
        if key not in cache:
            n = len(cache)
            src, elf, raw = (build_dir / f"asm{n}.{ext}" for ext in ("S", "elf", "bin"))
            src.write_text(f".code{bits}\n.globl _start\n_start:\n{text}\n")
            subprocess.run(
                ["gcc", "-m32" if bits != 64 else "-m64", "-nostdlib", "-static", "-no-pie",
                 "-Wl,-Ttext=0", "-Wl,-e,0", "-Wl,--build-id=none",
                 "-Wl,--no-warn-rwx-segments", "-o", str(elf), str(src)],
                check=True, capture_output=True,
            )  # fmt: skip
            subprocess.run(
                ["objcopy", "-O", "binary", "-j", ".text", str(elf), str(raw)],
                check=True,
                capture_output=True,
            )
            cache[key] = raw.read_bytes()
        return cache[key]

    return _asm
