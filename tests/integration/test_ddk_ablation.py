"""benchmarks/ddk_ablation.py shrunk (2 methods, 1 seed, 4 iterations): the table's plumbing, resume, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from tests.helpers import python, read_json
from tests.integration.test_distillation import teacher  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow


def test_registry(corpus, tmp_path, *, test_fraction=0.1):
    raw = yaml.safe_load(corpus["registry"].read_text())
    for entry in raw["domains"]:
        entry["train"] = str(corpus["registry"].parent / entry["train"])
        if test_fraction:
            entry["test_fraction"] = test_fraction
    path = tmp_path / "domains.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


test_registry.__test__ = False  # a helper, not a test


def ablation(corpus, registry, out, teacher_dir, *extra, check=True):
    return python(
        "benchmarks/ddk_ablation.py",
        "--domains",
        registry,
        "--tokenizer-model",
        corpus["tokenizer"],
        "--output-dir",
        out,
        "--teacher-load",
        teacher_dir,
        "--student-pretrain-iters",
        "2",
        "--train-iters",
        "4",
        "--ddk-interval",
        "2",
        "--seq-length",
        "32",
        "--micro-batch-size",
        "4",
        "--global-batch-size",
        "4",
        "--val-samples",
        "4",
        "--test-samples",
        "4",
        "--lr-warmup-iters",
        "1",
        *extra,
        check=check,
    )


def test_shrunk_ablation_table(tiny_corpus, tmp_path, teacher):  # noqa: F811
    registry = test_registry(tiny_corpus, tmp_path)
    out = tmp_path / "ablation"
    run = ablation(tiny_corpus, registry, out, teacher, "--methods", "kd-equal", "ddk", "--seeds", "7")
    summary = read_json(out / "summary.json")
    assert list(summary["methods"]) == ["kd-equal", "ddk"] and summary["seeds"] == [7]
    ref, ddk = summary["methods"]["kd-equal"], summary["methods"]["ddk"]
    assert ref["diff_worst"][0] == 0.0 and ref["diff_mean"][0] == 0.0
    per_seed = ddk["per_seed"]["7"]
    assert per_seed["worst"] == max(per_seed["ratio"]) and per_seed["mean"] == pytest.approx(
        np.mean(per_seed["ratio"])
    )
    assert ddk["diff_worst"][0] == pytest.approx(per_seed["worst"] - ref["per_seed"]["7"]["worst"])
    assert abs(sum(ddk["consumed_mixture"]) - 1) < 1e-9
    assert "worst - KD-eq" in run.stdout and (out / "ablation.png").stat().st_size > 10_000
    # resumable: finished runs are skipped, the table is rebuilt from their results
    logs = sorted((out / "runs").glob("*/train.log"))
    before = [p.read_text() for p in logs]
    again = ablation(tiny_corpus, registry, out, teacher, "--methods", "kd-equal", "ddk", "--seeds", "7")
    assert [p.read_text() for p in logs] == before
    assert again.stdout.splitlines()[-2] == run.stdout.splitlines()[-2]


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--methods", "kd-equal", "greedy"], "unknown method 'greedy'"),
        (["--methods", "ddk"], "must include kd-equal"),
        (["--methods", "kd-equal", "ddk@beta=2"], "'beta=2' is not KEY=VALUE"),
        (["--methods", "kd-equal", "hindsight:ddk"], "list ddk before it"),
    ],
)
def test_bad_methods(tiny_corpus, tmp_path, teacher, extra, needle):  # noqa: F811
    run = ablation(
        tiny_corpus, test_registry(tiny_corpus, tmp_path), tmp_path / "out", teacher, *extra, check=False
    )
    assert run.returncode == 2 and needle in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_registry_without_test_split_is_refused(tiny_corpus, tmp_path, teacher):  # noqa: F811
    registry = test_registry(tiny_corpus, tmp_path, test_fraction=0)
    run = ablation(tiny_corpus, registry, tmp_path / "out", teacher, check=False)
    assert run.returncode == 2 and "have no test split" in run.stderr
    assert not (tmp_path / "out").exists()


def _ablation_module():
    import importlib.util
    import sys

    from tests.helpers import REPO_ROOT

    spec = importlib.util.spec_from_file_location(
        "ddk_ablation", REPO_ROOT / "benchmarks" / "ddk_ablation.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["ddk_ablation"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_smoothing_is_compared_with_its_unsmoothed_partner():
    """``ddk`` (any alpha) is paired with ``ddk-no-smoothing`` of the same other overrides: seed-paired
    differences and the mean total-variation distance between their window mixtures."""
    ablation = _ablation_module()
    specs = ["kd-equal", "ddk", "ddk-no-smoothing", "ddk@alpha=0.8", "ddk@K=3", "ddk-log"]
    methods = [ablation.parse_method(s) for s in specs]
    partner = {m.spec: getattr(ablation.unsmoothed_partner(m, methods), "spec", None) for m in methods}
    assert partner == {
        "kd-equal": None,
        "ddk": "ddk-no-smoothing",
        "ddk-no-smoothing": None,
        "ddk@alpha=0.8": "ddk-no-smoothing",
        "ddk@K=3": None,  # no ddk-no-smoothing@K=3 in the list
        "ddk-log": None,
    }
    worst = {
        "kd-equal": 2.0,
        "ddk": 1.9,
        "ddk-no-smoothing": 1.8,
        "ddk@alpha=0.8": 2.1,
        "ddk@K=3": 1.9,
        "ddk-log": 1.7,
    }
    windows = {"ddk": [[0.5, 0.5], [0.6, 0.4]], "ddk-no-smoothing": [[0.5, 0.5], [0.7, 0.3]]}
    results = {}
    for spec in specs:
        for seed, shift in ((1, 0.0), (2, 0.02)):
            result = {"ratio": [1.0, worst[spec] + shift], "worst_ratio": worst[spec] + shift}
            result["mean_ratio"] = (1.0 + result["worst_ratio"]) / 2
            if spec in windows:
                result["window_mixtures"] = windows[spec]
            results[(spec, seed)] = result
    summary = ablation.summarize(["a", "b"], methods, results, [1, 2])
    compared = summary["methods"]["ddk"]["vs_no_smoothing"]
    assert compared["method"] == "ddk-no-smoothing" and compared["worst"] == pytest.approx((0.1, 0.0))
    assert compared["window_mixture_tv"] == pytest.approx(0.05)  # windows differ by 0 and by 0.1
    assert summary["methods"]["ddk@alpha=0.8"]["vs_no_smoothing"]["window_mixture_tv"] is None
    assert "ddk - ddk-no-smoothing (Eq. 2's smoothing vs none): worst +0.100" in ablation.format_summary(
        summary
    )


def test_study_table_lines_up_the_studies(tmp_path):
    """benchmarks/ddk_study_table.py: one row per method (first study's order), '.' where a study lacks it."""
    from tests.helpers import python

    def study(name, methods):
        out = tmp_path / name
        out.mkdir()
        entries = {m: {"diff_worst": [d, 0.01], "diff_mean": [d / 2, 0.002]} for m, d in methods.items()}
        (out / "summary.json").write_text(json.dumps({"reference": "kd-equal", "methods": entries}))
        return f"{name}={out}"

    run = python(
        "benchmarks/ddk_study_table.py",
        study("near", {"kd-equal": 0.0, "ddk": -0.05}),
        study("far", {"kd-equal": 0.0, "ddk-log": -0.25, "ddk": 0.35}),
    )
    assert run.stdout.splitlines() == [
        "| method | near | far |",
        "|---|---|---|",
        "| `ddk` | -0.050 ± 0.010 / -0.025 ± 0.002 | +0.350 ± 0.010 / +0.175 ± 0.002 |",
        "| `ddk-log` | . | -0.250 ± 0.010 / -0.125 ± 0.002 |",
    ]
    missing = python("benchmarks/ddk_study_table.py", f"x={tmp_path / 'nothing'}", check=False)
    assert missing.returncode == 2 and "is not NAME=DIR with DIR/summary.json" in missing.stderr
