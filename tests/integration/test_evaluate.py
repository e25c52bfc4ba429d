"""tools/evaluate.py: per-domain CE of a student and a teacher on the test split, equal at every layout."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from tests.helpers import REPO_ROOT, python, read_json, torchrun
from tests.integration.test_distillation import teacher  # noqa: F401  (session fixture)
from tests.runs import STUDENT, data_args, evaluation_args, pretrain, train_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tiny_corpus, tmp_path_factory, teacher):  # noqa: F811
    tmp = tmp_path_factory.mktemp("evaluate")
    raw = yaml.safe_load(tiny_corpus["registry"].read_text())
    base = tiny_corpus["registry"].parent
    for entry in raw["domains"]:
        entry["train"] = str(base / entry["train"])
        entry["test_fraction"] = 0.1
    registry = tmp / "domains.yaml"
    registry.write_text(yaml.safe_dump(raw))
    pretrain(
        1,
        *STUDENT,
        *train_args(2),
        *data_args(tiny_corpus, tmp / "cache"),
        "--ddk-mode",
        "cpt",
        "--save",
        tmp / "student",
    )
    return tmp, registry


def evaluate(corpus, tmp, registry, teacher_dir, nproc, *extra, output="eval.json", check=True):
    return torchrun(
        REPO_ROOT / "tools" / "evaluate.py",
        nproc,
        "--load",
        tmp / "student",
        "--teacher-load",
        teacher_dir,
        *evaluation_args(corpus, registry, tmp / "cache", split="test", num_samples=6, micro_batch_size=2),
        "--output",
        tmp / output,
        *extra,
        check=check,
    )


@pytest.fixture(scope="module")
def reference(tiny_corpus, setup, teacher):  # noqa: F811
    tmp, registry = setup
    run = evaluate(tiny_corpus, tmp, registry, teacher, 1, output="tp1.json")
    return run, read_json(tmp / "tp1.json")


def test_table_and_json(reference):
    run, result = reference
    assert "ratio S/T" in run.stdout and "worst-domain ratio" in run.stdout
    assert result["split"] == "test" and result["samples_per_domain"] == [6] * len(result["domains"])
    np.testing.assert_allclose(
        result["ratio"], np.exp(np.subtract(result["ce_student"], result["ce_teacher"]))
    )
    assert all(t > 0 for t in result["tokens"]) and result["worst_ratio"] == max(result["ratio"])


@pytest.mark.parametrize(
    "layout",
    [("--tensor-model-parallel-size", "2"), ("--pipeline-model-parallel-size", "2"), ()],
    ids=["tp2", "pp2", "dp2"],
)
def test_layouts_match_tp1(tiny_corpus, setup, teacher, reference, layout):  # noqa: F811
    tmp, registry = setup
    _, ref = reference
    evaluate(tiny_corpus, tmp, registry, teacher, 2, *layout, output="layout.json")
    result = read_json(tmp / "layout.json")
    assert result["tokens"] == ref["tokens"]  # every sample counted once, whatever the DP split
    np.testing.assert_allclose(result["ce_student"], ref["ce_student"], rtol=1e-5)
    np.testing.assert_allclose(result["ce_teacher"], ref["ce_teacher"], rtol=1e-5)


def test_registry_without_test_split_is_refused(tiny_corpus, setup, teacher):  # noqa: F811
    tmp, _ = setup
    run = evaluate(tiny_corpus, tmp, tiny_corpus["registry"], teacher, 1, output="none.json", check=False)
    assert run.returncode != 0 and not (tmp / "none.json").exists()  # torchrun reports the child's 2 as 1
    errors = [line for line in run.stderr.splitlines() if line.startswith("tools/evaluate.py: error:")]
    assert len(errors) == 1 and "have no test split" in errors[0], run.stderr[-2000:]


def test_teacher_cache_flags_are_checked_first(tmp_path):
    """Refused in one line before any file is read (the paths do not exist): both teacher flags, and the
    cache (which holds no test samples) with --split test."""
    run = python(
        "tools/evaluate.py",
        "--load",
        tmp_path / "none",
        "--domains",
        tmp_path / "none.yaml",
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        tmp_path / "none.model",
        "--seq-length",
        "32",
        "--teacher-load",
        "t",
        "--teacher-cache",
        "c",
        "--split",
        "test",
        check=False,
    )
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "at most one of --teacher-load and --teacher-cache" in run.stderr
    assert "holds training and validation samples only" in run.stderr
