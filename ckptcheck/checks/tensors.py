"""What the tensors are: shape and dtype per key, finite values."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import dtypes
from ..bits import stored_elements, view_index, widened
from . import repairs
from .model import Check, Verdict
from .shards import differing_copies

if TYPE_CHECKING:
    from ..engine import Session
    from ..manifest import TensorInfo

# Elements checked per step by the finite scan: bounds the temporary boolean mask, not the tensor.
FINITE_CHUNK = 1 << 24


def _fmt(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _missing(session: Session, key: str) -> Verdict:
    return Verdict.skip(f"{session.spec.display(key)} is missing (see key_present)")


def plan_shape(session: Session) -> list[Check]:
    def make(key: str):
        def evaluate() -> Verdict:
            info = session.by_canonical.get(key)
            if info is None:
                return _missing(session, key)
            want = session.spec.tensors[key].shape
            got = info.shape
            if info.aliased_dims:  # torch.load loads such a view; training would start from repeated values
                dims = list(info.aliased_dims)
                return Verdict.fail(
                    f"{session.spec.display(key)} of shape {_fmt(got)} repeats its stored values along dims {dims} "
                    "(stride 0 or overlapping strides): indices there read elements other indices read, which no "
                    "trained weight does",
                    expected="one stored value per element", obtained=f"stored values repeated along dims {dims}",
                    repair=repairs.from_training(),
                )
            if len(want) == len(got) and all(w is None or w == g for w, g in zip(want, got, strict=True)):
                return Verdict.ok(expected=_fmt(want), obtained=_fmt(got))
            hint = ""
            if len(got) == 2 and len(want) == 2 and (got[1], got[0]) == want:
                hint = " (stored transposed)"
            return Verdict.fail(
                f"{session.spec.display(key)} has shape {_fmt(got)}, the config expects {_fmt(want)}{hint}",
                expected=_fmt(want), obtained=_fmt(got),
                repair="see the config items: the config and the weights describe different models"
                if not hint else "transpose the tensor",
            )

        return evaluate

    return [Check("shape", session.spec.display(k), make(k)) for k in session.spec.tensors]


def plan_dtype(session: Session) -> list[Check]:
    def make(key: str):
        def evaluate() -> Verdict:
            info = session.by_canonical.get(key)
            if info is None:
                return _missing(session, key)
            want, source = session.expected_dtype
            if want is None or info.dtype == want:
                return Verdict.ok(expected=want, obtained=info.dtype)
            loss = dtypes.itemsize(info.dtype) > dtypes.itemsize(want)
            return Verdict.fail(
                f"{session.spec.display(key)} is {info.dtype}; {source} is {want}"
                + (" (casting loses precision)" if loss else ""),
                expected=want, obtained=info.dtype, repair=repairs.cast(session, want),
            )

        return evaluate

    return [Check("dtype", session.spec.display(k), make(k)) for k in session.spec.tensors]


def plan_finite(session: Session) -> list[Check]:
    def make(key: str):
        def evaluate() -> Verdict:
            if session.options.metadata_only:
                return Verdict.skip("values not read (--metadata-only)")
            stored = session.mapping.stored_for(key)
            if stored is None:
                return _missing(session, key)
            info = session.manifest.tensors[stored]
            if info.dtype not in dtypes.FLOATING:
                return Verdict.skip(f"{info.dtype} cannot hold NaN or Inf")
            if differing_copies(session, stored):
                return Verdict.skip(f"{stored} has copies that differ between shards (see replicas)")
            bad = _count_nonfinite(session, stored, info)
            if bad is None:
                return Verdict.ok(expected="finite", obtained="finite")
            nan, inf, first = bad
            return Verdict.fail(
                f"{stored} holds {nan} NaN and {inf} Inf values ({first})",
                expected="all finite", obtained=f"{nan} NaN, {inf} Inf", repair=repairs.from_training(),
            )

        return evaluate

    return [Check("finite", session.spec.display(k), make(k), reads_data=True) for k in session.spec.tensors]


def _count_nonfinite(session: Session, stored: str, info: TensorInfo) -> tuple[int, int, str] | None:
    """Scan one tensor's stored elements in bounded chunks: NaN and Inf counts and where the first is, in the
    tensor as the user indexes it; None when every value is finite."""
    import torch

    view = session.checkpoint.load(stored)
    flat = stored_elements(view)
    pairs = flat.dtype.is_complex  # scanned as (real, imaginary) pairs
    if pairs:
        flat = torch.view_as_real(flat).reshape(-1)
    nan = inf = 0
    first = -1
    for start in range(0, flat.numel(), FINITE_CHUNK):
        part = widened(flat[start:start + FINITE_CHUNK])
        if bool(torch.isfinite(part).all()):
            continue
        nan += int(torch.isnan(part).sum())
        inf += int(torch.isinf(part).sum())
        if first < 0:
            first = start + int((~torch.isfinite(part)).nonzero()[0, 0])
    if first < 0:
        return None
    element = first // 2 if pairs else first
    index = view_index(view, element)
    return nan, inf, f"first at flat index {index}" if index is not None else f"first at stored element {element}"
