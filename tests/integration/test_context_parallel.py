"""Context parallelism on CPU (all-gather attention): CP=2 reproduces CP=1 for KD and for DDK's
validation-driven weights; the attention and the sequence split agree with the full sequence."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import SCRIPTS, read_json, torchrun
from tests.integration.test_distillation import teacher  # noqa: F401  (session fixture)
from tests.runs import STUDENT, assert_series_close, data_args, pretrain, train_args

pytestmark = pytest.mark.slow

CP2 = ["--context-parallel-size", "2"]


@pytest.mark.parametrize("nproc", [2, 4], ids=["cp2", "cp4"])
def test_all_gather_attention_equals_full_causal_attention(tmp_path, nproc):
    """Values and gradients of q, k, v (GQA: 4 heads, 2 groups) on each rank's two chunks; the batch split."""
    torchrun(SCRIPTS / "cp_attention.py", nproc, tmp_path / "out.json", timeout=120)
    records = read_json(tmp_path / "out.json")
    assert sorted(r["cp_rank"] for r in records) == list(range(nproc))
    for r in records:
        assert r["cp_size"] == nproc and r["split_ok"], r
        assert r["out_err"] <= 1e-5 * r["out_scale"], r
        for name in "qkv":
            assert r[f"grad_{name}_err"] <= 1e-5 * r["grad_scale"], r


def distill(corpus, tmp, teacher_dir, mode, iters, *extra):
    return [
        *STUDENT,
        *train_args(iters),
        *data_args(corpus, tmp / "cache"),
        "--ddk-mode",
        mode,
        "--teacher-load",
        str(teacher_dir),
        *extra,
    ]


@pytest.fixture(scope="module")
def kd_cp1(tiny_corpus, tmp_path_factory, teacher):  # noqa: F811
    return pretrain(1, *distill(tiny_corpus, tmp_path_factory.mktemp("kd_cp1"), teacher, "kd", 3))


@pytest.mark.parametrize(
    "nproc,layout", [(2, CP2), (4, [*CP2, "--tensor-model-parallel-size", "2"])], ids=["cp2", "cp2xtp2"]
)
def test_kd_cp_matches_cp1(tiny_corpus, tmp_path, teacher, kd_cp1, nproc, layout):  # noqa: F811
    """CE, KD and the teacher's CE are per-token means over whole sequences (sums over the CP group)."""
    run = pretrain(nproc, *distill(tiny_corpus, tmp_path, teacher, "kd", 3, *layout))
    for key in ("lm loss", "kd loss", "teacher lm loss"):
        assert_series_close(run.series(key), kd_cp1.series(key))
    assert run.series("grad norm") == pytest.approx(kd_cp1.series("grad norm"), rel=1e-4)


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_ddk_cp2_matches_cp1(tiny_corpus, tmp_path, teacher):  # noqa: F811
    """DDK's per-domain validation CE (student and teacher) and the weights it derives, at CP=2 and
    CP=2 x DP=2; the CP=2 checkpoint resumes at CP=1."""
    runs, logs = {}, {}
    for name, nproc, layout in (("cp1", 1, []), ("cp2", 2, CP2)):
        out = tmp_path / name
        runs[name] = pretrain(
            nproc,
            *distill(
                tiny_corpus, out, teacher, "ddk", 4, "--ddk-interval", "2", "--save", out / "ckpt", *layout
            ),
        )
        logs[name] = read_log(out / "ckpt" / "ddk_log.jsonl")
    assert_series_close(runs["cp2"].series("lm loss"), runs["cp1"].series("lm loss"))
    assert [r["iteration"] for r in logs["cp2"]] == [r["iteration"] for r in logs["cp1"]] == [0, 2]
    for mine, theirs in zip(logs["cp2"], logs["cp1"], strict=True):
        for key in ("ce_student", "ce_teacher", "weights"):
            np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-6, err_msg=key)
