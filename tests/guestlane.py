"""The guest lane of the test suite: tests that need Debian's stock kernel, freshly booted.

Two marks send a test there:
- ``@pytest.mark.ipvs``: needs IPVS. Where the host kernel has IPVS
  (``/proc/net/ip_vs``, or an ``ip_vs`` module ``modprobe -n`` finds), these
  run natively like any other test; where it has not, in the guest.
- ``@pytest.mark.guest``: always in the guest. It stands for a user's fresh VM
  (the Vagrant box's kernel, nothing preloaded), where modules this host has
  built in are modules nothing has loaded yet: what kproxy must load itself.

The session boots ONE QEMU guest before the tests run (kproxy/guest.py:
Debian's stock kernel, the host's ``/`` read-only under a tmpfs overlay) that
runs every collected guest-lane test in one pytest session; each test's own report
(outcome, failure text, captured output, duration) comes back through the
writable share, serialized by pytest itself, and is reported on the host as
that test's result. The host never sets up those tests' fixtures.

Never a silent skip: with no way to boot the guest, or when the guest dies,
each of its tests fails with the reason. Without root, kernel tests
are expected failures as everywhere else in the suite (tests/conftest.py).

Settings: KPROXY_GUEST_TIMEOUT (seconds for the whole guest session),
KPROXY_GUEST=never (treat the host as having no guest: fail),
KPROXY_GUEST=always (ipvs tests in the guest even where the host has IPVS) or
KPROXY_GUEST=native (ipvs tests on this kernel; guest-marked ones still boot a guest).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from _pytest.reports import TestReport

from kproxy import guest
from kproxy.proxy import mode as proxy_mode

IPVS_MARK = "ipvs"
FRESH_MARK = "guest"
REPORT_ENV = "KPROXY_GUEST_REPORT"  # in the guest: where to write the reports
SELECT_ENV = "KPROXY_GUEST_SELECT"  # in the guest: the node ids to run


class GuestSide:
    """In the guest: run only the selected tests and write every report to a file."""

    def __init__(self, config: pytest.Config, report: str, select: str | None) -> None:
        self.config = config
        self.out = open(report, "a", encoding="utf-8")
        self.select = set(Path(select).read_text().split("\n")) if select else None

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        if self.select is not None:
            keep = [item for item in items if item.nodeid in self.select]
            drop = [item for item in items if item.nodeid not in self.select]
            if drop:
                config.hook.pytest_deselected(items=drop)
            items[:] = keep
        # The fresh-kernel checks first: they assert that nothing loaded a module before the first lab
        # up, and a session-scoped lab (tests/servicelab.py) may be set up before them otherwise.
        items.sort(key=lambda item: not item.nodeid.startswith("tests/test_fresh_kernel.py"))

    def pytest_runtest_logreport(self, report: TestReport) -> None:
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        self.out.write(json.dumps(data) + "\n")
        self.out.flush()

    def pytest_unconfigure(self) -> None:
        self.out.close()


class HostSide:
    """On the host: run the guest-lane tests in one guest, report each one here."""

    def __init__(self, config: pytest.Config, ipvs_in_guest: bool) -> None:
        self.config = config
        self.ipvs_in_guest = ipvs_in_guest
        self.items: list[pytest.Item] = []
        self.reports: dict[str, list[TestReport]] | None = None
        self.error = ""
        self.summary = ""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        self.items = [item for item in items if self._intercepts(item)]

    def _intercepts(self, item: pytest.Item) -> bool:
        if not (item.get_closest_marker(FRESH_MARK) or (self.ipvs_in_guest and item.get_closest_marker(IPVS_MARK))):
            return False
        xfail = item.get_closest_marker("xfail")
        return not (xfail and xfail.kwargs.get("run") is False)  # e.g. kernel tests without root

    @pytest.hookimpl(wrapper=True)
    def pytest_runtestloop(self, session: pytest.Session) -> Any:
        # At session start, outside any one test's timeout (pytest-timeout wraps each test's protocol).
        if not session.config.option.collectonly and any(self._intercepts(item) for item in self.items):
            self._run_guest()
        return (yield)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
        if not self._intercepts(item):
            return None
        if self.reports is None:
            self._run_guest()
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        reports = (self.reports or {}).get(item.nodeid)
        if not reports:
            reports = [self._failure(item)]
        for report in reports:
            item.ihook.pytest_runtest_logreport(report=report)
        # The host set up nothing for this item; tear down what the previous one left for it.
        item.session._setupstate.teardown_exact(nextitem)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def _failure(self, item: pytest.Item) -> TestReport:
        text = self.error or "the guest ran but reported nothing for this test (see its console log)"
        return TestReport(item.nodeid, item.location, {k: 1 for k in item.keywords}, "failed",
                          f"guest-lane test not run: {text}", "call", [], 0.0)

    def _run_guest(self) -> None:
        self.reports = {}
        items = [item for item in self.items if self._intercepts(item)]
        reason = "" if os.environ.get("KPROXY_GUEST") != "never" else "KPROXY_GUEST=never"
        reason = reason or guest.unavailable_reason()
        if reason:
            self.error = (f"this test runs in a QEMU guest booting Debian's stock kernel, and none can be booted: "
                          f"{reason}. Install the guest lane's packages (scripts/setup, as root).")
            return
        terminal = self.config.pluginmanager.get_plugin("terminalreporter")
        run_dir = Path(tempfile.mkdtemp(prefix="kproxy-guest-"))
        (run_dir / "select.txt").write_text("\n".join(item.nodeid for item in items))
        files = sorted({str(item.path) for item in items})
        timeout = float(os.environ.get("KPROXY_GUEST_TIMEOUT", min(3600, 300 + 90 * len(items))))
        if terminal:
            terminal.write_line(f"\nguest lane: running {len(items)} test(s) in one QEMU guest (Debian's stock kernel, "
                                f"freshly booted, TCG; timeout {timeout:.0f} s) ...", bold=True)
        argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA",
                "-o", f"timeout={self.config.getini('timeout') or 300}",
                # Each test's own time, not its fixtures': the last test's teardown there is every session-scoped
                # lab's `down` at once, which under emulation once took it past its timeout. The guest session
                # as a whole has its own timeout below, and each kproxy command in a test has one.
                "-o", "timeout_func_only=true",
                f"--junitxml={run_dir}/junit.xml", *files]
        env = {REPORT_ENV: str(run_dir / "reports.jsonl"), SELECT_ENV: str(run_dir / "select.txt")}
        started = time.monotonic()
        try:
            result = guest.run(argv, cwd=Path(str(self.config.rootpath)), env=env, timeout=timeout,
                               run_dir=run_dir,
                               log=lambda m: terminal.write_line(m) if terminal else print(m))
        except guest.GuestError as exc:
            self.error = f"the QEMU guest failed: {exc}"
            console = (run_dir / "console.log")
            if console.exists():
                self.error += "\n--- guest console (tail) ---\n" + console.read_text(errors="replace")[-4000:]
            return
        for line in (run_dir / "reports.jsonl").read_text().splitlines() if \
                (run_dir / "reports.jsonl").exists() else []:
            report = self.config.hook.pytest_report_from_serializable(config=self.config, data=json.loads(line))
            if isinstance(report, TestReport):
                self.reports.setdefault(report.nodeid, []).append(report)
        missing = [item.nodeid for item in items if item.nodeid not in self.reports]
        self.summary = (f"guest lane: {len(items)} test(s) ran in a QEMU guest (kernel "
                        f"{guest.ensure_kernel().version}) in {time.monotonic() - started:.1f} s, guest pytest exit "
                        f"status {result.status}; console log {run_dir}/console.log")
        if missing:
            self.error = (f"the guest's pytest (exit status {result.status}) reported nothing for this test; "
                          f"console tail:\n{result.console[-4000:]}")
        elif result.status == 0:
            shutil.rmtree(run_dir, ignore_errors=True)
            self.summary = self.summary.rsplit(";", 1)[0]

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.summary:
            terminalreporter.write_line(self.summary)


def configure(config: pytest.Config) -> None:
    """Called from tests/conftest.py's pytest_configure."""
    if guest.in_guest():
        report = os.environ.get(REPORT_ENV)
        if report:
            config.pluginmanager.register(GuestSide(config, report, os.environ.get(SELECT_ENV)), "kproxy-guest-side")
        return
    mode = os.environ.get("KPROXY_GUEST", "")
    ipvs_in_guest = mode == "always" or (mode != "native" and not proxy_mode("ipvs").runs_here())
    config.pluginmanager.register(HostSide(config, ipvs_in_guest), "kproxy-guest-host-side")
