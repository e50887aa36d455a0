"""Handing a job's ``files`` folder to the user its container runs as.

A catalog entrypoint may ask for its container to run as a user other than root
(``container.user``, ``"uid"`` or ``"uid:gid"``). The folder mounted at ``/files``
is made by the runner, so that user could neither write its results nor change its
inputs. The runner gives the folder and everything staged in it to that user
(``chown``) rather than opening it to every user of the host (``chmod 777``): the
job's files stay private on the host, and the runner, which runs as root for that,
can still read the results and remove the folder afterwards. A runner that is not
root cannot give files away; it can only run such a job when the job's user is its
own.
"""

from __future__ import annotations

import os
from pathlib import Path

from worker_runner.staging import StagingError


class FolderNotHandedOver(StagingError):
    """The job's folder could not be given to the user its container runs as."""


def parse_user(user: str) -> tuple[int, int | None]:
    """``"uid"`` or ``"uid:gid"`` as numbers (``None``: no group given)."""
    uid, _, gid = user.partition(":")
    try:
        return int(uid), (int(gid) if gid else None)
    except ValueError:
        raise FolderNotHandedOver(f"user {user!r} is not 'uid' or 'uid:gid'") from None


def hand_over(folder: Path, user: str) -> None:
    """Give ``folder`` and everything under it (never following symlinks) to
    ``user``. Without a group, files keep theirs: the user needs only to own them.
    Raises ``FolderNotHandedOver`` when this process may not do that."""
    uid, gid = parse_user(user)
    if uid == os.geteuid() and gid in (None, os.getegid()):
        return
    if os.geteuid() != 0:
        raise FolderNotHandedOver(
            f"the job runs as user {user}, but this runner runs as uid {os.geteuid()} and "
            "cannot give the job's folder to another user: run the runner as root"
        )
    group = -1 if gid is None else gid
    try:
        os.chown(folder, uid, group, follow_symlinks=False)
        for current, dirnames, filenames in os.walk(folder, followlinks=False):
            for name in (*dirnames, *filenames):
                os.chown(Path(current) / name, uid, group, follow_symlinks=False)
    except OSError as exc:
        raise FolderNotHandedOver(f"could not give the job's folder to user {user}: {exc}") from exc
