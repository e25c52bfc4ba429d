"""Soak test: SIGKILL a small DDK run at seeded random moments, resume it each time, and require the
whole trajectory to equal an uninterrupted run's.

    python tests/soak/kill_resume.py --kills 10 --seed 0            # builds its corpus and teacher in --work
    python tests/soak/kill_resume.py --kills 3 --seed 5 --work /tmp/soak --iters 12

Not part of the default test suite (it takes minutes); ``tests/integration/test_kill_resume.py`` runs a
2-kill version. Each kill picks, with a seeded RNG, a phase (``train``: an iteration's step; ``eval``: a
DDK evaluation; ``save``: a checkpoint being written; ``between``: just after a save), the n-th time that
phase starts in the current process, and a random delay after that start; then the run is resumed with
the same command (``--load`` = ``--save``). The run is ``tests/scripts/pretrain_traced.py``, which
announces the phases and logs every micro-batch's sample ids. Compared with the uninterrupted run:
the lm and kd loss of every iteration any segment printed (iterations redone after a kill included),
the sample ids of every micro-batch any segment drew, and the DDK weights of every update.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.helpers import SCRIPTS, subprocess_env  # noqa: E402
from tests.runs import STUDENT, TEACHER, data_args, parse_metrics, pretrain, train_args  # noqa: E402

PHASES = ("train", "eval", "save", "between")
MAX_DELAY_S = {"train": 1.0, "eval": 0.4, "save": 0.4, "between": 0.2}
"""Upper bound of the random delay between a phase's start and the kill."""
LOSS_RTOL = 2e-5
"""Printed losses (7 significant digits) of a resumed iteration equal the uninterrupted run's to this."""


@dataclass
class Trajectory:
    losses: dict[int, list[dict[str, float]]] = field(default_factory=dict)
    """Iteration -> its printed metrics, once per segment that completed it."""
    samples: dict[tuple[int, int], list[tuple]] = field(default_factory=dict)
    """(iteration, first global position of the micro-batch) -> its (domains, sample ids), once per draw."""
    weights: list[list[float]] = field(default_factory=list)
    kills: list[str] = field(default_factory=list)


def ddk_args(corpus: dict, teacher: Path, work: Path, iters: int, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        *STUDENT,
        *train_args(iters),
        *data_args(corpus, work / "cache"),
        "--ddk-mode",
        "ddk",
        "--teacher-load",
        str(teacher),
        "--ddk-interval",
        "2",
        "--save",
        str(work / "ckpt"),
        "--load",
        str(work / "ckpt"),
        "--save-interval",
        "2",
        *extra,
    ]


def run_segment(args: list[str], work: Path, kill: tuple[str, int, float] | None) -> tuple[str, str | None]:
    """One process of the run; with ``kill = (phase, n, delay)`` it is SIGKILLed ``delay`` seconds after
    the n-th start of ``phase``. Returns its stdout and what was killed (None: it finished)."""
    env = subprocess_env({"SOAK_SAMPLE_LOG": str(work / "samples.jsonl")})
    with open(work / "stderr.log", "a") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-u", str(SCRIPTS / "pretrain_traced.py"), *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        lines, seen, killed = [], 0, None
        for line in proc.stdout:
            lines.append(line)
            if kill is None or killed:
                continue
            phase, nth, delay = kill
            started = line.startswith(f"@@phase {phase}") if phase != "train" else " iteration " in line
            if started:
                seen += 1
                if seen == nth:
                    time.sleep(delay)
                    proc.send_signal(signal.SIGKILL)
                    killed = f"{phase} #{nth} +{delay:.2f}s"
        code = proc.wait()
    if killed is None and code != 0:
        raise AssertionError(f"segment failed with {code}; see {work / 'stderr.log'}")
    return "".join(lines), killed


def run(args: list[str], work: Path, *, kills: int, seed: int) -> Trajectory:
    """The run, killed ``kills`` times (plans drawn from ``seed``) and resumed until it finishes."""
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    trajectory = Trajectory()
    while True:
        plan = None
        if len(trajectory.kills) < kills:
            phase = rng.choice(PHASES)
            plan = (phase, rng.randint(1, 2), rng.uniform(0.0, MAX_DELAY_S[phase]))
        stdout, killed = run_segment(args, work, plan)
        for iteration, values in parse_metrics(stdout).items():
            trajectory.losses.setdefault(iteration, []).append(values)
        if killed is None:
            break
        trajectory.kills.append(killed)
    for line in (work / "samples.jsonl").read_text().splitlines():
        if line.endswith("}"):  # a line cut by a kill is not a draw
            record = json.loads(line)
            key = (record["iteration"], record["first"])
            trajectory.samples.setdefault(key, []).append((tuple(record["domain"]), tuple(record["sample"])))
    log = work / "ckpt" / "ddk_log.jsonl"
    trajectory.weights = [
        json.loads(line)["weights"] for line in log.read_text().splitlines() if line.strip()
    ]
    return trajectory


def differences(reference: Trajectory, resumed: Trajectory) -> list[str]:
    """Everything in ``resumed`` that differs from the uninterrupted ``reference`` (empty: identical)."""
    found = []
    if sorted(resumed.losses) != sorted(reference.losses):
        found.append(f"iterations {sorted(resumed.losses)} vs {sorted(reference.losses)}")
    for iteration, runs in resumed.losses.items():
        expected = reference.losses.get(iteration, [{}])[0]
        for values in runs:
            for key in ("lm loss", "kd loss"):
                a, b = values.get(key), expected.get(key)
                if a is None or b is None or abs(a - b) > LOSS_RTOL * abs(b):
                    found.append(f"iteration {iteration} {key}: {a} vs {b}")
    if set(resumed.samples) != set(reference.samples):
        found.append(
            f"micro-batches drawn differ: {sorted(set(resumed.samples) ^ set(reference.samples))[:5]}"
        )
    for key, draws in resumed.samples.items():
        if any(draw != reference.samples.get(key, [None])[0] for draw in draws):
            found.append(
                f"samples of iteration {key[0]} (position {key[1]}): {draws} vs {reference.samples.get(key)}"
            )
    if len(resumed.weights) != len(reference.weights) or any(
        abs(a - b) > 1e-9 * abs(b) for x, y in zip(resumed.weights, reference.weights) for a, b in zip(x, y)
    ):
        found.append(f"DDK weights {resumed.weights} vs {reference.weights}")
    return found


def soak(
    corpus: dict,
    teacher: Path,
    work: Path,
    *,
    kills: int,
    seed: int,
    iters: int,
    extra: tuple[str, ...] = (),
) -> tuple[list[str], list[str]]:
    """Run uninterrupted and killed ``kills`` times (both with the flags ``extra``); returns (the
    kills, the differences)."""
    reference = run(
        ddk_args(corpus, teacher, work / "reference", iters, extra), work / "reference", kills=0, seed=seed
    )
    resumed = run(
        ddk_args(corpus, teacher, work / "killed", iters, extra), work / "killed", kills=kills, seed=seed
    )
    return resumed.kills, differences(reference, resumed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iters", type=int, default=16)
    parser.add_argument(
        "--work", type=Path, default=None, help="scratch directory (default: a new temporary one)"
    )
    parser.add_argument(
        "--async-save",
        action="store_true",
        help="save with --async-save (kills land in background writes too)",
    )
    args = parser.parse_args(argv)
    import tempfile

    from tests.corpus import build_tiny_corpus

    work = args.work or Path(tempfile.mkdtemp(prefix="kill_resume_"))
    corpus = (
        build_tiny_corpus(work / "corpus")
        if not (work / "corpus" / "tokenizer.model").exists()
        else {
            "registry": work / "corpus" / "corpus" / "domains.yaml",
            "tokenizer": work / "corpus" / "tokenizer.model",
        }
    )
    teacher = work / "teacher" / "ckpt"
    if not teacher.exists():
        pretrain(
            1,
            *TEACHER,
            *train_args(8),
            *data_args(corpus, work / "teacher" / "cache"),
            "--ddk-mode",
            "cpt",
            "--save",
            teacher,
        )
    for sub in ("reference", "killed"):
        if (work / sub).exists():
            import shutil

            shutil.rmtree(work / sub)
    start = time.time()
    extra = ("--async-save",) if args.async_save else ()
    kills, found = soak(
        corpus, teacher, work, kills=args.kills, seed=args.seed, iters=args.iters, extra=extra
    )
    print(
        f"{len(kills)} kills (seed {args.seed}, {args.iters} iterations{', --async-save' if extra else ''}, "
        f"{time.time() - start:.0f}s): " + "; ".join(kills)
    )
    print(
        "trajectory identical to the uninterrupted run" if not found else "DIFFERENCES:\n" + "\n".join(found)
    )
    return 0 if not found and len(kills) == args.kills else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
