"""Regenerate the committed stubs: `python -m csi_driver.proto_gen._generate [name ...]` (default: csi engine).

The proto file is mapped to the virtual path csi_driver/proto_gen/<name>.proto so that the generated
modules import each other as `csi_driver.proto_gen.<name>_pb2` (plain protoc output would use a top-level
`import csi_pb2`, which breaks inside a package).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE_DIR = "csi_driver/proto_gen"
PROTOS = ("csi", "engine")


def generate(name: str, out_root: Path, proto_dir: Path = REPO / "proto") -> list[Path]:
    """Write <name>_pb2.py, <name>_pb2.pyi and <name>_pb2_grpc.py under out_root/csi_driver/proto_gen."""
    import grpc_tools
    from grpc_tools import protoc

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    (out_root / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PACKAGE_DIR}={proto_dir}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"{PACKAGE_DIR}/{name}.proto",
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {name}.proto")
    return [out_root / PACKAGE_DIR / f"{name}{suffix}" for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]


if __name__ == "__main__":
    for proto in sys.argv[1:] or list(PROTOS):
        for path in generate(proto, REPO):
            print(path.relative_to(REPO))
