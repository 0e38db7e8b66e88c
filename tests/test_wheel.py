"""The artifact users get: the wheel, built from the sources, installed into a fresh venv outside the
repository, driven from an empty folder.  A hand-kept package list once shipped a wheel without
``ckptcheck.convert`` and ``ckptcheck.roundtrip``: every command died with ModuleNotFoundError, and the
editable install the other tests use could not see it.

The venv gets ckptcheck from the wheel only.  Its dependencies (torch and the rest) come from the test
interpreter's site-packages, appended by a ``.pth`` line: a plain path, so that folder's own ``.pth``
files, among them the editable install's finder, never run; the test asserts that ckptcheck, its
subpackages and its pytest plugin load from the wheel and that no path of the repository is importable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from .writers import CONFIGS, FIXTURES

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "ckptcheck", "suites")
DATA = {"good.pth": FIXTURES / "good" / "consolidated.pth", "good.safetensors": FIXTURES / "good" / "model.safetensors",
        "damaged.pth": FIXTURES / "broken" / "damaged.pth", "ddp_prefix.pth": FIXTURES / "broken" / "ddp_prefix.pth",
        "params.json": CONFIGS / "lingua_params.json"}


class Installed:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "venv" / "bin"
        self.data = root / "data"

    def run(self, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    assert REPO not in root.parents
    src = root / "src"  # a copy: the repository's own build/ folder may hold stale modules
    src.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (root / "dist").glob("ckptcheck-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=120)
    venv_python = str(root / "venv" / "bin" / "python")
    subprocess.run([*pip, "--python", venv_python, "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    purelib = subprocess.run([venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "ckptcheck_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    shutil.rmtree(src)
    installed = Installed(root)
    installed.data.mkdir()
    for name, path in DATA.items():
        shutil.copy2(path, installed.data / name)
    return installed


@pytest.fixture
def empty(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def test_wheel_ships_every_package_and_the_repo_is_not_importable(installed: Installed, empty: Path) -> None:
    code = ("import sys, importlib.metadata as md, ckptcheck, ckptcheck.convert.api, ckptcheck.roundtrip.launch, "
            "ckptcheck.roundtrip.worker, ckptcheck.pytest_plugin, ckptcheck.suite as s;"
            "print(ckptcheck.__file__); print(md.distribution('ckptcheck').metadata['License-Expression']);"
            "print(','.join(s.available())); print('\\n'.join(sys.path))")
    proc = installed.run(str(installed.bin / "python"), "-c", code, cwd=empty)
    assert proc.returncode == 0, proc.stderr
    file, license, suites, *path = proc.stdout.splitlines()
    assert Path(file).is_relative_to(installed.root / "venv")
    assert license == "BSD-3-Clause"
    assert suites == "hf,init,lingua_init,lingua_resume,meta,resume,torchtitan"
    assert not [p for p in path if p and Path(p).resolve().is_relative_to(REPO.resolve())
                and not Path(p).resolve().is_relative_to((REPO / ".venv").resolve())]


# (arguments after ``ckptcheck``, exit status); paths are relative to the data folder
COMMANDS = [
    (["--help"], 0),
    (["check", "{d}/good.pth", "--model-config", "{d}/params.json"], 0),
    (["check", "{d}/damaged.pth", "--model-config", "{d}/params.json", "--format", "json"], 1),
    (["inspect", "{d}/good.pth"], 0),
    (["convert", "{d}/good.pth", "out.safetensors"], 0),
    (["repair", "{d}/ddp_prefix.pth", "fixed.pth", "--model-config", "{d}/params.json"], 0),
    (["diff", "{d}/good.pth", "{d}/good.safetensors", "--model-config", "{d}/params.json"], 0),
    (["report", "{d}/damaged.pth", "--model-config", "{d}/params.json", "-o", "report.html"], 1),
    (["roundtrip", "{d}/good.pth", "--model-config", "{d}/params.json", "--world-size", "1"], 0),
]


@pytest.mark.parametrize(("args", "status"), COMMANDS, ids=[c[0][0] + str(i) for i, c in enumerate(COMMANDS)])
def test_every_subcommand_from_an_empty_folder(args: list[str], status: int, installed: Installed,
                                               empty: Path) -> None:
    proc = installed.run(str(installed.bin / "ckptcheck"), *(a.format(d=installed.data) for a in args), cwd=empty)
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Error:" not in proc.stderr, proc.stderr


@pytest.mark.parametrize(("name", "status", "summary"), [("good.pth", 0, "* passed*"),
                                                         ("damaged.pth", 1, "* failed, * passed*")])
def test_pytest_plugin_from_an_empty_folder(name: str, status: int, summary: str, installed: Installed,
                                            empty: Path) -> None:
    proc = installed.run(str(installed.bin / "python"), "-m", "pytest", "-p", "no:cacheprovider",
                         "--ckpt", str(installed.data / name), "--model-config", str(installed.data / "params.json"),
                         cwd=empty)
    out = proc.stdout + proc.stderr
    assert proc.returncode == status, out
    assert "Traceback" not in out and "INTERNALERROR" not in out, out
    assert "plugins: ckptcheck-0.1.0" in out
    pytest.LineMatcher(proc.stdout.splitlines()).fnmatch_lines(["*= ckptcheck =*", summary])
