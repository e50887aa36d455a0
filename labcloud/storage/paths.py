"""Turn paths that users and workers send into storage keys, or refuse them.

Every path is checked here before any storage call. A user path such as
``"data/run1/a.tif"`` becomes the key ``"<subject>/data/run1/a.tif"``; anything that
could leave the user's root (``..`` segments, absolute paths, backslashes, NUL and
other control characters) is refused with a ``BadRequest`` that says what is wrong.
Web servers percent-decode a URL path once before it reaches us, so each path is
also checked after one and after two further rounds of decoding: an encoded
``%2e%2e`` or ``%00`` is refused rather than trusted to stay encoded downstream.

Empty and ``.`` segments are normalised away (``"data//run1/./a.tif"`` is
``"data/run1/a.tif"``); the name itself is kept as sent, never decoded.
"""

from __future__ import annotations

import re
from typing import NamedTuple
from urllib.parse import unquote

from labcloud.contract import FileArea
from labcloud.errors import BadRequest

# Longest name most file systems accept, and S3's limit on a whole key.
MAX_NAME_BYTES = 255
MAX_KEY_BYTES = 1024
# Local storage writes each file next to its destination under this prefix, then
# renames it; reserving the prefix keeps half-written files unaddressable.
PARTIAL_PREFIX = ".labcloud-partial-"

_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# A subject names one folder: it must not be "." / ".." nor contain a separator.
_SUBJECT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
_AREA_ORDER: tuple[FileArea, ...] = tuple(FileArea)


class UnsafePath(BadRequest):
    """The path is not a safe relative path."""


class UnknownArea(BadRequest):
    """The path does not start with a known area (config, data, artifact, output, log)."""


class UserKeyParts(NamedTuple):
    """A user key taken apart: ``relative`` is the path inside ``area`` ("" for the
    area folder itself)."""

    subject: str
    area: FileArea
    relative: str


def _problem(text: str) -> str | None:
    """What makes ``text`` unsafe as a relative path, or None."""
    if "\x00" in text:
        return "contains a NUL character"
    if _CONTROL_CHARACTERS.search(text):
        return "contains a control character"
    if "\\" in text:
        return "contains a backslash; separate folders with '/'"
    if text.startswith("/"):
        return "is absolute; give a path relative to your root folder"
    if ".." in text.split("/"):
        return "contains a '..' segment"
    return None


def normalise_path(raw: str) -> str:
    """``raw`` as a normalised relative POSIX path ("" when it names nothing).

    Raises ``UnsafePath`` naming the problem."""
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePath(f"path {raw!r} is not valid UTF-8") from None
    once = unquote(raw)
    for form, note in (
        (raw, ""),
        (once, " once percent-decoded"),
        (unquote(once), " twice percent-decoded"),
    ):
        problem = _problem(form)
        if problem is not None:
            raise UnsafePath(f"path {raw!r}{note} {problem}")
    segments = [segment for segment in raw.split("/") if segment not in ("", ".")]
    for segment in segments:
        if len(segment.encode()) > MAX_NAME_BYTES:
            raise UnsafePath(
                f"path {raw!r} has a name longer than {MAX_NAME_BYTES} bytes: {segment[:40]!r}..."
            )
        if segment.startswith(PARTIAL_PREFIX):
            raise UnsafePath(f"names starting with {PARTIAL_PREFIX!r} are reserved")
    return "/".join(segments)


def _checked_length(key: str) -> str:
    if len(key.encode()) > MAX_KEY_BYTES:
        raise UnsafePath(f"path is too long: at most {MAX_KEY_BYTES} bytes in all")
    return key


def check_key(key: str) -> str:
    """Return ``key`` when it is a normalised, non-empty storage key; raise
    ``UnsafePath`` otherwise. Storage implementations call this on every key they
    are given, as a second line of defence."""
    if not key or normalise_path(key) != key:
        raise UnsafePath(f"{key!r} is not a normalised storage key")
    return _checked_length(key)


def user_root_key(subject: str) -> str:
    """The key of a user's root folder (the subject itself, checked to be one safe
    folder name)."""
    if not _SUBJECT.fullmatch(subject):
        raise UnsafePath(
            f"user id {subject!r} cannot name a folder: use letters, digits and '._@+-', "
            "starting with a letter or digit"
        )
    return subject


def _areas_text(areas: tuple[FileArea, ...]) -> str:
    return ", ".join(area.value for area in areas)


def _area(name: str, allowed_areas: frozenset[FileArea] | None) -> FileArea:
    allowed = tuple(area for area in _AREA_ORDER if allowed_areas is None or area in allowed_areas)
    try:
        area = FileArea(name)
    except ValueError:
        raise UnknownArea(
            f"unknown area {name!r}: paths start with one of {_areas_text(allowed)}"
        ) from None
    if area not in allowed:
        raise UnknownArea(f"area {name!r} is not allowed here: use one of {_areas_text(allowed)}")
    return area


def area_key(subject: str, area: FileArea) -> str:
    """The key of one of a user's area folders, e.g. ``"<subject>/data"``."""
    return f"{user_root_key(subject)}/{area.value}"


def user_key(
    subject: str, raw_path: str, *, allowed_areas: frozenset[FileArea] | None = None
) -> str:
    """The storage key of a path relative to a user's root.

    The first segment must be a ``FileArea`` (and one of ``allowed_areas`` when
    given). Raises ``UnsafePath`` or ``UnknownArea`` saying what is wrong."""
    root = user_root_key(subject)
    relative = normalise_path(raw_path)
    if not relative:
        allowed = tuple(a for a in _AREA_ORDER if allowed_areas is None or a in allowed_areas)
        raise UnsafePath(f"the path is empty: it must start with one of {_areas_text(allowed)}")
    first, _, _ = relative.partition("/")
    _area(first, allowed_areas)
    return _checked_length(f"{root}/{relative}")


def child_key(base_key: str, relative: str) -> str:
    """The key of ``relative`` (a name, or a relative path) inside the folder
    ``base_key``."""
    base = check_key(base_key)
    rest = normalise_path(relative)
    if not rest:
        raise UnsafePath(f"name {relative!r} is empty")
    return _checked_length(f"{base}/{rest}")


def split_user_key(key: str) -> UserKeyParts:
    """Take a key made by ``user_key`` apart into subject, area and the path inside
    the area."""
    check_key(key)
    subject, _, rest = key.partition("/")
    if not rest:
        raise UnsafePath(f"{key!r} names a user's root folder, not a path in an area")
    first, _, relative = rest.partition("/")
    return UserKeyParts(user_root_key(subject), _area(first, None), relative)


def user_relative_path(key: str) -> str:
    """The path of a user key relative to the user's root (``"data/run1/a.tif"``)."""
    parts = split_user_key(key)
    return f"{parts.area.value}/{parts.relative}" if parts.relative else parts.area.value
