"""Benchmark tasks. A task = one YAML in ``conf/task/`` whose ``impl`` names a :class:`Task`
subclass as ``"module:attr"``; the module is imported only when the task is chosen."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from decodebench.config import ConfigValueError, TaskConfig
from decodebench.registry import import_entry
from decodebench.tasks.base import Sample, Task

__all__ = ["Sample", "Task", "build_task"]


def build_task(cfg: TaskConfig, data_dir: str | Path | None, cache_dir: str | Path) -> Task:
    """Instantiate the task class named by ``cfg.impl``."""
    try:
        task_class = import_entry(cfg.impl)
    except (ImportError, AttributeError) as error:
        raise ConfigValueError(f"task.impl '{cfg.impl}' cannot be imported: {error}") from error
    if not (isinstance(task_class, type) and issubclass(task_class, Task)):
        raise ConfigValueError(f"task.impl '{cfg.impl}' is not a Task subclass")
    return task_class(cfg, data_dir, cache_dir)
