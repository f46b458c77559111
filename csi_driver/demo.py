"""`csi-flashcopy demo`: a short tour of the engine on a local state directory."""

from __future__ import annotations

import time

from csi_driver.engine import Engine
from csi_driver.engine.model import MiB


def run_demo(state_dir: str) -> int:
    with Engine.open(state_dir) as eng:
        suffix = time.strftime("%H%M%S")
        vol = eng.create_volume(f"demo-{suffix}", 64 * MiB)
        eng.write(vol.id, 0, b"version 1 " * 100_000)
        print(f"created {vol.name} ({vol.size // MiB} MiB), wrote 1 MB")
        t = time.perf_counter()
        snap, m = eng.snapshot(vol.id, f"demo-snap-{suffix}")
        print(f"snapshot {snap.id} started in {(time.perf_counter() - t) * 1e3:.2f} ms ({m.state.value})")
        eng.write(vol.id, 0, b"version 2 " * 100_000)
        print("source now reads:  ", eng.read(vol.id, 0, 10))
        print("snapshot still has:", eng.read(snap.id, 0, 10))
        clone, cm = eng.clone(snap.id, f"demo-clone-{suffix}", size=128 * MiB, copy_rate=150)
        print(f"clone {clone.id} of the snapshot, readable at once:", eng.read(clone.id, 0, 10))
        eng.wait_copies(30)
        print("clone copy complete:", [m.state.value for m in eng.list_mappings(volume_id=clone.id)] or "mapping gone")
        eng.restore(snap.id, vol.id, copy_rate=100)
        print("restored the source from the snapshot:", eng.read(vol.id, 0, 10))
        for v in eng.list_volumes():
            print(f"  {v.name:28} {v.size // MiB:5} MiB  allocated {v.allocated_bytes // 1024:6} KiB  {v.status}")
    return 0
