"""What a benchmark prints and saves: the run's header, tables, MEETS/MISSES verdicts, JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from options import comfy_dir_of
from servers import comfy_version


def machine_facts() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) // 1024} MiB"
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "mem": mem,
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def print_header(title: str, target_desc: str, args: argparse.Namespace) -> dict[str, Any]:
    facts = machine_facts()
    comfy = comfy_dir_of(args)
    print(f"== {title}")
    print(f"   target : {target_desc}")
    print(f"   server : {comfy_version(comfy)}{' [quick]' if args.quick else ''}")
    print(
        f"   machine: nproc={facts['nproc']} cpu={facts['cpu']!r} mem={facts['mem']} "
        f"python={facts['python']} load1={facts['loadavg_at_start']:.2f}"
    )
    facts["server"] = comfy_version(comfy)
    facts["quick"] = bool(args.quick)
    return facts


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[str(c) for c in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = ["   " + line, "   " + "  ".join("-" * w for w in widths)]
    out += ["   " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def verdict(ok: bool) -> str:
    return "MEETS" if ok else "MISSES"


def write_json(args: argparse.Namespace, payload: dict[str, Any]) -> None:
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
