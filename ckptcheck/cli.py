"""``ckptcheck``: the engine from a shell.  Exit 0 all pass, 1 a check failed or found unsafe input,
2 usage error or unreadable input (one line on stderr), 3 an internal error (a bug: rerun with --debug)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from . import __version__
from .errors import CkptError, InputError, UnsafeInputError
from .convert.api import OUTPUT_FORMATS
from .options import CHECK_OPTIONS, DTYPE, MODEL_CONFIG, MODEL_FACTORY, TARGET, add_options, engine_options
from .streams import guarded_streams

EXIT_OK, EXIT_FAIL, EXIT_INPUT, EXIT_BUG = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own exit status is 2 as well; keep one line
        self.exit(EXIT_INPUT, f"ckptcheck: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ckptcheck", description="Prove a checkpoint is the one a training run expects.")
    parser.add_argument("--version", action="version", version=f"ckptcheck {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    check = sub.add_parser("check", help="run every check of a checkpoint against a model config")
    add_options(check.add_argument, pytest=False, options=CHECK_OPTIONS)
    check.add_argument("--format", choices=("text", "json"), default="text", help="output format (default text)")
    check.add_argument("-v", "--verbose", action="store_true", help="list passing and skipped checks too")
    check.add_argument("--matrix", action="store_true",
                       help="also check against every framework target (lingua, torchtitan, transformers, Meta)")
    check.add_argument("--debug", action="store_true", help="show tracebacks")
    check.set_defaults(func=cmd_check)

    conv = sub.add_parser("convert", help="convert a checkpoint to another format or naming, verified")
    conv.add_argument("src", metavar="SRC", help="the input checkpoint (never modified)")
    conv.add_argument("dst", metavar="DST", help="the output (written atomically; refused if it exists)")
    conv.add_argument("--to", choices=OUTPUT_FORMATS, help="output format (default: from DST's suffix)")
    conv.add_argument("--naming", choices=("meta", "lingua", "titan", "hf"),
                      help="output key names (default: the input's; hf for --to hf). lingua nests under 'model'")
    add_options(conv.add_argument, pytest=False, options=(MODEL_CONFIG, DTYPE))
    conv.add_argument("--weights-only", action="store_true",
                      help="leave optimizer, scheduler and data-loader state behind (carried by default to torch/dcp)")
    conv.add_argument("--init-optimizer-state", action="store_true",
                      help="write fresh AdamW state (step 0, zero moments) instead of the input's")
    _head_dim_option(conv)
    _output_options(conv)
    conv.set_defaults(func=cmd_convert)

    rep = sub.add_parser("repair", help="run the checks and write a repaired copy that passes them")
    rep.add_argument("src", metavar="SRC", help="the input checkpoint (never modified)")
    rep.add_argument("dst", metavar="DST", help="the repaired output")
    add_options(rep.add_argument, pytest=False, options=(MODEL_CONFIG, MODEL_FACTORY, TARGET, DTYPE))
    rep.add_argument("--to", choices=OUTPUT_FORMATS, help="output format (default: the input's kind)")
    rep.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    rep.add_argument("--init-optimizer-state", action="store_true",
                     help="write fresh AdamW state (step 0, zero moments) so that a resume target can start")
    rep.add_argument("--drop", action="append", default=[], metavar="KEY",
                     help="leave this tensor out (repeatable); without it a repair drops only provably redundant "
                     "tensors (tied copies holding exactly the embedding's values, rotary buffers the config "
                     "gives) and refuses other extras; never a tensor the config needs")
    rep.add_argument("--weights-only", action="store_true",
                     help="leave the optimizer, scheduler and data-loader state behind (refused otherwise where "
                          "the output format cannot hold it)")
    _head_dim_option(rep)
    _output_options(rep)
    rep.set_defaults(func=cmd_repair)

    dif = sub.add_parser("diff", help="compare two checkpoints key by key, in any formats and namings")
    dif.add_argument("a", metavar="A")
    dif.add_argument("b", metavar="B")
    add_options(dif.add_argument, pytest=False, options=(MODEL_CONFIG,))
    dif.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default: bitwise)")
    dif.add_argument("--rtol", type=float, default=0.0, help="relative tolerance (default: bitwise)")
    dif.add_argument("--forward", action="store_true",
                     help="also compare the logits of a reference Llama forward of each, in its own rotary convention")
    dif.add_argument("--tokens", type=int, default=16, help="random token ids for --forward (default 16)")
    dif.add_argument("--format", choices=("text", "json"), default="text")
    dif.add_argument("--debug", action="store_true", help="show tracebacks")
    dif.set_defaults(func=cmd_diff)

    trip = sub.add_parser("roundtrip", help="load the checkpoint into an FSDP2-sharded model on N processes and "
                          "compare every shard with it, bit for bit")
    trip.add_argument("ckpt", metavar="CKPT", help="the checkpoint to compare against (any format)")
    add_options(trip.add_argument, pytest=False, options=(MODEL_CONFIG, MODEL_FACTORY))
    trip.add_argument("--world-size", type=int, default=2, help="ranks to shard across (default 2)")
    trip.add_argument("--reshard", type=int, help="then save from that world and load at this many ranks")
    trip.add_argument("--optimizer", action="store_true", help="also load AdamW state and compare it (DCP input)")
    trip.add_argument("--dcp", help="a DCP checkpoint made elsewhere to load, instead of converting CKPT")
    trip.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                      help="auto: NCCL with one process per GPU when there are enough GPUs, else gloo on CPU")
    trip.add_argument("--timeout", type=float, default=600.0, help="seconds each world size may take")
    _head_dim_option(trip)
    trip.add_argument("--format", choices=("text", "json"), default="text")
    trip.add_argument("--debug", action="store_true", help="show tracebacks")
    trip.set_defaults(func=cmd_roundtrip)

    rpt = sub.add_parser("report", help="write a compatibility report (Markdown, HTML or JSON, by -o's suffix)")
    add_options(rpt.add_argument, pytest=False, options=CHECK_OPTIONS)
    rpt.add_argument("-o", "--output", required=True, metavar="PATH", help="report file: .md, .html or .json")
    rpt.add_argument("--no-matrix", action="store_true", help="leave out the compatibility matrix")
    rpt.add_argument("--debug", action="store_true", help="show tracebacks")
    rpt.set_defaults(func=cmd_report)

    inspect = sub.add_parser("inspect", help="describe a checkpoint: format, naming, tensors, inferred config")
    inspect.add_argument("ckpt", metavar="CKPT", help=CHECK_OPTIONS[0].help)
    inspect.add_argument("--format", choices=("text", "json"), default="text")
    inspect.add_argument("--params", choices=("lingua", "meta"),
                         help="print only the config the weights show, as that params.json; the head split needs "
                              "a witness (a config saved beside the checkpoint, rope.freqs) or --n-heads, "
                              "--n-kv-heads or --head-dim")
    for flag, what in (("--n-heads", "attention heads"), ("--n-kv-heads", "key/value heads"),
                       ("--head-dim", "the size of one head")):
        inspect.add_argument(flag, type=int, metavar="N",
                             help=f"{what}: the weights fix only heads × head_dim, not the split")
    inspect.add_argument("--debug", action="store_true", help="show tracebacks")
    inspect.set_defaults(func=cmd_inspect)
    return parser


def _with_progress(checks: list[Any], text: bool) -> Any:
    """A progress bar over the checks when they read data and a person watches (a terminal, text output)."""
    if not (text and sys.stderr.isatty() and any(c.reads_data for c in checks)):
        return checks
    from tqdm import tqdm

    return tqdm(checks, desc="checking", unit="check", file=sys.stderr, leave=False)


def _head_dim_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--head-dim", type=int, metavar="N",
                   help="confirm the config's head size where q/k rows are permuted (between Meta/lingua/"
                        "torchtitan and Hugging Face names) and nothing in the checkpoint shows it")


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert.api import convert

    report = convert(args.src, args.dst, to=args.to, naming=args.naming, config=args.model_config, dtype=args.dtype,
                     force=args.force, progress=args.format == "text", weights_only=args.weights_only,
                     init_optimizer_state=args.init_optimizer_state, head_dim=args.head_dim)
    if args.format == "json":
        print(json.dumps(report.to_json(), indent=2))
    else:
        print("\n".join(report.lines()))
    return EXIT_FAIL if report.recheck_failed else EXIT_OK  # written, but its own config fails it


def cmd_repair(args: argparse.Namespace) -> int:
    from .convert.api import tally
    from .repair import repair
    from .report.text import failure_lines

    options = engine_options(lambda name: getattr(args, name, None))
    outcome = repair(args.src, args.dst, config=args.model_config, options=options, to=args.to,
                     dry_run=args.dry_run, force=args.force, progress=args.format == "text",
                     init_optimizer_state=args.init_optimizer_state, drop=tuple(args.drop),
                     head_dim=args.head_dim, weights_only=args.weights_only)
    if args.format == "json":
        print(json.dumps(outcome.to_json(), indent=2))
    else:
        failed = [r for r in outcome.before if r.status.value in ("fail", "unsafe")]
        print(f"{len(failed)} of {len(outcome.before)} checks fail on {args.src}")
        for step in outcome.plan.steps:
            print(f"  repair: {step}")
        for why in outcome.plan.refusals:
            print(f"  cannot repair: {why}")
        for why in outcome.plan.left_as_is:
            print(f"  left as is: {why}")
        if outcome.conversion is not None:
            print("\n".join(outcome.conversion.lines()))
            still = [r for r in outcome.after if r.status.value in ("fail", "unsafe")]
            skipped = [r.id for r in outcome.after if r.status.value == "skip"]
            print(f"re-checked {args.dst}: "
                  + tally(len(outcome.after) - len(still) - len(skipped), len(outcome.after), skipped)
                  + (f"; {len(still)} fail: {', '.join(r.id for r in still[:8])}{' ...' if len(still) > 8 else ''}"
                     if still else ""))
            for r in still:
                print(f"FAIL   {r.id}")
                print("\n".join("       " + line for line in failure_lines(r)))
        elif outcome.plan.refusals:
            print("nothing written")
        else:
            print(f"dry run: nothing written (would write {args.dst} as {outcome.plan.to})")
    if not outcome.plan.possible:
        return EXIT_FAIL
    return EXIT_OK if args.dry_run or outcome.repaired else EXIT_FAIL


def cmd_diff(args: argparse.Namespace) -> int:
    from .diff import diff, render

    report = diff(args.a, args.b, config=args.model_config, atol=args.atol, rtol=args.rtol, forward=args.forward,
                  tokens=args.tokens)
    if args.format == "json":
        print(json.dumps(report.to_json(), indent=2))
    else:
        sys.stdout.write(render(report))
    return EXIT_OK if report.equal else EXIT_FAIL


def cmd_roundtrip(args: argparse.Namespace) -> int:
    from .roundtrip.launch import roundtrip

    result = roundtrip(args.ckpt, config=args.model_config, world_size=args.world_size, reshard_to=args.reshard,
                       optimizer=args.optimizer, factory=args.model_factory, timeout=args.timeout,
                       backend=args.backend, dcp=args.dcp, head_dim=args.head_dim)
    if args.format == "json":
        print(json.dumps(result.to_json(), indent=2))
    else:
        print("\n".join(result.lines()))
        for trip in result.trips:
            for m in trip.mismatches[:20]:
                print(f"  mismatch {m['key']}: {m['detail']}")
    return EXIT_OK if result.ok else EXIT_FAIL


def cmd_report(args: argparse.Namespace) -> int:
    from .report.document import build, write

    data = build(args.ckpt, args.model_config, engine_options(lambda name: getattr(args, name)),
                 matrix=not args.no_matrix)
    path = write(data, args.output)
    print(f"ckptcheck: wrote {path} ({data.summary['verdict']}: {data.summary['fail']} failed of "
          f"{data.summary['total']})", file=sys.stderr)
    return EXIT_OK if data.summary["verdict"] == "pass" else EXIT_FAIL


def cmd_check(args: argparse.Namespace) -> int:
    from .engine import plan, summarize
    from .report import json_report, text

    options = engine_options(lambda name: getattr(args, name))
    the_plan = plan(args.ckpt, args.model_config, options)
    results = (check.run() for check in _with_progress(the_plan.checks, args.format == "text"))
    # Text streams into a temporary file (a report may be many times the input's size) and reaches stdout only
    # once every check has run: a run that ends in an input error prints its one line and no half report.
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="surrogatepass") as spool:
        try:
            if args.format == "json":
                kept = list(results)
                summary = summarize(kept)
            else:
                spool.write(text.opening(the_plan.checkpoint_info, the_plan.config_info))
                summary = summarize(text.written(spool, results, verbose=args.verbose))
                spool.write(text.closing(summary, verbose=args.verbose))
        finally:
            the_plan.close()
        rows = None
        if args.matrix:
            from .matrix import compatibility_matrix

            rows = compatibility_matrix(args.ckpt, args.model_config, options)
        notes = the_plan.session.notes if the_plan.session else []
        for note in notes:
            print(f"ckptcheck: {note}", file=sys.stderr)
        if args.format == "json":
            doc = json_report.document(the_plan.checkpoint_info, the_plan.config_info, kept, summary)
            if rows is not None:
                from .matrix import to_json

                doc["matrix"] = to_json(rows)
            sys.stdout.write(json_report.dumps(doc))
        else:
            spool.seek(0)
            shutil.copyfileobj(spool, sys.stdout)
            if rows is not None:
                from .matrix import render_text

                sys.stdout.write("\ncompatibility matrix\n" + render_text(rows))
    return EXIT_OK if summary["verdict"] == "pass" else EXIT_FAIL


def cmd_inspect(args: argparse.Namespace) -> int:
    from .configs import scaling_as_meta
    from .corroborate import head_dim_witnesses
    from .formats import open_checkpoint
    from .spec import biases
    from .infer import infer_dims
    from .naming import map_keys
    from .report.text import human_bytes

    with open_checkpoint(args.ckpt) as ckpt:
        m = ckpt.manifest
        mapping = map_keys(m.tensors)
        by_canonical = {c: m.tensors[s] for s, c in mapping.canonical.items()}
        inferred = infer_dims(by_canonical)
        witnesses = head_dim_witnesses(m.tensors, inferred, args.ckpt, None)
    params, note = _inspect_params(args, inferred, witnesses)
    if args.params:
        note = note or _partial(inferred) or _inexpressible(args.params, params, biases(by_canonical))
        if note:
            raise InputError(args.ckpt, None, f"no params.json written: {note}")
        saved = [w.config for w in witnesses if w.config is not None]
        for name in ("norm_eps", "rope_theta"):  # a witness's default is no evidence: only what it states
            stated = next((getattr(c, name) for c in saved if c.states(name)), None)
            if stated is None:
                print(f"ckptcheck: {name} is not in the weights and no saved config states it, so it is left out "
                      "(lingua and Meta then use their defaults): add the training run's value", file=sys.stderr)
            else:
                params[name] = stated
        params.update(next((scaling_as_meta(c) for c in saved if c.rope_scaling is not None), {}))
        if args.params == "meta":
            params.pop("weight_tying", None)
        print(json.dumps({"model": params} if args.params == "lingua" else params, indent=2))
        return EXIT_OK
    doc: dict[str, Any] = {
        "path": args.ckpt, "format": m.format, "naming": mapping.scheme.name, "naming_title": mapping.scheme.title,
        "wrappers": list(mapping.wrappers), "nesting": m.nesting, "sections": list(m.sections),
        "facts": m.facts, "tensor_count": len(m.tensors), "bytes": m.total_bytes,
        "tensors": [{"key": t.key, "shape": list(t.shape), "dtype": t.dtype, "bytes": t.nbytes,
                     **({"alias_of": t.alias_of} if t.alias_of else {})} for t in m.tensors.values()],
        "extra_tensors": len(m.extra_tensors), "inferred_params": params,
        "inferred_params_note": note or "head split from " + ", ".join(_head_sources(args, witnesses)),
    }
    if args.format == "json":
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    from tabulate import tabulate

    print(f"checkpoint  {args.ckpt}")
    print(f"format      {m.format}")
    print(f"naming      {mapping.scheme.name} ({mapping.scheme.title})"
          + (f", wrappers {', '.join(mapping.wrappers)}" if mapping.wrappers else ""))
    if m.nesting:
        print(f"nesting     model tensors under {m.nesting!r}")
    if m.sections:
        print(f"sections    {', '.join(m.sections)} ({len(m.extra_tensors)} tensors outside the model)")
    for k, v in m.facts.items():
        print(f"{k:<11} {v}" if len(k) <= 11 else f"{k}: {v}")
    print()
    rows = [[t.key, "[" + ", ".join(map(str, t.shape)) + "]", t.dtype, human_bytes(t.nbytes)
             + (f" (= {t.alias_of})" if t.alias_of else "")] for t in m.tensors.values()]
    print(tabulate(rows, headers=["key", "shape", "dtype", "bytes"], tablefmt="simple"))
    print()
    print(f"total       {len(m.tensors)} tensors, {human_bytes(m.total_bytes)}")
    print("inferred    " + json.dumps(params))
    print(f"            ({doc['inferred_params_note']}; --params lingua|meta prints a params.json)")
    return EXIT_OK


_HEAD_FLAGS = (("--n-heads", "n_heads"), ("--n-kv-heads", "n_kv_heads"), ("--head-dim", "head_dim"))


def _head_sources(args: argparse.Namespace, witnesses: list[Any]) -> list[str]:
    return [flag for flag, name in _HEAD_FLAGS if getattr(args, name) is not None] + [w.source for w in witnesses]


def _partial(inferred: Any) -> str:
    """Why the weights leave n_layers open ("" when they do not): top layers holding only some tensors."""
    if not inferred.partial_top:
        return ""
    parts = ", ".join(f"layer {n} holds {held} of {full} tensors" for n, held, full in inferred.partial_top)
    return (f"n_layers is {inferred.complete_layers} or {inferred.n_layers} ({parts}): drop the stray tensors or "
            "restore the missing ones first")


TITLES = {"meta": "Meta", "lingua": "lingua"}


def _inexpressible(schema: str, params: dict[str, Any], found: dict[str, list[str]]) -> str:
    """Why a ``schema`` params.json cannot describe these weights ("" when it can): neither lingua's nor Meta's
    Llama has biases, and Meta's params.json has no head_dim (it is always dim / n_heads) and no weight tying."""
    if found:
        keys = sorted(k for ks in found.values() for k in ks)
        return (f"the checkpoint holds {len(keys)} bias tensors ({', '.join(keys[:2])}, ...), which {TITLES[schema]}'s Llama "
                f"does not have and its params.json cannot state ({' and '.join(sorted(found))}): describe it "
                "with a Hugging Face config.json")
    if schema == "meta" and "head_dim" in params:
        return (f"head_dim {params['head_dim']} is not dim / n_heads = {params['dim']} / {params['n_heads']}, and "
                "Meta's params.json has no head_dim field (its ModelArgs derives it): use --params lingua")
    if schema == "meta" and params.get("weight_tying"):
        return ("the output weight is the embedding (tied), and Meta's params.json has no weight_tying field (its "
                "Llama has its own output weight): use --params lingua")
    return ""


def _inspect_params(args: argparse.Namespace, inferred: Any, witnesses: list[Any]) -> tuple[dict[str, Any], str]:
    """The params the weights show, with the head split only when stated (flags) or witnessed; else the
    params without it and why.  Head counts given that do not fit the weights are an input error."""
    from .infer import split_heads, weights_params

    q, k = inferred.q_rows, inferred.kv_rows
    stated = [(flag, name, getattr(args, name)) for flag, name in _HEAD_FLAGS if getattr(args, name) is not None]
    stated += [(w.source, "head_dim", w.head_dim) for w in witnesses]
    if q is None or k is None:
        return weights_params(inferred, None), "the checkpoint has no wq/wk weight to size the heads from"
    if not stated:
        return weights_params(inferred, None), (
            f"the weights fix only n_heads × head_dim = {q} and n_kv_heads × head_dim = {k}, and nothing in or "
            "beside the checkpoint states head_dim: pass --n-heads, --n-kv-heads or --head-dim "
            "(from the training run's config)")
    try:
        split = split_heads(q, k, stated)
    except ValueError as exc:
        raise InputError(args.ckpt, None, f"the head split does not fit the weights: {exc}") from None
    return weights_params(inferred, split), ""


def main(argv: Sequence[str] | None = None) -> int:
    """The exit status is the verdict, whatever happens to stdout and stderr (see streams.py)."""
    with guarded_streams():
        return _run(argv)


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UnsafeInputError as exc:
        if args.debug:
            raise
        print(f"ckptcheck: unsafe: {exc.line()}", file=sys.stderr)
        return EXIT_FAIL
    except CkptError as exc:
        if args.debug:
            raise
        print(f"ckptcheck: error: {exc.line()}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("ckptcheck: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in ckptcheck, not a problem with the input
        if args.debug:
            raise
        print(f"ckptcheck: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
