"""What the courier needs from ComfyUI, as plain types. `comfy_adapter` provides it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class Validation:
    ok: bool
    error: dict[str, Any] | None
    outputs: list[str]
    node_errors: dict[str, Any]


@dataclass(frozen=True)
class QueueSnapshot:
    """ComfyUI's queue at one moment, cheap to take: every queued job and every 0.5 s watch
    takes one, so nothing here sorts or scans the whole queue per lookup."""

    running: frozenset[str]  # prompt ids being executed now
    pending: dict[str, float]  # prompt id -> ComfyUI's queue number (lower runs first)

    def position(self, prompt_id: str) -> int | None:
        """0 while running; n = prompts of the whole queue ahead of it; None if absent."""
        if prompt_id in self.running:
            return 0
        number = self.pending.get(prompt_id)
        if number is None:
            return None
        return len(self.running) + sum(1 for other in self.pending.values() if other < number)

    def in_order(self) -> list[str]:
        """Pending prompt ids in the order ComfyUI will run them."""
        return sorted(self.pending, key=self.pending.__getitem__)

    def __contains__(self, prompt_id: object) -> bool:
        return prompt_id in self.running or prompt_id in self.pending


@dataclass(frozen=True)
class Completion:
    """What ComfyUI's worker reports when a prompt leaves execution (task_done)."""

    prompt_id: str
    status_str: str  # "success" or "error"
    messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SavedFile:
    """A file an output node wrote, as listed in its UI output."""

    node_id: str
    index: int
    path: Path


class ComfyPort(Protocol):
    client_id: str

    async def validate(self, prompt_id: str, prompt: dict[str, Any]) -> Validation: ...

    def apply_on_prompt_handlers(self, prompt: dict[str, Any]) -> dict[str, Any]: ...

    def enqueue(
        self, prompt_id: str, prompt: dict[str, Any], extra_data: dict[str, Any], outputs: list[str]
    ) -> None:
        """Queue the prompt, last in line."""

    def queue_length(self) -> int:
        """Prompts running or pending now."""

    def queue_snapshot(self) -> QueueSnapshot: ...

    def remove_pending(self, prompt_id: str) -> bool: ...

    def interrupt(self, prompt_id: str) -> bool: ...

    def on_start(self, callback: Callable[[str], None]) -> None: ...

    def on_progress(self, callback: Callable[[str, float], None]) -> None: ...

    def on_completion(self, callback: Callable[[Completion], None]) -> None: ...

    def notify_client(self, prompt_id: str, event: str, data: dict[str, Any]) -> None: ...

    def worker_alive(self) -> bool | None: ...

    def output_files(self, outputs: dict[str, Any]) -> list[SavedFile]: ...

    def base_url(self) -> str: ...
