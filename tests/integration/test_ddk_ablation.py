"""benchmarks/ddk_ablation.py shrunk (2 methods, 1 seed, 4 iterations): the table's plumbing, resume, bad input."""

from __future__ import annotations

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
