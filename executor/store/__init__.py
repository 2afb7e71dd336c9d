"""Where jobs, images and callbacks are kept: the `Store` protocol and its backends.

`base.py` is the interface; `sqlite/` the embedded backend (one file, one host);
`postgres/` several hosts on one database. A new backend is one more module implementing
`Store`, chosen by `wiring.build_store`.
"""

from .base import DuplicateAttempt, Fleet, OutboxEvent, Store

__all__ = ["DuplicateAttempt", "Fleet", "OutboxEvent", "Store"]
