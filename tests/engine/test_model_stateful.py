"""Random sequences of engine operations against a bytes-per-volume model (hypothesis stateful testing)."""

from __future__ import annotations

import os
import shutil
import tempfile

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from csi_driver.engine import CopyItem, Engine, MappingState, errors
from tests.engine.bypass_sim import SimBypass
from tests.engine.model import Model

GRAIN = 64 * 1024
HEAVY = os.environ.get("CSI_FLASHCOPY_HEAVY") == "1"


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="fc-model-")
        self.eng = Engine.open(self.dir, background=False)
        self.model = Model()
        self.n = 0

    def teardown(self) -> None:
        self.eng.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # host I/O goes through these (BypassMachine routes it through bypass grants)
    def io_write(self, vid: str, off: int, data: bytes) -> None:
        self.eng.write(vid, off, data)

    def io_read(self, vid: str, off: int, n: int) -> bytes:
        return self.eng.read(vid, off, n)

    def created(self, vid: str) -> None:
        pass

    def _name(self) -> str:
        self.n += 1
        return f"v{self.n}"

    def _online(self) -> list[str]:
        return [v for v in self.model.data if v not in self.model.offline]

    @rule(grains=st.integers(1, 6), extra=st.integers(0, GRAIN - 1))
    def create(self, grains: int, extra: int) -> None:
        if len(self.model.data) > 12:
            return
        size = (grains - 1) * GRAIN + extra + 1
        v = self.eng.create_volume(self._name(), size, grain_size=GRAIN)
        assert v.size % GRAIN == 0 and v.size >= size
        self.model.create(v.id, v.size)
        self.created(v.id)

    @precondition(lambda self: self._online())
    @rule(data=st.data(), byte=st.integers(1, 255))
    def write(self, data: st.DataObject, byte: int) -> None:
        vid = data.draw(st.sampled_from(self._online()))
        size = len(self.model.data[vid])
        off = data.draw(st.integers(0, size - 1))
        n = data.draw(st.integers(1, min(size - off, 3 * GRAIN)))
        payload = bytes([byte]) * n
        self.io_write(vid, off, payload)
        self.model.write(vid, off, payload)

    @precondition(lambda self: self._online())
    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        vid = data.draw(st.sampled_from(self._online()))
        size = len(self.model.data[vid])
        off = data.draw(st.integers(0, size - 1))
        n = data.draw(st.integers(1, size - off))
        self.eng.discard(vid, off, n)
        self.model.write(vid, off, bytes(n))

    @precondition(lambda self: self._online() and len(self.model.data) <= 12)
    @rule(data=st.data(), rate=st.sampled_from([0, 0, 50, 150]))
    def snapshot(self, data: st.DataObject, rate: int) -> None:
        vid = data.draw(st.sampled_from(self._online()))
        t, m = self.eng.snapshot(vid, self._name(), copy_rate=rate)
        assert m.state in (MappingState.COPYING, MappingState.IDLE_OR_COPIED)
        self.model.copy(vid, t.id, t.size)

    @precondition(lambda self: self._online() and len(self.model.data) <= 12)
    @rule(data=st.data(), rate=st.sampled_from([0, 50, 150]), grow=st.integers(0, 2))
    def clone(self, data: st.DataObject, rate: int, grow: int) -> None:
        vid = data.draw(st.sampled_from(self._online()))
        size = len(self.model.data[vid]) + grow * GRAIN
        t, _ = self.eng.clone(vid, self._name(), size=size, copy_rate=rate)
        self.model.copy(vid, t.id, t.size)

    @precondition(lambda self: len(self._online()) >= 2)
    @rule(data=st.data())
    def restore(self, data: st.DataObject) -> None:
        src, dst = data.draw(st.permutations(self._online()))[:2]
        if len(self.model.data[dst]) < len(self.model.data[src]):
            with pytest.raises(errors.OutOfRange):
                self.eng.restore(src, dst)
            return
        try:
            self.eng.restore(src, dst, copy_rate=data.draw(st.sampled_from([0, 50, 150])))
        except errors.InvalidState:
            # dst is the target of an active mapping (it still reads through its own source)
            assert self.eng.get_volume(dst).source_mapping_id is not None
            return
        self.model.copy(src, dst, len(self.model.data[dst]))

    @precondition(lambda self: len(self._online()) >= 2)
    @rule(data=st.data())
    def refresh_incremental(self, data: st.DataObject) -> None:
        src, dst = data.draw(st.permutations(self._online()))[:2]
        if len(self.model.data[dst]) < len(self.model.data[src]):
            return
        try:
            m = self.eng.create_mapping(src, dst, copy_rate=150, incremental=True)
            self.eng.start_mapping(m.id)
        except errors.InvalidState:
            return
        self.model.copy(src, dst, len(self.model.data[dst]))
        # a second start after the copy finished copies only what changed
        if self.eng.wait_copies(5):
            self.eng.write(src, 0, b"\x7f" * 10)
            self.model.write(src, 0, b"\x7f" * 10)
            info = self.eng.get_mapping(m.id)
            if info.state == MappingState.IDLE_OR_COPIED:
                self.eng.start_mapping(m.id)
                self.model.copy(src, dst, len(self.model.data[dst]))

    @precondition(lambda self: self.eng.list_mappings())
    @rule(data=st.data(), force=st.booleans())
    def stop(self, data: st.DataObject, force: bool) -> None:
        m = data.draw(st.sampled_from(self.eng.list_mappings()))
        info = self.eng.stop_mapping(m.id, force=force)
        if info.state in (MappingState.STOPPED, MappingState.STOPPING):
            self.model.offline.add(m.target_id)
        for v in self.eng.list_volumes():  # a forced stop also stops targets that depended on it
            if v.status == "offline" and v.id in self.model.data:
                self.model.offline.add(v.id)

    @precondition(lambda self: self.model.data)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        vid = data.draw(st.sampled_from(list(self.model.data)))
        self.eng.delete_volume(vid)
        self.model.delete(vid)
        with pytest.raises(errors.NotFound):
            self.eng.get_volume(vid)

    @precondition(lambda self: len(self._online()) >= 2 and len(self.model.data) <= 10)
    @rule(data=st.data())
    def group_snapshot(self, data: st.DataObject) -> None:
        srcs = data.draw(st.lists(st.sampled_from(self._online()), min_size=1, max_size=3, unique=True))
        items = [CopyItem(s, self._name()) for s in srcs]
        _, pairs = self.eng.snapshot_group(items, group_name=self._name())
        for s, (t, m) in zip(srcs, pairs):
            assert m.source_id == s and m.start_time == pairs[0][1].start_time
            self.model.copy(s, t.id, t.size)

    @rule()
    def wait_copies(self) -> None:
        assert self.eng.wait_copies(20)

    @rule(grains=st.integers(1, 3))
    def copy_a_little(self, grains: int) -> None:
        self.eng.run_copies(grains * GRAIN)

    @rule()
    def reopen(self) -> None:
        self.eng.close()
        self.eng = Engine.open(self.dir, background=False)
        self.reopened()

    @rule()
    def takeover(self) -> None:
        """The engine process dies (SIGKILL: no flush, no commit) and a new one takes over in the same boot, as
        under a FUSE keeper: every write acknowledged before, flushed or not, reads back (journal.J1-J4)."""
        self.eng.abandon()
        self.eng = Engine.open(self.dir, background=False)
        self.reopened()

    def reopened(self) -> None:
        pass

    @invariant()
    def volumes_match_model(self) -> None:
        visible = {v.id: v for v in self.eng.list_volumes()}
        assert set(visible) == set(self.model.data)
        for vid, want in self.model.data.items():
            if vid in self.model.offline:
                assert visible[vid].status == "offline"
                with pytest.raises(errors.VolumeOffline):
                    self.eng.read(vid, 0, 1)
                continue
            assert visible[vid].status == "online", visible[vid]
            got = self.io_read(vid, 0, len(want))
            assert got == bytes(want), f"volume {vid} differs from the model"


EngineMachine.TestCase.settings = settings(
    max_examples=400 if HEAVY else 60,
    stateful_step_count=60 if HEAVY else 30,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
TestEngineModel = EngineMachine.TestCase


class BypassMachine(EngineMachine):
    """The same rules with every volume offered to a bypass and host I/O served through its grants (B1-B4)."""

    def __init__(self) -> None:
        super().__init__()
        self.reopened()

    def reopened(self) -> None:
        self.sim = SimBypass(self.eng._io)
        self.eng.attach_bypass(self.sim)
        for vid in self.model.data:
            self.created(vid)

    def created(self, vid: str) -> None:
        self.eng.bypass_volume(vid, True)

    def io_write(self, vid: str, off: int, data: bytes) -> None:
        self.sim.write(self.eng, vid, off, data)

    def io_read(self, vid: str, off: int, n: int) -> bytes:
        return self.sim.read(self.eng, vid, off, n)


BypassMachine.TestCase.settings = EngineMachine.TestCase.settings
TestEngineModelThroughBypass = BypassMachine.TestCase
