"""Worker processes shared by all passes of a run, and the progress messages they send."""

from __future__ import annotations

import multiprocessing as mp
import queue
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

import pyarrow as pa

PROGRESS = None  # per worker process: queue of (bytes_in, rows_in) for the parent's progress bar


def _init_worker(progress_queue) -> None:
    global PROGRESS
    PROGRESS = progress_queue
    pa.set_cpu_count(1)  # parallelism comes from worker processes; no nested thread pools
    pa.set_io_thread_count(1)

class Workers:
    """Worker processes, spawned once per run and shared by all passes; in-process when n <= 1
    (simplest to debug, and what most tests use)."""

    def __init__(self, n: int):
        self.pool = None
        if n > 1:
            ctx = mp.get_context("spawn")  # fork after pyarrow started its threads can deadlock
            self.queue = ctx.Queue()
            self.pool = ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker, initargs=(self.queue,))
        else:
            self.queue = queue.SimpleQueue()

    def map(self, fn, calls: list[tuple], on_progress=None) -> list:
        """fn(*args) for each args, results in order; progress messages go to on_progress."""

        def drain():
            while True:
                try:
                    msg = self.queue.get_nowait()
                except queue.Empty:
                    return
                if on_progress is not None:
                    on_progress(msg)

        if self.pool is None:
            global PROGRESS
            saved, PROGRESS = PROGRESS, self.queue
            try:
                results = []
                for args in calls:
                    results.append(fn(*args))
                    drain()
                return results
            finally:
                PROGRESS = saved
        futures = [self.pool.submit(fn, *args) for args in calls]
        pending = set(futures)
        try:
            while pending:
                finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                drain()
                for f in finished:
                    f.result()  # a worker's error surfaces here, with its own message
        except BaseException:
            for f in pending:
                f.cancel()
            raise
        drain()
        return [f.result() for f in futures]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

