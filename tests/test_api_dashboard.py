"""The dashboard in a real headless Chromium (Debian's /usr/bin/chromium, installed by `make
deps`; Playwright only drives it, no browser is downloaded): it loads over the TCP listener
with the token, shows a running VM with its console and charts, and its Pause button pauses
the VM."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from .api_harness import Daemon, ticker_image
from .test_api import _http_url

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# The probe's flags for this closed network: no background connections, no sandbox as root.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
TOKEN = "dashboard-test-token-0123456789"


@pytest.fixture
def chromium_path():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is missing: `make deps` installs it")
        pytest.skip("no /usr/bin/chromium (apt-get install chromium, or make deps)")
    return CHROMIUM


@pytest.mark.kvm
def test_dashboard_pauses_a_vm(tmp_path, chromium_path):
    from playwright.sync_api import expect, sync_playwright

    (tmp_path / "token").write_text(TOKEN)
    d = Daemon(
        tmp_path, "--multi", "--http", "127.0.0.1:0", "--token-file", str(tmp_path / "token")
    )
    try:
        d.ok("PUT", "/vms/web")
        d.ok("PUT", "/vms/web/machine-config", {"vcpu_count": 1, "mem_size_mib": 16,
                                                "irqchip": True})  # fmt: skip
        d.ok("PUT", "/vms/web/boot-source", {"kernel_image_path": ticker_image()})
        d.ok("PUT", "/vms/web/actions", {"action_type": "InstanceStart"})
        url = _http_url(d)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path, args=FLAGS,
                                         headless=True)  # fmt: skip
            try:
                page = browser.new_page()
                page.goto(f"{url}/?access_token={TOKEN}")
                assert "access_token" not in page.url  # the token left the address bar
                state = page.get_by_test_id("state-web")
                expect(state).to_have_text("Running", timeout=20_000)
                expect(page.get_by_test_id("console")).to_contain_text("tick 2 ", timeout=20_000)
                page.wait_for_timeout(2500)  # a few samples for the charts
                page.screenshot(path=str(tmp_path / "dashboard.png"))
                page.get_by_test_id("pause-web").click()
                expect(state).to_have_text("Paused", timeout=20_000)
                expect(page.get_by_test_id("resume-web")).to_be_enabled()
            finally:
                browser.close()
        st = d.ok("GET", "/vms/web/vm/stats")
        assert st["state"] == "Paused"
        time.sleep(0.5)
        assert d.ok("GET", "/vms/web/vm/stats")["output_bytes"] == st["output_bytes"]
    finally:
        d.stop()
