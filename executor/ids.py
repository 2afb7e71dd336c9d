"""Time-ordered UUIDs (version 7, RFC 9562) for the journal's prompt and event ids.

Random (version 4) ids land on a random page of their index: with a large journal each
insert reads and rewrites a cold page. Version 7 ids start with the time in milliseconds,
so new rows share the index's last pages. They are still ordinary UUID strings to
ComfyUI and to callback receivers. (Python's uuid module has uuid7 only from 3.14.)
"""

from __future__ import annotations

import os
import time
import uuid


def uuid7() -> uuid.UUID:
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")  # 80 bits: 12 for rand_a, 62 for rand_b
    rand_a = rand >> 68
    rand_b = rand & ((1 << 62) - 1)
    value = (millis & ((1 << 48) - 1)) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    return uuid.UUID(int=value)
