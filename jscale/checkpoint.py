"""Checkpoints with orbax: the train state (the model's non-gradient state included), the data
iterator's position, and a little JSON metadata.

Orbax writes each step to a temporary directory and renames it only when complete, so a process killed
mid-write (even with SIGKILL) leaves no half checkpoint that could be restored; stale temporaries are
cleaned up when the next run opens the directory. The grain iterator's state is saved beside the train
state, so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Save and restore ``(state, data_iterator, meta)`` under ``directory/<step>/``.

    Args:
      directory: checkpoint root (created if missing).
      keep: how many most recent checkpoints to keep.
      async_save: write in a background thread (the device→host copy happens before ``save``
        returns, so the caller may donate the state right after).
    """

    def __init__(self, directory: str | Path, *, keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or ``None``."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, meta: dict[str, Any]) -> None:
        """Start saving checkpoint ``step`` (asynchronously unless ``async_save=False``)."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, like_state: Any, data_iterator: Any) -> tuple[Any, dict[str, Any]]:
        """Restore checkpoint ``step``: returns ``(state, meta)`` and rewinds ``data_iterator`` in place.

        ``like_state`` gives the tree structure, shapes, dtypes (and shardings) to restore into.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
            meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def restore_state(self, step: int, like_state: Any) -> Any:
        """The train state of checkpoint ``step`` alone (the data iterator is not touched)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        return self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata of checkpoint ``step`` alone (nothing else is restored)."""
        return self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        """Block until pending asynchronous saves are complete."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release resources."""
        self._manager.close()
