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
    takes one, so nothing here sorts the whole queue.

    `running` and `pending` hold only the items the courier put (known by identity, not
    by prompt_id: anyone can queue a prompt under a courier job's id through /prompt);
    `busy` and `numbers` count every prompt, for queue positions.
    """

    running: frozenset[str]  # prompt ids of the courier's items being executed now
    pending: dict[str, float]  # the courier's waiting items: prompt id -> queue number
    busy: int = 0  # prompts being executed now, anyone's
    numbers: tuple[float, ...] = ()  # queue numbers of every waiting prompt (lower runs first)

    def position(self, prompt_id: str) -> int | None:
        """0 while running; n = prompts of the whole queue ahead of it; None if absent."""
        if prompt_id in self.running:
            return 0
        number = self.pending.get(prompt_id)
        if number is None:
            return None
        return self.busy + sum(1 for other in self.numbers if other < number)

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
class Executing:
    """The node running on ComfyUI's worker thread now."""

    prompt_id: str
    node_id: str
    courier_item: bool  # the prompt is an item the courier put, not one under its id


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

    def remove_pending(self, prompt_id: str) -> bool:
        """Take the courier's own waiting item off the queue, never another's."""

    def interrupt(self, prompt_id: str) -> bool:
        """Interrupt the courier's item if it is the one running."""

    # The hooks fire on ComfyUI's worker thread for the courier's own items only: an item
    # someone queued through /prompt under a courier job's prompt_id is not one of them.
    def on_start(self, callback: Callable[[str], None]) -> None: ...

    def on_progress(self, callback: Callable[[str, float], None]) -> None: ...

    def on_completion(self, callback: Callable[[Completion], None]) -> None: ...

    def notify_client(self, prompt_id: str, event: str, data: dict[str, Any]) -> None: ...

    def worker_alive(self) -> bool | None: ...

    def output_files(self, outputs: dict[str, Any]) -> list[SavedFile]: ...

    def relative_paths(self, text: str) -> str:
        """`text` with ComfyUI's own directories as labels (`output/…`): for messages
        that leave the host, which must not name its folders."""

    def base_url(self) -> str: ...
