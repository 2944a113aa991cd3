"""The scheduler's counters and their Prometheus text exposition (format 0.0.4).

Written by the scheduler thread only; read by /metrics (a torn read of one counter between
two steps is harmless for a scrape)."""

from dataclasses import dataclass, field


@dataclass
class SchedulerMetrics:
    n_slots: int
    requests_received: int = 0
    completed: int = 0
    cancelled: int = 0
    rejected: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    steps: int = 0
    step_tokens: int = 0
    step_seconds: float = 0.0
    waiting: int = 0
    running: int = 0
    http_errors: dict = field(default_factory=dict)  # status -> count, kept by the app

    def record_step(self, seconds: float, n_tokens: int) -> None:
        self.steps += 1
        self.step_tokens += n_tokens
        self.step_seconds += seconds

    def mean_step_seconds(self) -> float:
        return self.step_seconds / self.steps if self.steps else 0.0

    def exposition(self) -> str:
        lines = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP llmtp_{name} {help_text}")
            lines.append(f"# TYPE llmtp_{name} {kind}")
            lines.extend(f"llmtp_{name}{labels} {value}" for labels, value in samples)

        metric("requests_total", "counter", "Requests by outcome.",
               [('{outcome="received"}', self.requests_received), ('{outcome="completed"}', self.completed),
                ('{outcome="cancelled"}', self.cancelled), ('{outcome="rejected"}', self.rejected),
                ('{outcome="failed"}', self.failed)])
        metric("http_errors_total", "counter", "Error responses by status code.",
               [(f'{{code="{code}"}}', count) for code, count in sorted(self.http_errors.items())] or [("", 0)])
        metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", self.prompt_tokens)])
        metric("completion_tokens_total", "counter", "Tokens generated.", [("", self.completion_tokens)])
        metric("steps_total", "counter", "Engine steps run.", [("", self.steps)])
        metric("step_tokens_total", "counter", "Tokens fed through engine steps.", [("", self.step_tokens)])
        metric("step_seconds_total", "counter", "Seconds spent in engine steps.", [("", round(self.step_seconds, 6))])
        metric("queue_waiting", "gauge", "Requests waiting for a slot.", [("", self.waiting)])
        metric("slots_busy", "gauge", "KV-cache slots in use.", [("", self.running)])
        metric("slots", "gauge", "KV-cache slots.", [("", self.n_slots)])
        return "\n".join(lines) + "\n"
