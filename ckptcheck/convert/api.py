"""``convert``: the whole conversion, from the paths a user gives to a verified output in place."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import dtypes
from ..configs import ModelConfig, load_config, to_hf_config, to_lingua_params
from ..errors import InputError
from ..files import check_inside
from ..formats import open_checkpoint
from ..manifest import OPTIMIZER_SECTIONS, Manifest
from ..naming import HF, Scheme
from ..checks.integrity import checksum_of
from .heads import confirm_head_split
from .atomic import Staging, refuse_short_space, refuse_unsafe_destination
from .buffers import refuse_unrecomputable
from .plan import RECOMPUTED, ConversionPlan, build_plan, carry_state, fresh_adamw_state, scheme_named
from .stream import ChunkSource
from .verify import verify_output
from .writers import DcpWriter, SafetensorsWriter, TorchZipWriter

OUTPUT_FORMATS = ("torch", "safetensors", "dcp", "hf")
# Output formats that can hold a model nesting ({"model": {...}}): converting within one keeps the source's.
_NESTING_FORMATS = ("torch", "dcp")
_SUFFIX_FORMAT = {".pth": "torch", ".pt": "torch", ".bin": "torch", ".safetensors": "safetensors"}


@dataclass
class ConversionReport:
    src: str
    dst: str
    to: str
    naming: str
    nesting: str | None
    summary: dict[str, int]
    bytes_written: int
    bytes_verified: int
    seconds: float
    dropped: list[tuple[str, str]]
    config_written: str | None = None
    precision: dict[str, dict[str, float]] = field(default_factory=dict)
    optimizer_initialised: bool = False
    # The output re-checked as written, with the config written beside it (metadata only: the values were
    # verified against the input): {"config": path, "target": suite, "total": n, "failed": [{"id", "message"}],
    # "skipped": [...]}.
    recheck: dict[str, Any] | None = None
    # The checksum the input keeps for its data, verified on every read (None: it keeps none).
    input_checksum: str | None = None

    @property
    def recheck_failed(self) -> bool:
        return bool(self.recheck and self.recheck["failed"])

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def lines(self) -> list[str]:
        s = self.summary
        out = [
            f"wrote {self.dst} ({self.to}, {self.naming} naming"
            + (f", model under {self.nesting!r}" if self.nesting else "") + f") from {self.src}",
            f"  {s['tensors']} tensors" + (f" and {s['state_tensors']} training-state tensors" if s["state_tensors"] else "")
            + f", {self.bytes_written / 1e6:.1f} MB in {self.seconds:.2f} s: "
            f"{s['renamed']} renamed, {s['permuted']} q/k permuted, {s['cast']} cast, {s['dropped']} dropped",
        ]
        if self.bytes_verified:
            out.append(f"  verified: read back and compared with the input ({self.bytes_verified / 1e6:.1f} MB)")
        out.append(f"  input integrity: {self.input_checksum} checked on every read" if self.input_checksum else
                   "  input integrity: not verifiable, the input keeps no checksum (a corrupted byte in it is "
                   f"copied as is): compare it with a reference (ckptcheck diff {self.src} REFERENCE)")
        for key, why in self.dropped:
            out.append(f"  dropped {key}: {why}")
        if self.precision:
            out.append(self._precision_line())
        if self.config_written:
            out.append(f"  config: {self.config_written}")
        if self.recheck is not None:
            failed = self.recheck["failed"]
            skipped = self.recheck["skipped"]
            passed = self.recheck["total"] - len(failed) - len(skipped)
            out.append(f"  re-checked with {self.recheck['config']} (target {self.recheck['target']}): "
                       + tally(passed, self.recheck["total"], [f["id"] for f in skipped]))
            out += [f"  FAIL {f['id']}: {f['message']}" for f in failed]
        if self.optimizer_initialised:
            out.append("  NOTE: optimizer state was INITIALISED, not carried over: AdamW at step 0 with zero moments "
                       "for every parameter. Training that resumes from this restarts its optimizer.")
        return out


    def _precision_line(self) -> str:
        """How many values the cast changed, naming the tensor with the largest error, and apart the tensors
        whose NaN payloads it rewrote (a NaN has no absolute error)."""
        stats = self.precision.values()
        changed, total = sum(v["changed"] for v in stats), sum(v["elements"] for v in stats)
        parts = [f"the cast changed {changed} of {total} values"]
        worst = max(self.precision.items(), key=lambda kv: kv[1]["max_abs_error"])
        if worst[1]["max_abs_error"] > 0:
            parts.append(f"largest absolute error {worst[1]['max_abs_error']:.3g} (in {worst[0]})")
        nans = {k: int(v["nan_payloads_changed"]) for k, v in self.precision.items() if v["nan_payloads_changed"]}
        if nans:
            shown = ", ".join(list(nans)[:3]) + (" ..." if len(nans) > 3 else "")
            parts.append(f"{sum(nans.values())} NaN payload(s) rewritten (in {shown})")
        return "  precision: " + "; ".join(parts)


def tally(passed: int, total: int, skipped: list[str]) -> str:
    """How many checks pass, never counting a check the evidence could not decide as passed."""
    line = f"{passed} of {total} checks pass"
    if skipped:
        line += (f", {len(skipped)} not verifiable ({', '.join(skipped[:4])}{' ...' if len(skipped) > 4 else ''}: "
                 "ckptcheck check -v says why)")
    return line


def infer_output_format(dst: Path, to: str | None, default: str | None = None) -> str:
    """``to``, else the format DST's suffix names, else ``default``.  A suffix that names another format
    is refused: tools that go by the name (safetensors, transformers) could not open the file."""
    named = _SUFFIX_FORMAT.get(dst.suffix)
    if to is not None:
        if to not in OUTPUT_FORMATS:
            raise InputError(None, "--to", f"unknown format {to!r}; use {', '.join(OUTPUT_FORMATS)}")
        if named is not None and named != to:
            raise InputError(dst, None, f"the name says {named} ({dst.suffix}) but the output is {to}: name it "
                             f"for what it holds, or pass --to {named}")
        return to
    fmt = named or default
    if fmt is None:
        raise InputError(dst, None, f"cannot tell the output format from the name; pass --to {'|'.join(OUTPUT_FORMATS)}")
    return fmt


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str | None = None,
    naming: str | None = None,
    config: str | os.PathLike[str] | ModelConfig | None = None,
    dtype: str | None = None,
    force: bool = False,
    progress: bool = False,
    drop: dict[str, str] | None = None,
    verify: bool = True,
    init_optimizer_state: bool = False,
    weights_only: bool = False,
    recheck: bool = True,
    head_dim: int | None = None,
) -> ConversionReport:
    """Convert ``src`` into ``dst``; raises ``InputError`` (nothing written) on any problem.

    ``verify=False`` is for callers that verify the output more thoroughly themselves before anyone
    uses it (the FSDP round trip compares every shard it loads with the source).  ``recheck=False`` is
    for callers that run the full checks on the output themselves (repair).  ``head_dim`` confirms the
    config's head split where a permutation of q/k rows needs it and nothing in the checkpoint does.
    """
    from ..engine import resolve_config_path

    src_p, dst_p = Path(src), Path(dst)
    fmt = infer_output_format(dst_p, to)
    refuse_unsafe_destination(src_p, dst_p, force)
    if isinstance(config, ModelConfig):
        cfg: ModelConfig | None = config
    else:
        config_path = resolve_config_path(src_p, config)
        cfg = load_config(config_path) if config_path else None
    cast = dtypes.canonical(dtype) if dtype else None
    started = time.perf_counter()
    with open_checkpoint(src_p) as source:
        dst_scheme, nesting = _target_layout(fmt, naming, source.manifest)
        aliases = {"torch": "keep", "dcp": "copy"}.get(fmt, "drop")
        plan = build_plan(source.manifest, naming=dst_scheme, dtype=cast, config=cfg, drop=drop, aliases=aliases)
        refuse_unrecomputable(source, [k for k, why in plan.dropped if why == RECOMPUTED], cfg)
        if cfg is not None and any(m.permute for m in plan.moves):
            confirm_head_split(source.manifest, cfg, src_p, head_dim)
        state_files = train_state_files(source.manifest)
        if weights_only:
            left = [*source.manifest.sections, *(f.name for f in state_files)]
            if left:
                plan = dataclasses.replace(plan, dropped=(*plan.dropped, (", ".join(left),
                                                                          "training state (--weights-only)")))
        elif init_optimizer_state:
            if fmt not in ("torch", "dcp"):
                raise InputError(dst_p, None, f"--to {fmt} holds no optimizer state; use --to torch or --to dcp")
            plan = fresh_adamw_state(plan)
            left = [*(x for x in source.manifest.sections if x not in OPTIMIZER_SECTIONS),
                    *(f.name for f in state_files)]
            if left:  # the fresh state replaces all of it: say so
                plan = dataclasses.replace(plan, dropped=(*plan.dropped, (", ".join(left), "training state "
                                                                          "replaced by --init-optimizer-state")))
        else:
            refuse_lost_state(source.manifest, state_files, fmt, dst_p)
            if source.manifest.sections:
                plan = carry_state(plan, source, config=cfg)
        if plan.state and fmt == "torch":
            nesting = nesting or "model"  # the training state goes beside the model: {"model": ..., "optim": ...}
        if fmt == "hf" and cfg is None:
            raise InputError(dst_p, None, "--to hf writes a config.json: pass --model-config")
        refuse_repeated_views(source.manifest, plan)
        refuse_unrepresentable(plan, fmt, source.manifest.path)
        refuse_short_space(dst_p, plan.total_bytes)
        try:
            staging = Staging(dst_p, folder=fmt in ("dcp", "hf"))
        except OSError as exc:
            raise InputError(dst_p, None, f"cannot create the output: {exc.strerror or exc}") from None
        try:
            chunks = ChunkSource(source)
            with _progress_bar(progress, plan.total_bytes, f"converting to {fmt}") as tick:
                _writer(fmt, staging.path, dst_p, nesting).write(plan, chunks, tick)
            written_config = _write_config(fmt, staging.path, dst_p, cfg, plan)
            if fmt == "dcp" and not weights_only and not init_optimizer_state:
                _copy_train_states(state_files, staging.path)
            verified = verify_output(staging.path, plan, chunks, display=str(dst_p)) if verify else 0
            staging.commit()
        except OSError as exc:  # a full disk, a file size limit, a read-only folder: nothing is left behind
            staging.abort()
            raise InputError(dst_p, None, f"cannot write the output: {exc.strerror or exc}") from None
        except BaseException:
            staging.abort()
            raise
    precision = {k: {"max_abs_error": v.max_abs, "changed": v.changed, "elements": v.count,
                     "nan_payloads_changed": v.nan_payloads}
                 for k, v in chunks.cast_stats.items()}
    return ConversionReport(
        recheck=(_recheck(dst_p, written_config, recheck_target(source.manifest, fmt, naming, plan.dst_scheme.name))
                 if recheck and written_config else None),
        src=str(src_p), dst=str(dst_p), to=fmt, naming=plan.dst_scheme.name, nesting=nesting,
        summary=plan.summary(),
        bytes_written=plan.total_bytes, bytes_verified=verified, seconds=time.perf_counter() - started,
        dropped=[list(d) for d in plan.dropped], config_written=written_config, precision=precision,  # type: ignore[misc]
        optimizer_initialised=init_optimizer_state, input_checksum=checksum_of(source.manifest.facts),
    )


def refuse_repeated_views(source: Manifest, plan: ConversionPlan) -> None:
    """Before writing anything: a stored view that repeats its values (stride 0) would be written out whole,
    a 70 KB file growing to terabytes; the user materializes it on purpose by re-saving it cloned."""
    for move in plan.moves:
        info = source.tensors.get(move.src_key)
        if info is not None and info.aliased_dims:
            raise InputError(source.path, move.src_key,
                             f"repeats its stored values along dims {list(info.aliased_dims)} (stride 0 or overlapping "
                             "strides): "
                             f"copying it would write all {info.numel:,} elements; to write them, re-save "
                             "it with tensor.clone() before torch.save")


# Output formats whose files hold torch tensors, which keep int64 strides (torch refuses a shape whose
# contiguous strides overflow: "Stride calculation overflowed"); safetensors keeps shapes only.
TORCH_TENSOR_FORMATS = frozenset(("torch", "dcp"))
MAX_STRIDE = (1 << 63) - 1


def refuse_unrepresentable(plan: ConversionPlan, fmt: str, path: str) -> None:
    """Before writing anything: a tensor torch cannot make ([0, 2**62, 4]: no elements, but its first stride
    is 2**64) is refused for a torch or DCP output, which would be written and then unreadable."""
    if fmt not in TORCH_TENSOR_FORMATS:
        return
    for move in plan.moves:
        stride = 1
        for size in reversed(move.shape[1:]):
            stride *= size
            if stride > MAX_STRIDE:
                raise InputError(path, move.src_key, f"shape {list(move.shape)} needs strides past 64 bits, which "
                                 f"no torch tensor holds: write it to safetensors (--to safetensors), not {fmt}")


def _target_layout(fmt: str, naming: str | None, source: Manifest) -> tuple[Scheme | None, str | None]:
    """The output's key scheme (None: keep the source's) and model nesting.

    A torch file into a torch file, or DCP into DCP, keeps the source's nesting (a torchtitan step folder
    stays flat, a lingua one nested) unless ``--naming`` asks for another layout.  Otherwise ``--to dcp``
    writes lingua's layout (model keys under "model") unless torchtitan naming is asked for; ``--naming
    lingua`` nests a torch file the same way, like lingua's consolidated.pth.
    """
    scheme = scheme_named(naming) if naming else (HF if fmt == "hf" else None)
    if fmt == "hf" and scheme is not HF:
        raise InputError(None, "--naming", "--to hf writes Hugging Face names; drop --naming or pass --naming hf")
    if naming is None and fmt in _NESTING_FORMATS and source.format == fmt:
        nesting = source.nesting
    elif fmt == "dcp":
        nesting = None if naming in ("titan", "hf") else "model"
    elif fmt == "torch":
        nesting = "model" if naming == "lingua" else None
    else:
        nesting = None
    if fmt == "safetensors" and naming == "lingua":
        raise InputError(None, "--naming", "safetensors cannot nest keys under 'model'; use --naming meta")
    return scheme, nesting


def _writer(fmt: str, staged: Path, dst: Path, nesting: str | None):
    if fmt == "torch":
        return TorchZipWriter(staged, nesting=nesting, archive_name=dst.name)
    if fmt == "safetensors":
        return SafetensorsWriter(staged)
    if fmt == "dcp":
        return DcpWriter(staged, nesting=nesting)
    return SafetensorsWriter(staged, sharded_in=staged)


def _write_config(fmt: str, staged: Path, dst: Path, cfg: ModelConfig | None, plan: ConversionPlan) -> str | None:
    """The config beside the weights, describing them as written: in the schema of their naming (a
    config.json for Hugging Face names, else a lingua params.json), their dtype, and the embedding's rows
    where the input config left the vocabulary to the tokenizer."""
    if cfg is None or fmt not in ("dcp", "hf"):
        return None
    vocab = next((m.shape[0] for m in plan.moves if m.canonical == "tok_embeddings.weight" and m.shape), None)
    if plan.dst_scheme is HF:
        data = to_hf_config(cfg, written_dtype(plan), vocab)
        (staged / "config.json").write_text(json.dumps(data, indent=2) + "\n")
        load_config(staged / "config.json")  # what was written must read back as a valid config
        return str(dst / "config.json")
    (staged / "params.json").write_text(json.dumps(to_lingua_params(cfg, vocab), indent=2) + "\n")
    return str(dst / "params.json")


def recheck_target(source: Manifest, fmt: str, naming: str | None, written_naming: str) -> str:
    """The target the re-check judges the output by.  Where the output keeps the source's layout (the same
    format, no --naming), it is the framework whose layout the source has (a torchtitan step folder: the
    torchtitan target), so a layout the conversion changed fails; else the generic ``init`` target.  Targets
    that resume training are left to ``check``: the re-check reads the weights' metadata only."""
    from ..suite import available, load_suite

    if naming is not None or fmt != source.format:
        return "init"
    for name in available():
        suite = load_suite(name)
        if (suite.formats and source.format in suite.formats and suite.nesting == source.nesting
                and suite.naming in (None, written_naming) and "resume" not in suite.categories):
            return name
    return "init"


def _recheck(dst: Path, config: str, target: str) -> dict[str, Any]:
    """The checks on the output as written, with the config written beside it."""
    from ..engine import Options, plan, run

    the_plan = plan(dst, config, Options(target=target, metadata_only=True))
    try:
        results = run(the_plan)
    finally:
        the_plan.close()
    failed = [{"id": r.id, "message": r.message} for r in results if r.status.value in ("fail", "unsafe")]
    skipped = [{"id": r.id, "message": r.message} for r in results if r.status.value == "skip"]
    return {"config": config, "target": target, "total": len(results), "failed": failed, "skipped": skipped}


def written_dtype(plan: ConversionPlan) -> str:
    """The floating dtype holding most of the model's bytes as written (transformers' torch_dtype)."""
    from collections import Counter

    counts: Counter[str] = Counter()
    for m in plan.moves:
        if m.dst_dtype in dtypes.FLOATING:
            counts[m.dst_dtype] += m.nbytes
    return max(sorted(counts), key=lambda d: counts[d]) if counts else "float32"


def train_state_files(manifest: Manifest) -> list[Path]:
    """lingua keeps each data-parallel rank's train state (step, scheduler, data loader) in
    train_state_<rank>.json beside the DCP files: it travels with the training state."""
    from ..training_state import TRAIN_STATE_RE

    folder = Path(manifest.path)
    if manifest.format != "dcp" or not folder.is_dir():
        return []
    found = [f for f in sorted(folder.iterdir()) if TRAIN_STATE_RE.match(f.name) and f.is_file()]
    for f in found:  # copied into the output: a link out of the folder would carry a stranger's file
        check_inside(f, folder)
    return found


def refuse_lost_state(manifest: Manifest, state_files: list[Path], fmt: str, dst: Path) -> None:
    """Training state goes where the output can hold it (sections: torch and DCP; lingua's per-rank
    files: beside DCP files) or nowhere without --weights-only: a conversion never drops it silently."""
    lost = [] if fmt in ("torch", "dcp") else list(manifest.sections)
    lost += [] if fmt == "dcp" else [f.name for f in state_files]
    if lost:
        raise InputError(dst, None, f"--to {fmt} cannot hold the training state {', '.join(lost)}: use "
                         + ("--to dcp" if state_files else "--to torch or --to dcp")
                         + ", or --weights-only to leave it behind")


def _copy_train_states(state_files: list[Path], staged: Path) -> None:
    import shutil

    for f in state_files:
        shutil.copyfile(f, staged / f.name)


class _progress_bar:  # noqa: N801 - used as a context manager
    """A tqdm byte counter on a terminal; nothing otherwise."""

    def __init__(self, enabled: bool, total: int, desc: str) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, leave=False)

    def __enter__(self):
        return self.bar.update if self.bar is not None else (lambda n: None)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

