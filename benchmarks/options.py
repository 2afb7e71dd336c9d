"""The command line every benchmark shares, and the temp folder a run keeps only on --keep."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


class BenchParser(argparse.ArgumentParser):
    """The common options, plus sizes whose default differs between --quick and a full run."""

    def __init__(self, doc: str) -> None:
        super().__init__(description=doc.split("\n\n")[0])
        self._sizes: dict[str, tuple[float, float]] = {}
        self.add_argument(
            "--quick",
            action="store_true",
            help="CI-sized run (fewer samples); still prints every ratio",
        )
        self.add_argument(
            "--comfy-dir",
            default=os.environ.get("COMFYUI_DIR"),
            help="real ComfyUI checkout (default: $COMFYUI_DIR); unset = stand-in",
        )
        self.add_argument(
            "--standin", action="store_true", help="use the stand-in even when COMFYUI_DIR is set"
        )
        self.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
        self.add_argument("--keep", action="store_true", help="keep the temp folder (logs)")

    def add_size(self, flag: str, quick: float, full: float, help: str | None = None) -> None:
        """An option of `full`'s type whose default is `quick` with --quick, else `full`
        (0 counts as unset)."""
        sizes = f"default {full}, {quick} with --quick"
        text = f"{help}; {sizes}" if help else sizes
        action = self.add_argument(flag, type=type(full), help=text)
        self._sizes[action.dest] = (quick, full)

    def parse(self) -> argparse.Namespace:
        """parse_args(), with every size left unset given its --quick or full default."""
        args = self.parse_args()
        for dest, (quick, full) in self._sizes.items():
            if not getattr(args, dest):
                setattr(args, dest, quick if args.quick else full)
        return args


def comfy_dir_of(args: argparse.Namespace) -> Path | None:
    return None if args.standin or not args.comfy_dir else Path(args.comfy_dir)


class TempDir:
    """A temp folder removed at exit unless --keep."""

    def __init__(self, keep: bool, prefix: str) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        self.keep = keep

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: Any) -> None:
        if self.keep:
            print(f"   (kept {self.path})")
        else:
            shutil.rmtree(self.path, ignore_errors=True)
