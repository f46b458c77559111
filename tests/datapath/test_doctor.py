"""`csi-flashcopy doctor` on this machine, as root: the real /dev/fuse (a FUSE mount probed), loop-control, host
tools found on a PATH the test builds, propagation of real bind mounts made private or shared."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver.datapath import doctor
from tests.datapath.conftest import needs_kernel

PRIVILEGED = Path(doctor.__file__).parent / "privileged"

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"),
    reason="doctor's FUSE, loop and mount checks need root with /dev/fuse and /dev/loop-control")


@contextlib.contextmanager
def bind_dir(propagation: str) -> Iterator[str]:
    """A temp dir bind-mounted onto itself (its own mount), made --make-<propagation>; unmounted and removed after."""
    d = tempfile.mkdtemp(prefix="doctor-prop-")
    subprocess.run(["mount", "--bind", d, d], check=True)
    try:
        subprocess.run(["mount", f"--make-{propagation}", d], check=True)
        yield d
    finally:
        subprocess.run(["umount", "-l", d], check=False)
        shutil.rmtree(d, ignore_errors=True)


def doctor_cli(state_dir: str, *args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, "-m", "csi_driver", "doctor", f"--state-dir={state_dir}", *args],
                          capture_output=True, text=True, env=env, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])


def tools_path(tmp_path: Path, without: set[str]) -> str:
    """A PATH dir with every tool doctor looks for, but those in `without`, as symlinks to the real ones."""
    d = tmp_path / "bin"
    d.mkdir()
    for tool in doctor.TOOLS:
        real = shutil.which(tool)
        if tool not in without:
            assert real, f"{tool} is not installed here (.ci/setup-system.sh)"
            (d / tool).symlink_to(real)
    return str(d)


@pytest.fixture
def shared_state() -> Iterator[str]:
    with bind_dir("shared") as d:
        yield d


@needs_root
def test_doctor_reports_fuse_and_loop_ok_as_json(shared_state: str) -> None:
    r = doctor_cli(shared_state, "-o", "json", "--kubelet-dir=")
    doc = json.loads(r.stdout)
    checks = {c["check"]: c for c in doc["checks"]}
    for name in ("fuse-device", "fuse-mount", "loop-devices", "tool:losetup", "tool:mount", "cap:CAP_SYS_ADMIN",
                 "state-dir-propagation", "state-dir-space"):
        assert checks[name]["status"] == "ok", checks[name]
    assert checks["fuse-mount"]["detail"].startswith("kernel FUSE protocol 7.")
    assert "kubelet-dir-propagation" not in checks  # --kubelet-dir= skips it
    assert doc["ok"] is True and r.returncode == 0, r.stdout + r.stderr
    assert {c["status"] for c in doc["checks"]} <= {"ok", "missing", "degraded"}
    # the probe's scratch mount is gone
    assert os.listdir(shared_state) == []
    assert not [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if "flashcopy-doctor" in line]


@needs_root
def test_fuse_resend_matches_the_kernel_version() -> None:
    flags, minor = doctor.probe_fuse_init()
    import platform

    assert bool(flags & doctor.w.HAS_RESEND) == doctor.kernel_at_least(platform.release(), (6, 9))
    assert minor >= doctor.w.MIN_MINOR


@needs_root
def test_a_missing_must_have_tool_is_missing_and_exits_non_zero(shared_state: str, tmp_path: Path) -> None:
    no_losetup = tools_path(tmp_path, {"losetup"})
    r = doctor_cli(shared_state, "-o", "json", "--kubelet-dir=", path=no_losetup)
    assert r.returncode == 1, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    checks = {c["check"]: c for c in doc["checks"]}
    assert checks["tool:losetup"]["status"] == "missing" and doc["ok"] is False
    assert checks["tool:losetup"]["degrades"]
    assert checks["tool:mount"]["status"] == "ok"
    # the table says the same, and --exit-zero only changes the exit status
    t = doctor_cli(shared_state, "--kubelet-dir=", "--exit-zero", path=no_losetup)
    assert t.returncode == 0
    row = next(line for line in t.stdout.splitlines() if line.startswith("tool:losetup"))
    assert row.split()[1] == "missing"
    assert "CANNOT" in t.stdout.splitlines()[-1]


@needs_root
def test_a_missing_optional_tool_only_degrades(shared_state: str, tmp_path: Path) -> None:
    r = doctor_cli(shared_state, "-o", "json", "--kubelet-dir=", path=tools_path(tmp_path, {"mkfs.xfs"}))
    assert r.returncode == 0, r.stdout + r.stderr
    checks = {c["check"]: c for c in json.loads(r.stdout)["checks"]}
    assert checks["tool:mkfs.xfs"]["status"] == "degraded"
    assert "xfs" in checks["tool:mkfs.xfs"]["degrades"]


@needs_root
def test_private_and_shared_mounts_are_told_apart() -> None:
    with bind_dir("private") as priv:
        c = doctor.check_propagation("p", os.path.join(priv, "not-yet", "state"), "x")
        assert c.status == "missing" and "private" in c.detail and priv in c.detail, c
    with bind_dir("shared") as shared:
        c = doctor.check_propagation("p", shared, "x")
        assert c.status == "ok" and "shared:" in c.detail, c
        # the CLI: a kubelet dir that is private fails the node, a shared one does not
        with bind_dir("private") as kubelet:
            r = doctor_cli(shared, "-o", "json", f"--kubelet-dir={kubelet}")
            checks = {x["check"]: x for x in json.loads(r.stdout)["checks"]}
            assert checks["kubelet-dir-propagation"]["status"] == "missing" and r.returncode == 1
        with bind_dir("shared") as kubelet:
            r = doctor_cli(shared, "-o", "json", f"--kubelet-dir={kubelet}")
            checks = {x["check"]: x for x in json.loads(r.stdout)["checks"]}
            assert checks["kubelet-dir-propagation"]["status"] == "ok" and r.returncode == 0, r.stdout


def test_mountinfo_optional_fields_and_escapes() -> None:
    info = ["22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw",
            "30 22 8:1 /x /var/lib/my\\040dir rw master:4 - ext4 /dev/vda rw",
            "31 22 8:1 /y /var/lib/kubelet rw shared:7 master:2 - ext4 /dev/vda rw"]
    assert doctor.mount_of("/var/lib/my dir/state", info) == ("/var/lib/my dir", ["master:4"])
    assert doctor.mount_of("/var/lib/kubelet/pods", info) == ("/var/lib/kubelet", ["shared:7", "master:2"])
    assert doctor.mount_of("/srv", info) == ("/", ["shared:1"])
    assert doctor.kernel_at_least("6.9.0-rc1", (6, 9)) and not doctor.kernel_at_least("6.8.12-amd64", (6, 9))
    assert doctor.kernel_at_least("6.18.44-fc-v1300", (6, 9))


def _commands_of_privileged() -> set[str]:
    """The command names privileged/*.py builds: the first string of every list literal that starts an argv."""
    found = set()
    for path in PRIVILEGED.glob("*.py"):
        if path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.List) and node.elts and isinstance(node.elts[0], ast.Constant) \
                    and isinstance(node.elts[0].value, str) and not node.elts[0].value.startswith("-"):
                found.add(node.elts[0].value)
    return found


def test_doctor_checks_every_tool_the_privileged_verbs_run() -> None:
    commands = _commands_of_privileged() - {"ioctl"}  # freeze.py: FIFREEZE is an ioctl, named in its errors
    assert {"losetup", "mount", "umount", "blkid", "mkfs.ext4"} <= commands  # the scan itself works
    assert commands <= set(doctor.TOOLS), f"doctor.TOOLS lacks {commands - set(doctor.TOOLS)}"


@needs_kernel
@pytest.mark.root
def test_volume_condition_points_at_doctor_when_a_node_feature_is_missing(engine, datapath, workdir) -> None:
    """No FUSE keeper (a node feature the engine restart needs): NodeGetVolumeStats stays healthy but says so, and
    names the command that lists what the node lacks."""
    vol = engine.create_volume("doc", 16 << 20)
    stg, tgt = f"{workdir}/stg/doc", f"{workdir}/pod/doc/dev"
    datapath.stage(vol.id, stg, block=True)
    datapath.publish(vol.id, stg, tgt, block=True)
    try:
        st = datapath.stats(vol.id, tgt)
        assert not st.abnormal and "csi-flashcopy doctor" in st.message, st.message
    finally:
        datapath.unpublish(vol.id, tgt)
        datapath.unstage(vol.id, stg)
