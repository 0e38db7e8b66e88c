"""The reader interface every format implements, and helpers they share."""

from __future__ import annotations

import dataclasses
import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from ..errors import CkptError, InputError
from ..files import open_binary as open_binary  # re-exported: roundtrip.storage imports it from here
from ..manifest import MODEL_SECTIONS, OPTIMIZER_SECTIONS, Manifest, TensorInfo, natural_key

if TYPE_CHECKING:
    import torch

# Top-level names that are training state rather than model tensors when a state dict is flat
# (torchtitan saves model keys at the top level beside these).
STATE_SECTIONS = frozenset((
    *OPTIMIZER_SECTIONS, "lr_scheduler", "lr_schedulers", "scheduler", "dataloader", "data_loader",
    "train_state", "trainer_state", "epoch", "global_step", "step", "args", "config", "hyper_parameters",
    "rng_state", "rng_states", "loops", "callbacks", "pytorch-lightning_version",
))


@contextmanager
def reader_errors(path: Any, item: str | None) -> Iterator[None]:
    """The reader boundary: whatever escapes a reader on some input (a ``RuntimeError`` from torch, a
    ``KeyError`` from a table the file did not fill) ends as one ``InputError`` line naming the file and the
    item; the exception's type stays in it, so that a genuine bug remains recognisable."""
    try:
        yield
    except CkptError:
        raise
    except RecursionError:
        raise InputError(path, item, "nests too deeply to read (RecursionError)") from None
    except MemoryError:
        raise InputError(path, item, "reading it needs more memory than its bytes justify (MemoryError)") from None
    except Exception as exc:
        text = (str(exc).strip().splitlines() or [""])[0][:160]
        raise InputError(path, item, f"cannot be read ({type(exc).__name__}: {text})") from exc


_F = TypeVar("_F", bound=Callable[..., Any])
# The reader methods every caller goes through: each is guarded by ``reader_errors`` in every subclass.
_GUARDED = ("load", "read_rows", "load_value", "verify")


def _guarded(method: _F) -> _F:
    @functools.wraps(method)
    def call(self: Checkpoint, key: str, *args: Any, **kwargs: Any) -> Any:
        with reader_errors(getattr(getattr(self, "manifest", None), "path", None), key):
            return method(self, key, *args, **kwargs)

    return call  # type: ignore[return-value]


class Checkpoint(ABC):
    """An opened checkpoint: a manifest now, tensor data on demand, one tensor at a time.  Every
    subclass's ``load``, ``read_rows`` and ``load_value`` run inside ``reader_errors``."""

    manifest: Manifest

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _GUARDED:
            if name in cls.__dict__:
                setattr(cls, name, _guarded(cls.__dict__[name]))

    @abstractmethod
    def load(self, key: str) -> torch.Tensor:
        """The tensor stored under ``key`` (a manifest key, model or extra), read from disk now."""

    def load_value(self, key: str) -> Any:
        """A non-tensor entry (``manifest.extra_entries``): a number, string, list... through the allowlist."""
        raise InputError(self.manifest.path, key, "this format holds no non-tensor values")

    def read_rows(self, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` along dim 0, reading no more than they need where the format allows.

        This is what keeps conversion memory near one chunk instead of one whole tensor; formats
        override it with direct byte-range reads.  ``out`` is a reusable uint8 buffer the result may
        live in (then it is valid until the buffer is reused); formats that cannot use it ignore it.
        This fallback reads the whole tensor.
        """
        return self.load(key)[start:stop]

    def verify(self, key: str) -> None:
        """Check the checksum the format keeps for ``key``'s data (an InputError if it does not match), without
        building the tensor where the reader can, and a no-op for data an earlier read already verified: the
        integrity check then reads no byte that the other checks read.  This fallback reads the tensor."""
        self.load(key)

    def records(self, key: str) -> dict[str, int]:
        """The checksummed records that hold ``key``'s data, named uniquely across the checkpoint, with their
        sizes: what ``verify`` checks, counted once however many tensors view it.  This fallback: one record
        per tensor, of the tensor's size (a DCP chunk set, a safetensors entry)."""
        info = self.manifest.tensors.get(key) or self.manifest.extra_tensors.get(key)
        return {f"{self.manifest.path}:{key}": info.nbytes if info is not None else 0}

    def close(self) -> None:
        """Release open files; a closed checkpoint can still describe itself."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Layout:
    """Where each flattened entry of a checkpoint belongs: the model, or training state beside it."""

    nesting: str | None
    sections: tuple[str, ...]
    model: dict[str, TensorInfo]
    extra: dict[str, TensorInfo]
    others: tuple[str, ...]
    # entry path -> its key in ``model`` or ``extra`` (tensors)
    names: dict[tuple[str, ...], str]

    @property
    def extra_paths(self) -> dict[str, tuple[str, ...]]:
        """Dotted key -> path, for every entry outside the model (tensors and values): an optimizer's
        parameter names contain dots, so only the path says where one ends."""
        others = set(self.others)
        return {key: p for p in self.all_paths if (key := ".".join(p)) in self.extra or key in others}

    all_paths: tuple[tuple[str, ...], ...] = ()


def split_sections(entries: Iterable[tuple[tuple[str, ...], TensorInfo | None]]) -> Layout:
    """Sort flattened (path, tensor-or-None) entries into model tensors and training state.

    A model section (lingua's "model") wins when present; otherwise every top-level name outside the
    known training-state names is a model tensor (torchtitan saves model keys at the top level).
    """
    items = [(path, info) for path, info in entries if path]
    firsts = {path[0] for path, info in items if info is not None and len(path) > 1}
    nesting = next((name for name in MODEL_SECTIONS if name in firsts), None)
    model: dict[str, TensorInfo] = {}
    extra: dict[str, TensorInfo] = {}
    others: list[str] = []
    sections: set[str] = set()
    names: dict[tuple[str, ...], str] = {}
    for path, info in items:
        if nesting is not None:
            in_model = path[0] == nesting and len(path) > 1
            name = ".".join(path[1:]) if in_model else ".".join(path)
        else:
            in_model = path[0] not in STATE_SECTIONS
            name = ".".join(path)
        if not in_model:
            sections.add(path[0])
        if info is None:
            others.append(".".join(path))
            continue
        names[path] = name
        (model if in_model else extra)[name] = _renamed(info, name)
    return Layout(
        nesting=nesting, sections=tuple(sorted(sections)), model=_sorted(model), extra=_sorted(extra), others=tuple(others), names=names,
        all_paths=tuple(path for path, _ in items),
    )


def merged_facts(manifests: Iterable[Manifest]) -> dict[str, str]:
    """Every fact of every file of a multi-file checkpoint, one value per fact: the union of the files' values
    (comma-separated lists, as refused globals and opcodes are, in order of first appearance).

    Generic on purpose: a fact one shard states (a pickle opcode torch.load refuses) bears on the verdict of the
    whole checkpoint, whichever fact it is and however many shards state it."""
    parts: dict[str, dict[str, None]] = {}
    for manifest in manifests:
        for name, value in manifest.facts.items():
            parts.setdefault(name, {}).update(dict.fromkeys(value.split(", ")))
    return {name: ", ".join(values) for name, values in parts.items()}


def _sorted(tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    return {k: tensors[k] for k in sorted(tensors, key=natural_key)}


def _renamed(info: TensorInfo, key: str) -> TensorInfo:
    return info if info.key == key else dataclasses.replace(info, key=key)


def row_span(shape: tuple[int, ...], start: int, stop: int) -> tuple[int, int]:
    """(first element, element count) of rows start:stop of a contiguous tensor of ``shape``."""
    per_row = 1
    for d in shape[1:]:
        per_row *= d
    return start * per_row, (stop - start) * per_row


def row_step(rows: int, row_bytes: int, chunk_bytes: int) -> int:
    """Rows per chunk: as many as fit in ``chunk_bytes``, bounded by bytes, not rows; all of them when a row
    holds no bytes (a [2**62, 0] tensor is one empty chunk, not 2**36 of them)."""
    return max(1, chunk_bytes // row_bytes) if row_bytes else max(1, rows)


def row_chunks(rows: int, nbytes: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """The row ranges of a tensor of ``rows`` rows and ``nbytes`` bytes, about ``chunk_bytes`` each: as many
    ranges as the bytes need, whatever the number of rows."""
    step = row_step(rows, nbytes // rows if rows else 0, chunk_bytes)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def check_rows(path: str, key: str, shape: tuple[int, ...], start: int, stop: int) -> None:
    if not shape or not 0 <= start <= stop <= shape[0]:
        raise InputError(path, key, f"rows {start}:{stop} are outside shape {list(shape)}")


def read_exact(f: BinaryIO, offset: int, nbytes: int, *, path: str, item: str,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``nbytes`` from ``offset`` read straight into a uint8 tensor: ``out``'s memory if it is large
    enough (reused pages fault no fresh memory), else a new one."""
    import torch

    buf = out[:nbytes] if out is not None and out.numel() >= nbytes else torch.empty(nbytes, dtype=torch.uint8)
    if nbytes:
        f.seek(offset)
        view = memoryview(buf.numpy()).cast("B")
        got = 0
        while got < nbytes:
            n = f.readinto(view[got:])
            if not n:
                raise InputError(path, item, f"file ends {nbytes - got} bytes before the tensor's data does")
            got += n
    return buf


def bytes_to_tensor(buf: torch.Tensor, dtype: str, shape: tuple[int, ...], stride: tuple[int, ...] | None = None,
                    *, big_endian: bool = False) -> torch.Tensor:
    """Reinterpret raw bytes as a tensor of ``dtype`` with ``shape`` (and ``stride`` for views)."""
    import torch

    from ..dtypes import itemsize, to_torch

    width = itemsize(dtype) // (2 if to_torch(dtype).is_complex else 1)  # torch swaps each complex part
    if big_endian and width > 1:
        buf = buf.view(-1, width).flip(-1).reshape(-1)
    flat = buf.view(to_torch(dtype)) if buf.numel() else torch.empty(0, dtype=to_torch(dtype))
    if stride is None:
        return flat.view(shape)
    return flat.as_strided(shape, stride, 0)
