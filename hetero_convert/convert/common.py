"""What both directions share: the summary a conversion returns, errors collected from writer threads, the
NaN/Inf check, and sizes as users type them."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch

from ..errors import ConversionError


@dataclass
class Summary:
    """What a conversion did. `chunks` counts the pieces written (a Megatron tensor at TP=8 is 8 chunks, a
    HF tensor is one); `tensors` the distinct tensors they belong to."""

    direction: str
    source: str
    output: str
    tensors: int = 0
    chunks: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    layout: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class ErrorSink:
    """Collects errors raised in writer threads (DCP's threads would otherwise drop them silently)."""

    def __init__(self):
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.lock = threading.Lock()

    def error(self, msg: str):
        with self.lock:
            self.errors.append(msg)

    def warn(self, msg: str):
        with self.lock:
            self.warnings.append(msg)

    def raise_if_any(self):
        if self.errors:
            raise ConversionError("\n".join(self.errors[:20]) + (
                f"\n... and {len(self.errors) - 20} more" if len(self.errors) > 20 else ""))


def check_finite(t: torch.Tensor, what: str, sink: ErrorSink, strict: bool) -> None:
    finite = FiniteCount(what, sink, strict)
    finite(t)
    finite.report()


class FiniteCount:
    """The NaN/Inf check of one tensor, seen whole or a block at a time (a chunk streamed through a small
    buffer); `report()` records what it found once: an error under `strict`, else a warning."""

    def __init__(self, what: str, sink: ErrorSink, strict: bool):
        self.what, self.sink, self.strict, self.bad = what, sink, strict, 0

    def __call__(self, t: torch.Tensor) -> None:
        # min and max propagate NaN, and an Inf is itself the min or max, so a finite (min, max) proves every
        # value finite. aminmax reads the tensor once in its own dtype with no temporary, where a float32 sum
        # (converting first) or an elementwise isfinite cost 20-40x more. Only a tensor that fails pays for the
        # exact count.
        if not t.is_floating_point() or t.numel() == 0:
            return
        lo, hi = torch.aminmax(t.reshape(-1))
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            self.bad += int((~torch.isfinite(t)).sum())

    def report(self) -> None:
        if self.bad:
            msg = f"{self.what}: {self.bad} NaN/Inf values"
            (self.sink.error if self.strict else self.sink.warn)(msg + (" (refused: --strict)" if self.strict else ""))


def parse_size(s: str | int) -> int:
    """'5GB' -> 5e9, '300KiB' -> 307200, 1000 -> 1000."""
    if isinstance(s, int):
        return s
    text = s.strip().upper()
    try:
        for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                           ("KB", 10**3), ("B", 1)):
            if text.endswith(unit):
                return int(float(text[: -len(unit)]) * mult)
        return int(text)
    except ValueError:
        raise ConversionError(f"size {s!r}: expected a number with an optional unit (B, KB, MB, GB, KiB, MiB, "
                              f"GiB)") from None
