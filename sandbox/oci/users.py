"""Who a container runs as: user strings resolved against the image's own /etc/passwd and /etc/group.

The rootfs is untrusted image content. Its files are read as if the rootfs were
`/`: symlinks are followed, but absolute targets and `..` stay inside the
rootfs, so an image whose /etc/passwd points at the host's never makes Tandem
read a host file. Only regular files are read, and only their first few MiB.
Malformed lines are skipped rather than guessed at (a guessed uid of 0 would
be root).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from core.errors import InvalidArgument

_MAX_ID = 2**31 - 1  # runc rejects IDs above MaxInt32
_MAX_FILE = 4 << 20
_MAX_SYMLINKS = 40


@dataclass(frozen=True)
class PasswdEntry:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...]


@dataclass(frozen=True)
class Identity:
    """The process identity runc sets: uid, primary gid and every supplementary gid (sorted, with the primary)."""

    uid: int
    gid: int
    additional_gids: tuple[int, ...]


def _parse_id(text: str) -> int | None:
    if not text.isdigit():
        return None
    value = int(text)
    return value if value <= _MAX_ID else None


def parse_passwd(text: str) -> list[PasswdEntry]:
    """`name:password:uid:gid:...` lines; comments, NIS `+`/`-` lines and malformed lines are skipped."""
    entries = []
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) < 4 or not fields[0] or fields[0][0] in "#+-":
            continue
        uid, gid = _parse_id(fields[2]), _parse_id(fields[3])
        if uid is not None and gid is not None:
            entries.append(PasswdEntry(fields[0], uid, gid))
    return entries


def parse_group(text: str) -> list[GroupEntry]:
    """`name:password:gid:member,member` lines; malformed ones are skipped."""
    entries = []
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) < 3 or not fields[0] or fields[0][0] in "#+-":
            continue
        gid = _parse_id(fields[2])
        if gid is None:
            continue
        members = tuple(m.strip() for m in fields[3].split(",") if m.strip()) if len(fields) > 3 else ()
        entries.append(GroupEntry(fields[0], gid, members))
    return entries


def read_in_root(rootfs: Path, path: str) -> str | None:
    """The text of `path` inside `rootfs`, resolved as if rootfs were `/`; None if it is missing or not a file."""
    root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    dirs = [root_fd]  # dirs[-1] is the directory being walked; dirs[0] is the root
    pending = [part for part in path.split("/") if part not in ("", ".")]
    links = 0
    try:
        while pending:
            name = pending.pop(0)
            if name == "..":
                if len(dirs) > 1:
                    os.close(dirs.pop())
                continue
            try:
                st = os.stat(name, dir_fd=dirs[-1], follow_symlinks=False)
            except FileNotFoundError:
                return None
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > _MAX_SYMLINKS:
                    return None
                target = os.readlink(name, dir_fd=dirs[-1])
                if target.startswith("/"):
                    while len(dirs) > 1:
                        os.close(dirs.pop())
                pending[:0] = [part for part in target.split("/") if part not in ("", ".")]
            elif pending:
                if not stat.S_ISDIR(st.st_mode):
                    return None
                dirs.append(os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirs[-1]))
            elif stat.S_ISREG(st.st_mode):
                return _read_regular(name, dirs[-1], st)
            else:
                return None
        return None
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None  # the tree changed under us; treat as missing
        raise
    finally:
        for fd in dirs:
            os.close(fd)


def _read_regular(name: str, dir_fd: int, expected: os.stat_result) -> str | None:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if (st.st_dev, st.st_ino) != (expected.st_dev, expected.st_ino) or not stat.S_ISREG(st.st_mode):
            return None
        return f.read(_MAX_FILE).decode("utf-8", errors="replace")


def _split_user(user: str) -> tuple[str, str | None]:
    parts = user.split(":")
    if len(parts) > 2 or not parts[0]:
        raise InvalidArgument(f"invalid user {user!r}: want uid, name, uid:gid or name:group")
    return parts[0], parts[1] if len(parts) == 2 else None


def _numeric(text: str, what: str, user: str) -> int | None:
    if not text.isdigit():
        return None
    value = int(text)
    if value > _MAX_ID:
        raise InvalidArgument(f"invalid user {user!r}: {what} out of range")
    return value


def resolve_identity(
    rootfs: Path, user: str, *, supplemental_groups: tuple[int, ...] = (), image_groups: bool = True
) -> Identity:
    """Resolve a user string the way containerd does.

    `user` is "uid", "name", "uid:gid", "name:gid", "uid:group" or "name:group";
    "" means root. A numeric uid takes its primary gid from /etc/passwd, or 0
    if it has no entry; an explicit group always wins. A name missing from
    /etc/passwd (or a group missing from /etc/group) is an InvalidArgument.
    With `image_groups` (SupplementalGroupsPolicy Merge) the groups in
    /etc/group that list the user by name are added; `supplemental_groups`
    always are.
    """
    user_part, group_part = _split_user(user) if user else ("0", None)
    passwd = parse_passwd(read_in_root(rootfs, "/etc/passwd") or "")
    numeric_uid = _numeric(user_part, "uid", user)
    if numeric_uid is None:
        entry = next((e for e in passwd if e.name == user_part), None)
        if entry is None:
            raise InvalidArgument(f"user {user_part!r} is not in the image's /etc/passwd")
        uid = entry.uid
    else:
        entry = next((e for e in passwd if e.uid == numeric_uid), None)
        uid = numeric_uid
    gid = entry.gid if entry else 0
    if group_part is not None:
        gid = _resolve_group(rootfs, group_part, user)
    gids = {gid, *supplemental_groups}
    if image_groups and entry is not None:
        groups = parse_group(read_in_root(rootfs, "/etc/group") or "")
        gids.update(g.gid for g in groups if entry.name in g.members and g.name != entry.name)
    return Identity(uid, gid, tuple(sorted(gids)))


def _resolve_group(rootfs: Path, group: str, user: str) -> int:
    gid = _numeric(group, "gid", user)
    if gid is not None:
        return gid
    entry = next((g for g in parse_group(read_in_root(rootfs, "/etc/group") or "") if g.name == group), None)
    if entry is None:
        raise InvalidArgument(f"group {group!r} is not in the image's /etc/group")
    return entry.gid
