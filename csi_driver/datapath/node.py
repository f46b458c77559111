"""Node data path over an engine: stage/publish/unstage/unpublish/stats/expand and the snapshot quiesce hook.

Used by the node engine process (csi_driver.remote.service), and in-process by an embedded backend (it
satisfies api.NodeDataPath). Every operation checks
the live system (mount table, loop devices) as well as its crash-safe staging records, so it is idempotent
and repairs half-done work; teardown goes in the reverse order of setup (unmount, detach loop, remove the
export) and keeps going past individual failures, raising them together at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from csi_driver.api import NodeStats  # the record the NodeBackend protocol returns
from csi_driver.datapath import privileged
from csi_driver.datapath.fuse_export import EngineVolume, FuseExport, Timings
from csi_driver.engine import errors

log = logging.getLogger(__name__)

DEFAULT_FS = "ext4"
FREEZE_MAX_SECONDS = 10.0
#: space kept beside staging.json so that unstage/unpublish can record what they undid on a full state dir
RECORDS_RESERVE = 256 * 1024
#: bucket bounds (seconds) of the freeze window histogram (csi_driver.metrics: flashcopy_freeze_seconds)
FREEZE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclasses.dataclass
class StageRecord:
    volume_id: str
    staging_path: str
    block: bool
    fs_type: str
    read_only: bool
    loop_device: str = ""
    mount_flags: list[str] = dataclasses.field(default_factory=list)
    # target path -> read_only
    publishes: dict[str, bool] = dataclasses.field(default_factory=dict)
    #: target paths publish created (a block target's file, a mount target's directory): unpublish deletes only
    #: these, never a file or directory that was there before; None = a record from before this was kept
    made: list[str] | None = dataclasses.field(default_factory=list)


def safe_options(flags: Sequence[str]) -> list[str]:
    """Mount options for a filesystem whose content a Pod (or a crafted image) shapes: nosuid and nodev unless
    the capability's mount_flags ask for suid / dev."""
    opts = list(flags)
    for opt, allow in (("nosuid", "suid"), ("nodev", "dev")):
        if opt not in opts and allow not in opts:
            opts.append(opt)
    return opts


class _Records:
    """Staging records in one JSON file, replaced atomically (temp file, fsync, rename, fsync dir)."""

    def __init__(self, path: str):
        self.path = path
        self.items: dict[str, StageRecord] = {}
        try:
            with open(path) as f:
                raw = json.load(f)
            for r in raw.get("staged", []):
                rec = StageRecord(**{"made": None, **r})  # no "made": written before it was kept
                self.items[rec.volume_id] = rec
        except FileNotFoundError:
            pass

    def save(self) -> None:
        """Replace the file. On a full filesystem the space kept in RECORDS_RESERVE is given up for it (an
        unstage or unpublish must be able to record what it undid); it is made again when there is room."""
        try:
            self._save()
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not _give_up(self.reserve):
                raise
            log.warning("state dir full: releasing the staging records' reserve %s", self.reserve)
            self._save()
        _hold(self.reserve, RECORDS_RESERVE)

    @property
    def reserve(self) -> str:
        return self.path + ".reserve"

    def _save(self) -> None:
        tmp = self.path + ".tmp"
        data = {"staged": [dataclasses.asdict(r) for r in self.items.values()]}
        try:
            with open(tmp, "w") as f:
                os.fchmod(f.fileno(), 0o600)
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.replace(tmp, self.path)
        dfd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _hold(path: str, size: int) -> None:
    """Keep size bytes allocated at path (best effort: a full filesystem leaves it for the next save)."""
    with contextlib.suppress(OSError):
        if os.path.exists(path) and os.stat(path).st_blocks * 512 >= size:
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)


def _give_up(path: str) -> bool:
    try:
        if os.stat(path).st_size == 0:
            return False
        os.truncate(path, 0)
        return True
    except OSError:
        return False


class _Errors:
    """Collects teardown failures so every step is tried; raises them together at the end."""

    def __init__(self, what: str):
        self.what = what
        self.failures: list[str] = []

    @contextlib.contextmanager
    def step(self, msg: str) -> Iterator[None]:
        try:
            yield
        except Exception as e:
            log.error("%s: %s failed: %s", self.what, msg, e)
            self.failures.append(f"{msg}: {e}")

    def raise_any(self) -> None:
        if self.failures:
            raise errors.EngineError(f"{self.what}: leftovers may remain: " + "; ".join(self.failures))


class DataPath:
    """Owns the FUSE export of this node's staged volumes, their loop devices, mounts and records."""

    def __init__(self, engine: Any, state_dir: str | None = None, *, export_dir: str | None = None,
                 keeper: str = "off", keeper_abort_after: float | None = None):
        """state_dir: where the staging records and the export live (default: the engine's state dir).

        keeper: who holds the export's connection so that a restart of this process pauses the volumes' I/O
        instead of failing it: "auto" (a keeper process started when none answers), "external" (one beside
        us, waited for), "off" (none: in-process, where the data path lives and dies with its caller anyway).
        keeper_abort_after: the bound on a pause that keeper ("auto") puts (None: its default).
        """
        self.engine = engine
        self.state_dir = os.path.abspath(state_dir if state_dir is not None else engine.state_dir)
        self.export = FuseExport(export_dir or os.path.join(self.state_dir, "exports"),
                                 keeper_dir=None if keeper == "off" else self.state_dir,
                                 keeper_external=keeper == "external", keeper_abort_after=keeper_abort_after)
        self._records = _Records(os.path.join(self.state_dir, "staging.json"))
        _hold(self._records.reserve, RECORDS_RESERVE)
        self._lock = threading.RLock()  # records and per-volume work; node RPCs are rare and short
        #: volume id -> snapshots quiescing it now (frozen outside the lock); `_thawed` is notified as each ends
        self._quiescing: dict[str, int] = {}
        self._thawed = threading.Condition(self._lock)
        self.last_freeze_window = 0.0
        #: every freeze window ("freeze": first FIFREEZE to last thaw, when a filesystem was frozen)
        self.freeze_timings = Timings(FREEZE_BUCKETS, ("freeze",))

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Re-adopt what the records say is staged, then mount the export (or take over the live connection a
        keeper holds: the files must be known before the first request a successor reads)."""
        with self._lock:
            adopted = []
            for rec in self._records.items.values():
                with contextlib.suppress(errors.NotFound):
                    self.engine.get_volume(rec.volume_id)
                    self.export.add(rec.volume_id, EngineVolume(self.engine, rec.volume_id),
                                    read_only=rec.read_only)
                    adopted.append(rec.volume_id)
            self.export.start()
            if self._bypass_ok():
                self.engine.attach_bypass(self.export.bypass)
                for vid in adopted:
                    self.engine.bypass_volume(vid, True)

    def _bypass_ok(self) -> bool:
        """The compiled loop can serve granted grains and the engine is in this process (it can grant)."""
        return self.export.bypass is not None and hasattr(self.engine, "attach_bypass")

    def stop(self, *, teardown: bool = False, handover: bool = False) -> None:
        """Stop serving. teardown=True first unpublishes and unstages everything (tests, clean shutdown);
        handover=True leaves the mount and its connection to the keeper for the next process."""
        if teardown:
            with self._lock:
                for rec in list(self._records.items.values()):
                    with contextlib.suppress(Exception):
                        self.unstage(rec.volume_id, rec.staging_path)
        if self._bypass_ok():
            try:
                self.engine.attach_bypass(None)  # every grant revoked: no bypassed I/O once the engine closes
            except errors.EngineClosed:
                pass
            except Exception as e:  # (a full state dir) the export must still stop: no mount or keeper left
                log.error("data path stop: revoking the bypass failed: %s", e)
        self.export.stop(handover=handover and bool(self._records.items))

    def staged(self) -> list[StageRecord]:
        with self._lock:
            return [dataclasses.replace(r, publishes=dict(r.publishes)) for r in self._records.items.values()]

    def staged_ids(self) -> list[str]:
        with self._lock:
            return list(self._records.items)

    def record(self, volume_id: str) -> StageRecord | None:
        with self._lock:
            return self._records.items.get(volume_id)

    # ------------------------------------------------------------------ helpers

    def _export_path(self, volume_id: str) -> str:
        return self.export.path(volume_id)

    def _loops(self, volume_id: str) -> list[privileged.LoopInfo]:
        """Every loop device on this volume's export file: the staging one, plus read-only ones that serve
        read-only block publishes."""
        path = self._export_path(volume_id)
        return [lo for lo in privileged.list_loops() if lo.backing_file in (path, path + " (deleted)")]

    def _live_loop(self, volume_id: str) -> str | None:
        """The staging loop device of this volume, found from sysfs (works on a dead mount)."""
        loops = self._loops(volume_id)
        rec = self._records.items.get(volume_id)
        for lo in loops:
            if rec is not None and lo.device == rec.loop_device:
                return lo.device
        writable = [lo for lo in loops if not lo.read_only]
        return (writable or loops)[0].device if loops else None

    def _device(self, rec: StageRecord) -> str:
        """The volume's staging loop device, resolved from its backing file (sysfs). A recorded device that
        backs something else (a record left by a failed unstage, or a crash between detach and save, whose
        number the kernel gave to another volume) is refused: it would hand another volume's data out."""
        loops = self._loops(rec.volume_id)
        if rec.loop_device:
            if any(lo.device == rec.loop_device for lo in loops):
                return rec.loop_device
            backing = next((lo.backing_file for lo in privileged.list_loops() if lo.device == rec.loop_device),
                           "")
            raise errors.InvalidState(
                f"volume {rec.volume_id}: its staging record names {rec.loop_device}, which "
                f"{'now backs ' + backing if backing else 'is detached'}, not this volume's export; "
                "unstage and stage it again")
        dev = self._live_loop(rec.volume_id)
        if dev is None:
            raise errors.InvalidState(f"volume {rec.volume_id}: no loop device (stage it again)")
        return dev

    def _read_only_loop(self, volume_id: str, staging_dev: str) -> str:
        """A read-only loop device for a read-only block publish: a read-only bind of a device node does not
        stop writes (the kernel applies a mount's read-only flag to files and directories only)."""
        for lo in self._loops(volume_id):
            if lo.device == staging_dev and lo.read_only:
                return lo.device
        for lo in self._loops(volume_id):
            if lo.read_only:
                return lo.device
        return privileged.attach_loop(self._export_path(volume_id), read_only=True, reuse=False)

    def _drop_read_only_loops(self, rec: StageRecord) -> None:
        """Detach the extra read-only loop devices once no read-only block publish uses them."""
        if not rec.block or any(rec.publishes.values()):
            return
        for lo in self._loops(rec.volume_id):
            if lo.device != rec.loop_device and lo.read_only:
                privileged.detach_loop(lo.device)

    def _dead_loop(self, rec: StageRecord) -> str | None:
        """The recorded loop device when it still sits on a previous engine process's export.

        Its FUSE connection died with that process, so every I/O fails (EIO). Once the new export is mounted,
        the dead mount is detached and the kernel names the backing file "/<volume id>" (outside any mount).
        """
        if not rec.loop_device:
            return None
        name = os.path.basename(rec.loop_device)
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                backing = f.read().rstrip("\n").removesuffix(" (deleted)")
        except OSError:
            return None  # detached
        if backing == self._export_path(rec.volume_id):
            return None  # on the live export
        return rec.loop_device if backing == "/" + rec.volume_id else None

    def _our_mount(self, path: str, volume_id: str) -> bool:
        """True when the top mount at path is this volume's loop device (its filesystem or a device bind).

        Used where no record vouches for a path: the CSI request could name any mount on the host.
        """
        found = privileged.mounts_at(path)
        if not found:
            return False
        top = found[-1]
        for lo in self._loops(volume_id):
            rdev = os.stat(lo.device).st_rdev
            if top.major_minor == f"{os.major(rdev)}:{os.minor(rdev)}" or top.root == "/" + os.path.basename(lo.device):
                return True
        return False

    def _export_alive(self, volume_id: str) -> bool:
        try:
            os.stat(self._export_path(volume_id))
            return True
        except OSError:
            return False

    # ------------------------------------------------------------------ stage

    def stage(self, volume_id: str, staging_path: str, *, block: bool, fs_type: str = "",
              mount_flags: Sequence[str] = (), read_only: bool = False) -> StageRecord:
        fs_type = "" if block else (fs_type or DEFAULT_FS)
        if not block and fs_type not in privileged.SUPPORTED_FS:
            raise errors.InvalidArgument(
                f"unsupported fsType {fs_type!r} (supported: {', '.join(privileged.SUPPORTED_FS)})")
        staging_path = os.path.abspath(staging_path)
        with self._lock:
            vol = self.engine.get_volume(volume_id)  # NotFound for an unknown volume
            rec = self._records.items.get(volume_id)
            if rec is not None:
                if rec.staging_path != staging_path:
                    raise errors.AlreadyExists(
                        f"volume {volume_id} is already staged at {rec.staging_path}")
                if rec.block != block or (not block and rec.fs_type != fs_type) or rec.read_only != read_only:
                    raise errors.AlreadyExists(
                        f"volume {volume_id} is already staged at {staging_path} with a different "
                        f"access type, fsType or read-only flag")
            else:
                rec = StageRecord(volume_id, staging_path, block, fs_type, read_only,
                                  mount_flags=list(mount_flags))
            earlier = volume_id in self._records.items
            try:
                self._setup(rec, vol.size)
                self._records.items[volume_id] = rec
                self._records.save()  # may fail too (a full state dir): then nothing of this call stays
            except Exception:
                # undo what this call did unless an earlier stage (recorded) owns it
                if not earlier:
                    self._records.items.pop(volume_id, None)
                    with contextlib.suppress(Exception):
                        self._teardown(rec, "rollback stage")
                raise
            return rec

    def _setup(self, rec: StageRecord, size: int) -> None:
        vid = rec.volume_id
        dead = self._dead_loop(rec)
        if dead is not None:
            self._drop_dead(rec, dead)
        dev = self._live_loop(vid)
        if dev is not None and not self._export_alive(vid):
            raise errors.InvalidState(
                f"volume {vid}: its loop device {dev} sits on a dead export (the engine process restarted); "
                "unstage it first")
        path = self.export.add(vid, EngineVolume(self.engine, vid), read_only=rec.read_only)
        if self._bypass_ok():
            self.engine.bypass_volume(vid, True)
        if dev is None:
            dev = privileged.attach_loop(path, read_only=rec.read_only)
        rec.loop_device = dev
        if rec.block:
            return
        os.makedirs(rec.staging_path, exist_ok=True)
        if privileged.is_mountpoint(rec.staging_path):
            privileged.mount(dev, rec.staging_path, fstype=rec.fs_type, read_only=rec.read_only)  # verifies
            return
        found = privileged.filesystem_type(dev)
        if found is None:
            if rec.read_only:
                raise errors.InvalidState(f"volume {vid} holds no filesystem and is staged read-only")
            prezeroed = not self.engine.changed_extents(None, vid)
            privileged.mkfs(dev, rec.fs_type, prezeroed=prezeroed)
        elif found != rec.fs_type:
            raise errors.InvalidState(
                f"volume {vid} holds a {found} filesystem, not {rec.fs_type}; refusing to reformat")
        elif found == "ext4" and not rec.read_only and privileged.ext4_size(dev) < size:
            # a restore or clone into a larger volume: grow the copied filesystem before mounting it
            privileged.grow_ext4_offline(dev)
        opts = safe_options(rec.mount_flags)
        if rec.fs_type == "xfs" and "nouuid" not in opts:
            opts.append("nouuid")  # snapshots and clones share their source's UUID; xfs would refuse them
        privileged.mount(dev, rec.staging_path, fstype=rec.fs_type, options=opts, read_only=rec.read_only)
        if found == "xfs" and not rec.read_only:
            privileged.resize_filesystem(dev, rec.staging_path, "xfs")  # xfs grows only mounted; no-op if full

    def _drop_dead(self, rec: StageRecord, dead: str) -> None:
        """Staging again after an engine restart: take down the staging mount on the dead loop device, so
        a fresh loop device on the new export replaces it (the filesystem's journal replays on mount)."""
        busy = [t for t in rec.publishes if privileged.is_mountpoint(t)]
        if busy:
            raise errors.InvalidState(
                f"volume {rec.volume_id} lost its engine connection (the engine process restarted) and is "
                f"still published at {', '.join(busy)}: unpublish it, then stage it again")
        log.warning("volume %s: replacing loop device %s left on a dead export", rec.volume_id, dead)
        if not rec.block and privileged.is_mountpoint(rec.staging_path):
            privileged.umount(rec.staging_path)
        privileged.detach_loop(dead)
        rec.loop_device = ""

    # ------------------------------------------------------------------ unstage

    def _settle(self, volume_id: str) -> None:
        """Wait (lock held, released while waiting) until no snapshot holds volume_id frozen: an unmount or
        a grow of a frozen filesystem fails ("target is busy") or blocks. A freeze ends by itself within
        FREEZE_MAX_SECONDS; past a margin on that the caller gets Timeout and its retry comes later."""
        deadline = time.monotonic() + FREEZE_MAX_SECONDS + 5.0
        while self._quiescing.get(volume_id):
            left = deadline - time.monotonic()
            if left <= 0:
                raise errors.Timeout(f"volume {volume_id} is still held frozen by a snapshot: try again")
            self._thawed.wait(left)

    def unstage(self, volume_id: str, staging_path: str) -> None:
        """Undo stage (and any publish left behind); fine if nothing is staged."""
        staging_path = os.path.abspath(staging_path)
        with self._lock:
            self._settle(volume_id)
            rec = self._records.items.get(volume_id)
            if rec is None:
                # no record (never staged, or a crash before it was saved): unmount only what is ours
                owned = self._our_mount(staging_path, volume_id)
                rec = StageRecord(volume_id, staging_path if owned else "", block=False, fs_type="", read_only=False)
            elif rec.staging_path != staging_path:
                raise errors.InvalidArgument(
                    f"volume {volume_id} is staged at {rec.staging_path}, not {staging_path}")
            try:
                self._teardown(rec, f"unstage {volume_id}")
            except Exception:
                self._records.save()  # keep the record: a retry finds what is left
                raise
            kept = self._records.items.pop(volume_id, None)
            try:
                self._records.save()
            except Exception:
                if kept is not None:  # memory as the disk has it: the retry saves again, never answers OK early
                    kept.loop_device = ""  # detached: the number may go to another volume (item 5)
                    self._records.items[volume_id] = kept
                raise

    def _teardown(self, rec: StageRecord, what: str) -> None:
        errs = _Errors(what)
        for target in list(rec.publishes):
            with errs.step(f"unpublish {target}"):
                self._unpublish_path(target, delete=rec.made is None or target in rec.made)
                rec.publishes.pop(target, None)
        if rec.staging_path and (os.path.isdir(rec.staging_path) or privileged.is_mountpoint(rec.staging_path)):
            with errs.step(f"unmount {rec.staging_path}"):
                privileged.umount(rec.staging_path)
        with errs.step("detach loop"):
            for dev in [lo.device for lo in self._loops(rec.volume_id)] + [self._dead_loop(rec)]:
                if dev is not None:
                    privileged.detach_loop(dev)
        errs.raise_any()
        # only now: removing the export under a still-attached loop device would fail its I/O
        if self._bypass_ok():
            with contextlib.suppress(errors.NotFound, errors.EngineClosed):
                self.engine.bypass_volume(rec.volume_id, False)
        self.export.remove(rec.volume_id)

    # ------------------------------------------------------------------ publish

    def publish(self, volume_id: str, staging_path: str, target_path: str, *, block: bool,
                read_only: bool = False, mount_flags: Sequence[str] = (), single_writer: bool = False) -> None:
        staging_path = os.path.abspath(staging_path)
        target_path = os.path.abspath(target_path)
        with self._lock:
            self.engine.get_volume(volume_id)
            rec = self._records.items.get(volume_id)
            if rec is None or rec.staging_path != staging_path:
                raise errors.InvalidState(f"volume {volume_id} is not staged at {staging_path}")
            if rec.block != block:
                raise errors.InvalidState(
                    f"volume {volume_id} is staged as {'block' if rec.block else 'mount'}, "
                    f"publish asks for {'block' if block else 'mount'}")
            prev = rec.publishes.get(target_path)
            if prev is not None and prev != read_only and privileged.is_mountpoint(target_path):
                raise errors.AlreadyExists(
                    f"{target_path} is already published with read_only={prev}")
            if rec.read_only and not read_only:
                raise errors.InvalidState(f"volume {volume_id} is staged read-only")
            others = sorted(t for t in rec.publishes if t != target_path)
            if single_writer and others:
                raise errors.InvalidState(
                    f"volume {volume_id} has a single-writer access mode and is already published at {others[0]}")
            if self._dead_loop(rec) is not None:
                raise errors.InvalidState(
                    f"volume {volume_id} lost its engine connection (the engine process restarted): stage it again")
            dev = self._device(rec)
            if block:
                made = self._ensure_file(target_path)
                if read_only:
                    dev = self._read_only_loop(volume_id, dev)
                privileged.mount(dev, target_path, bind=True, read_only=read_only)
            else:
                made = not os.path.lexists(target_path)
                os.makedirs(target_path, exist_ok=True)
                opts = safe_options([o for o in mount_flags if o not in ("ro", "rw", "bind")])
                privileged.mount(staging_path, target_path, bind=True, read_only=read_only, options=opts)
            had = target_path in rec.publishes
            rec.publishes[target_path] = read_only
            if made and rec.made is not None and target_path not in rec.made:
                rec.made.append(target_path)
            try:
                self._records.save()
            except Exception:
                if not had:  # not recorded, so not kept (what it made goes too): a retry publishes again
                    del rec.publishes[target_path]
                    if rec.made is not None and target_path in rec.made:
                        rec.made.remove(target_path)
                    with contextlib.suppress(Exception):
                        self._unpublish_path(target_path, delete=made)
                raise

    @staticmethod
    def _ensure_file(path: str) -> bool:
        """A file to bind a block device node on; True when this made it (unpublish deletes only such)."""
        if os.path.isdir(path) and not privileged.is_mountpoint(path) and not os.listdir(path):
            os.rmdir(path)  # a block target must be a file to bind a device node on
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a"):
                pass
            return True
        return False

    def unpublish(self, volume_id: str, target_path: str) -> None:
        target_path = os.path.abspath(target_path)
        with self._lock:
            self._settle(volume_id)
            rec = self._records.items.get(volume_id)
            recorded = rec is not None and target_path in rec.publishes
            # unrecorded: a crash between mount and record, or a path that was never ours (leave it alone)
            # what publish made at the target goes with it (CSI); what was there before stays (a user's file)
            ours = rec is not None and recorded and (rec.made is None or target_path in rec.made)
            if recorded or self._our_mount(target_path, volume_id):
                self._unpublish_path(target_path, delete=ours)
            if rec is not None and recorded:
                was = rec.publishes.pop(target_path)
                if rec.made is not None and target_path in rec.made:
                    rec.made.remove(target_path)
                try:
                    self._records.save()
                except Exception:
                    rec.publishes[target_path] = was  # as the disk has it: the retry saves again
                    if ours and rec.made is not None:
                        rec.made.append(target_path)
                    raise
                self._drop_read_only_loops(rec)

    @staticmethod
    def _unpublish_path(target_path: str, *, delete: bool = True) -> None:
        privileged.umount(target_path)
        if not delete:
            return
        # the target is ours to delete (CSI: the SP removes what it created at the target path)
        with contextlib.suppress(FileNotFoundError, OSError):
            if os.path.isdir(target_path):
                os.rmdir(target_path)
            else:
                os.unlink(target_path)

    # ------------------------------------------------------------------ stats, expand

    def _rec_for_path(self, volume_id: str, path: str) -> StageRecord:
        path = os.path.abspath(path)
        rec = self._records.items.get(volume_id)
        if rec is None or (path != rec.staging_path and path not in rec.publishes
                           and not (rec.block and self._same_device(path, rec))):
            raise errors.NotFound(f"volume {volume_id} is not staged or published at {path}")
        return rec

    def _same_device(self, path: str, rec: StageRecord) -> bool:
        """path is a node of the volume's block device: kubelet asks for stats of block volumes at its own
        per-pod bind mount of the device (.../volumeDevices/<pv>/dev/<pod-uid>), not at our publish target.
        The device is found from sysfs: a stale record's number may be another volume's."""
        loop = self._live_loop(rec.volume_id)
        if not loop:
            return False
        try:
            st, dev = os.stat(path), os.stat(loop)
        except OSError:
            return False
        return stat.S_ISBLK(st.st_mode) and st.st_rdev == dev.st_rdev

    def stats(self, volume_id: str, volume_path: str) -> NodeStats:
        with self._lock:
            vol = self.engine.get_volume(volume_id)
            rec = self._rec_for_path(volume_id, volume_path)
            abnormal, msg = self._condition(rec, vol)
            if rec.block:
                dev = self._live_loop(volume_id)  # from sysfs: a stale record's number may be another volume's
                size = privileged.block_size_bytes(dev) if dev else vol.size
                used = min(vol.allocated_bytes, size)
                return NodeStats(True, size, used, size - used, abnormal=abnormal, message=msg)
        try:
            st = os.statvfs(volume_path)
        except OSError as e:
            return NodeStats(False, 0, 0, 0, abnormal=True, message=f"statfs {volume_path}: {e}")
        total = st.f_blocks * st.f_frsize
        avail = st.f_bavail * st.f_frsize
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        return NodeStats(False, total, used, avail, st.f_files, st.f_files - st.f_ffree, st.f_favail,
                         abnormal=abnormal, message=msg)

    def _condition(self, rec: StageRecord, vol: Any) -> tuple[bool, str]:
        if vol.status != "online":
            return True, f"volume is {vol.status}: {vol.error}"
        if not self._export_alive(rec.volume_id):
            return True, "the engine export of this volume is gone (engine process restarted?)"
        if self._dead_loop(rec) is not None:
            return True, (f"{self.export.lost or 'the node engine process restarted'}: I/O to this volume fails "
                          "until it is unpublished and staged again")
        dev = self._live_loop(rec.volume_id)
        if dev is None:
            return True, "no loop device attached"
        if not rec.block and not privileged.is_mountpoint(rec.staging_path):
            return True, f"staging path {rec.staging_path} is not mounted"
        why = self.export.restart_fails()
        if why:
            # not abnormal now, but an operator should know before restarting the engine
            return False, (f"healthy; a restart of the node engine would fail its I/O: {why} (`csi-flashcopy "
                           "doctor` on the node lists what it lacks)")
        return False, "healthy"

    def expand(self, volume_id: str, volume_path: str, required_bytes: int) -> int:
        """Grow the volume if needed, refresh the loop capacity, then grow the filesystem online."""
        with self._lock:
            self._settle(volume_id)
            rec = self._rec_for_path(volume_id, volume_path)
            vol = self.engine.get_volume(volume_id)
            if required_bytes > vol.size:
                vol = self.engine.resize_volume(volume_id, required_bytes)
            self.export.refresh_size(volume_id)
            dev = self._device(rec)
            for lo in self._loops(volume_id):  # read-only publishes' devices too
                if privileged.block_size_bytes(lo.device) != vol.size:
                    privileged.refresh_loop_capacity(lo.device)
            if not rec.block:
                if (rec.fs_type == "ext4" and not privileged.can_resize_ext4_online()
                        and privileged.ext4_size(dev) < privileged.block_size_bytes(dev)):
                    raise errors.InvalidState(
                        f"volume {volume_id}: growing a mounted ext4 filesystem needs CAP_SYS_RESOURCE, which the "
                        "node process lacks (`csi-flashcopy doctor` on the node shows it); the device has grown "
                        "and the filesystem grows (offline) when the volume is next staged")
                privileged.resize_filesystem(dev, rec.staging_path, rec.fs_type)
            return privileged.block_size_bytes(dev)

    # ------------------------------------------------------------------ snapshots

    def quiesce(self, source_ids: list[str]) -> contextlib.AbstractContextManager[None]:
        """Engine quiesce hook: freeze the staged read-write filesystems among source_ids, flush block ones."""
        return self._quiesce(list(source_ids))

    @contextlib.contextmanager
    def _quiesce(self, source_ids: list[str]) -> Iterator[None]:
        with self._lock:
            recs = [self._records.items[s] for s in source_ids if s in self._records.items]
            for s in source_ids:  # unstage/unpublish/expand of these wait for the thaw (`_settle`)
                self._quiescing[s] = self._quiescing.get(s, 0) + 1
        try:
            with self._frozen(recs):
                yield
        finally:
            with self._lock:
                for s in source_ids:
                    n = self._quiescing.pop(s, 1) - 1
                    if n:
                        self._quiescing[s] = n
                self._thawed.notify_all()

    @contextlib.contextmanager
    def _frozen(self, recs: list[StageRecord]) -> Iterator[None]:
        recs = [r for r in recs if self._dead_loop(r) is None]  # nothing to freeze or flush on a dead device
        mps = [r.staging_path for r in recs
               if not r.block and not r.read_only and privileged.is_mountpoint(r.staging_path)]
        for r in recs:
            loop = self._live_loop(r.volume_id) if r.block and not r.read_only else None  # sysfs, not the record
            if loop:
                # no filesystem to freeze: push the device's page cache down to the engine instead
                with contextlib.suppress(OSError):
                    fd = os.open(loop, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
        t0 = time.monotonic()
        with privileged.frozen(mps, max_seconds=FREEZE_MAX_SECONDS):
            yield
        self.last_freeze_window = time.monotonic() - t0
        if mps:
            self.freeze_timings.observe("freeze", self.last_freeze_window)
            log.info("froze %d filesystem(s) for %.1f ms", len(mps), self.last_freeze_window * 1000)

    # ------------------------------------------------------------------ api.NodeBackend names

    def node_stage(self, volume_id: str, staging_path: str, *, block: bool, fs_type: str,
                   mount_flags: Sequence[str] = (), read_only: bool = False) -> None:
        self.stage(volume_id, staging_path, block=block, fs_type=fs_type, mount_flags=mount_flags,
                   read_only=read_only)

    def node_unstage(self, volume_id: str, staging_path: str) -> None:
        self.unstage(volume_id, staging_path)

    def node_publish(self, volume_id: str, staging_path: str, target_path: str, *, block: bool,
                     read_only: bool = False, mount_flags: Sequence[str] = (), single_writer: bool = False) -> None:
        self.publish(volume_id, staging_path, target_path, block=block, read_only=read_only,
                     mount_flags=mount_flags, single_writer=single_writer)

    def node_unpublish(self, volume_id: str, target_path: str) -> None:
        self.unpublish(volume_id, target_path)

    def node_stats(self, volume_id: str, volume_path: str) -> NodeStats:
        return self.stats(volume_id, volume_path)

    def node_expand(self, volume_id: str, volume_path: str, required_bytes: int) -> int:
        return self.expand(volume_id, volume_path, required_bytes)


def datapath_unavailable() -> str | None:
    """Why this host cannot run the kernel data path (FUSE export + loop devices), or None."""
    if os.geteuid() != 0:
        return "not root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control"
    return None
