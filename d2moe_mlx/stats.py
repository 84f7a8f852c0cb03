"""Counters of the expert engine: what the caches hit, what was read, where the time went."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StreamStats:
    """Counters since the model was loaded (``snapshot``/``delta`` for one reply).

    ``lookups``/``hits`` count (layer, part, distinct expert) per call, hits being
    ready when the call began."""

    steps: int = 0  # forward passes (first MoE layer calls)
    tokens: int = 0  # tokens through the first MoE layer
    lookups: int = 0
    hits: int = 0
    bytes_read: int = 0
    wait_seconds: float = 0.0  # main thread blocked on loads
    sync_seconds: float = 0.0  # main thread blocked in the per-layer sync (compute so far)
    host_seconds: float = 0.0  # layer calls' time in Python: neither computing nor waiting
    calls: int = 0  # MoE layer calls
    groups: int = 0  # calls split into expert groups (more experts than slots)
    syncs: int = 0  # host syncs (scheduled calls)
    pairs: dict = field(default_factory=dict)  # level -> (token, expert) pairs computed at it
    substituted: int = 0  # pairs whose expert was replaced by a resident one (SMoE)
    predicted: int = 0  # prefetch: next-layer experts predicted
    predicted_right: int = 0  # ... that the next layer did use
    prefetch_loads: int = 0
    per_layer_hits: dict = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def level_mix(self) -> dict[int, float]:
        """Fraction of the computed (token, expert) pairs at each level."""
        total = sum(self.pairs.values())
        return {lv: n / total for lv, n in sorted(self.pairs.items())} if total else {}

    @property
    def substitution_rate(self) -> float:
        total = sum(self.pairs.values())
        return self.substituted / total if total else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        return self.predicted_right / self.predicted if self.predicted else 0.0

    def snapshot(self) -> "StreamStats":
        return StreamStats(**{k: (dict(v) if isinstance(v, dict) else v)
                              for k, v in self.__dict__.items()})

    def delta(self, before: "StreamStats") -> "StreamStats":
        out = self.snapshot()
        for k, v in before.__dict__.items():
            if isinstance(v, dict):
                if k == "pairs":
                    out.pairs = {lv: n - v.get(lv, 0) for lv, n in out.pairs.items()
                                 if n > v.get(lv, 0)}  # levels not run since: absent
            else:
                setattr(out, k, getattr(out, k) - v)
        return out
