"""The valid checkpoints every mutation starts from: the fixtures' bytes, and a DCP folder written by the
real ``dcp.save`` here so that its ``Metadata`` object is at hand to mutate (never unpickled from a file)."""

from __future__ import annotations

import copy
import io
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata

from ..writers import CONFIGS, FIXTURES


@dataclass(frozen=True)
class Zip:
    """A torch zip as its records, in order: (name, bytes)."""
    records: tuple[tuple[str, bytes], ...]

    @property
    def prefix(self) -> str:
        return self.records[0][0].split("/", 1)[0]

    def get(self, suffix: str) -> bytes:
        return dict(self.records)[f"{self.prefix}/{suffix}"]


def read_zip(data: bytes) -> Zip:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return Zip(tuple((i.filename, z.read(i.filename)) for i in z.infolist()))


def write_zip(records: tuple[tuple[str, bytes], ...] | list[tuple[str, bytes]],
              compression: dict[str, int] | None = None) -> bytes:
    """A zip of ``records`` (stored unless ``compression`` names a method for a record); torch reads it."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are a mutation, not a mistake
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            for name, data in records:
                z.writestr(zipfile.ZipInfo(name), data, compress_type=(compression or {}).get(name, 0))
    return buf.getvalue()


@cache
def fixture(rel: str) -> bytes:
    return (FIXTURES / rel).read_bytes()


@cache
def config(name: str) -> bytes:
    return (CONFIGS / name).read_bytes()


@dataclass(frozen=True)
class DcpBase:
    metadata: Metadata
    distcp: bytes
    extras: tuple[tuple[str, bytes], ...]  # params.json, train_state_00000.json

    def fresh_metadata(self) -> Metadata:
        return copy.deepcopy(self.metadata)


@cache
def dcp_base() -> DcpBase:
    """lingua's fixture step folder, written anew by ``dcp.save`` from the fixture's (trusted) state."""
    state = torch.load(FIXTURES / "good/lingua_consolidated/consolidated.pth", weights_only=True)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metadata = dcp.save(state, checkpoint_id=tmp)
        distcp = (Path(tmp) / "__0_0.distcp").read_bytes()
    extras = tuple((name, fixture(f"good/dcp/{name}")) for name in ("params.json", "train_state_00000.json"))
    return DcpBase(metadata, distcp, extras)


@cache
def meta_shard_variant(which: str) -> bytes:
    """Shard 01 of the Meta fixture changed by ``torch.save``: ``sliced`` (wq loses a row: the shards'
    shapes disagree) or ``duplicate`` (shard 00's wq under a second name nothing splits)."""
    shard = torch.load(FIXTURES / "good/meta_mp/consolidated.01.pth", weights_only=True)
    other = torch.load(FIXTURES / "good/meta_mp/consolidated.00.pth", weights_only=True)
    key = "layers.0.attention.wq.weight"
    if which == "sliced":
        shard[key] = shard[key][1:].clone()
    else:
        shard[key] = other[key].clone()  # both shards now hold shard 00's rows of wq: a duplicate
    buf = io.BytesIO()
    torch.save(shard, buf)
    return buf.getvalue()
