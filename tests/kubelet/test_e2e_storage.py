"""Kubernetes' own storage conformance against the driver: the "External Storage" suite of e2e.test v1.35.6
(../shared/peers/k8s-node/e2e, run by its run-external-storage.sh) with our test-driver description
tests/kubelet/flashcopy-testdriver.yaml, on the real kubelet node of tests/kubelet/node.py.

The chosen patterns (PATTERNS, each a test named after it) run in one e2e.test run (its start costs ~20 s), the
xfs expansion patterns in a second; each test parses the JUnit report e2e.test writes and asserts that no spec of
its pattern failed and at least one passed (specs the suite skips itself, e.g. for a capability the driver does
not claim, are fine). Measured here: ~6 minutes for both runs. CSI_FLASHCOPY_E2E=0 switches them off.

CSI_FLASHCOPY_E2E_FULL=1 adds the whole non-disruptive suite (everything but Disruptive|Serial|Slow and the specs
below that need images this node does not have; 40 passed, 0 failed in 861 s here). KUBELET_KEEP_STATE=1 keeps
/tmp/kl-* (reports and logs). Results: docs/kubelet.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from csi_driver import DRIVER_NAME
from tests.kubelet.node import PEER_NODE, Env, has_cap_sys_resource, running_node, why_skip

RUNNER = PEER_NODE / "e2e" / "run-external-storage.sh"
TESTDRIVER = Path(__file__).with_name("flashcopy-testdriver.yaml")
XFS_CLASS = "flashcopy-e2e-xfs"  # made by the fixture: the chart's `flashcopy` class with fstype xfs

SKIP = why_skip() or (None if RUNNER.exists() else f"no {RUNNER}")
if SKIP is None and os.environ.get("CSI_FLASHCOPY_E2E") == "0":
    SKIP = "CSI_FLASHCOPY_E2E=0: the External Storage e2e patterns are switched off"
pytestmark = [pytest.mark.skipif(SKIP is not None, reason=SKIP or ""), pytest.mark.long]

# Always skipped (e2e --ginkgo.skip): the runner's default (no disruptive/serial/slow specs in a shared CI run),
# plus specs needing images other than the node's imported pause and busybox (no registry is reachable, they
# would fail with ErrImagePull):
NEEDS_OTHER_IMAGES = [
    r"subPath",  # agnhost (mounttest) containers
    r"volumeMode should not mount / map unused volumes",  # a hostexec pod (agnhost) inspects the node's mounts
    r"should allow exec of files on the volume",  # an nginx:1.14-4 pod
    r"\[Feature:Windows\]",  # Windows images (and no Windows node)
    r"\[Feature:SELinux\]",  # needs an SELinux-enforcing node as well
]
BASE_SKIP = "|".join(["Disruptive", "Serial", "Slow", *NEEDS_OTHER_IMAGES])
CI_SKIP = "|".join(["Disruptive", "Serial", *NEEDS_OTHER_IMAGES])
# Without CAP_SYS_RESOURCE (this machine's root) a mounted ext4 cannot grow (EXT4_IOC_RESIZE_FS: EPERM; the driver
# answers FAILED_PRECONDITION): the specs that grow the default (ext4) class online, in the PV and the ephemeral
# patterns, are skipped; test_e2e_volume_expand_xfs runs the PV ones on xfs instead.
EXT4_ONLINE_EXPANSION = [] if has_cap_sys_resource() else [
    re.escape("Dynamic PV (default fs)(allowExpansion)] volume-expand should resize volume when PVC is edited while "
              "pod"),
    re.escape("(default fs)") + ".*" + re.escape("ephemeral should support expansion of pvcs")]


@dataclass
class Report:
    passed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def counts(self) -> str:
        return f"passed={len(self.passed)} failed={len(self.failed)} skipped={len(self.skipped)}"


def parse_junit(path: Path, focus: str) -> Report:
    """Ginkgo's JUnit report lists every spec of the binary (the unfocused ones as skipped): count only this
    driver's External Storage specs that match the focus."""
    rep = Report()
    tag = f"[Driver: {DRIVER_NAME}]"
    for tc in ET.parse(path).getroot().iter("testcase"):
        name = tc.get("name", "")
        if tag not in name or not re.search(focus, name):
            continue
        status = tc.get("status", "")
        if status == "passed":
            rep.passed.append(name)
        elif status in ("skipped", "pending"):
            rep.skipped.append(name)
        else:
            bad = tc.find("failure")
            if bad is None:
                bad = tc.find("error")
            msg = (bad.get("message", "") + "\n" + (bad.text or "")) if bad is not None else status
            rep.failed.append((name, msg[:3000]))
    return rep


@dataclass
class Suite:
    env: Env
    base: Path
    xfs_driver: Path


def hung_loop_devices() -> str | None:
    """`losetup -j FILE` (what NodeStageVolume runs) asks every loop device for its status, which stats its backing
    file: one loop device backed by a file on an unresponsive FUSE mount (another process's) hangs every staging
    on the machine (DEADLINE_EXCEEDED after 60 s, pods never start). Say so up front instead of after the suite's
    5-minute pod timeouts."""
    try:
        subprocess.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE", "-j", str(TESTDRIVER)],
                       capture_output=True, timeout=15)
        return None
    except subprocess.TimeoutExpired:
        backing = []
        for d in sorted(Path("/sys/block").glob("loop*/loop/backing_file")):
            backing.append(f"{d.parent.parent.name} -> {d.read_text().strip()}")
        return "losetup -j hangs on this machine (a loop device backed by a file on an unresponsive FUSE mount " \
               "of another process): " + "; ".join(backing)


@pytest.fixture(scope="module")
def suite() -> Iterator[Suite]:
    hung = hung_loop_devices()
    if hung:
        pytest.skip(hung)
    with running_node() as e:
        base = Path(tempfile.mkdtemp(prefix="e2e-", dir=e.cluster.state))
        e.apply({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": XFS_CLASS},
                 "provisioner": DRIVER_NAME, "reclaimPolicy": "Delete", "volumeBindingMode": "WaitForFirstConsumer",
                 "allowVolumeExpansion": True, "parameters": {"csi.storage.k8s.io/fstype": "xfs"}})
        # the same description with the xfs class: the suite has no xfs variant of the allowExpansion patterns
        xfs = base / "flashcopy-testdriver-xfs.yaml"
        xfs.write_text(TESTDRIVER.read_text().replace("FromExistingClassName: flashcopy\nSnapshotClass",
                                                      f"FromExistingClassName: {XFS_CLASS}\nSnapshotClass", 1))
        assert XFS_CLASS in xfs.read_text()
        yield Suite(e, base, xfs)


@dataclass
class Run:
    report: Report
    returncode: int
    log: Path

    def of(self, text: str) -> Report:
        """The specs of one pattern (its spec-name text)."""
        rep = Report()
        rep.passed = [n for n in self.report.passed if text in n]
        rep.failed = [(n, m) for n, m in self.report.failed if text in n]
        rep.skipped = [n for n in self.report.skipped if text in n]
        return rep


def run_suite(s: Suite, name: str, focus: str, *, testdriver: Path = TESTDRIVER, skip: str = BASE_SKIP,
              timeout: float = 1800) -> Run:
    """One e2e.test run (~20 s to start, then its specs one after another), its JUnit report parsed."""
    report = s.base / name
    report.mkdir()
    env = dict(s.env.cluster.env, TESTDRIVER=str(testdriver), FOCUS=focus, SKIP=skip, REPORT=str(report))
    t0 = time.monotonic()
    with open(report / "e2e.log", "w") as log:
        r = subprocess.run(["bash", str(RUNNER), "--ginkgo.timeout=2h"], env=env, stdout=log,
                           stderr=subprocess.STDOUT, timeout=timeout)
    took = time.monotonic() - t0
    junit = report / "junit_01.xml"
    text = (report / "e2e.log").read_text(errors="replace")
    assert junit.exists(), f"e2e.test ({r.returncode}) wrote no {junit}:\n{text[-4000:]}"
    rep = parse_junit(junit, focus)
    print(f"\n[e2e {name}] {rep.counts()} in {took:.0f}s (rc {r.returncode}, log {report / 'e2e.log'})")
    for n in rep.passed:
        print(f"  passed  {n}")
    for n, _ in rep.failed:
        print(f"  FAILED  {n}")
    assert rep.passed or rep.failed or rep.skipped, f"focus {focus!r} matched no spec:\n{text[-2000:]}"
    return Run(rep, r.returncode, report / "e2e.log")


def check(s: Suite, run: Run, text: str) -> None:
    """No spec of the pattern failed and at least one passed."""
    rep = run.of(text)
    if rep.failed:
        driver = "\n".join(s.env.driver.text().splitlines()[-40:])
        details = "\n\n".join(f"{n}:\n{m}" for n, m in rep.failed)
        pytest.fail(f"{len(rep.failed)} e2e spec(s) of {text!r} failed ({rep.counts()}):\n{details}\n"
                    f"--- csi-flashcopy node plugin:\n{driver}")
    assert rep.passed, f"no spec of {text!r} ran ({rep.counts()}; log {run.log})"


def exited_clean(run: Run) -> None:
    """e2e.test itself ended 0 when no spec failed (no suite-level failure such as a leaked namespace)."""
    assert run.returncode == 0 or run.report.failed, f"e2e.test exited {run.returncode} with no failed spec: {run.log}"


# The patterns CI runs, in one e2e.test run: (test id, text of the suite's spec names, SKIP regex added to the
# run). The ROX-mode variants of the data-source specs are left to the full run (they repeat the same restore,
# read-only). The run does not skip [Slow]: the focus is exact, and the volumeMode pattern's only spec that this
# node can run (a Pod using a volume in the other mode must fail) is tagged Slow; its other spec needs agnhost.
PATTERNS = [
    ("volumes-fs", "Dynamic PV (default fs)] volumes ", ""),
    ("volumes-block", "Dynamic PV (block volmode)] volumes ", ""),
    ("provision-from-snapshot", "Dynamic PV (default fs)] provisioning should provision storage with snapshot data "
     "source", "ROX mode"),
    ("provision-from-pvc", "Dynamic PV (default fs)] provisioning should provision storage with pvc data source",
     "ROX mode"),
    ("snapshottable", "Dynamic Snapshot (delete policy)] snapshottable [", ""),
    ("volume-mode-fs", "Dynamic PV (filesystem volmode)] volumeMode should fail to use a volume in a pod with "
     "mismatched mode", ""),
    ("volume-mode-block", "Dynamic PV (block volmode)] volumeMode should fail to use a volume in a pod with "
     "mismatched mode", ""),
    ("ephemeral-fs", "Generic Ephemeral-volume (default fs) (late-binding)] ephemeral ", ""),
    ("ephemeral-block", "Generic Ephemeral-volume (block volmode) (late-binding)] ephemeral ", ""),
    ("capacity", "Dynamic PV (default fs)] capacity ", ""),
]
EXPAND = "Dynamic PV (default fs)(allowExpansion)] volume-expand"


@pytest.fixture(scope="module")
def ci_run(suite: Suite) -> Run:
    focus = "(" + "|".join(re.escape(t) for _, t, _ in PATTERNS) + ")"
    skip = "|".join(filter(None, [CI_SKIP, *EXT4_ONLINE_EXPANSION, *sorted({x for _, _, x in PATTERNS if x})]))
    return run_suite(suite, "ci", focus, skip=skip, timeout=2400)


@pytest.mark.parametrize(("name", "text"), [p[:2] for p in PATTERNS], ids=[p[0] for p in PATTERNS])
def test_e2e_pattern(suite: Suite, ci_run: Run, name: str, text: str) -> None:
    check(suite, ci_run, text)


def test_e2e_run_exit_status(ci_run: Run) -> None:
    exited_clean(ci_run)


def test_e2e_volume_expand_xfs(suite: Suite) -> None:
    """Offline and online expansion (allowExpansion patterns) on xfs, through the xfs variant of the description:
    xfs_growfs needs no CAP_SYS_RESOURCE."""
    run = run_suite(suite, "volume-expand-xfs", re.escape(EXPAND), testdriver=suite.xfs_driver)
    check(suite, run, EXPAND)
    exited_clean(run)


@pytest.mark.skipif(not has_cap_sys_resource(),
                    reason="root lacks CAP_SYS_RESOURCE (/proc/self/status CapEff bit 24): ext4 online resize "
                           "(EXT4_IOC_RESIZE_FS) fails with EPERM; the xfs variant runs instead")
def test_e2e_volume_expand_ext4(suite: Suite) -> None:
    run = run_suite(suite, "volume-expand-ext4", re.escape(EXPAND))
    check(suite, run, EXPAND)
    exited_clean(run)


@pytest.mark.skipif(not os.environ.get("CSI_FLASHCOPY_E2E_FULL"),
                    reason="the whole External Storage suite takes long: set CSI_FLASHCOPY_E2E_FULL=1")
def test_e2e_full_suite(suite: Suite) -> None:
    """Every non-disruptive spec of the External Storage suite for the driver (minus BASE_SKIP)."""
    run = run_suite(suite, "full", "", skip="|".join([BASE_SKIP, *EXT4_ONLINE_EXPANSION]), timeout=3 * 3600)
    check(suite, run, "")
    exited_clean(run)
