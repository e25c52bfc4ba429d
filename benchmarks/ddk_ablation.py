"""The paper's ablation table (DDK vs CPT / KD baselines, smoothing, K, alpha) on held-out test data.

Every method starts from the same student checkpoint and trains the same number of iterations with
``pretrain_ddk.py`` (a subprocess per run, as a user would); each final student is then measured on
the registry's **test** split (never read by training or by DDK's validation) with ``tools/evaluate.py``
against the same teacher. Printed per method, over the seeds: per-domain test ratio S/T, worst-domain
and average ratio as mean +- sd, and the seed-paired difference to ``kd-equal`` with its standard error.
Also writes ``summary.json`` and ``ablation.png`` to ``--output-dir``. Resumable: a run whose
``test_eval.json`` exists is skipped; an unfinished one is restarted from the student init.

    python benchmarks/ddk_ablation.py --domains data/local/domains.yaml --tokenizer-model data/local/tok.model \\
        --output-dir runs/ablation_far --student-pretrain-iters 60 --student-pretrain-weights 0.485 0.485 0.015 0.015

Methods (``--methods``; ``NAME@K=20,alpha=0.8,tau=2,step=0.1,signal=kd-gap,val=128`` overrides a parameter):

    cpt-natural, cpt-equal   continued pre-training (no teacher) at the natural (token-proportional) / equal mixture
    kd-natural, kd-equal     KD (Eq. 3) at a static mixture; kd-equal is the paper's "ES" and the reference here
    ddk, ddk-no-smoothing    the paper's DDK and its "w/o FS" ablation
    ddk-smooth0, ddk-tempered, ddk-log, ddk-bounded, ddk-robust    this project's variants (docs/DDK.md)
    hindsight:M              static KD at the average mixture method M consumed in the same seed

Without ``--teacher-load`` a teacher is trained first (``--teacher-iters``, natural mixture); without
``--student-load`` the student is pre-trained (CPT) on ``--student-pretrain-weights`` for
``--student-pretrain-iters``: how long and how skewed decides how far behind the teacher it starts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_ddk.errors import ConfigError, DataError, UserError  # noqa: E402

BASE_METHODS = {
    # name: (--ddk-mode, --ddk-mixing, static mixture)
    "cpt-natural": ("cpt", None, "natural"),
    "cpt-equal": ("cpt", None, "equal"),
    "kd-natural": ("kd", None, "natural"),
    "kd-equal": ("kd", None, "equal"),
    "ddk": ("ddk", "ddk", "equal"),
    "ddk-no-smoothing": ("ddk", "no-smoothing", "equal"),
    "ddk-smooth0": ("ddk", "ddk-smooth0", "equal"),
    "ddk-tempered": ("ddk", "ddk-tempered", "equal"),
    "ddk-log": ("ddk", "ddk-log", "equal"),
    "ddk-bounded": ("ddk", "ddk-bounded", "equal"),
    "ddk-robust": ("ddk", "ddk-robust", "equal"),
}
PARAMETERS = {
    "K": "--ddk-interval",
    "alpha": "--ddk-alpha",
    "tau": "--ddk-temperature",
    "step": "--ddk-max-step",
    "signal": "--ddk-signal",
    "val": "--ddk-val-samples",
}
REFERENCE = "kd-equal"
DEFAULT_METHODS = [
    "cpt-natural",
    "cpt-equal",
    "kd-natural",
    "kd-equal",
    "ddk",
    "ddk-no-smoothing",
    "ddk-smooth0",
    "ddk-log",
    "ddk-robust",
    "hindsight:ddk",
    "hindsight:ddk-robust",
]
TEACHER_MODEL = [
    "--num-layers",
    "3",
    "--hidden-size",
    "128",
    "--num-attention-heads",
    "4",
    "--num-query-groups",
    "2",
    "--ffn-hidden-size",
    "352",
]
STUDENT_MODEL = [
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--num-attention-heads",
    "4",
    "--num-query-groups",
    "2",
    "--ffn-hidden-size",
    "176",
]
ARCH = [
    "--swiglu",
    "--disable-bias-linear",
    "--untie-embeddings-and-output-weights",
    "--normalization",
    "RMSNorm",
    "--position-embedding-type",
    "rope",
]


@dataclass(frozen=True)
class Method:
    spec: str
    mode: str
    mixing: str | None
    mixture: str
    """``natural``, ``equal`` or ``hindsight``."""
    flags: tuple[str, ...] = ()
    source: str | None = None
    """For ``hindsight:M``: the method whose consumed mixture is replayed."""

    @property
    def slug(self) -> str:
        return self.spec.replace(":", "_").replace("@", "_").replace(",", "_").replace("=", "")


def parse_method(spec: str) -> Method:
    """``NAME``, ``NAME@key=value,...`` or ``hindsight:SPEC``; unknown names and keys raise ``ConfigError``."""
    if spec.startswith("hindsight:"):
        source = parse_method(spec[len("hindsight:") :])
        if source.mode != "ddk":
            raise ConfigError(
                f"--methods {spec}: hindsight replays a DDK run's mixture; {source.spec} is not DDK"
            )
        return Method(spec, "kd", None, "hindsight", source=source.spec)
    name, _, params = spec.partition("@")
    if name not in BASE_METHODS:
        raise ConfigError(
            f"--methods: unknown method {name!r}; choose from {', '.join(BASE_METHODS)} "
            "or hindsight:<ddk method>"
        )
    mode, mixing, mixture = BASE_METHODS[name]
    flags: list[str] = []
    for item in filter(None, params.split(",")):
        key, _, value = item.partition("=")
        if key not in PARAMETERS or not value:
            raise ConfigError(
                f"--methods {spec}: {item!r} is not KEY=VALUE with KEY one of {', '.join(PARAMETERS)}"
            )
        flags += [PARAMETERS[key], value]
    return Method(spec, mode, mixing, mixture, tuple(flags))


@dataclass
class Plan:
    args: argparse.Namespace
    out: Path
    names: list[str]
    natural: list[float]
    methods: list[Method]
    log: list[str] = field(default_factory=list)


def _python() -> list[str]:
    return [sys.executable]


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def _run(cmd: list[str], log: Path, threads: int) -> None:
    with open(log, "a") as handle:
        handle.write("+ " + " ".join(map(str, cmd)) + "\n")
        handle.flush()
        proc = subprocess.run(
            list(map(str, cmd)), cwd=ROOT, env=_env(threads), stdout=handle, stderr=subprocess.STDOUT
        )
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-5:]
        raise RuntimeError(f"{cmd[0:1]} ... failed ({proc.returncode}); see {log}: {' / '.join(tail)}")


# ------------------------------------------------------------------------------------------- set-up
def check_inputs(args: argparse.Namespace) -> tuple[list[str], list[float], list[Method]]:
    """Registry with test splits, tokenizer, method names: every problem before any training."""
    from megatron_ddk.data.domains import (
        check_test_documents_disjoint,
        load_domain_registry,
        validate_registry,
    )
    from megatron_ddk.data.tokenizer import build_tokenizer

    methods = [parse_method(spec) for spec in args.methods]
    specs = {m.spec for m in methods}
    if REFERENCE not in specs:
        raise ConfigError(f"--methods must include {REFERENCE} (the reference of the differences)")
    for index, method in enumerate(methods):
        if method.source and method.source not in [m.spec for m in methods[:index]]:
            raise ConfigError(
                f"--methods {method.spec}: list {method.source} before it (its mixture is replayed)"
            )
    if len(set(args.seeds)) != len(args.seeds) or not args.seeds:
        raise ConfigError(f"--seeds {args.seeds}: give distinct seeds")
    registry = load_domain_registry(args.domains)
    if not registry.has_test_split:
        missing = [d.name for d in registry.domains if d.test_prefix is None and d.test_fraction <= 0]
        raise DataError(
            f"--domains {args.domains}: domains {missing} have no test split; the benchmark measures on "
            "held-out test data: add 'test:' or 'test_fraction:' (docs/DATA.md)"
        )
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    validate_registry(registry, vocab_size=tokenizer.vocab_size)
    check_test_documents_disjoint(registry)
    if args.student_pretrain_weights and len(args.student_pretrain_weights) != len(registry.domains):
        raise ConfigError(
            f"--student-pretrain-weights: {len(args.student_pretrain_weights)} weights for "
            f"{len(registry.domains)} domains"
        )
    for flag in ("teacher_load", "student_load"):
        path = getattr(args, flag)
        if path and not (Path(path) / "latest_checkpointed_iteration.txt").exists():
            raise ConfigError(
                f"--{flag.replace('_', '-')} {path}: not a checkpoint directory written by pretrain_ddk.py"
            )
    return registry.names, natural_mixture(registry), methods


def natural_mixture(registry) -> list[float]:
    """Each domain's share of the training tokens."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens = []
    for domain in registry.domains:
        count = 0
        for prefix in domain.train_prefixes:
            dataset = IndexedDataset(prefix, mmap=True)  # keep it alive while its memory map is read
            count += int(dataset.index.sequence_lengths.sum(dtype=np.int64))
        tokens.append(count)
    return [t / sum(tokens) for t in tokens]


def write_registry(source: str, path: Path, weights: list[float]) -> Path:
    """The input registry with absolute prefixes and the given weights (static mixtures are registry weights)."""
    raw = yaml.safe_load(Path(source).read_text())
    base = Path(source).resolve().parent
    for entry, weight in zip(raw["domains"], weights):
        for key in ("train", "valid", "test"):
            if key in entry:
                value = entry[key]
                entry[key] = [str(base / v) for v in value] if isinstance(value, list) else str(base / value)
        entry["weight"] = float(weight)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _data_flags(args, registry: Path) -> list[str]:
    return [
        "--tokenizer-type",
        args.tokenizer_type,
        "--tokenizer-model",
        args.tokenizer_model,
        "--domains",
        str(registry),
        "--data-cache-path",
        str(Path(args.output_dir) / "cache"),
        "--seq-length",
        str(args.seq_length),
    ]


def _batch_flags(args) -> list[str]:
    return [
        "--micro-batch-size",
        str(args.micro_batch_size),
        "--global-batch-size",
        str(args.global_batch_size),
        "--log-interval",
        "10",
    ]


def _model_flags(checkpoint: str) -> list[str]:
    """The student's architecture flags, from its checkpoint's metadata."""
    from megatron_ddk.checkpointing import read_metadata

    model = read_metadata(checkpoint).model
    flags = [
        "--num-layers",
        model.num_layers,
        "--hidden-size",
        model.hidden_size,
        "--num-attention-heads",
        model.num_attention_heads,
        "--num-query-groups",
        model.query_groups,
        "--ffn-hidden-size",
        model.ffn_hidden_size,
        "--normalization",
        model.normalization,
        "--position-embedding-type",
        model.position_embedding_type,
        "--make-vocab-size-divisible-by",
        model.make_vocab_size_divisible_by,
        "--max-position-embeddings",
        model.max_position_embeddings,
        "--init-method-std",
        model.init_method_std,
    ]
    flags += (
        ["--swiglu"] * model.swiglu
        + ["--untie-embeddings-and-output-weights"] * model.untie_embeddings_and_output_weights
        + ["--disable-bias-linear"] * (not model.add_bias_linear)
    )
    return list(map(str, flags))


def _finished(checkpoint: Path, iters: int) -> bool:
    tracker = checkpoint / "latest_checkpointed_iteration.txt"
    return tracker.exists() and int(tracker.read_text().strip()) == iters


def prepare_teacher(plan: Plan) -> str:
    args = plan.args
    if args.teacher_load:
        return args.teacher_load
    ckpt = plan.out / "teacher"
    if not _finished(ckpt, args.teacher_iters):
        registry = write_registry(args.domains, plan.out / "teacher_domains.yaml", plan.natural)
        shutil.rmtree(ckpt, ignore_errors=True)
        print(
            f"training the teacher ({args.teacher_iters} iterations, natural mixture) -> {ckpt}", flush=True
        )
        _run(
            [
                *_torchrun(args.nproc),
                "pretrain_ddk.py",
                "--ddk-mode",
                "cpt",
                *_data_flags(args, registry),
                *_batch_flags(args),
                *TEACHER_MODEL,
                *ARCH,
                "--train-iters",
                args.teacher_iters,
                "--lr",
                "3e-3",
                "--min-lr",
                "3e-4",
                "--lr-warmup-iters",
                str(min(30, args.teacher_iters // 10)),
                "--ddk-val-samples",
                str(args.val_samples),
                "--seed",
                "1234",
                "--save",
                ckpt,
            ],
            plan.out / "teacher.log",
            args.threads,
        )
    return str(ckpt)


def prepare_student(plan: Plan) -> str:
    args = plan.args
    if args.student_load:
        return args.student_load
    ckpt = plan.out / "student_init"
    if not _finished(ckpt, args.student_pretrain_iters):
        weights = args.student_pretrain_weights or plan.natural
        registry = write_registry(args.domains, plan.out / "student_init_domains.yaml", weights)
        shutil.rmtree(ckpt, ignore_errors=True)
        print(
            f"pre-training the student ({args.student_pretrain_iters} iterations, mixture {weights}) -> {ckpt}",
            flush=True,
        )
        _run(
            [
                *_torchrun(args.nproc),
                "pretrain_ddk.py",
                "--ddk-mode",
                "cpt",
                *_data_flags(args, registry),
                *_batch_flags(args),
                *STUDENT_MODEL,
                *ARCH,
                "--train-iters",
                args.student_pretrain_iters,
                "--lr",
                "3e-3",
                "--min-lr",
                "3e-4",
                "--lr-warmup-iters",
                str(min(10, args.student_pretrain_iters // 10)),
                "--ddk-val-samples",
                str(args.val_samples),
                "--seed",
                "1234",
                "--save",
                ckpt,
            ],
            plan.out / "student_init.log",
            args.threads,
        )
    return str(ckpt)


# ------------------------------------------------------------------------------------------- runs
def consumed_mixture(ddk_log: Path, train_iters: int, interval: int) -> list[float]:
    """The average mixture a DDK run trained on: each window's weights times the iterations it lasted."""
    records = [json.loads(line) for line in ddk_log.read_text().splitlines() if line.strip()]
    total = None
    for record in records:
        start = record["iteration"]
        length = min(start + interval, train_iters) - start
        contribution = np.asarray(record["weights"]) * max(length, 0)
        total = contribution if total is None else total + contribution
    return (total / total.sum()).tolist()


def _with_windows(result: dict, method: Method, run_dir: Path) -> dict:
    """A DDK run's result with the mixture of every window (``window_mixtures``), read from its JSONL log."""
    log = run_dir / "ckpt" / "ddk_log.jsonl"
    if method.mode == "ddk" and "window_mixtures" not in result and log.exists():
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        result["window_mixtures"] = [record["weights"] for record in records]
    return result


def _after(dependency, function, *args):
    """``function(*args)`` once ``dependency`` (a future, or None) has finished successfully."""
    if dependency is not None:
        dependency.result()
    return function(*args)


def _interval(method: Method, default: int) -> int:
    flags = list(method.flags)
    return int(flags[flags.index("--ddk-interval") + 1]) if "--ddk-interval" in flags else default


def run_method(plan: Plan, method: Method, seed: int, teacher: str, student: str) -> dict:
    args = plan.args
    run_dir = plan.out / "runs" / f"{method.slug}_seed{seed}"
    result_file = run_dir / "test_eval.json"
    if result_file.exists():
        return _with_windows(json.loads(result_file.read_text()), method, run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    if method.mixture == "hindsight":
        source = parse_method(method.source)
        source_dir = plan.out / "runs" / f"{source.slug}_seed{seed}"
        weights = consumed_mixture(
            source_dir / "ckpt" / "ddk_log.jsonl", args.train_iters, _interval(source, args.ddk_interval)
        )
    else:
        weights = plan.natural if method.mixture == "natural" else [1.0] * len(plan.names)
    registry = write_registry(args.domains, run_dir / "domains.yaml", weights)
    cmd = [
        *_torchrun(args.nproc),
        "pretrain_ddk.py",
        "--ddk-mode",
        method.mode,
        *_data_flags(args, registry),
        *_batch_flags(args),
        *_model_flags(student),
        "--train-iters",
        str(args.train_iters),
        "--lr",
        str(args.lr),
        "--min-lr",
        str(args.min_lr),
        "--lr-warmup-iters",
        str(args.lr_warmup_iters),
        "--seed",
        str(seed),
        "--ddk-val-samples",
        str(args.val_samples),
        "--ddk-interval",
        str(args.ddk_interval),
        "--ddk-alpha",
        str(args.ddk_alpha),
        "--kd-weight",
        str(args.kd_weight),
        "--load",
        student,
        "--finetune",
        "--save",
        run_dir / "ckpt",
    ]
    if method.mode != "cpt":
        cmd += ["--teacher-load", teacher]
    if method.mixing:
        cmd += ["--ddk-mixing", method.mixing]
    cmd += list(method.flags)
    start = time.time()
    _run(cmd, run_dir / "train.log", args.threads)
    train_seconds = time.time() - start
    result = evaluate(plan, run_dir / "ckpt", teacher, run_dir / "eval.log", run_dir / ".test_eval.json")
    result.update(method=method.spec, seed=seed, mixture=weights, train_seconds=train_seconds)
    if method.mode == "ddk":
        result["consumed_mixture"] = consumed_mixture(
            run_dir / "ckpt" / "ddk_log.jsonl", args.train_iters, _interval(method, args.ddk_interval)
        )
    result = _with_windows(result, method, run_dir)
    result_file.write_text(json.dumps(result, indent=1) + "\n")
    (run_dir / ".test_eval.json").unlink(missing_ok=True)
    print(
        f"  {method.spec:>24s} seed {seed}: worst {result['worst_ratio']:.3f} mean {result['mean_ratio']:.3f} "
        f"({train_seconds:.0f}s)",
        flush=True,
    )
    return result


def evaluate(plan: Plan, checkpoint: Path, teacher: str, log: Path, output: Path) -> dict:
    args = plan.args
    _run(
        [
            *_torchrun(args.nproc),
            "tools/evaluate.py",
            "--load",
            checkpoint,
            "--teacher-load",
            teacher,
            "--domains",
            args.domains,
            "--split",
            "test",
            "--num-samples",
            str(args.test_samples),
            "--tokenizer-type",
            args.tokenizer_type,
            "--tokenizer-model",
            args.tokenizer_model,
            "--seq-length",
            str(args.seq_length),
            "--micro-batch-size",
            "16",
            "--data-cache-path",
            str(plan.out / "cache"),
            "--output",
            output,
        ],
        log,
        args.threads,
    )
    return json.loads(output.read_text())


# ------------------------------------------------------------------------------------------- report
def _mean_sd(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else float("nan")


def _mean_se(differences) -> tuple[float, float]:
    d = np.asarray(differences, dtype=np.float64)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("nan")


def _pm(pair, width: int, sign: str = "") -> str:
    """``mean+-sd`` (or the mean alone when there is one seed)."""
    if math.isnan(pair[1]):
        return f"{pair[0]:{sign}{width}.3f}"
    return f"{pair[0]:{sign}6.3f}+-{pair[1]:5.3f}"


def summarize(
    names: list[str], methods: list[Method], results: dict[tuple[str, int], dict], seeds: list[int]
) -> dict:
    """Per method: per-domain / worst / mean ratio (mean, sd over seeds) and seed-paired differences to kd-equal."""
    summary = {"domains": names, "seeds": seeds, "reference": REFERENCE, "methods": {}}
    ref = {s: results[(REFERENCE, s)] for s in seeds}
    for method in methods:
        runs = [results[(method.spec, s)] for s in seeds]
        ratios = np.array([r["ratio"] for r in runs])  # [seeds, domains]
        worst, mean = ratios.max(axis=1), ratios.mean(axis=1)
        d_worst = worst - np.array([ref[s]["worst_ratio"] for s in seeds])
        d_mean = mean - np.array([ref[s]["mean_ratio"] for s in seeds])
        entry = {
            "ratio_mean": ratios.mean(axis=0).tolist(),
            "ratio_sd": (
                ratios.std(axis=0, ddof=1) if len(seeds) > 1 else np.full(len(names), np.nan)
            ).tolist(),
            "worst": _mean_sd(worst),
            "mean": _mean_sd(mean),
            "diff_worst": _mean_se(d_worst),
            "diff_mean": _mean_se(d_mean),
            "per_seed": {
                str(s): {"ratio": r["ratio"], "worst": float(w), "mean": float(m)}
                for s, r, w, m in zip(seeds, runs, worst, mean)
            },
        }
        if "consumed_mixture" in runs[0]:
            entry["consumed_mixture"] = np.mean([r["consumed_mixture"] for r in runs], axis=0).tolist()
        summary["methods"][method.spec] = entry
    for method in methods:  # the dynamic mixture against replaying its own average as a static one
        if method.source:
            dynamic, static = (
                results_by_seed(results, method.source, seeds),
                results_by_seed(results, method.spec, seeds),
            )
            summary["methods"][method.source]["vs_hindsight"] = {
                "worst": _mean_se([d["worst_ratio"] - h["worst_ratio"] for d, h in zip(dynamic, static)]),
                "mean": _mean_se([d["mean_ratio"] - h["mean_ratio"] for d, h in zip(dynamic, static)]),
            }
    for method in methods:  # the paper's factor smoothing (Eq. 2) against its "w/o FS" ablation
        partner = unsmoothed_partner(method, methods)
        if partner is None:
            continue
        smooth, plain = (
            results_by_seed(results, method.spec, seeds),
            results_by_seed(results, partner.spec, seeds),
        )
        distances = [
            0.5 * float(np.abs(np.subtract(a, b)).sum())
            for s, p in zip(smooth, plain)
            for a, b in zip(s.get("window_mixtures", []), p.get("window_mixtures", []))
        ]
        summary["methods"][method.spec]["vs_no_smoothing"] = {
            "method": partner.spec,
            "worst": _mean_se([a["worst_ratio"] - b["worst_ratio"] for a, b in zip(smooth, plain)]),
            "mean": _mean_se([a["mean_ratio"] - b["mean_ratio"] for a, b in zip(smooth, plain)]),
            "window_mixture_tv": float(np.mean(distances)) if distances else None,
        }
    return summary


def unsmoothed_partner(method: Method, methods: list[Method]) -> Method | None:
    """For a paper-exact ``ddk`` method, the ``ddk-no-smoothing`` method with the same overrides (alpha
    aside: Eq. 1 alone does not use it), if the list has one."""
    if method.mixing != "ddk" or method.mixture == "hindsight":
        return None

    def overrides(m: Method) -> dict[str, str]:
        pairs = dict(zip(m.flags[::2], m.flags[1::2]))
        pairs.pop("--ddk-alpha", None)
        return pairs

    for other in methods:
        if other.mixing == "no-smoothing" and overrides(other) == overrides(method):
            return other
    return None


def results_by_seed(results: dict, spec: str, seeds: list[int]) -> list[dict]:
    return [results[(spec, s)] for s in seeds]


def format_summary(summary: dict) -> str:
    names = summary["domains"]
    width = max(24, *(len(m) for m in summary["methods"]))
    header = (
        f"{'method':>{width}s} | "
        + " | ".join(f"{n[:14]:>14s}" for n in names)
        + f" | {'worst':>13s} | {'average':>13s} | {'worst - KD-eq':>15s} | {'avg - KD-eq':>15s}"
    )
    rule = "-" * len(header)
    rows = [
        f"test ratio S/T (ppl student / ppl teacher), mean +- sd over seeds {summary['seeds']}; "
        "differences paired by seed, +- standard error",
        rule,
        header,
        rule,
    ]
    for spec, e in summary["methods"].items():
        cells = [_pm(pair, 14) for pair in zip(e["ratio_mean"], e["ratio_sd"])]
        rows.append(
            f"{spec:>{width}s} | "
            + " | ".join(f"{c:>14s}" for c in cells)
            + f" | {_pm(e['worst'], 13):>13s} | {_pm(e['mean'], 13):>13s}"
            f" | {_pm(e['diff_worst'], 15, '+'):>15s} | {_pm(e['diff_mean'], 15, '+'):>15s}"
        )
    rows.append(rule)
    for spec, e in summary["methods"].items():
        if "vs_hindsight" in e:
            h = e["vs_hindsight"]
            rows.append(
                f"{spec} - hindsight:{spec} (its own average mixture, static): worst "
                f"{_pm(h['worst'], 7, '+')}, average {_pm(h['mean'], 7, '+')}"
            )
    for spec, e in summary["methods"].items():
        if "vs_no_smoothing" in e:
            v = e["vs_no_smoothing"]
            tv = v["window_mixture_tv"]
            rows.append(
                f"{spec} - {v['method']} (Eq. 2's smoothing vs none): worst {_pm(v['worst'], 7, '+')}, "
                f"average {_pm(v['mean'], 7, '+')}"
                + (
                    ""
                    if tv is None
                    else f"; their window mixtures differ by {tv:.3f} (total variation, mean)"
                )
            )
    return "\n".join(rows)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary["methods"])
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(methods)), 4.5))
    for ax, key, title in (
        (axes[0], "worst", "worst-domain test ratio S/T"),
        (axes[1], "mean", "average test ratio S/T"),
    ):
        means = [summary["methods"][m][key][0] for m in methods]
        sds = [np.nan_to_num(summary["methods"][m][key][1]) for m in methods]
        colors = [
            "tab:gray"
            if m == REFERENCE
            else "tab:blue"
            if m.startswith(("ddk", "hindsight"))
            else "tab:orange"
            for m in methods
        ]
        ax.bar(range(len(methods)), means, yerr=sds, color=colors, capsize=3)
        ax.axhline(summary["methods"][REFERENCE][key][0], color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=60, ha="right", fontsize=8)
        ax.set_title(title)
        low = min(m - s for m, s in zip(means, sds))
        ax.set_ylim(max(0.0, low - 0.1 * abs(low)), None)
    fig.suptitle(f"DDK ablation, seeds {summary['seeds']} (bars: mean +- sd; dashed: {REFERENCE})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domains", required=True, help="registry with train / valid / test per domain")
    p.add_argument("--tokenizer-type", default="SentencePieceTokenizer")
    p.add_argument("--tokenizer-model", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[1234, 1235, 1236])
    p.add_argument("--teacher-load", default=None)
    p.add_argument("--teacher-iters", type=int, default=300)
    p.add_argument("--student-load", default=None)
    p.add_argument("--student-pretrain-iters", type=int, default=60)
    p.add_argument("--student-pretrain-weights", nargs="+", type=float, default=None)
    p.add_argument("--train-iters", type=int, default=60)
    p.add_argument("--ddk-interval", type=int, default=8)
    p.add_argument("--ddk-alpha", type=float, default=0.5)
    p.add_argument("--kd-weight", type=float, default=0.2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--lr-warmup-iters", type=int, default=5)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--val-samples", type=int, default=32, help="--ddk-val-samples (validation split)")
    p.add_argument("--test-samples", type=int, default=0, help="test samples per domain (0: all)")
    p.add_argument("--nproc", type=int, default=1, help="torchrun processes per run")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per process")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        names, natural, methods = check_inputs(args)
    except UserError as err:
        print(f"ddk_ablation.py: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = Plan(args, out, names, natural, methods)
    (out / "command.txt").write_text(" ".join([sys.executable, *sys.argv]) + "\n")
    teacher = prepare_teacher(plan)
    student = prepare_student(plan)
    start_eval = out / "student_init_test_eval.json"
    if not start_eval.exists():
        initial = evaluate(plan, Path(student), teacher, out / "student_init_eval.log", out / ".start.json")
        start_eval.write_text(json.dumps(initial, indent=1) + "\n")
    initial = json.loads(start_eval.read_text())
    print(
        "student init, test ratios: " + ", ".join(f"{n} {r:.3f}" for n, r in zip(names, initial["ratio"])),
        flush=True,
    )
    results: dict[tuple[str, int], dict] = {}
    # method by method, in the order given (a study cut short has whole methods); hindsight:M waits for M's
    # run of the same seed, which was submitted before it (sources come first in the list: check_inputs)
    jobs = [(m, s) for m in methods for s in args.seeds]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures: dict = {}
        for method, seed in jobs:
            source = futures.get((method.source, seed))
            futures[(method.spec, seed)] = pool.submit(
                _after, source, run_method, plan, method, seed, teacher, student
            )
        for key, future in futures.items():
            results[key] = future.result()
    summary = summarize(names, methods, results, args.seeds)
    summary["student_init_ratio"] = initial["ratio"]
    summary["natural_mixture"] = natural
    summary["settings"] = {k: v for k, v in vars(args).items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, out / "ablation.png")
    print(format_summary(summary))
    print(f"wrote {out / 'summary.json'} and {out / 'ablation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
