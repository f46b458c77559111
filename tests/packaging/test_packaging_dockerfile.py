"""The Dockerfile, checked without a container runtime: what it copies exists and survives .dockerignore, the wheel
builds from exactly that context, its Debian packages exist (apt-cache, same Debian release as the base image),
and its entry point is the package's console script."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from csi_driver import cli
from tests.packaging import packaging_manifests as pm

DOCKERFILE = pm.REPO / "Dockerfile"
# Tools the node data path runs (e2fsprogs, xfsprogs, util-linux with losetup/fsfreeze/blkid); FUSE needs none.
REQUIRED_PACKAGES = {"e2fsprogs", "xfsprogs", "util-linux", "mount"}


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _dockerignore_excludes(rel: str) -> bool:
    """Docker's rule: patterns in order, the last match wins, '!' re-includes; a path matches via itself or a parent."""
    patterns = [p.strip() for p in (pm.REPO / ".dockerignore").read_text().splitlines()]
    parts = Path(rel).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for p in patterns:
        if not p or p.startswith("#"):
            continue
        neg = p.startswith("!")
        pat = p[1:] if neg else p
        pat = pat.rstrip("/")
        if pat.startswith("**/"):
            hit = any(fnmatch.fnmatch(Path(c).name, pat[3:]) for c in candidates)
        else:
            hit = any(fnmatch.fnmatch(c, pat) and c.count("/") == pat.count("/") for c in candidates)
        if hit:
            excluded = not neg
    return excluded


def _context_sources() -> list[str]:
    srcs = []
    for op, rest in _instructions():
        if op in ("COPY", "ADD") and "--from=" not in rest:
            words = [w for w in rest.split() if not w.startswith("--")]
            srcs += words[:-1]
    return srcs


def test_copied_files_exist_and_are_in_the_context() -> None:
    srcs = _context_sources()
    assert srcs, "no COPY from the build context"
    for src in srcs:
        assert (pm.REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
        assert not _dockerignore_excludes(src), f".dockerignore excludes {src}, which the Dockerfile copies"
    # The context is small: tests, docs, charts and the git history stay out of it.
    for path in ("tests/__init__.py", "charts/csi-flashcopy/Chart.yaml", ".git/HEAD", "deploy/generate.py"):
        assert _dockerignore_excludes(path), path
    assert _dockerignore_excludes("csi_driver/__pycache__/cli.cpython-311.pyc")


def test_wheel_builds_from_the_docker_context(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    ctx = tmp_path / "ctx"
    for src in _context_sources():
        s = pm.REPO / src
        if s.is_dir():
            shutil.copytree(s, ctx / src, ignore=lambda d, names: [
                n for n in names if _dockerignore_excludes(str((Path(d) / n).relative_to(pm.REPO)))])
        else:
            (ctx / src).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s, ctx / src)
    out = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "--wheel-dir", str(out), str(ctx)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = out.glob("csi_flashcopy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"csi_driver/cli.py", "csi_driver/proto_gen/csi_pb2.py"} <= names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "csi-flashcopy = csi_driver.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_base_images_pinned_and_user_non_root() -> None:
    ins = _instructions()
    args = dict(a.split("=", 1) for op, a in ins if op == "ARG" and "=" in a)
    froms = [a.split()[0] for op, a in ins if op == "FROM"]
    assert len(froms) == 2
    for f in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f)
        assert re.fullmatch(r"python:3\.11-slim-bookworm", image), image  # Python 3.11, Debian 12, pinned tag
    users = [a for op, a in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    uid = users[-1].split(":")[0]
    # the controller Deployment runs as this uid
    deploy = (pm.KUSTOMIZE_MULTI / "controller.yaml").read_text()
    assert f"runAsUser: {uid}" in deploy


def test_entrypoint_is_the_console_script() -> None:
    ins = _instructions()
    entry = [a for op, a in ins if op == "ENTRYPOINT"][-1]
    cmd = [a for op, a in ins if op == "CMD"][-1]
    assert entry == '["csi-flashcopy"]'
    scripts = tomllib.loads((pm.REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["csi-flashcopy"] == "csi_driver.cli:main"
    assert cmd == '["serve"]'
    assert cli.build_parser().parse_args(["serve"]).command == "serve"


def test_debian_packages_exist() -> None:
    installs = [a for op, a in _instructions() if op == "RUN" and "apt-get install" in a]
    assert len(installs) == 2  # the build stage's compiler, the runtime's tools

    def listed(run: str) -> set[str]:
        return {w for w in run.split("apt-get install", 1)[1].split("&&")[0].split() if not w.startswith("-")}

    build, runtime = listed(installs[0]), listed(installs[1])
    assert "gcc" in build  # the FUSE loop extension is compiled into the wheel
    assert runtime >= REQUIRED_PACKAGES, REQUIRED_PACKAGES - runtime
    assert "gcc" not in runtime
    pkgs = build | runtime
    apt_cache = shutil.which("apt-cache")
    if apt_cache is None:
        pytest.skip("apt-cache not available to check the package names")
    os_release = Path("/etc/os-release").read_text()
    if "VERSION_CODENAME=bookworm" not in os_release:
        pytest.skip("not Debian 12 (bookworm): package names checked only against the base image's release")
    for p in sorted(pkgs):
        r = subprocess.run([apt_cache, "show", "--no-all-versions", p], capture_output=True, text=True)
        assert r.returncode == 0 and f"Package: {p}" in r.stdout, f"no Debian package {p}"
    # and the package provides the tools the data path runs
    tools = {"losetup": "mount", "fsfreeze": "util-linux", "blkid": "util-linux", "mkfs.ext4": "e2fsprogs",
             "mkfs.xfs": "xfsprogs", "xfs_growfs": "xfsprogs", "resize2fs": "e2fsprogs"}
    dpkg = shutil.which("dpkg")
    for tool, pkg in tools.items():
        path = shutil.which(tool)
        if dpkg is None or path is None:
            continue
        r = subprocess.run([dpkg, "-S", str(Path(path).resolve()).replace("/usr/", "/")], capture_output=True,
                           text=True)
        r2 = subprocess.run([dpkg, "-S", str(Path(path).resolve())], capture_output=True, text=True)
        owner = (r.stdout + r2.stdout).split(":")[0]
        assert owner == pkg, f"{tool} is in {owner}, not {pkg}"
