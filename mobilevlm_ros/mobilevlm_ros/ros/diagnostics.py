"""What /diagnostics reports: request latency percentiles and error counts, gathered from every answered request."""

import collections
import re
import threading

import numpy as np


class RequestStats:
    """Thread-safe: the worker records, the diagnostics timer reads."""

    def __init__(self, window: int = 200):
        self._lock = threading.Lock()
        self._latencies: collections.deque[float] = collections.deque(maxlen=window)
        self.answered = 0
        self.errors: collections.Counter[str] = collections.Counter()

    def record(self, success: bool, error: str, latency_s: float) -> None:
        with self._lock:
            if success:
                self.answered += 1
                self._latencies.append(latency_s)
            else:
                self.errors[error_kind(error)] += 1

    def summary(self) -> dict[str, str]:
        with self._lock:
            latencies = np.array(self._latencies) if self._latencies else None
            values = {"answered": str(self.answered), "errors": str(sum(self.errors.values()))}
            values |= {f"errors: {kind}": str(count) for kind, count in sorted(self.errors.items())}
        if latencies is not None:
            values["latency p50 (s)"] = f"{np.percentile(latencies, 50):.3f}"
            values["latency p95 (s)"] = f"{np.percentile(latencies, 95):.3f}"
        return values


def error_kind(error: str) -> str:
    """A short class of an error message for counting: its text before the first colon, quote or parenthesis, numbers
    written as N. Messages quote a client's input and sizes; without this, hostile requests would add a kind each."""
    kind = re.split(r"""[:'"(]""", error, maxsplit=1)[0]
    return re.sub(r"\d+", "N", kind).strip() or "unknown"
