"""Who jobs run as, and who owns their directories.

When jobd is root, jobs never run as root unless JOBD_ALLOW_ROOT says so:

- `range` (the default): each running job gets a uid and gid of its own from JOBD_UID_RANGE,
  unused by any other running job or live process. Jobs then cannot read each other's
  directories or signal each other's processes. The uids need no passwd entry.
- `fixed` (JOBD_RUN_AS): every job runs as one user. Jobs share a uid, so a job can signal the
  others' processes and reach their files through /proc; use the range where that matters.
- `root` (JOBD_ALLOW_ROOT=true with no JOBD_RUN_AS): jobs run as root, as the classic jobd did.

When jobd is not root it cannot switch users: jobs run as jobd's own user (`self`).

Directories: DATAPATH is 0711 when jobs run as other users (they can reach their own directory
but not list the others); DATAPATH/<id> is 0750, owner jobd, group the job's gid, while the job
runs, and 0700 once it ended; work/, home/, tmp/ and the log belong to the job's uid.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobd.config import Config, ConfigError
from jobd.files import JobFiles

log = logging.getLogger("jobd.users")


@dataclass(frozen=True)
class Identity:
    """The uid, gid and supplementary groups a job runs with."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def popen_args(self) -> dict[str, Any]:
        """`subprocess.Popen` arguments that switch to this identity (in C, before exec)."""
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}


def parse_user(text: str) -> Identity:
    """`name`, `uid`, `name:group` or `uid:gid`, looked up in the passwd and group files."""
    user, _, group = text.strip().partition(":")
    entry = None
    if user.isdigit():
        uid = int(user)
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            entry = None
    else:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise ConfigError(f"JOBD_RUN_AS: no user named {user!r}") from None
        uid = entry.pw_uid
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise ConfigError(f"JOBD_RUN_AS: no group named {group!r}") from None
    else:
        gid = entry.pw_gid if entry is not None else uid
    groups: tuple[int, ...] = ()
    if entry is not None:
        groups = tuple(g for g in os.getgrouplist(entry.pw_name, gid) if g != gid)
    return Identity(uid, gid, groups)


def live_uids(proc: Path = Path("/proc")) -> set[int]:
    """The uids of every process on the machine (owner of /proc/<pid>)."""
    uids: set[int] = set()
    with os.scandir(proc) as entries:
        for entry in entries:
            if entry.name.isdigit():
                try:
                    uids.add(entry.stat(follow_symlinks=False).st_uid)
                except FileNotFoundError:
                    continue  # exited while we looked
    return uids


class UserPolicy:
    """Chooses the identity of each job and sets up its directories to match."""

    def __init__(self, mode: str, *, fixed: Identity | None = None,
                 uid_range: tuple[int, int] = (20000, 29999), ignored: str = "") -> None:
        self.mode = mode
        self.fixed = fixed
        self.first, self.last = uid_range
        self._ignored = ignored

    @classmethod
    def from_config(cls, config: Config, euid: int | None = None) -> UserPolicy:
        euid = os.geteuid() if euid is None else euid
        if euid != 0:
            return cls("self", ignored=config.run_as)
        if config.run_as:
            identity = parse_user(config.run_as)
            if identity.uid == 0:
                if not config.allow_root:
                    raise ConfigError("JOBD_RUN_AS: refusing to run jobs as root; set "
                                      "JOBD_ALLOW_ROOT=true if that is really wanted")
                return cls("root")
            return cls("fixed", fixed=identity)
        if config.allow_root:
            return cls("root")
        return cls("range", uid_range=config.uid_range)

    @property
    def switches(self) -> bool:
        """Do jobs run as another user than jobd?"""
        return self.mode in ("fixed", "range")

    def describe(self) -> str:
        if self.mode == "self":
            text = f"jobs run as jobd's own user (uid {os.geteuid()}): jobd is not root"
            if self._ignored:
                text += f"; JOBD_RUN_AS={self._ignored} ignored"
            return text
        if self.mode == "root":
            return "jobs run as root (JOBD_ALLOW_ROOT)"
        if self.mode == "fixed":
            assert self.fixed is not None
            return f"jobs run as uid {self.fixed.uid} gid {self.fixed.gid} (JOBD_RUN_AS)"
        return f"jobs run as a uid of their own from {self.first}-{self.last} (JOBD_UID_RANGE)"

    def warnings(self) -> list[str]:
        """Configuration that works but is probably not meant."""
        if self.mode != "range":
            return []
        taken = sorted(p.pw_name for p in pwd.getpwall() if self.first <= p.pw_uid <= self.last)
        if taken:
            return [f"JOBD_UID_RANGE {self.first}-{self.last} holds existing users "
                    f"({', '.join(taken[:5])}): jobs may get their uids"]
        return []

    def assign(self, seq: int, busy: set[int]) -> Identity | None:
        """The identity of a job about to start; None: jobd's own (no switch).

        In the range, start at a place given by the job's seq and take the first uid that is
        neither `busy` (held by another running job) nor owning a live process (left by an
        earlier job that daemonised).
        """
        if self.mode == "fixed":
            return self.fixed
        if self.mode != "range":
            return None
        span = self.last - self.first + 1
        live = live_uids()
        for step in range(span):
            uid = self.first + (seq + step) % span
            if uid not in busy and uid not in live:
                return Identity(uid, uid)
        raise RuntimeError(f"no free uid in JOBD_UID_RANGE {self.first}-{self.last}")

    def check_datapath(self, datapath: Path) -> None:
        """Refuse a DATAPATH that jobs running as another user could not reach."""
        if not self.switches:
            return
        uid, gids = (self.fixed.uid, {self.fixed.gid, *self.fixed.groups}) if self.fixed \
            else (-1, set())
        path = datapath.resolve()
        for parent in reversed(path.parents):
            try:
                info = parent.stat()
            except FileNotFoundError:
                return  # jobd creates the rest, searchable
            if info.st_uid == uid:
                ok = info.st_mode & stat.S_IXUSR
            elif info.st_gid in gids:
                ok = info.st_mode & stat.S_IXGRP
            else:
                ok = info.st_mode & stat.S_IXOTH
            if not ok:
                raise ConfigError(
                    f"DATAPATH {datapath}: {parent} (mode {stat.S_IMODE(info.st_mode):04o}) "
                    f"cannot be searched by the users jobs run as, so they could not reach "
                    f"their directories; allow it (chmod o+x {parent}), choose another "
                    f"DATAPATH, or set JOBD_RUN_AS / JOBD_ALLOW_ROOT")

    # -- directories ------------------------------------------------------------------------

    def prepare_datapath(self, datapath: Path, private: list[Path]) -> None:
        """DATAPATH searchable (not listable) by job users; jobd's own corners private."""
        if self.switches:
            os.chmod(datapath, 0o711)
        for path in private:
            os.chmod(path, 0o700)

    def hand_over(self, files: JobFiles, identity: Identity | None) -> None:
        """Give a prepared job directory to the job's user."""
        if identity is None:
            os.chmod(files.root, 0o700)
            for path in (files.home, files.tmp):
                os.chmod(path, 0o700)
            return
        os.chown(files.root, os.geteuid(), identity.gid)
        os.chmod(files.root, 0o750)
        _chown_tree(files.work, identity)
        for path in (files.home, files.tmp):
            os.chown(path, identity.uid, identity.gid)
            os.chmod(path, 0o700)
        os.chown(files.log, identity.uid, identity.gid)
        os.chmod(files.log, 0o600)

    def take_back(self, files: JobFiles) -> None:
        """After the run: the job's directory is jobd's alone again (a later job may get the
        same uid)."""
        if files.root.exists():
            os.chmod(files.root, 0o700)


def _chown_tree(root: Path, identity: Identity) -> None:
    """chown -R without following links (the tree came out of an archive)."""
    os.chown(root, identity.uid, identity.gid, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), identity.uid, identity.gid,
                     follow_symlinks=False)
