"""Each benchmark pipeline in a process of its own (its peak memory is its own, a native crash is named), timed one
run at a time on request, so that pipelines can take turns run by run."""

import resource
import signal
import statistics
import sys
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from multiprocessing.connection import Connection
from typing import Any

Run = Callable[[int], dict[str, float]]  # new tokens -> the run's figures
Setup = Callable[..., tuple[Run, dict[str, Any]]]  # loads a pipeline: its run and what it reports about itself


def in_fresh_process(function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` in a spawned process: the memory it takes (fp16 weights of a 3B model) goes with it."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


class Worker:
    """A pipeline loaded in a process of its own, timed one run at a time on request."""

    def __init__(self, setup: Setup, *args: Any):
        context = get_context("spawn")
        self._connection, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, setup, args), daemon=True)
        self._process.start()
        child.close()
        self.info: dict[str, Any] = self._receive()
        self.warm = False

    def run(self, new_tokens: int) -> dict[str, float]:
        self._connection.send(new_tokens)
        self.warm = True
        return self._receive()

    def finish(self) -> dict[str, float]:
        """Stop the process; its peak memory."""
        self._connection.send(None)
        memory = self._receive()
        self._process.join()
        return memory

    def _receive(self) -> Any:
        try:
            status, value = self._connection.recv()
        except EOFError:
            self._process.join()
            code = self._process.exitcode
            how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
            raise RuntimeError(f"a benchmark pipeline's process died ({how}) before it answered") from None
        if status == "error":
            raise RuntimeError(f"a benchmark pipeline failed in its process:\n{value}")
        return value

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join()


def _serve(connection: Connection, setup: Setup, args: tuple[Any, ...]) -> None:
    """A worker process: load the pipeline, then answer each requested token count with one timed run."""
    try:
        run, info = setup(*args)
        connection.send(("ok", info))
        while (new_tokens := connection.recv()) is not None:
            connection.send(("ok", run(new_tokens)))
        connection.send(("ok", _peak_memory()))
    except Exception:
        connection.send(("error", traceback.format_exc()))


def alternate(workers: dict[str, Worker], new_tokens: int, repeats: int) -> dict[str, dict[str, Any]]:
    """A short warm-up run each, then `repeats` rounds in which every pipeline runs once; medians per pipeline."""
    for worker in workers.values():
        if not worker.warm:
            worker.run(min(4, new_tokens))
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in workers}
    for _ in range(repeats):
        for name, worker in workers.items():
            runs[name].append(worker.run(new_tokens))
    return {
        name: worker.info | {key: statistics.median(run[key] for run in runs[name]) for key in runs[name][0]} | worker.finish()
        for name, worker in workers.items()
    }


def _peak_memory() -> dict[str, float]:
    """The process's peak RSS, and its peak CUDA memory when the pipeline used torch on a GPU (torch is not imported
    here for pipelines that never imported it: importing it would add to their memory)."""
    memory = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        memory["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return memory
