"""Local storage: files under ComfyUI's output folder, served by ComfyUI's own `/view`.

An object key (`<content_request_id>/<attempt>-<n>.<ext>`) is not used as a path as it is:
on a case-insensitive file system (Windows, macOS by default) `Job1` and `job1` would be
one folder, and Windows refuses device names (`CON`, `nul`, `COM1`, ...) whatever their
case or extension. Each part of the key becomes a name that is the same on every file
system (`local_name`): lower case, the id still readable, and its capitals kept in a tag.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from urllib.parse import urlencode

from ..errors import StorageError

SUBFOLDER = "courier"

# Device names Windows refuses as a file or folder name, in any case and with any
# extension (`nul.png` too); COM0 and LPT0 since Windows 11.
WINDOWS_RESERVED = frozenset(
    {"con", "prn", "aux", "nul"} | {f"{p}{n}" for p in ("com", "lpt") for n in range(10)}
)
_KEPT = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")
_EXTENSION = re.compile(r"[a-z0-9]+")
_TAG = re.compile(r"r?[0-9a-f]*")  # what follows the `.` of a name whose case was kept


def local_name(part: str) -> str:
    """The file-system name of one part of an object key; distinct parts, distinct names.

    - Lower case letters, digits, `-` and `_` stay as they are, so `first-call-1` (and
      every lower-case id) keeps its name; capitals become lower case, and any other
      character (never in a job id) is written `%xx` per UTF-8 byte.
    - When capitals were lowered, `.` and a hexadecimal mask of their positions follow
      (bit 0 is the first character): `Job1` -> `job1.1`, `MyJob` -> `myjob.5`.
    - A Windows device name gets `_` and the flag `r`: `con` -> `con_.r`, `CON` ->
      `con_.r7`.
    - A file name keeps its extension last (`Node-1.png` -> `node-1.1.png`); an
      extension that could be read as a mask (`r` and hex digits only) is escaped.

    No `~` (so never an 8.3 short name), no trailing dot or space, at most 163 characters
    for a 128-character id (a name may have 255).
    """
    stem, dot, extension = part.rpartition(".")
    if not (dot and stem and _EXTENSION.fullmatch(extension) and not _TAG.fullmatch(extension)):
        stem, extension = part, ""
    mask = 0
    out: list[str] = []
    for i, char in enumerate(stem):
        if "A" <= char <= "Z":
            mask |= 1 << i
            char = char.lower()
        out.append(char if char in _KEPT else "".join(f"%{b:02x}" for b in char.encode()))
    name = "".join(out)
    tag = f"{mask:x}" if mask else ""
    if name in WINDOWS_RESERVED:
        name, tag = name + "_", "r" + tag
    if tag:
        name += "." + tag
    return f"{name}.{extension}" if extension else name


def local_path(key: str) -> PurePosixPath:
    """Where `key` is stored under the courier's folder."""
    relative = PurePosixPath(key)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise StorageError(f"refusing object key outside the output folder: {key!r}", False)
    return PurePosixPath(*(local_name(part) for part in relative.parts))


class LocalStorage:
    kind = "local"

    def __init__(self, output_dir: Path, base_url: Callable[[], str]) -> None:
        self._output = Path(output_dir)
        self._root = self._output / SUBFOLDER
        self._base_url = base_url

    def url_of_file(self, path: Path) -> str | None:
        """The node's own file, served as it is: no second copy under courier/."""
        try:
            relative = PurePosixPath(Path(path).resolve().relative_to(self._output.resolve()))
        except ValueError:
            return None  # not in ComfyUI's output folder
        return self._view_url(relative.name, "/".join(relative.parts[:-1]))

    def _view_url(self, filename: str, subfolder: str) -> str:
        query = urlencode({"filename": filename, "subfolder": subfolder, "type": "output"})
        return f"{self._base_url()}/view?{query}"

    async def put(self, key: str, data: bytes, content_type: str) -> str:
        relative = local_path(key)
        target = self._root.joinpath(*relative.parts)
        try:
            await asyncio.to_thread(_write_atomically, target, data)
        except OSError as e:
            raise StorageError(f"could not write {target.name}: {e.strerror or e}", True) from e
        return self._view_url(relative.name, "/".join((SUBFOLDER, *relative.parts[:-1])))


def _write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
