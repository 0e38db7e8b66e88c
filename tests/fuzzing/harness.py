"""Run a ``Case`` through the CLI in a worker process and judge the outcome against issue 11's contract:
exit 0, 1 or 2 (never 3, never a traceback; exit 2 and unsafe as one line), within the time limit, peak memory
under twice the input plus a fixed baseline, and no exit 0 that an oracle calls wrong: the real loader refusing
a file (for ``check`` only) or a mutation that made the data the command reads wrong by construction
(strategies.py's docstring says which oracle applies to which command).  A break saves the case as a
reproducer and is counted by its class: (family, mutation, command, symptom)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .strategies import FIFO, SYMLINK, Case

ROOT = Path(__file__).resolve().parents[2]
# The time limit is CPU seconds, so a loaded machine (CI's -n 2, a campaign beside other work) never turns a
# slow-but-bounded input into a false break; a process that waits without working (a FIFO, a lock) is caught by
# the wall-clock limit, WALL_FACTOR times longer.
SECONDS = float(os.environ.get("CKPTCHECK_FUZZ_SECONDS", "20"))
WALL_FACTOR = 6
ORACLE_SECONDS = 30.0
BASELINE = 256 << 20  # bytes any input may use beyond twice its size (buffers, tables, the report)
OUT = Path(os.environ.get("CKPTCHECK_FUZZ_OUT", ROOT / "build" / "fuzz"))
FINDINGS = os.environ.get("CKPTCHECK_FUZZ_FINDINGS")  # a notes file to append one line per new class to


class Worker:
    """One worker process (see worker.py), killed and started anew when it hangs or dies."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.proc: subprocess.Popen | None = None
        self.answers = -1
        self.failure = ""  # why the last ask got no answer: "hang" or "crash"

    def _start(self) -> None:
        read, write = os.pipe()
        env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fuzzing.worker", self.role, str(write)],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     pass_fds=(write,), cwd=ROOT, env=env, text=True)
        os.close(write)
        self.answers = read
        self._buffer = b""
        if self._read(120.0) is None:
            raise RuntimeError(f"the fuzz {self.role} worker did not start")

    def _read(self, timeout: float) -> dict | None:
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self.answers], [], [], timeout)
            chunk = os.read(self.answers, 1 << 16) if ready else b""
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def ask(self, job: dict, timeout: float) -> dict | None:
        """The worker's answer, or None when it gave none in time or died (it is ended either way)."""
        if self.proc is None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
            answer = self._read(timeout)
        except BrokenPipeError:
            answer = None
        if answer is None:
            assert self.proc is not None
            self.failure = "hang" if self.proc.poll() is None else "crash"
            self.close()
        return answer

    def close(self) -> int | None:
        """End the process (its own pid, nothing else); its exit status (negative: the signal)."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.kill()
        status = proc.wait()
        os.close(self.answers)
        return status


@dataclass(frozen=True)
class Outcome:
    rc: int | str  # the exit status, "raised", "hang" or "crash"
    seconds: float
    memory: int  # peak resident bytes of this input beyond the worker's before it
    stderr: str
    symptom: str  # "" when the contract held
    unsafe: bool = False  # refused as hostile (exit 1): a CkptError line or an UNSAFE check


@dataclass
class Stats:
    family: str
    inputs: int = 0
    outcomes: Counter = field(default_factory=Counter)
    by_command: dict[str, Counter] = field(default_factory=dict)  # command -> its outcomes
    slowest: tuple[float, str] = (0.0, "")
    largest: tuple[int, str] = (0, "")
    breaks: dict[str, str] = field(default_factory=dict)  # class -> reproducer folder

    def add(self, case: Case, outcome: Outcome) -> str:
        """Count the outcome; the break's class when it is new here (to save one reproducer per class)."""
        self.inputs += 1
        result = "unsafe" if outcome.unsafe else str(outcome.rc)
        self.outcomes[result] += 1
        self.by_command.setdefault(case.command, Counter())[result] += 1
        label = f"{case.mutation}: {case.detail}"
        self.slowest = max(self.slowest, (outcome.seconds, label))
        self.largest = max(self.largest, (outcome.memory, label))
        key = f"{case.family} | {case.mutation} | {case.command} | {outcome.symptom}"
        if not outcome.symptom or key in self.breaks:
            return ""
        self.breaks[key] = ""
        return key

    def write(self) -> Path:
        OUT.mkdir(parents=True, exist_ok=True)
        path = OUT / f"stats-{self.family}-{os.getpid()}.json"
        path.write_text(json.dumps({"family": self.family, "inputs": self.inputs, "outcomes": self.outcomes,
                                    "by_command": self.by_command,
                                    "slowest": self.slowest, "largest": self.largest, "breaks": self.breaks}))
        return path


def materialize(case: Case, folder: Path) -> None:
    for rel, content in case.files:
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content == FIFO:
            os.mkfifo(path)
        else:
            path.symlink_to(content.removeprefix(SYMLINK))


_INTERNAL = re.compile(r"ckptcheck: internal error: (\w+)")
_ONE_LINE = ("ckptcheck: error:", "ckptcheck: unsafe:")


def symptom_of(rc: int | str, stderr: str, memory: int, case: Case) -> str:
    """The contract break, named by class (no values): "" when the outcome keeps the contract."""
    if rc in ("hang", "slow", "crash", "raised"):
        return {"hang": f"no outcome within {SECONDS * WALL_FACTOR:g} s", "slow": f"over {SECONDS:g} s of CPU", "crash": "the worker died (signal or abort)",
                "raised": "an exception escaped cli.main"}[rc]
    if rc == 3:
        found = _INTERNAL.search(stderr)
        return f"exit 3 ({found.group(1) if found else 'internal error'})"
    if rc not in (0, 1, 2):
        return f"exit {rc}"
    if "Traceback (most recent call last)" in stderr or "frame #" in stderr:
        return "traceback on stderr"
    if "MemoryError" in stderr or memory > 2 * case.input_bytes + BASELINE:
        return "memory over 2x input + baseline"
    verdicts = [line for line in stderr.splitlines() if line.startswith(_ONE_LINE)]
    if rc == 2 and len(verdicts) != 1:
        return "exit 2 without exactly one error line"
    if rc == 0 and case.must_refuse:
        return "exit 0 on input wrong by construction"
    return ""


class Harness:
    """A run worker and an oracle worker for one test process; ``check`` judges one case."""

    def __init__(self) -> None:
        self.runner = Worker("run")
        self.oracle = Worker("oracle")
        self.tmp = Path(tempfile.mkdtemp(prefix="ckptcheck-fuzz-"))

    def close(self) -> None:
        self.runner.close()
        self.oracle.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def check(self, case: Case) -> Outcome:
        folder = self.tmp / "case"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        try:
            materialize(case, folder)
            argv = [a.replace("{case}", str(folder)).replace("{out}", str(folder / "converted"))
                    for a in case.argv]
            answer = self.runner.ask({"folder": str(folder), "argv": argv}, SECONDS * WALL_FACTOR)
            stderr = (folder / "stderr").read_text(errors="replace") if (folder / "stderr").exists() else ""
            if answer is None:
                rc: int | str = self.runner.failure
                outcome = Outcome(rc, SECONDS * WALL_FACTOR, 0, stderr, "")
            else:
                memory = max(0, answer["peak"] - answer["rss_before"])
                rc = "slow" if answer["cpu"] > SECONDS else answer["rc"]
                outcome = Outcome(rc, answer["seconds"], memory, stderr, "")
            symptom = symptom_of(outcome.rc, stderr, outcome.memory, case)
            if not symptom and outcome.rc == 0:
                symptom = self._oracle_refuses(case, folder)
            stdout = (folder / "stdout").read_text(errors="replace") if (folder / "stdout").exists() else ""
            unsafe = outcome.rc == 1 and ("ckptcheck: unsafe:" in stderr or "\nUNSAFE " in "\n" + stdout)
            return Outcome(outcome.rc, outcome.seconds, outcome.memory, stderr, symptom, unsafe)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _oracle_refuses(self, case: Case, folder: Path) -> str:
        for kind, rel in case.oracle:
            answer = self.oracle.ask({"kind": kind, "path": str(folder / rel)}, ORACLE_SECONDS)
            if answer and answer["refused"]:
                return f"exit 0 where {'torch.load(weights_only=True)' if kind == 'torch' else 'safetensors'} refuses"
        return ""


def save_reproducer(case: Case, outcome: Outcome) -> Path:
    """The case's files and a case.json (argv, mutation, symptom) under OUT/<family>/; its folder."""
    digest = hashlib.sha1(repr((case.argv, case.files)).encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9]+", "-", f"{case.mutation} {outcome.symptom}".lower()).strip("-")[:80]
    folder = OUT / case.family / f"{slug}-{digest}"
    if not folder.exists():
        files = folder / "case"
        files.mkdir(parents=True)
        for rel, content in case.files:
            if isinstance(content, bytes):
                (files / rel).parent.mkdir(parents=True, exist_ok=True)
                (files / rel).write_bytes(content)
        (folder / "case.json").write_text(json.dumps({
            "family": case.family, "mutation": case.mutation, "detail": case.detail, "argv": case.argv,
            "special_files": {rel: c for rel, c in case.files if isinstance(c, str)},
            "oracle": case.oracle, "must_refuse": case.must_refuse, "symptom": outcome.symptom,
            "exit": outcome.rc, "seconds": outcome.seconds, "memory": outcome.memory,
            "stderr": outcome.stderr[-4000:]}, indent=1))
    if FINDINGS:
        _note_class(case, outcome, folder)
    return folder


def _note_class(case: Case, outcome: Outcome, folder: Path) -> None:
    """One line per new class in the findings notes (format, mutation, command, symptom, example, reproducer)."""
    key = f"| {case.family} | {case.mutation} | {case.command} | {outcome.symptom} |"
    notes = Path(FINDINGS)
    if notes.exists() and key in notes.read_text():
        return
    with notes.open("a") as handle:
        handle.write(f"{key} {case.detail[:120]} | {folder} |\n")
