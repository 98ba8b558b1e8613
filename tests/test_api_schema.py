"""The API against its own OpenAPI document: schemathesis (0 server errors, 0 schema
violations), and kvmpy.client checked operation by operation against /openapi.json.

make test runs a short schemathesis smoke (fuzzing and stateful phases, 10 examples per
operation, ~30 s per mode); KVMPY_SCHEMATHESIS_FULL=1 runs every phase (the coverage phase's
~2,000 boundary cases per mode too) with 50 examples:

    KVMPY_SCHEMATHESIS_FULL=1 .venv/bin/pytest tests/test_api_schema.py -q
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from kvmpy.api import models as M
from kvmpy.client import DAEMON_OPS, OPERATIONS, Client

from .api_harness import Daemon

HERE = Path(__file__).parent
FULL = os.environ.get("KVMPY_SCHEMATHESIS_FULL") == "1"


def _netns_ok() -> str | None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (util-linux, iproute2)"
    r = subprocess.run(["unshare", "--net", "--", "true"], capture_output=True)
    return None if r.returncode == 0 else f"cannot make a network namespace: {r.stderr.decode()}"


@pytest.mark.kvm
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["single", "multi"])
def test_schemathesis(tmp_path, mode):
    """In a network namespace of its own (a generated migration destination reaches nothing
    outside it), with a running VM and a fresh one."""
    problem = _netns_ok()
    if problem:
        pytest.skip(problem)
    phases = "coverage,fuzzing,stateful" if FULL else "fuzzing,stateful"
    cmd = ["unshare", "--net", "--", sys.executable, str(HERE / "api_schemathesis.py"),
           "--mode", mode, "--dir", str(tmp_path), "--examples", "50" if FULL else "10",
           "--phases", phases]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    tail = r.stdout[-6000:] + r.stderr[-3000:]
    assert r.returncode == 0, tail
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["status"] == 0
    assert re.search(r"\d+ generated, (\d+) passed", r.stdout), tail


# --- the client against the document -----------------------------------------------------------


@pytest.fixture(scope="module", params=["single", "multi"])
def doc(request, tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp(request.param), *(
        ["--multi"] if request.param == "multi" else []))  # fmt: skip
    try:
        c = Client(d.sock)
        yield request.param, c.openapi()
        c.close()
    finally:
        d.stop()


def _ops(doc) -> dict[str, tuple[str, str]]:
    out = {}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            out[op["operationId"]] = (method.upper(), path)
    return out


def test_every_operation_has_a_client_method(doc):
    mode, spec = doc
    ops = _ops(spec)
    table = {op_id: (method, path) for method, path, op_id in OPERATIONS.values()}
    for op_id, (method, path) in ops.items():
        assert op_id in table, f"{method} {path} ({op_id}) has no kvmpy.client method"
        want_method, want_path = table[op_id]
        assert method == want_method, op_id
        name = next(n for n, v in OPERATIONS.items() if v[2] == op_id)
        prefix = "/vms/{vm_id}" if mode == "multi" and name not in DAEMON_OPS else ""
        assert path == prefix + want_path, (op_id, path)
    missing = {op_id for _m, _p, op_id in OPERATIONS.values()} - set(ops)
    if mode == "single":
        missing -= {"createVm", "deleteVm"}  # multi mode only
    assert not missing, f"client methods without an operation: {missing}"


def _validator(spec, schema):
    import jsonschema_rs

    return jsonschema_rs.validator_for({**schema, "components": spec["components"]})


def test_client_requests_match_the_document(doc):
    """Every request the client makes, captured before it leaves: its method and path are an
    operation's, and its body validates against that operation's request schema."""
    mode, spec = doc
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/vms":
            return httpx.Response(200, json={"multi": mode == "multi", "vms": []})
        if request.url.path == "/":
            return httpx.Response(200, json={"app_name": "kvmpy", "id": "vm0",
                                             "state": "Not started", "vmm_version": "x"})  # fmt: skip
        if request.url.path.endswith("/migrate"):
            return httpx.Response(200, json={"destination": "127.0.0.1:4000", "downtime_ms": 2.5,
                                             "total_s": 0.1, "rounds": 2})  # fmt: skip
        if request.url.path.endswith("/migrate-receive"):
            return httpx.Response(200, json={"address": "127.0.0.1:4000"})
        return httpx.Response(204)

    c = Client("/nonexistent.sock")
    c._http = httpx.Client(transport=httpx.MockTransport(handler), base_url="http://localhost")
    if mode == "multi":
        c.create_vm("vm0", M.FullVmConfiguration(machine_config=M.MachineConfiguration(
            vcpu_count=1, mem_size_mib=16)))  # fmt: skip
    vm = c.vm("vm0")
    vm.put_machine_config(M.MachineConfiguration(vcpu_count=2, mem_size_mib=64, irqchip=True))
    vm.patch_machine_config(M.MachineConfigurationUpdate(mem_size_mib=32))
    vm.put_boot_source(M.BootSource(kernel_image_path="vmlinux", boot_args="console=ttyS0"))
    vm.put_drive(M.Drive(drive_id="rootfs", is_root_device=True, path_on_host="r.ext4",
                         is_read_only=False))  # fmt: skip
    vm.patch_drive(M.PartialDrive(drive_id="rootfs", path_on_host="r2.ext4"))
    vm.put_network_interface(M.NetworkInterface(iface_id="eth0", host_dev_name="tap0",
                                                guest_mac="06:00:AC:10:00:02"))  # fmt: skip
    vm.patch_network_interface(M.PartialNetworkInterface(iface_id="eth0"))
    vm.put_vsock(M.Vsock(guest_cid=3, uds_path="v.sock"))
    vm.put_entropy(M.EntropyDevice(rate_limiter=M.RateLimiter(
        bandwidth=M.TokenBucket(size=1000, refill_time=100))))  # fmt: skip
    vm.put_balloon(M.Balloon(amount_mib=0, deflate_on_oom=False))
    vm.patch_balloon(M.BalloonUpdate(amount_mib=8))
    vm.patch_balloon_stats(M.BalloonStatsUpdate(stats_polling_interval_s=1))
    vm.put_logger(M.Logger(log_path="fc.log", level="Debug", show_level=True))
    vm.put_metrics(M.Metrics(metrics_path="m.json"))
    vm.start()
    vm.pause()
    vm.resume()
    vm.create_snapshot("snap", "mem")
    vm.load_snapshot("snap", lazy=True)
    vm.migrate(M.MigrateParams(destination="127.0.0.1:4000", downtime_ms=20, max_rounds=5))
    vm.migrate_receive(M.MigrateReceiveParams(listen="127.0.0.1:0"))
    vm.put_scheduler(300)
    vm.flush_metrics()
    vm.stop()
    ops = {(m, p): op for p, item in spec["paths"].items() for m, op in item.items()}
    checked = 0
    for req in seen:
        path = req.url.path
        match = [(m, p) for (m, p) in ops if m.upper() == req.method and re.fullmatch(
            re.sub(r"\{[^}]+\}", "[^/]+", p), path)]  # fmt: skip
        assert match, f"{req.method} {path} is no operation of the document"
        op = ops[match[0]]
        if req.content:
            schema = op["requestBody"]["content"]["application/json"]["schema"]
            body = json.loads(req.content)
            errors = [e.message for e in _validator(spec, schema).iter_errors(body)]
            assert not errors, (req.method, path, body, errors)
            checked += 1
    assert checked >= 20
