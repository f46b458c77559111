"""csi-sanity (the CSI conformance suite, kubernetes-csi/csi-test) against a real `serve --mode all`.

The binary is a test peer beside the checkout: ../shared/peers/csi-sanity (see shared/peers/README.md).
Goal: 0 failures in the Identity, Controller, snapshot, GroupController and Node groups. The Node group
stages real volumes (FUSE export, loop device, mkfs, mounts): it needs root, /dev/fuse and loop devices, and
the run fails if it leaves a mount or loop device behind. "defaults" runs it with mount volumes, "parameters"
with block volumes (both with the engine embedded in `serve`), "process" with mount volumes served by the
separate node engine process (`csi-flashcopy engine` + `serve --engine process`). Every variant passes the
mutable parameters of sanity-mutable-parameters.yaml (a VolumeAttributesClass's copyRate/cleanRate), so the
ModifyVolume specs and CreateVolume's volume-attribute-class specs run.
"""

from __future__ import annotations

import json
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.csi.conftest import REPO, CsiServer
from tests.datapath.conftest import KERNEL_SKIP, leftovers

SANITY = REPO.parent / "shared" / "peers" / "csi-sanity"
MUTABLE_PARAMETERS = Path(__file__).with_name("sanity-mutable-parameters.yaml")

# Groups skipped with --ginkgo.skip (none: every group runs).
SKIPPED_GROUPS: dict[str, str] = {}

CHECKED_GROUPS = ("Identity", "Controller", "snapshot", "GroupController", "Node", "ModifyVolume")


def group_of(name: str) -> str:
    if "Identity Service" in name:
        return "Identity"
    if "GroupController" in name:
        return "GroupController"
    if "Node Service" in name:
        return "Node"
    if "ModifyVolume [Controller Server]" in name:
        return "ModifyVolume"
    if re.search(r"Snapshots? \[Controller Server\]", name):
        return "snapshot"
    if "[Controller Server]" in name:
        return "Controller"
    return "other"


def parse_junit(path: Path) -> dict[str, dict[str, list[str]]]:
    """{group: {"passed"|"failed"|"skipped": [spec names]}}"""
    out: dict[str, dict[str, list[str]]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "")
        if case.find("failure") is not None or case.find("error") is not None:
            status = "failed"
        elif case.find("skipped") is not None or case.get("status") in ("skipped", "pending", "disabled"):
            status = "skipped"
        else:
            status = "passed"
        out.setdefault(group_of(name), {"passed": [], "failed": [], "skipped": []})[status].append(name)
    return out


def run_sanity(srv: CsiServer, work: Path, *extra: str) -> dict[str, dict[str, list[str]]]:
    report = work / "junit.xml"
    argv = [
        str(SANITY),
        f"--csi.endpoint={srv.endpoint}",
        f"--csi.stagingdir={work / 'staging'}",  # csi-sanity creates (and removes) these itself
        f"--csi.mountdir={work / 'mount'}",
        f"--ginkgo.junit-report={report}",
        "--ginkgo.no-color",
        "--ginkgo.timeout=15m",
        f"--csi.testvolumemutableparameters={MUTABLE_PARAMETERS}",
        *extra,
    ]
    if SKIPPED_GROUPS:
        argv.append("--ginkgo.skip=" + "|".join(SKIPPED_GROUPS.values()))
    proc = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=1200, check=False)
    (work / "sanity.out").write_text(proc.stdout + proc.stderr)
    assert report.exists(), f"csi-sanity wrote no report (exit {proc.returncode}):\n{proc.stdout[-4000:]}"
    return parse_junit(report)


def summary(result: dict[str, dict[str, list[str]]]) -> dict[str, dict[str, int]]:
    return {g: {k: len(v) for k, v in r.items()} for g, r in sorted(result.items())}


@pytest.mark.skipif(not SANITY.exists(), reason=f"csi-sanity test peer not found at {SANITY}")
@pytest.mark.skipif(KERNEL_SKIP is not None, reason=f"the Node group stages real volumes: {KERNEL_SKIP}")
@pytest.mark.parametrize("variant", ["defaults", "parameters", "process"])
def test_csi_sanity(server_factory, tmp_path_factory, tmp_path: Path, variant: str) -> None:
    extra: list[str] = []
    if variant == "parameters":
        # the same suite with a StorageClass / VolumeSnapshotClass of our own parameters
        (tmp_path / "vol.yaml").write_text("grainSize: 64Ki\ncopyRate: \"0\"\ncleanRate: \"20\"\n")
        (tmp_path / "snap.yaml").write_text("copyRate: \"10\"\n")
        extra = [f"--csi.testvolumeparameters={tmp_path / 'vol.yaml'}",
                 f"--csi.testsnapshotparameters={tmp_path / 'snap.yaml'}",
                 "--csi.testvolumeaccesstype=block"]
    cluster = None
    if variant == "process":
        from tests.csi.conftest import short_tmp
        from tests.datapath.csi_node import NodeCluster, process_mode_unavailable

        why = process_mode_unavailable()
        if why:
            pytest.skip(f"engine process mode unavailable: {why}")
        cluster = NodeCluster(short_tmp(tmp_path_factory, "sanity-process"), "process")
        srv = cluster.srv
    else:
        srv = server_factory(f"sanity-{variant}").start()
    try:
        result = run_sanity(srv, tmp_path, *extra)
    finally:
        problems = cluster.stop() if cluster is not None else []
    assert not problems, problems
    counts = summary(result)
    print(f"csi-sanity ({variant}): " + json.dumps(counts))
    (tmp_path / "counts.json").write_text(json.dumps(counts, indent=1))
    failed = {g: r["failed"] for g, r in result.items() if r["failed"]}
    assert not failed, f"csi-sanity failures: {json.dumps(failed, indent=1)}\n{srv.log()[-3000:]}"
    for group in CHECKED_GROUPS:
        assert counts.get(group, {}).get("passed", 0) > 0, f"no {group} spec ran: {counts}"
    for group in SKIPPED_GROUPS:
        assert counts.get(group, {}).get("passed", 0) == 0
    # MODIFY_VOLUME is advertised and the mutable parameters given: none of its specs may be skipped
    assert counts["ModifyVolume"]["skipped"] == 0, counts
    srv.stop()
    assert not leftovers(str(tmp_path)) and not leftovers(str(srv.root)), \
        f"left behind: {leftovers(str(tmp_path)) + leftovers(str(srv.root))}"
