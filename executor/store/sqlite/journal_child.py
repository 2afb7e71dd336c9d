"""The journal process's side of the pipe (see process.py), and its wire format.

Run as a script, so it has no relative imports: it imports the journal by the package
name its parent gives it. A frame is a 4-byte little-endian length and a pickle: a call
is `(fn, args, kwargs)`, an answer `(True, result)` or `(False, exception)`.
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import sqlite3
import struct
import sys
import traceback
import types
from collections.abc import Callable
from typing import Any, BinaryIO

HEAD = struct.Struct("<I")  # length of the pickle that follows
PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL  # both ends run the same interpreter
JOURNAL_MODULE = "executor.store.sqlite.journal"  # below the top package


def import_journal(top: str, root: str) -> Any:
    """Import `<top>.executor.store.sqlite.journal` from `root`, the package's folder,
    without running the top package's __init__ (it registers ComfyUI's nodes: not wanted
    here).

    `top` is the parent's name for the package, so pickled functions and jobs resolve to
    the same classes on both sides; ComfyUI names a custom node's package after its folder
    path, dots included, so every dotted part above it is a stand-in module.
    """
    parts = top.split(".")
    for i in range(1, len(parts) + 1):
        module = types.ModuleType(".".join(parts[:i]))
        module.__path__ = [root] if i == len(parts) else []
        sys.modules[module.__name__] = module
    return importlib.import_module(f"{top}.{JOURNAL_MODULE}")


def _read(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    return data if len(data) == size else None


def serve(open_journal: Callable[[], Any], calls: BinaryIO, answers: BinaryIO) -> None:
    """Answer calls until `calls` ends; the journal opens with the first call."""
    journal = None
    while (head := _read(calls, HEAD.size)) is not None:
        body = _read(calls, HEAD.unpack(head)[0])
        if body is None:
            break
        try:
            fn, args, kwargs = pickle.loads(body)
            if journal is None:
                journal = open_journal()
            answer = pickle.dumps((True, fn(journal, *args, **kwargs)), PICKLE_PROTOCOL)
        except Exception as e:
            answer = error_answer(e)
        answers.write(HEAD.pack(len(answer)) + answer)
        answers.flush()
    if journal is not None:
        journal.close()


def error_answer(error: Exception) -> bytes:
    """The error as a caller on a thread would have seen it, if it survives pickling."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    try:
        pickle.loads(pickle.dumps(error, PICKLE_PROTOCOL))
        if hasattr(error, "add_note"):  # Python 3.11+
            error.add_note(f"raised in the journal process:\n{text}")
        return pickle.dumps((False, error), PICKLE_PROTOCOL)
    except Exception:
        failure = sqlite3.OperationalError(f"journal call failed in the journal process:\n{text}")
        return pickle.dumps((False, failure), PICKLE_PROTOCOL)


def main(argv: list[str]) -> None:
    top, root, path = argv[1:4]
    # Ctrl+C in ComfyUI's terminal reaches the whole process group: the journal stays up
    # until ComfyUI has shut down and closed the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    answers = os.fdopen(os.dup(1), "wb")
    calls = os.fdopen(os.dup(0), "rb")
    os.dup2(2, 1)  # a stray print must not corrupt the answers
    journal = import_journal(top, root)
    serve(lambda: journal.Journal(path), calls, answers)


if __name__ == "__main__":
    main(sys.argv)
