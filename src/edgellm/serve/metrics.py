"""Server metrics in Prometheus' text format (GET /metrics), kept by hand: a few counters, gauges, histograms."""

from __future__ import annotations

import bisect
import threading

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)            # seconds
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1)       # seconds


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip([*map(str, self.buckets), "+Inf"], self.counts, strict=True):
            total += n
            out.append(f'{name}_bucket{{le="{bound}"}} {total}')
        return [*out, f"{name}_sum {self.sum:.6f}", f"{name}_count {total}"]


class Metrics:
    """Updated by the engine thread and the HTTP handlers; read by /metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters = {"requests_total": 0, "prompt_tokens_total": 0, "prompt_tokens_cached_total": 0,
                         "generated_tokens_total": 0, "requests_rejected_total": 0,
                         "draft_tokens_total": 0, "draft_tokens_accepted_total": 0}
        self.finished: dict[str, int] = {}
        self.gauges = {"requests_running": 0, "requests_waiting": 0, "kv_slots_used": 0, "kv_slots_total": 0}
        self.ttft = Histogram(TTFT_BUCKETS)
        self.per_token = Histogram(TOKEN_BUCKETS)

    def request(self) -> None:
        with self._lock:
            self.counters["requests_total"] += 1

    def rejected(self) -> None:
        with self._lock:
            self.counters["requests_rejected_total"] += 1

    def prompt_tokens(self, n: int, cached: int) -> None:
        with self._lock:
            self.counters["prompt_tokens_total"] += n
            self.counters["prompt_tokens_cached_total"] += cached

    def generated(self, n: int) -> None:
        with self._lock:
            self.counters["generated_tokens_total"] += n

    def drafted(self, n: int, accepted: int) -> None:
        """Speculation: n tokens drafted for one sequence in one step, `accepted` of them kept."""
        with self._lock:
            self.counters["draft_tokens_total"] += n
            self.counters["draft_tokens_accepted_total"] += accepted

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def token_latency(self, seconds: float) -> None:
        with self._lock:
            self.per_token.observe(seconds)

    def request_done(self, reason: str) -> None:
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def set_gauges(self, running: int, waiting: int, kv_used: int, kv_total: int) -> None:
        self.gauges.update(requests_running=running, requests_waiting=waiting, kv_slots_used=kv_used,
                           kv_slots_total=kv_total)

    def render(self) -> str:
        with self._lock:
            lines = []
            for name, value in self.counters.items():
                lines += [f"# TYPE edgellm_{name} counter", f"edgellm_{name} {value}"]
            lines.append("# TYPE edgellm_requests_finished_total counter")
            lines += [f'edgellm_requests_finished_total{{reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
            for name, value in self.gauges.items():
                lines += [f"# TYPE edgellm_{name} gauge", f"edgellm_{name} {value}"]
            lines += ["# TYPE edgellm_time_to_first_token_seconds histogram",
                      *self.ttft.lines("edgellm_time_to_first_token_seconds"),
                      "# TYPE edgellm_time_per_output_token_seconds histogram",
                      *self.per_token.lines("edgellm_time_per_output_token_seconds")]
        return "\n".join(lines) + "\n"
