"""Volumes: create, look up, resize, delete (at once for the caller, storage when nothing reads through it)."""

from __future__ import annotations

import secrets
import time

from csi_driver.engine import errors
from csi_driver.engine.bypass import changes_io
from csi_driver.engine.cascade import Cascade
from csi_driver.engine.model import (
    DEFAULT_GRAIN,
    GRAIN_SIZES,
    MAX_VOLUME_SIZE,
    GroupInfo,
    MappingInfo,
    MappingState,
    VolumeInfo,
    valid_id,
)
from csi_driver.engine.state import Vol


class Volumes(Cascade):
    """The volume part of the public API (methods without a leading underscore take the engine lock)."""

    def _new_volume(self, name: str, size: int, grain: int, attrs: dict[str, str] | None,
                    volume_id: str | None) -> Vol:
        self._check_name(name)
        if grain not in GRAIN_SIZES:
            raise errors.InvalidArgument(f"grain size must be one of {GRAIN_SIZES}, got {grain}")
        if not isinstance(size, int) or size <= 0:
            raise errors.InvalidArgument(f"size must be a positive integer, got {size!r}")
        if size > MAX_VOLUME_SIZE:  # a file offset cannot reach it (ftruncate would overflow)
            raise errors.OutOfRange(f"size {size} is more than the largest volume ({MAX_VOLUME_SIZE} bytes)")
        if self.find_volume(name) is not None:
            raise errors.AlreadyExists(f"a volume named {name!r} exists")
        if volume_id is None:
            volume_id = self._new_id("vol")
        elif not valid_id(volume_id):
            raise errors.InvalidArgument(f"invalid volume id {volume_id!r}")
        elif volume_id in self._vols:
            raise errors.AlreadyExists(f"volume id {volume_id!r} exists")
        attrs = dict(attrs or {})
        if not all(isinstance(k, str) and isinstance(x, str) for k, x in attrs.items()):
            raise errors.InvalidArgument("attrs must map strings to strings")
        size = -(-size // grain) * grain
        v = Vol(volume_id, next(self._seq), name, size, grain, attrs, time.time(),
                f"{volume_id}.{secrets.token_hex(4)}.img")
        self._create_file(v)
        return v

    def create_volume(self, name: str, size: int, *, grain_size: int = DEFAULT_GRAIN,
                      attrs: dict[str, str] | None = None, volume_id: str | None = None) -> VolumeInfo:
        with self._lock:
            self._check_open()
            v = self._new_volume(name, size, grain_size, attrs, volume_id)
            self._vols[v.id] = v
            self._dirty_vol(v)
            self._commit_or_forget([v])
            return self._vinfo(v)

    def _commit_or_forget(self, new_vols: list[Vol]) -> None:
        try:
            self._commit()
        except BaseException:
            for v in new_vols:
                self._vols.pop(v.id, None)
                self._drop_file(v)
            raise

    def get_volume(self, volume_id: str) -> VolumeInfo:
        with self._lock:
            return self._vinfo(self._vol(volume_id))

    def find_volume(self, name: str) -> VolumeInfo | None:
        with self._lock:
            for v in self._vols.values():
                if v.name == name and not v.deleted:
                    return self._vinfo(v)
            return None

    def list_volumes(self) -> list[VolumeInfo]:
        with self._lock:
            vols = sorted((v for v in self._vols.values() if not v.deleted), key=lambda v: v.seq)
            return [self._vinfo(v) for v in vols]

    def inspect(self) -> tuple[list[VolumeInfo], list[MappingInfo], list[GroupInfo]]:
        """Everything at one instant, hidden nodes included (deleted=True, with the volumes they stay for)."""
        with self._lock:
            vols = sorted(self._vols.values(), key=lambda v: v.seq)
            maps = sorted(self._maps.values(), key=lambda m: m.seq)
            groups = sorted(self._groups.values(), key=lambda g: g.seq)
            return ([self._vinfo(v) for v in vols], [self._minfo(m) for m in maps],
                    [self._ginfo(g) for g in groups])

    def set_volume_attrs(self, volume_id: str, attrs: dict[str, str]) -> VolumeInfo:
        with self._lock:
            v = self._vol(volume_id)
            v.attrs = dict(attrs)
            self._dirty_vol(v)
            self._commit()
            return self._vinfo(v)

    @changes_io
    def resize_volume(self, volume_id: str, new_size: int) -> VolumeInfo:
        with self._lock:
            self._check_open()
            v = self._vol(volume_id)
            if not isinstance(new_size, int) or new_size <= 0:
                raise errors.InvalidArgument(f"size must be a positive integer, got {new_size!r}")
            if new_size > MAX_VOLUME_SIZE:
                raise errors.OutOfRange(f"size {new_size} is more than the largest volume ({MAX_VOLUME_SIZE} bytes)")
            new_size = -(-new_size // v.grain) * v.grain
            if new_size < v.size:
                raise errors.OutOfRange(f"volume {volume_id} is {v.size} bytes; shrinking is not supported")
            if new_size == v.size:
                return self._vinfo(v)
            self._flush_all()
            try:
                self._io.truncate(self._fd(v), new_size)
            except errors.OutOfRange as e:
                raise errors.OutOfRange(f"{new_size} bytes is more than the filesystem allows") from e
            v.size = new_size
            if v.bits is not None:
                v.bits.resize(v.ngrains, fill=True)  # I3: the new range is ours and reads as zeros
                self._mark_bit("v:" + v.id, v.bits, v)
            for m in self._maps.values():
                if m.diff is not None and volume_id in (m.source, m.target):
                    m.diff.resize(max(m.diff.n, v.ngrains), fill=True)
                    self._dirty_map(m)
            self._dirty_vol(v)
            self._commit()
            return self._vinfo(v)

    @changes_io
    def delete_volume(self, volume_id: str) -> None:
        """Delete at once for the caller; storage goes when nothing reads through the volume any more."""
        with self._lock:
            self._check_open()
            v = self._vol(volume_id)
            inc = self._incoming(v) if v.upstream is not None else None
            if inc is not None:
                v.clean_rate = inc.clean_rate
            elif v.downstream is not None:
                dm = self._incoming(v.downstream)
                v.clean_rate = dm.clean_rate if dm else 0
            for m in list(self._maps.values()):
                # mappings into v are pointless now; mappings out of v that still copy keep going
                if m.target == v.id or (m.source == v.id and m.state not in (MappingState.COPYING,
                                                                            MappingState.STOPPING)):
                    self._forget_mapping(m)
            if v.upstream is not None and v.downstream is None:
                self._unlink(v)  # a target nobody reads through: just cut it off
            v.deleted = True
            v.name = f"{v.name}\0deleted\0{v.id}"  # frees the name for reuse
            self._dirty_vol(v)
            self._reap()
            self._commit()
            self._ensure_reserve()  # space may have come back
            self._work.notify_all()
