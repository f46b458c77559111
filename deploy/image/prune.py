"""Prune the image's install tree (a venv), run by its own python in the Dockerfile's build stage.

Removes what the driver never imports, then proves that everything it does import still does:
- kubernetes.aio: the kubernetes client (>= 35) ships an asyncio copy of its whole generated client, 68 MB with its
  bytecode; nothing in the sync client (kubernetes.client, config, watch, utils, ...) imports it.
- the distributions only kubernetes.aio needs (aiohttp, aiohttp-retry and what they pull in): every installed
  distribution that csi-flashcopy's requirements do not reach once kubernetes' aiohttp edges are left out.
- pip, setuptools and wheel: nothing is installed into the image at run time.
- the Python sources of the kubernetes client's generated API and model classes (kubernetes/client/api, models:
  32 MB of the client's 57 MB): they stay as bytecode only (sourceless .pyc beside where the .py was, which Python
  imports when the source is absent); a traceback through them shows no source line, nothing else changes. The
  hand-written parts of the client (api_client, rest, configuration, exceptions, config, watch) keep their sources.
- symbol tables of the compiled extensions that ship them (cryptography's Rust module, PyYAML's): strip
  --strip-unneeded, as Debian does for its own libraries.
Everything else stays, bytecode included (the controller runs with a read-only root filesystem: without the .pyc
files every start would compile the client's ~1,700 modules again).
Usage: python prune.py  (the venv's python; prints what it removed and the sizes)
"""

from __future__ import annotations

import compileall
import importlib
import importlib.metadata as md
import importlib.util
import os
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

# kubernetes' requirements that only kubernetes.aio imports
AIO_ONLY = {"aiohttp", "aiohttp-retry"}
TOOLS = {"pip", "setuptools", "wheel"}
ROOT = "csi-flashcopy"


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(dist: md.Distribution) -> set[str]:
    """The names a distribution requires unconditionally or for this Python (extras' requirements left out)."""
    from pip._vendor.packaging.requirements import Requirement  # pip is still here while this runs

    out = set()
    for spec in dist.requires or []:
        req = Requirement(spec)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.add(norm(req.name))
    return out


def tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def remove_dist(dist: md.Distribution, site: Path) -> None:
    """Every file its RECORD lists, the bytecode of its modules (not always listed) and the directories left empty."""
    tops = set()
    for f in dist.files or []:
        p = Path(str(dist.locate_file(f)))
        if p.suffix == ".py":
            Path(importlib.util.cache_from_source(str(p))).unlink(missing_ok=True)
        if p.is_file() or p.is_symlink():
            p.unlink()
        if Path(f).parts[0] != "..":  # not a console script in bin/
            tops.add(site / Path(f).parts[0])
    for top in tops:
        if not top.is_dir():
            continue
        for d, _, _ in sorted(os.walk(top, topdown=False), key=lambda w: -len(w[0])):
            if Path(d, "__pycache__").is_dir() and not any(Path(d).glob("*.py")):
                shutil.rmtree(Path(d, "__pycache__"))  # bytecode of sources that are gone
            if not any(Path(d).iterdir()):
                Path(d).rmdir()


def main() -> int:
    site = Path(next(p for p in sys.path if p.endswith("site-packages")))
    before = tree_size(Path(sys.prefix))
    dists = {norm(d.metadata["Name"]): d for d in md.distributions(path=[str(site)])}
    keep: set[str] = set()
    todo = [norm(ROOT)]
    while todo:
        name = todo.pop()
        if name in keep or name not in dists:
            continue
        keep.add(name)
        reqs = requirements(dists[name])
        if name == "kubernetes":
            reqs -= AIO_ONLY
        todo += sorted(reqs)
    drop = sorted(set(dists) - keep - TOOLS)
    aio = site / "kubernetes" / "aio"
    print(f"prune: kubernetes/aio {tree_size(aio) / 1e6:.1f} MB")
    shutil.rmtree(aio)
    for name in drop:
        print(f"prune: {name} {dists[name].version} (not reached from csi-flashcopy without kubernetes.aio)")
        remove_dist(dists[name], site)
    client = site / "kubernetes" / "client"
    for gen in (client / "api", client / "models"):
        size = sum(p.stat().st_size for p in gen.glob("*.py"))
        if not compileall.compile_dir(gen, maxlevels=0, legacy=True, quiet=1):
            raise SystemExit(f"prune: could not compile {gen}")
        for p in gen.glob("*.py"):
            p.unlink()
        shutil.rmtree(gen / "__pycache__", ignore_errors=True)
        print(f"prune: {gen.relative_to(site)}/*.py {size / 1e6:.1f} MB (sourceless .pyc kept)")
    strip, readelf = shutil.which("strip"), shutil.which("readelf")  # binutils, with the build stage's gcc
    for so in sorted(site.rglob("*.so")):
        sections = subprocess.run([readelf, "-S", str(so)], capture_output=True, text=True).stdout if readelf else ""
        if strip and ".symtab" in sections:
            size = so.stat().st_size
            subprocess.run([strip, "--strip-unneeded", str(so)], check=True)
            print(f"prune: strip {so.relative_to(site)} {size / 1e6:.1f} -> {so.stat().st_size / 1e6:.1f} MB")
    # prove the imports: all of the sync kubernetes client (kubernetes/__init__ imports every subpackage), every
    # module of the driver, and the lazily imported parts of rich the CLI uses
    for mod in ("kubernetes", "kubernetes.client", "kubernetes.utils", "rich.console", "rich.live", "rich.progress",
                "csi_driver"):
        importlib.import_module(mod)
    import csi_driver

    n = 0
    for info in pkgutil.walk_packages(csi_driver.__path__, "csi_driver."):
        if not info.name.endswith(".__main__"):  # python -m csi_driver: runs the CLI
            importlib.import_module(info.name)
            n += 1
    print(f"prune: imports ok (kubernetes, rich, {n} csi_driver modules)")
    for name in sorted(TOOLS & set(dists)):
        print(f"prune: {name} {dists[name].version} (installer only)")
        remove_dist(dists[name], site)
    print(f"prune: {sys.prefix} {before / 1e6:.0f} MB -> {tree_size(Path(sys.prefix)) / 1e6:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
