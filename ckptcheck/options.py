"""One definition of each option, shared by the pytest plugin (``--ckpt-*``) and the CLI.

Kept free of heavy imports: pytest loads this module for every run, with or without ``--ckpt``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DTYPE_CHOICES = ("bf16", "fp16", "fp32", "fp64", "bfloat16", "float16", "float32", "float64")


@dataclass(frozen=True)
class OptionDef:
    dest: str
    cli: str | None  # None: a positional argument on the CLI
    pytest: str  # always registered: the --ckpt-* namespace is ckptcheck's own
    help: str
    choices: tuple[str, ...] | None = None
    default: Any = None
    flag: bool = False
    metavar: str | None = None
    # The short spelling of the mission (``--ckpt``, ``--model-config``), registered only when no project
    # conftest or plugin has claimed it: ckptcheck is installed into other projects' pytest.
    pytest_alias: str | None = None

    def kwargs(self) -> dict[str, Any]:
        if self.flag:
            return {"action": "store_true", "default": False, "help": self.help}
        kw: dict[str, Any] = {"default": self.default, "help": self.help}
        if self.choices:
            kw["choices"] = self.choices
        if self.metavar:
            kw["metavar"] = self.metavar
        return kw


CKPT = OptionDef("ckpt", None, "--ckpt-path", "checkpoint: a .pth/.pt/.bin file, Meta shards folder, safetensors "
                 "file or index, DCP folder or Hugging Face folder", metavar="PATH", pytest_alias="--ckpt")
MODEL_CONFIG = OptionDef("model_config", "--model-config", "--ckpt-model-config",
                         "model config: lingua or Meta params.json, or Hugging Face config.json "
                         "(default: one found beside the checkpoint)", metavar="PATH", pytest_alias="--model-config")
MODEL_FACTORY = OptionDef("model_factory", "--model-factory", "--ckpt-model-factory",
                          "module:function returning the nn.Module to check against (built on the meta device)",
                          metavar="MODULE:FUNC", pytest_alias="--model-factory")
TARGET = OptionDef("target", "--target", "--ckpt-target",
                   "the check suite (suites/NAME.json): init, can training start from these weights (default); "
                   "resume, also from its training state", default="init", metavar="NAME")
DTYPE = OptionDef("dtype", "--dtype", "--ckpt-dtype",
                  "dtype every tensor should have (default: the config's, else the checkpoint's dominant one)",
                  choices=DTYPE_CHOICES)
METADATA_ONLY = OptionDef("metadata_only", "--metadata-only", "--ckpt-metadata-only",
                          "read no tensor data: skip the value checks", flag=True)

ROUNDTRIP = OptionDef("roundtrip", "--roundtrip", "--ckpt-roundtrip",
                      "also load the checkpoint into an FSDP2-sharded model on N real processes and compare every "
                      "shard bit for bit; N or a list such as 1,2,4", metavar="N[,N...]")
RESHARD = OptionDef("reshard", "--reshard", "--ckpt-reshard",
                    "with --roundtrip: save from the first world size and load again at this one", metavar="M")

CHECK_OPTIONS = (CKPT, MODEL_CONFIG, MODEL_FACTORY, TARGET, DTYPE, METADATA_ONLY, ROUNDTRIP, RESHARD)
REPORT = OptionDef("report", None, "--ckpt-report",
                   "write a compatibility report to PATH (.md, .html or .json), once, from every worker's results",
                   metavar="PATH")
MATRIX = OptionDef("matrix", "--matrix", "--ckpt-matrix",
                   "also check against every framework target and add the compatibility matrix", flag=True)


PYTEST_OPTIONS = (*CHECK_OPTIONS, REPORT, MATRIX)


def plugin_dest(name: str) -> str:
    """Where pytest keeps an option: under ckptcheck's own prefix, so no project's option shares the dest."""
    return f"ckptcheck_{name}"


def add_options(add: Callable[..., Any], *, pytest: bool, options: tuple[OptionDef, ...] = CHECK_OPTIONS) -> None:
    """Register options with an argparse ``add_argument`` or a pytest group's ``addoption``."""
    for opt in options:
        if pytest:
            add(opt.pytest, dest=plugin_dest(opt.dest), **opt.kwargs())
        elif opt.cli is None:
            add(opt.dest, **{k: v for k, v in opt.kwargs().items() if k != "default"})
        else:
            add(opt.cli, dest=opt.dest, **opt.kwargs())


def add_pytest_aliases(add: Callable[..., Any], taken: set[str] | None) -> list[str]:
    """Register the short spellings not in ``taken`` (None: unknown, so none); returns those left unregistered."""
    left = []
    for opt in PYTEST_OPTIONS:
        if opt.pytest_alias is None:
            continue
        if taken is None or opt.pytest_alias in taken:
            left.append(opt.pytest_alias)
        else:
            add(opt.pytest_alias, dest=plugin_dest(opt.dest), **{**opt.kwargs(), "help": f"same as {opt.pytest}"})
    return left


def engine_options(get: Callable[[str], Any]) -> Any:
    """Build ``engine.Options`` from a getter over either namespace (imports the engine lazily)."""
    from .engine import Options

    return Options(target=get("target") or "init", dtype=get("dtype"), metadata_only=bool(get("metadata_only")),
                   model_factory=get("model_factory"), roundtrip=get("roundtrip"), reshard=get("reshard"))
