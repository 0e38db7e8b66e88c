"""The pickle reader reaches torch.load(weights_only=True)'s verdict on the same bytes: BUILD on a rebuilt
tensor, keys equal once strings, tensors inside lists and tuples, and the basic globals torch allows.
torch itself is the judge: every test runs it on the file too."""

from __future__ import annotations

import collections
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from torch._weights_only_unpickler import _get_allowed_globals

from ckptcheck.checks.model import Status
from ckptcheck.cli import main
from ckptcheck.engine import Options, plan, run
from ckptcheck.formats import open_checkpoint
from ckptcheck.formats.torch_pickle import TORCH_ALLOWLIST
from ckptcheck.safe_pickle import BASIC_GLOBALS, TorchRefuses

from .writers import CONFIGS, FIXTURES

CONFIG = CONFIGS / "meta_params.json"
SD = torch.load(FIXTURES / "good" / "consolidated.pth", weights_only=True)


class _Built:
    """A tensor pickled with a BUILD state after its rebuild, as a hostile writer would."""

    def __init__(self, t: torch.Tensor, state: tuple[Any, ...]) -> None:
        self.t, self.state = t, state

    def __reduce__(self) -> Any:
        ts = torch.storage.TypedStorage(wrap_storage=self.t.untyped_storage(), dtype=self.t.dtype, _internal=True)
        state = tuple(ts if x == "STORAGE" else x for x in self.state)
        return (torch._utils._rebuild_tensor_v2,
                (ts, 0, tuple(self.t.shape), self.t.stride(), False, collections.OrderedDict()), state)


def _save(tmp_path: Path, extra: dict[str, Any]) -> Path:
    path = tmp_path / "consolidated.pth"
    torch.save({**SD, **extra}, path)
    return path


def _check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["check", str(path), "--model-config", str(CONFIG)])
    out = capsys.readouterr()
    return code, out.out + out.err


def _torch_refuses(path: Path) -> str:
    with pytest.raises((pickle.UnpicklingError, RuntimeError, TypeError, AttributeError, KeyError)) as info:
        torch.load(path, weights_only=True)
    return str(info.value)


def test_build_on_tensor_with_negative_offset_is_refused_like_torch(tmp_path: Path, capsys) -> None:
    path = _save(tmp_path, {"norm.weight": _Built(SD["norm.weight"].clone(), ("STORAGE", -3, (32,), (1,)))})
    assert "invalid storage offset" in _torch_refuses(path)
    code, out = _check(path, capsys)
    assert code == 2
    [line] = out.strip().splitlines()
    assert str(path) in line and "data.pkl" in line and "bad storage offset" in line


@pytest.mark.parametrize("state", [("STORAGE", 0, (32,), (1,), "int8"), (5, 0, (32,), (1,))])
def test_build_on_tensor_with_a_state_set_does_not_take_is_refused(tmp_path: Path, capsys, state) -> None:
    path = _save(tmp_path, {"norm.weight": _Built(SD["norm.weight"].clone(), state)})
    _torch_refuses(path)
    code, out = _check(path, capsys)
    assert code == 2 and "tensor.set_ does not take" in out and str(path) in out


def test_build_on_tensor_view_past_its_storage_is_refused(tmp_path: Path, capsys) -> None:
    path = _save(tmp_path, {"norm.weight": _Built(SD["norm.weight"].clone(), ("STORAGE", 0, (33,), (1,)))})
    assert "resize storage" in _torch_refuses(path)
    code, out = _check(path, capsys)
    assert code == 2 and "norm.weight: tensor of shape [33]" in out and "runs past its storage" in out


def test_build_on_tensor_with_empty_state_empties_it_as_torch_does(tmp_path: Path, capsys) -> None:
    path = _save(tmp_path, {"norm.weight": _Built(SD["norm.weight"].clone(), ())})
    assert tuple(torch.load(path, weights_only=True)["norm.weight"].shape) == (0,)
    assert open_checkpoint(path).manifest.tensors["norm.weight"].shape == (0,)
    code, out = _check(path, capsys)
    assert code == 1 and "norm.weight" in out


def test_build_on_a_plain_dict_is_refused_like_torch(tmp_path: Path, capsys) -> None:
    import zipfile
    src = tmp_path / "src.pth"
    torch.save(SD, src)
    path = tmp_path / "consolidated.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("data.pkl"):
                assert data.startswith(b"\x80\x02}")
                data = b"\x80\x02}}b" + data[3:]
            zout.writestr(info.filename, data)
    assert "Can only build" in _torch_refuses(path)
    code, out = _check(path, capsys)
    assert code == 2 and len(out.strip().splitlines()) == 1 and "data.pkl" in out


@pytest.mark.parametrize("keys", [(0, "0"), (1, "1"), (True, "True")])
def test_keys_equal_once_strings_are_refused_as_ambiguous(tmp_path: Path, capsys, keys) -> None:
    a, b = keys
    path = _save(tmp_path, {"extra": {a: torch.ones(2), b: torch.zeros(2)}})
    assert len(torch.load(path, weights_only=True)["extra"]) == 2  # torch keeps both; a flat name cannot
    code, out = _check(path, capsys)
    assert code == 2
    [line] = out.strip().splitlines()
    assert str(path) in line and f"extra.{b}: two keys flatten to this key" in line


def test_tensors_inside_lists_and_tuples_are_entries(tmp_path: Path, capsys) -> None:
    path = _save(tmp_path, {"extra": [(torch.ones(2), torch.full((2,), float("nan")))]})
    loaded = torch.load(path, weights_only=True)["extra"]
    assert torch.isnan(loaded[0][1]).all()
    manifest = open_checkpoint(path).manifest
    names = {*manifest.tensors, *manifest.extra_tensors}
    assert {"extra.0.0", "extra.0.1"} <= names
    code, out = _check(path, capsys)
    assert "TensorRef" not in out


def test_tensors_inside_lists_are_converted_not_dropped(tmp_path: Path, capsys) -> None:
    src = _save(tmp_path, {"extra": [(torch.ones(2), torch.arange(2.0))]})
    dst = tmp_path / "out.pth"
    code = main(["convert", str(src), str(dst), "--model-config", str(CONFIG)])
    out = capsys.readouterr()
    assert "TensorRef" not in out.out + out.err
    if code == 0:  # what convert keeps of it is real tensors, never a record
        extra = torch.load(dst, weights_only=True).get("extra")
        flat = [v for k, v in torch.load(dst, weights_only=True).items() if k.startswith("extra")]
        assert extra is None or all(isinstance(t, torch.Tensor) for t in extra[0])
        assert flat
    else:
        assert code == 2 and len((out.out + out.err).strip().splitlines()) == 1


@pytest.mark.parametrize("value, name", [(frozenset({1}), "frozenset"), (slice(1, 5), "slice")])
def test_globals_torch_refuses_are_reported_refused(tmp_path: Path, capsys, value, name) -> None:
    path = _save(tmp_path, {"extra": value})
    assert f"GLOBAL {name} was not an allowed global" in _torch_refuses(path)
    by_id = {r.id: r for r in run(plan(path, CONFIG, Options()))}
    assert by_id["version[weights_only]"].status is Status.FAIL
    assert f"builtins.{name}" in by_id["version[weights_only]"].obtained
    assert _check(path, capsys)[0] == 1


def test_allowlist_matches_torch_weights_only_globals() -> None:
    """Every global we read without reporting is one torch's weights_only unpickler allows, and every global
    it allows we know (read, or stopped as unsupported): a torch upgrade that changes the list fails here."""
    torch_allows = set(_get_allowed_globals())
    ours = {f"{m}.{n}": entry for (m, n), entry in TORCH_ALLOWLIST.items()}
    reported = {k for k, v in ours.items() if isinstance(v, TorchRefuses)}
    assert sorted(set(ours) - reported - torch_allows) == []
    assert sorted(reported & torch_allows) == []
    assert sorted(torch_allows - set(ours)) == []
    basic = {f"{m}.{n}" for (m, n), v in BASIC_GLOBALS.items() if not isinstance(v, TorchRefuses)}
    assert basic <= torch_allows


class _FromType:
    """A tensor pickled through torch._tensor._rebuild_from_type_v2 with a chosen type and state."""

    def __init__(self, t: torch.Tensor, new_type: Any, state: Any) -> None:
        self.t, self.new_type, self.state = t, new_type, state

    def __reduce__(self) -> Any:
        ts = torch.storage.TypedStorage(wrap_storage=self.t.untyped_storage(), dtype=self.t.dtype, _internal=True)
        args = (ts, 0, tuple(self.t.shape), self.t.stride(), False, collections.OrderedDict())
        return torch._tensor._rebuild_from_type_v2, (torch._utils._rebuild_tensor_v2, self.new_type, args, self.state)


@pytest.mark.parametrize("new_type, state, cause", [
    (torch.Size, {}, "not a tensor class"), (collections.OrderedDict, {}, "not a tensor class"),
    (torch.Tensor, 5, "tensor state is a int"), (torch.Tensor, [1, 2], "tensor state is a list")])
def test_rebuild_from_type_takes_its_type_and_state_as_torch_does(tmp_path: Path, capsys, new_type, state,
                                                                  cause) -> None:
    path = _save(tmp_path, {"norm.weight": _FromType(SD["norm.weight"].clone(), new_type, state)})
    _torch_refuses(path)
    code, out = _check(path, capsys)
    assert code == 2 and cause in out and str(path) in out and len(out.strip().splitlines()) == 1


def test_rebuild_from_type_as_parameter_with_attributes_loads(tmp_path: Path, capsys) -> None:
    weight = torch.nn.Parameter(SD["norm.weight"].clone(), requires_grad=False)
    weight.note = "kept"
    path = _save(tmp_path, {"norm.weight": weight})
    assert torch.load(path, weights_only=True)["norm.weight"].note == "kept"
    code, out = _check(path, capsys)
    assert code == 0, out


@pytest.mark.parametrize("name", ["complex32", "float8_e8m0fnu", "float4_e2m1fn_x2", "bits8", "bits16"])
def test_dtypes_torch_loads_are_read_not_refused(tmp_path: Path, capsys, name: str) -> None:
    dtype = getattr(torch, name)
    weight = torch.zeros(32 * dtype.itemsize, dtype=torch.uint8).view(dtype)
    path = _save(tmp_path, {"norm.weight": weight})
    assert torch.load(path, weights_only=True)["norm.weight"].dtype == dtype
    assert open_checkpoint(path).manifest.tensors["norm.weight"].dtype == name
    code, out = _check(path, capsys)
    assert code == 1 and "internal error" not in out and "does not read" not in out  # a bfloat16 was expected


def test_quantization_scheme_value_is_read_as_torch_reads_it(tmp_path: Path, capsys) -> None:
    path = _save(tmp_path, {"qscheme": torch.per_tensor_affine})
    assert torch.load(path, weights_only=True)["qscheme"] is torch.per_tensor_affine
    assert _check(path, capsys)[0] == 0


def test_non_tensor_blob_past_64_mb_is_read_as_torch_reads_it(tmp_path: Path, capsys) -> None:
    """The bound on data.pkl is the memory contract (the file's own size), not a fixed 64 MB."""
    path = _save(tmp_path, {"sampler_state": b"x" * (70 << 20)})
    assert len(torch.load(path, weights_only=True)["sampler_state"]) == 70 << 20
    code, out = _check(path, capsys)
    assert code == 0, out


def test_a_protocol_head_is_a_pickle_whatever_follows() -> None:
    """One way to tell a pickle member from other bytes (there were two: a list of heads, and parsing)."""
    from ckptcheck.safe_pickle import looks_like_pickle

    assert all(looks_like_pickle(bytes([0x80, n]) + b"\xff\xff") for n in range(2, pickle.HIGHEST_PROTOCOL + 1))
    assert not looks_like_pickle(b"\x80\x07\xff")


@pytest.mark.parametrize("value, cause", [({torch.ones(2): 1}, "a tensor used as a key"),
                                          ({torch.ones(2), torch.zeros(2)}, "a set of tensors")],
                         ids=["tensor_key", "tensor_set"])
def test_tensors_where_no_entry_can_be_named_are_refused(tmp_path: Path, capsys, value, cause) -> None:
    path = _save(tmp_path, {"extra": value})
    assert len(torch.load(path, weights_only=True)["extra"]) == len(value)
    code, out = _check(path, capsys)
    assert code == 2 and cause in out and str(path) in out and "TensorRef" not in out and "StorageRef" not in out



class _Call:
    """Pickles as a call of ``fn`` with ``args`` (a REDUCE), as a crafted file would hold it."""

    def __init__(self, fn: Any, args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.fn, self.args


@pytest.mark.parametrize("args", [(), ("torch.strided_x",), ("torch.strided", 1)])
def test_get_layout_called_as_torch_cannot_is_refused(tmp_path: Path, capsys, args: tuple[Any, ...]) -> None:
    """The fuzzer swapped a tensor's backward-hooks OrderedDict global for torch.serialization._get_layout: torch
    calls it with no argument (TypeError) and refuses the file; ckptcheck's stand-in answered "strided" to any
    call and passed it.  Now only one string naming a torch layout is taken, as torch's own lookup takes it."""
    import torch.serialization

    bad = _save(tmp_path, {"extra": _Call(torch.serialization._get_layout, args)})
    assert _torch_refuses(bad)
    code, out = _check(bad, capsys)
    assert code == 2 and "names no torch layout: torch.load refuses it" in out
    from ckptcheck.formats.torch_pickle import LAYOUTS

    assert {str(v) for v in vars(torch).values() if isinstance(v, torch.layout)} == LAYOUTS
    good = _save(tmp_path, {"extra": _Call(torch.serialization._get_layout, ("torch.strided",))})
    torch.load(good, weights_only=True)
    assert _check(good, capsys)[0] == 0


def test_device_called_without_a_name_is_refused_as_torch_refuses(tmp_path: Path, capsys) -> None:
    """The campaign's last class: torch.device() with no argument (a global swapped into a tensor's backward
    hooks) makes torch.load raise; the stand-in defaulted to "cpu" and passed it."""
    bad = _save(tmp_path, {"extra": _Call(torch.device, ())})
    assert _torch_refuses(bad)
    code, out = _check(bad, capsys)
    assert code == 2 and "_device() missing 1 required positional argument" in out
    good = _save(tmp_path, {"extra": _Call(torch.device, ("cpu",))})
    torch.load(good, weights_only=True)
    assert _check(good, capsys)[0] == 0
