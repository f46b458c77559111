"""mountinfo parsing (proc(5)): fields, optional tags, and the kernel's octal escapes (\\040 space, \\011 tab,
\\012 newline, \\134 backslash) in root, mount point and source; from text, from a file, and the live table."""

from __future__ import annotations

import os
from pathlib import Path

from csi_driver.datapath import privileged

SAMPLE = (
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro\n"
    "97 22 7:3 / /var/lib/k\\040with\\040space rw,nosuid - ext4 /dev/loop3 rw\n"
    "98 22 0:50 / /mnt/tab\\011and\\012newline ro master:7 shared:9 - fuse.flashcopy flashcopy rw,user_id=0\n"
    "99 22 0:51 /sub\\134dir /mnt/back\\134slash rw - tmpfs tmp\\040fs rw,size=1024k\n"
    "100 22 0:52 / /mnt/literal\\134040 rw - tmpfs none rw\n"
    "101 22 0:53 / /mnt/not\\9an\\escape rw - proc proc rw\n"
)


def test_fields_and_escapes() -> None:
    m = privileged.parse_mountinfo(SAMPLE)
    assert [x.mount_point for x in m] == ["/", "/var/lib/k with space", "/mnt/tab\tand\nnewline",
                                          "/mnt/back\\slash", "/mnt/literal\\040", "/mnt/not\\9an\\escape"]
    assert (m[0].mount_id, m[0].parent_id, m[0].major_minor, m[0].root) == (22, 1, "8:1", "/")
    assert m[0].options == {"rw", "relatime"} and m[0].super_options == {"rw", "errors=remount-ro"}
    assert m[1].source == "/dev/loop3" and m[1].major_minor == "7:3" and m[1].options == {"rw", "nosuid"}
    # optional tags (shared:, master:) before the separator do not shift the fields after it
    assert m[2].read_only and m[2].fstype == "fuse.flashcopy" and m[2].source == "flashcopy"
    assert "user_id=0" in m[2].super_options
    assert m[3].root == "/sub\\dir" and m[3].source == "tmp fs" and not m[3].read_only


def test_escaped_backslash_is_unescaped_once() -> None:
    # "\134040" is a backslash followed by the text "040", not a space
    (m,) = privileged.parse_mountinfo("7 1 0:9 / /a\\134040b rw - tmpfs x rw\n")
    assert m.mount_point == "/a\\040b"


def test_only_newline_ends_a_line() -> None:
    # the kernel escapes only space, tab, newline and backslash: a form feed or U+0085 stays raw in the name
    (m,) = privileged.parse_mountinfo("7 1 0:9 / /odd\x0cname\x85x rw - tmpfs x rw\n")
    assert m.mount_point == "/odd\x0cname\x85x" and m.fstype == "tmpfs"


def test_mounts_reads_a_given_file(tmp_path: Path) -> None:
    f = tmp_path / "mountinfo"
    f.write_text(SAMPLE)
    assert [m.mount_point for m in privileged.mounts(f)] == [m.mount_point for m in privileged.parse_mountinfo(SAMPLE)]
    assert privileged.mounts(str(f))[1].mount_point == "/var/lib/k with space"


def test_live_mount_table() -> None:
    live = privileged.mounts()
    assert any(m.mount_point == "/" for m in live) and all(m.mount_id > 0 and m.fstype for m in live)
    assert privileged.is_mountpoint("/") and not privileged.is_mountpoint(os.path.join(os.sep, "nonexistent-x"))
    assert privileged.mounts_at("/proc")[-1].fstype == "proc"
