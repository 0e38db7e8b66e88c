"""The records that flow out of the engine: planned checks and their results."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

from ..errors import UnsafeInputError


class Status(str, Enum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"
    UNSAFE = "unsafe"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a check concluded; the planner adds the identity to make a ``CheckResult``."""

    status: Status
    message: str = ""
    expected: str | None = None
    obtained: str | None = None
    repair: str | None = None
    # structured extras for reports (the round trip's timings and memory), JSON-serialisable
    details: dict[str, Any] | None = None

    @classmethod
    def ok(cls, message: str = "", *, expected: Any = None, obtained: Any = None,
           details: dict[str, Any] | None = None) -> Verdict:
        return cls(Status.PASS, message, _text(expected), _text(obtained), details=details)

    @classmethod
    def fail(cls, message: str, *, expected: Any = None, obtained: Any = None, repair: str | None = None,
             details: dict[str, Any] | None = None) -> Verdict:
        return cls(Status.FAIL, message, _text(expected), _text(obtained), repair, details)

    @classmethod
    def skip(cls, message: str) -> Verdict:
        return cls(Status.SKIP, message)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, tuple):
        return "[" + ", ".join("?" if v is None else str(v) for v in value) + "]"
    return str(value)


@dataclass(frozen=True, slots=True)
class CheckResult:
    id: str
    category: str
    key: str
    status: Status
    expected: str | None
    obtained: str | None
    message: str
    why: str
    repair: str | None
    details: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        if self.details is None:
            del data["details"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CheckResult:
        return cls(**{**data, "status": Status(data["status"]), "details": data.get("details")})


@dataclass(frozen=True, slots=True)
class Check:
    """One planned check.  Planning is cheap and deterministic; ``run`` does the work (maybe reading data)."""

    category: str
    key: str
    evaluate: Callable[..., Verdict]
    reads_data: bool = False
    # What ``evaluate`` is called with: a per-key check passes its key here, not in a closure (a checkpoint
    # may hold 100,000 keys, and a closure per key cost three times the memory).
    args: tuple[Any, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.category}[{self.key}]"

    def run(self) -> CheckResult:
        """Evaluate; unsafe input met while reading data becomes an ``unsafe`` result, other input
        errors propagate (the CLI exits 2, the pytest item fails with the one line)."""
        try:
            verdict = self.evaluate(*self.args)
        except UnsafeInputError as exc:
            verdict = Verdict(Status.UNSAFE, exc.line(), obtained=exc.culprit,
                              repair="do not load this file; obtain the checkpoint from a trusted source")
        return CheckResult(
            id=self.id, category=self.category, key=self.key, status=verdict.status,
            expected=verdict.expected, obtained=verdict.obtained, message=verdict.message,
            why=WHY.get(self.category, ""), repair=verdict.repair, details=verdict.details,
        )


# Why each category matters, said once and shown with every failure of it.
WHY: dict[str, str] = {
    "safety": "a pickle that names code outside the allowlist runs that code the moment torch.load opens it; a "
              "path that leads outside the checkpoint folder makes the loader read files the checkpoint does not own",
    "version": "the torch that loads the checkpoint must be able to read its serialization and layout, "
    "the way training reads it (memory-mapped, lazily, or through DCP)",
    "naming": "loaders match tensors by name: under another naming a strict load fails and a lenient one "
    "leaves every weight at its initial value",
    "layout": "each framework loads one format and one nesting: lingua a DCP folder with the model under "
    "'model', transformers safetensors, Meta's code consolidated.pth files",
    "config": "the config builds the model: where it disagrees with the weights, the weights cannot load",
    "key_present": "a missing tensor fails a strict load, or stays randomly initialised in a lenient one",
    "unexpected_key": "a strict load_state_dict fails on extra keys; a lenient one drops them, which hides a "
    "checkpoint of another model",
    "shape": "a shape mismatch fails the load, and only after the job has started on the cluster",
    "dtype": "a tensor of another dtype is cast on load: silent precision loss, or twice the memory",
    "finite": "one NaN or Inf weight spreads to every activation: the loss is NaN from the first step",
    "replicas": "Meta's model-parallel files each hold a copy of every tensor they do not split, and each rank "
    "loads its own: copies that differ are different models, and a merge into one file would keep one silently",
    "integrity": "a flipped bit in stored data loads silently (torch checks no CRC on load) and trains from a "
    "corrupted weight: only a checksum, or a comparison with a reference, can tell",
    "resume": "resuming without optimizer state restarts AdamW's moments from zero: a loss spike and a "
    "different run",
    "optimizer_state": "each parameter resumes with its own AdamW moments; a missing or misshapen one "
    "fails the load or restarts that parameter's moments from zero, and a NaN in one makes its updates NaN",
    "optimizer_groups": "a parameter in no param group is never updated; one in two is updated twice; a NaN or "
    "negative lr, eps <= 0 or betas outside [0, 1) turn every update into NaN or divergence",
    "optimizer_step": "AdamW's bias correction uses the step: parameters at different steps resume "
    "inconsistently, and a step that disagrees with the train state means mixed-up files",
    "train_state": "without the scheduler the learning rate restarts its warm-up; without the data loader "
    "the run sees the same data again",
    "fsdp_roundtrip": "training loads the checkpoint sharded across ranks; a conversion or resharding error "
    "there surfaces as a silently different model, or a tied weight that is no longer tied",
}

# The order categories are planned and reported in.
CATEGORIES = tuple(WHY)
