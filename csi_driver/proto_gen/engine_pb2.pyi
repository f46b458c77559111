from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ("pid", "version", "state_dir")
    PID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_DIR_FIELD_NUMBER: _ClassVar[int]
    pid: int
    version: str
    state_dir: str
    def __init__(self, pid: _Optional[int] = ..., version: _Optional[str] = ..., state_dir: _Optional[str] = ...) -> None: ...

class CapacityRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CapacityResponse(_message.Message):
    __slots__ = ("total_bytes", "free_bytes")
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    total_bytes: int
    free_bytes: int
    def __init__(self, total_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ...) -> None: ...

class Volume(_message.Message):
    __slots__ = ("id", "name", "size", "grain_size", "attrs", "created_at", "condition", "source_id", "copy_progress", "allocated_bytes")
    class AttrsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    GRAIN_SIZE_FIELD_NUMBER: _ClassVar[int]
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    COPY_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    size: int
    grain_size: int
    attrs: _containers.ScalarMap[str, str]
    created_at: float
    condition: str
    source_id: str
    copy_progress: float
    allocated_bytes: int
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., size: _Optional[int] = ..., grain_size: _Optional[int] = ..., attrs: _Optional[_Mapping[str, str]] = ..., created_at: _Optional[float] = ..., condition: _Optional[str] = ..., source_id: _Optional[str] = ..., copy_progress: _Optional[float] = ..., allocated_bytes: _Optional[int] = ...) -> None: ...

class VolumeResponse(_message.Message):
    __slots__ = ("volume",)
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    volume: Volume
    def __init__(self, volume: _Optional[_Union[Volume, _Mapping]] = ...) -> None: ...

class VolumesResponse(_message.Message):
    __slots__ = ("volumes",)
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    volumes: _containers.RepeatedCompositeFieldContainer[Volume]
    def __init__(self, volumes: _Optional[_Iterable[_Union[Volume, _Mapping]]] = ...) -> None: ...

class CreateVolumeRequest(_message.Message):
    __slots__ = ("name", "size", "grain_size", "attrs", "volume_id")
    class AttrsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    GRAIN_SIZE_FIELD_NUMBER: _ClassVar[int]
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    grain_size: int
    attrs: _containers.ScalarMap[str, str]
    volume_id: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., grain_size: _Optional[int] = ..., attrs: _Optional[_Mapping[str, str]] = ..., volume_id: _Optional[str] = ...) -> None: ...

class GetVolumeRequest(_message.Message):
    __slots__ = ("volume_id",)
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    def __init__(self, volume_id: _Optional[str] = ...) -> None: ...

class FindVolumeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class FindVolumeResponse(_message.Message):
    __slots__ = ("volume",)
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    volume: Volume
    def __init__(self, volume: _Optional[_Union[Volume, _Mapping]] = ...) -> None: ...

class FindVolumesRequest(_message.Message):
    __slots__ = ("attrs",)
    class AttrsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    attrs: _containers.ScalarMap[str, str]
    def __init__(self, attrs: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DeleteVolumeRequest(_message.Message):
    __slots__ = ("volume_id",)
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    def __init__(self, volume_id: _Optional[str] = ...) -> None: ...

class ResizeVolumeRequest(_message.Message):
    __slots__ = ("volume_id", "new_size")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_SIZE_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    new_size: int
    def __init__(self, volume_id: _Optional[str] = ..., new_size: _Optional[int] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ("source_id", "name", "copy_rate", "attrs", "volume_id")
    class AttrsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    COPY_RATE_FIELD_NUMBER: _ClassVar[int]
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    source_id: str
    name: str
    copy_rate: int
    attrs: _containers.ScalarMap[str, str]
    volume_id: str
    def __init__(self, source_id: _Optional[str] = ..., name: _Optional[str] = ..., copy_rate: _Optional[int] = ..., attrs: _Optional[_Mapping[str, str]] = ..., volume_id: _Optional[str] = ...) -> None: ...

class CloneRequest(_message.Message):
    __slots__ = ("source_id", "name", "size", "copy_rate", "clean_rate", "attrs", "volume_id")
    class AttrsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    COPY_RATE_FIELD_NUMBER: _ClassVar[int]
    CLEAN_RATE_FIELD_NUMBER: _ClassVar[int]
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    source_id: str
    name: str
    size: int
    copy_rate: int
    clean_rate: int
    attrs: _containers.ScalarMap[str, str]
    volume_id: str
    def __init__(self, source_id: _Optional[str] = ..., name: _Optional[str] = ..., size: _Optional[int] = ..., copy_rate: _Optional[int] = ..., clean_rate: _Optional[int] = ..., attrs: _Optional[_Mapping[str, str]] = ..., volume_id: _Optional[str] = ...) -> None: ...

class SnapshotItem(_message.Message):
    __slots__ = ("source_id", "name", "attrs", "volume_id")
    class AttrsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    source_id: str
    name: str
    attrs: _containers.ScalarMap[str, str]
    volume_id: str
    def __init__(self, source_id: _Optional[str] = ..., name: _Optional[str] = ..., attrs: _Optional[_Mapping[str, str]] = ..., volume_id: _Optional[str] = ...) -> None: ...

class SnapshotGroupRequest(_message.Message):
    __slots__ = ("group_name", "items", "copy_rate")
    GROUP_NAME_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    COPY_RATE_FIELD_NUMBER: _ClassVar[int]
    group_name: str
    items: _containers.RepeatedCompositeFieldContainer[SnapshotItem]
    copy_rate: int
    def __init__(self, group_name: _Optional[str] = ..., items: _Optional[_Iterable[_Union[SnapshotItem, _Mapping]]] = ..., copy_rate: _Optional[int] = ...) -> None: ...

class DeleteGroupRequest(_message.Message):
    __slots__ = ("group_name",)
    GROUP_NAME_FIELD_NUMBER: _ClassVar[int]
    group_name: str
    def __init__(self, group_name: _Optional[str] = ...) -> None: ...

class PrepareGroupRequest(_message.Message):
    __slots__ = ("group_name", "items", "copy_rate", "watchdog_ms")
    GROUP_NAME_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    COPY_RATE_FIELD_NUMBER: _ClassVar[int]
    WATCHDOG_MS_FIELD_NUMBER: _ClassVar[int]
    group_name: str
    items: _containers.RepeatedCompositeFieldContainer[SnapshotItem]
    copy_rate: int
    watchdog_ms: int
    def __init__(self, group_name: _Optional[str] = ..., items: _Optional[_Iterable[_Union[SnapshotItem, _Mapping]]] = ..., copy_rate: _Optional[int] = ..., watchdog_ms: _Optional[int] = ...) -> None: ...

class GroupPhaseRequest(_message.Message):
    __slots__ = ("group_name",)
    GROUP_NAME_FIELD_NUMBER: _ClassVar[int]
    group_name: str
    def __init__(self, group_name: _Optional[str] = ...) -> None: ...

class ReleaseGroupRequest(_message.Message):
    __slots__ = ("group_name", "abort")
    GROUP_NAME_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    group_name: str
    abort: bool
    def __init__(self, group_name: _Optional[str] = ..., abort: _Optional[bool] = ...) -> None: ...

class ReleaseGroupResponse(_message.Message):
    __slots__ = ("hold_seconds",)
    HOLD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    hold_seconds: float
    def __init__(self, hold_seconds: _Optional[float] = ...) -> None: ...

class NodeStageRequest(_message.Message):
    __slots__ = ("volume_id", "staging_path", "block", "fs_type", "mount_flags", "read_only")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    STAGING_PATH_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    FS_TYPE_FIELD_NUMBER: _ClassVar[int]
    MOUNT_FLAGS_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    staging_path: str
    block: bool
    fs_type: str
    mount_flags: _containers.RepeatedScalarFieldContainer[str]
    read_only: bool
    def __init__(self, volume_id: _Optional[str] = ..., staging_path: _Optional[str] = ..., block: _Optional[bool] = ..., fs_type: _Optional[str] = ..., mount_flags: _Optional[_Iterable[str]] = ..., read_only: _Optional[bool] = ...) -> None: ...

class NodeUnstageRequest(_message.Message):
    __slots__ = ("volume_id", "staging_path")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    STAGING_PATH_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    staging_path: str
    def __init__(self, volume_id: _Optional[str] = ..., staging_path: _Optional[str] = ...) -> None: ...

class NodePublishRequest(_message.Message):
    __slots__ = ("volume_id", "staging_path", "target_path", "block", "read_only", "mount_flags", "single_writer")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    STAGING_PATH_FIELD_NUMBER: _ClassVar[int]
    TARGET_PATH_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    MOUNT_FLAGS_FIELD_NUMBER: _ClassVar[int]
    SINGLE_WRITER_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    staging_path: str
    target_path: str
    block: bool
    read_only: bool
    mount_flags: _containers.RepeatedScalarFieldContainer[str]
    single_writer: bool
    def __init__(self, volume_id: _Optional[str] = ..., staging_path: _Optional[str] = ..., target_path: _Optional[str] = ..., block: _Optional[bool] = ..., read_only: _Optional[bool] = ..., mount_flags: _Optional[_Iterable[str]] = ..., single_writer: _Optional[bool] = ...) -> None: ...

class NodeUnpublishRequest(_message.Message):
    __slots__ = ("volume_id", "target_path")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_PATH_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    target_path: str
    def __init__(self, volume_id: _Optional[str] = ..., target_path: _Optional[str] = ...) -> None: ...

class NodeStatsRequest(_message.Message):
    __slots__ = ("volume_id", "volume_path")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    VOLUME_PATH_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    volume_path: str
    def __init__(self, volume_id: _Optional[str] = ..., volume_path: _Optional[str] = ...) -> None: ...

class NodeStatsResponse(_message.Message):
    __slots__ = ("block", "total_bytes", "used_bytes", "available_bytes", "total_inodes", "used_inodes", "available_inodes", "abnormal", "message")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_INODES_FIELD_NUMBER: _ClassVar[int]
    USED_INODES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_INODES_FIELD_NUMBER: _ClassVar[int]
    ABNORMAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    block: bool
    total_bytes: int
    used_bytes: int
    available_bytes: int
    total_inodes: int
    used_inodes: int
    available_inodes: int
    abnormal: bool
    message: str
    def __init__(self, block: _Optional[bool] = ..., total_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., available_bytes: _Optional[int] = ..., total_inodes: _Optional[int] = ..., used_inodes: _Optional[int] = ..., available_inodes: _Optional[int] = ..., abnormal: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class NodeExpandRequest(_message.Message):
    __slots__ = ("volume_id", "volume_path", "required_bytes")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    VOLUME_PATH_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_BYTES_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    volume_path: str
    required_bytes: int
    def __init__(self, volume_id: _Optional[str] = ..., volume_path: _Optional[str] = ..., required_bytes: _Optional[int] = ...) -> None: ...

class NodeExpandResponse(_message.Message):
    __slots__ = ("capacity_bytes",)
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    capacity_bytes: int
    def __init__(self, capacity_bytes: _Optional[int] = ...) -> None: ...

class CopyStatus(_message.Message):
    __slots__ = ("id", "source_id", "target_id", "state", "copy_rate", "clean_rate", "progress", "bytes_to_copy", "bytes_to_clean", "error", "incremental", "restore", "group_id", "start_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    COPY_RATE_FIELD_NUMBER: _ClassVar[int]
    CLEAN_RATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    BYTES_TO_COPY_FIELD_NUMBER: _ClassVar[int]
    BYTES_TO_CLEAN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    INCREMENTAL_FIELD_NUMBER: _ClassVar[int]
    RESTORE_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    source_id: str
    target_id: str
    state: str
    copy_rate: int
    clean_rate: int
    progress: float
    bytes_to_copy: int
    bytes_to_clean: int
    error: str
    incremental: bool
    restore: bool
    group_id: str
    start_time: float
    def __init__(self, id: _Optional[str] = ..., source_id: _Optional[str] = ..., target_id: _Optional[str] = ..., state: _Optional[str] = ..., copy_rate: _Optional[int] = ..., clean_rate: _Optional[int] = ..., progress: _Optional[float] = ..., bytes_to_copy: _Optional[int] = ..., bytes_to_clean: _Optional[int] = ..., error: _Optional[str] = ..., incremental: _Optional[bool] = ..., restore: _Optional[bool] = ..., group_id: _Optional[str] = ..., start_time: _Optional[float] = ...) -> None: ...

class VolumeStatus(_message.Message):
    __slots__ = ("id", "name", "size", "allocated_bytes", "attrs", "condition", "created_at", "hidden", "staged", "dependents")
    class AttrsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    STAGED_FIELD_NUMBER: _ClassVar[int]
    DEPENDENTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    size: int
    allocated_bytes: int
    attrs: _containers.ScalarMap[str, str]
    condition: str
    created_at: float
    hidden: bool
    staged: bool
    dependents: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., size: _Optional[int] = ..., allocated_bytes: _Optional[int] = ..., attrs: _Optional[_Mapping[str, str]] = ..., condition: _Optional[str] = ..., created_at: _Optional[float] = ..., hidden: _Optional[bool] = ..., staged: _Optional[bool] = ..., dependents: _Optional[_Iterable[str]] = ...) -> None: ...

class GroupStatus(_message.Message):
    __slots__ = ("id", "name", "state", "mapping_ids", "start_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MAPPING_IDS_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    state: str
    mapping_ids: _containers.RepeatedScalarFieldContainer[str]
    start_time: float
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[str] = ..., mapping_ids: _Optional[_Iterable[str]] = ..., start_time: _Optional[float] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("volumes", "mappings", "groups")
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    MAPPINGS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    volumes: _containers.RepeatedCompositeFieldContainer[VolumeStatus]
    mappings: _containers.RepeatedCompositeFieldContainer[CopyStatus]
    groups: _containers.RepeatedCompositeFieldContainer[GroupStatus]
    def __init__(self, volumes: _Optional[_Iterable[_Union[VolumeStatus, _Mapping]]] = ..., mappings: _Optional[_Iterable[_Union[CopyStatus, _Mapping]]] = ..., groups: _Optional[_Iterable[_Union[GroupStatus, _Mapping]]] = ...) -> None: ...

class ModifyCopiesRequest(_message.Message):
    __slots__ = ("volume_id", "copy_rate", "clean_rate")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    COPY_RATE_FIELD_NUMBER: _ClassVar[int]
    CLEAN_RATE_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    copy_rate: int
    clean_rate: int
    def __init__(self, volume_id: _Optional[str] = ..., copy_rate: _Optional[int] = ..., clean_rate: _Optional[int] = ...) -> None: ...

class CopiesResponse(_message.Message):
    __slots__ = ("mappings",)
    MAPPINGS_FIELD_NUMBER: _ClassVar[int]
    mappings: _containers.RepeatedCompositeFieldContainer[CopyStatus]
    def __init__(self, mappings: _Optional[_Iterable[_Union[CopyStatus, _Mapping]]] = ...) -> None: ...

class RestoreVolumeRequest(_message.Message):
    __slots__ = ("volume_id", "snapshot_id", "copy_rate")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    COPY_RATE_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    snapshot_id: str
    copy_rate: int
    def __init__(self, volume_id: _Optional[str] = ..., snapshot_id: _Optional[str] = ..., copy_rate: _Optional[int] = ...) -> None: ...

class CopyResponse(_message.Message):
    __slots__ = ("mapping",)
    MAPPING_FIELD_NUMBER: _ClassVar[int]
    mapping: CopyStatus
    def __init__(self, mapping: _Optional[_Union[CopyStatus, _Mapping]] = ...) -> None: ...

class RefreshVolumeRequest(_message.Message):
    __slots__ = ("volume_id", "source_id", "copy_rate")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    COPY_RATE_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    source_id: str
    copy_rate: int
    def __init__(self, volume_id: _Optional[str] = ..., source_id: _Optional[str] = ..., copy_rate: _Optional[int] = ...) -> None: ...

class RefreshVolumeResponse(_message.Message):
    __slots__ = ("mapping", "grains_to_copy")
    MAPPING_FIELD_NUMBER: _ClassVar[int]
    GRAINS_TO_COPY_FIELD_NUMBER: _ClassVar[int]
    mapping: CopyStatus
    grains_to_copy: int
    def __init__(self, mapping: _Optional[_Union[CopyStatus, _Mapping]] = ..., grains_to_copy: _Optional[int] = ...) -> None: ...

class AllocatedExtentsRequest(_message.Message):
    __slots__ = ("volume_id", "start", "limit")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    start: int
    limit: int
    def __init__(self, volume_id: _Optional[str] = ..., start: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class DeltaExtentsRequest(_message.Message):
    __slots__ = ("base_id", "target_id", "start", "limit")
    BASE_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    base_id: str
    target_id: str
    start: int
    limit: int
    def __init__(self, base_id: _Optional[str] = ..., target_id: _Optional[str] = ..., start: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ExtentsResponse(_message.Message):
    __slots__ = ("size", "offsets", "lengths")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    size: int
    offsets: _containers.RepeatedScalarFieldContainer[int]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, size: _Optional[int] = ..., offsets: _Optional[_Iterable[int]] = ..., lengths: _Optional[_Iterable[int]] = ...) -> None: ...
