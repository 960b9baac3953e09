"""Where the worker's CPU steps run: decoding before inference, building and writing outputs after it.

With ``worker.cpu_processes`` at 0 each step runs in the worker's own thread when it is submitted (one image
after the other, as a CPU-only node wants: inference already uses every core). Above 0 the steps run in that
many spawned processes, so decoding the next batch and writing the last one overlap the inference of this
one and the GPU does not wait for the CPU. Spawned, not forked: the worker holds torch and CUDA state, which
a fork would copy half-initialised. A child that dies (a decoder crashing on a hostile file) takes down only
the steps in flight: :class:`StepPool` starts a fresh pool and the worker retries each of those images alone,
so one image's crash never costs another its result.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

import structlog

from cxr_node.jobs.records import Job
from cxr_node.work.load import Loaded, load
from cxr_node.work.write import OutputWriter

log = structlog.get_logger("cxr_node.worker")

T = TypeVar("T")

__all__ = ["BrokenProcessPool", "StepPool", "auto_processes", "install_writer", "load_step", "write_step"]


def auto_processes(device: str, cores: int | None = None) -> int:
    """The pool size ``auto`` means: on a GPU every core but one (at most 8) feeds it; on the CPU none."""
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return 0 if device == "cpu" else max(1, min(8, cores - 1))


class StepPool:
    """Runs the worker's CPU steps inline (``size`` 0) or in ``size`` spawned processes.

    Parameters
    ----------
    size : int
        Processes; 0 runs every step in the caller's thread at submission.
    initializer, initargs : callable and its arguments
        Run in each child first: logging, its store connection and :func:`install_writer`.
    """

    def __init__(
        self, size: int, initializer: Callable[..., None] | None = None, initargs: tuple[Any, ...] = ()
    ) -> None:
        self.size = size
        self._initializer, self._args = initializer, initargs
        self._pool: ProcessPoolExecutor | None = None
        if size:
            self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        context = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(self.size, mp_context=context, initializer=self._initializer, initargs=self._args)

    @property
    def inline(self) -> bool:
        """Whether steps run in the caller's thread."""
        return self._pool is None

    def submit(self, step: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``step(*args)``: now (inline; its exception is kept in the future) or in a child."""
        if self._pool is not None:
            return self._pool.submit(step, *args)
        future: Future[T] = Future()
        try:
            future.set_result(step(*args))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def warm(self, timeout_s: float = 120.0) -> None:
        """Start every child now (each imports the DICOM stack and opens the store: 1-2 s), not on the first
        batch; a child that cannot start shows here, in the worker's start-up."""
        if self._pool is None:
            return
        for future in [self._pool.submit(_ready) for _ in range(self.size)]:
            future.result(timeout=timeout_s)

    def restart(self) -> None:
        """Replace a broken pool (a child died) with a fresh one; the steps in flight were lost."""
        if self._pool is None:
            return
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._start()
        log.warning("worker.pool_restarted", processes=self.size)

    def close(self) -> None:
        """Finish the steps in flight and stop the children."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


_WRITER: OutputWriter | None = None
"""This child's output writer, installed by the pool's initializer (:func:`install_writer`)."""


def install_writer(writer: OutputWriter) -> None:
    """In a pool child: the writer :func:`write_step` uses (made by the composition root's initializer)."""
    global _WRITER
    _WRITER = writer


def load_step(root: Path, job: Job, max_side: int) -> Loaded:
    """Read and decode one job's image (raises as :func:`~cxr_node.work.load.load` does)."""
    return load(root, job, max_side)


def write_step(loaded: Loaded) -> bool:
    """In a pool child: write one inferred job's outputs with this child's writer; True when written."""
    if _WRITER is None:
        raise RuntimeError("write_step runs in a pool child whose initializer installed a writer")
    return _WRITER.write(loaded)


def _ready() -> bool:
    """A step that does nothing: :meth:`StepPool.warm` runs one per child."""
    return True


def finish_step(job: Job, max_side: int) -> bool:
    """In a pool child: write the outputs of a job left inferred (a crash, a full disk), its image re-decoded."""
    if _WRITER is None:
        raise RuntimeError("finish_step runs in a pool child whose initializer installed a writer")
    return _WRITER.finish(job, max_side)
