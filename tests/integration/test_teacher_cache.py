"""The teacher cache end to end: the tool (TP=2, kill and resume), DDK from the cache (DP, resume, first
weights as online), and the refusals (another identity, uncached samples, damaged shards)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_ddk.distill import teacher_cache as tc
from megatron_ddk.errors import CheckpointError
from tests.helpers import REPO_ROOT, free_port, subprocess_env, torchrun
from tests.integration.test_distillation import _edited_teacher, teacher  # noqa: F401  (session fixture)
from tests.runs import STUDENT, assert_series_close, data_args, evaluation_args, pretrain, train_args

pytestmark = pytest.mark.slow
TOOL = REPO_ROOT / "tools" / "cache_teacher_logits.py"
RUN = ["--train-iters", "6", "--global-batch-size", "8", "--ddk-interval", "2", "--ddk-mode", "ddk"]
"""The DDK run of this file, as the tool's selection flags."""


def tool_args(corpus, out, teacher_dir, *extra):
    return [
        "--output",
        out,
        "--teacher-load",
        teacher_dir,
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        corpus["tokenizer"],
        "--domains",
        corpus["registry"],
        "--data-cache-path",
        Path(out).parent / "data_cache",
        "--seq-length",
        "32",
        "--top-k",
        "16",
        "--tail-samples",
        "0",  # the top-k estimator (the sampled tail has its own test below, and is the tool's default)
        "--micro-batch-size",
        "4",
        "--val-samples",
        "8",
        "--no-progress",
        *map(str, extra),
    ]


def ddk(corpus, tmp, iters, *extra):
    return [
        *STUDENT,
        *train_args(iters),
        *data_args(corpus, tmp / "cache"),
        "--ddk-mode",
        "ddk",
        "--ddk-interval",
        "2",
        "--kd-weight",
        "0.5",
        *map(str, extra),
    ]


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cache(tiny_corpus, tmp_path_factory, teacher):  # noqa: F811
    """What the DDK run below can draw, cached by the teacher at TP=2 (the run itself is at TP=1)."""
    out = tmp_path_factory.mktemp("teacher_cache") / "cache"
    proc = torchrun(
        TOOL,
        2,
        *tool_args(
            tiny_corpus, out, teacher, *RUN, "--shard-size", "16", "--tensor-model-parallel-size", "2"
        ),
    )
    assert "complete" in proc.stdout and "tokens/s" in proc.stdout
    return out


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory, cache):
    tmp = tmp_path_factory.mktemp("cached_ddk")
    run = pretrain(1, *ddk(tiny_corpus, tmp, 6, "--teacher-cache", cache, "--save", tmp / "ckpt"))
    return tmp, run, read_log(tmp / "ckpt" / "ddk_log.jsonl")


def test_ddk_from_the_cache_trains_with_the_sparse_kd_term(reference, cache):
    _, run, log = reference
    assert sorted(run.metrics) == list(range(1, 7))
    assert all(v > 0 for v in run.series("kd loss"))
    assert all("teacher lm loss" in m for m in run.metrics.values())
    assert [r["iteration"] for r in log] == [0, 2, 4]
    index = tc.read_index(cache)
    assert all(shard["sha256"] for shard in index["shards"])
    assert index["layout"] == {
        "seq_length": 32,
        "top_k": 16,
        "id_dtype": "uint16",
        "log_prob_dtype": "float16",
    }


def test_first_window_weights_equal_online_ddk(tiny_corpus, tmp_path, teacher, reference):  # noqa: F811
    """The teacher's validation CE from the (TP=2) cache is the online teacher's: same Eq. 1 weights."""
    _, _, cached_log = reference
    online = pretrain(
        1, *ddk(tiny_corpus, tmp_path, 2, "--teacher-load", teacher, "--save", tmp_path / "ckpt")
    )
    assert online.returncode == 0
    online_log = read_log(tmp_path / "ckpt" / "ddk_log.jsonl")
    np.testing.assert_allclose(cached_log[0]["ce_teacher"], online_log[0]["ce_teacher"], rtol=1e-5)
    np.testing.assert_allclose(cached_log[0]["weights"], online_log[0]["weights"], rtol=1e-5)


def evaluation(corpus, tmp, student, num_samples, *teacher_flags):
    """tools/evaluate.py's flags for the validation split of this file's corpus."""
    data = evaluation_args(
        corpus,
        corpus["registry"],
        tmp / "data_cache",
        split="valid",
        num_samples=num_samples,
        micro_batch_size=4,
    )
    return ["--load", student, *teacher_flags, *data]


def test_evaluate_from_the_cache_equals_the_online_teacher(tiny_corpus, tmp_path, cache, teacher, reference):  # noqa: F811
    """tools/evaluate.py --teacher-cache (at DP=2) gives the online teacher's CE and ratios (TP=1); asked for
    validation samples the cache lacks, it names the cached prefix before building a model."""
    evaluate, student = REPO_ROOT / "tools" / "evaluate.py", reference[0] / "ckpt"
    online = tmp_path / "online.json"
    torchrun(
        evaluate,
        1,
        *evaluation(tiny_corpus, tmp_path, student, 8, "--teacher-load", teacher),
        "--output",
        online,
    )
    cached = tmp_path / "cached.json"
    run = torchrun(
        evaluate,
        2,
        *evaluation(tiny_corpus, tmp_path, student, 8, "--teacher-cache", cache),
        "--output",
        cached,
    )
    assert f"vs teacher {cache} (cached CE)" in run.stdout
    want, got = json.loads(online.read_text()), json.loads(cached.read_text())
    assert got["teacher_source"] == "cache" and got["tokens"] == want["tokens"]
    for key in ("ce_teacher", "ce_student", "ratio"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5)
    refused = subprocess.run(
        [sys.executable, evaluate, *evaluation(tiny_corpus, tmp_path, student, 9, "--teacher-cache", cache)],
        cwd=REPO_ROOT,
        env=subprocess_env(None),
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "use --num-samples 8 or add them" in refused.stderr, refused.stderr[
        -2000:
    ]
    assert len(refused.stderr.strip().splitlines()) == 1


def test_dp2_equals_dp1(tiny_corpus, tmp_path, cache, reference):
    _, ref, ref_log = reference
    run = pretrain(2, *ddk(tiny_corpus, tmp_path, 6, "--teacher-cache", cache, "--save", tmp_path / "ckpt"))
    assert_series_close(run.series("lm loss"), ref.series("lm loss"))
    assert_series_close(run.series("kd loss"), ref.series("kd loss"))
    for mine, theirs in zip(read_log(tmp_path / "ckpt" / "ddk_log.jsonl"), ref_log, strict=True):
        np.testing.assert_allclose(mine["weights"], theirs["weights"], rtol=1e-6)


def test_cp2_equals_cp1(tiny_corpus, tmp_path, cache, reference):
    """The cache's [b, s, k] rows are cut with the sequence; its per-sample teacher CE counted once."""
    _, ref, ref_log = reference
    run = pretrain(
        2,
        *ddk(tiny_corpus, tmp_path, 6, "--teacher-cache", cache, "--save", tmp_path / "ckpt"),
        "--context-parallel-size",
        "2",
    )
    for key in ("lm loss", "kd loss", "teacher lm loss"):
        assert_series_close(run.series(key), ref.series(key))
    for mine, theirs in zip(read_log(tmp_path / "ckpt" / "ddk_log.jsonl"), ref_log, strict=True):
        np.testing.assert_allclose(mine["weights"], theirs["weights"], rtol=1e-6)


def test_resume_reproduces_uninterrupted_run(tiny_corpus, tmp_path, cache, reference):
    _, ref, ref_log = reference
    args = ddk(
        tiny_corpus,
        tmp_path,
        6,
        "--teacher-cache",
        cache,
        "--save",
        tmp_path / "ckpt",
        "--load",
        tmp_path / "ckpt",
    )
    first = pretrain(1, *args, "--exit-interval", "3")
    second = pretrain(1, *args)
    assert_series_close(first.series("lm loss") + second.series("lm loss"), ref.series("lm loss"))
    assert_series_close(first.series("kd loss") + second.series("kd loss"), ref.series("kd loss"))
    for mine, theirs in zip(read_log(tmp_path / "ckpt" / "ddk_log.jsonl"), ref_log, strict=True):
        np.testing.assert_allclose(mine["weights"], theirs["weights"], rtol=1e-9)


def test_run_that_could_draw_uncached_samples_is_refused(tiny_corpus, tmp_path, cache):
    run = pretrain(1, *ddk(tiny_corpus, tmp_path, 12, "--teacher-cache", cache), check=False)
    assert run.returncode != 0 and "iteration" not in run.stdout
    error = [line for line in run.stderr.splitlines() if line.startswith("pretrain_ddk.py: error:")]
    assert len(error) == 1, run.stderr[-3000:]
    assert "lacks samples this run can draw" in error[0] and "python_code: " in error[0]
    assert "cache_teacher_logits.py" in error[0] and "--train-iters 12" in error[0]
    assert "--top-k 16 --tail-samples 0" in error[0]  # the fill command builds the same kind of cache


def test_online_teacher_fills_in_for_uncached_samples(tiny_corpus, tmp_path, cache, teacher, reference):  # noqa: F811
    """Twice as long as the cache covers, with --teacher-load: the covered part is the cached run's."""
    _, ref, _ = reference
    run = pretrain(
        1,
        *ddk(
            tiny_corpus,
            tmp_path,
            12,
            "--teacher-cache",
            cache,
            "--teacher-load",
            teacher,
            "--lr-decay-iters",
            "6",
        ),
    )
    assert sorted(run.metrics) == list(range(1, 13)) and all(v > 0 for v in run.series("kd loss"))
    assert_series_close(run.series("lm loss")[:6], ref.series("lm loss"))
    assert_series_close(run.series("kd loss")[:6], ref.series("kd loss"))


# ------------------------------------------------------------------ refusals, checked in-process (no training)
def cached_teacher(corpus, tmp, cache_dir, *extra):
    from megatron_ddk.arguments import parse_run
    from megatron_ddk.data.domains import load_domain_registry
    from megatron_ddk.distill.teacher_source import CachedTeacher

    cfg, tokenizer = parse_run(ddk(corpus, tmp, 6, "--teacher-cache", cache_dir, *extra))
    return CachedTeacher(cfg, tokenizer, load_domain_registry(cfg.data.domains))


def edited_cache(cache, tmp_path, edit):
    copy = tmp_path / "cache_copy"
    shutil.copytree(cache, copy)
    index = json.loads((copy / tc.INDEX_FILENAME).read_text())
    edit(index)
    (copy / tc.INDEX_FILENAME).write_text(json.dumps(index))
    return copy


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda i: i["identity"]["tokenizer"].update(sha256="0" * 64), "another tokenizer"),
        (
            lambda i: i["identity"]["data"]["domains"][1]["train"][0].update(idx_sha256="0" * 64),
            "other datasets",
        ),
        (lambda i: i["identity"]["data"].update(seed=7), "other datasets"),
    ],
    ids=["tokenizer", "dataset", "seed"],
)
def test_cache_of_another_identity_is_refused(tiny_corpus, tmp_path, cache, edit, words):
    with pytest.raises(CheckpointError, match=words):
        cached_teacher(tiny_corpus, tmp_path, edited_cache(cache, tmp_path, edit))


def test_another_seq_length_or_temperature_is_refused(tiny_corpus, tmp_path, cache):
    with pytest.raises(CheckpointError, match=r"another --seq-length \(seq_length: cache 32, this run 16\)"):
        cached_teacher(tiny_corpus, tmp_path, cache, "--seq-length", "16")
    with pytest.raises(CheckpointError, match="another --kd-temperature"):
        cached_teacher(tiny_corpus, tmp_path, cache, "--kd-temperature", "2.0")


def test_another_teacher_is_refused(tiny_corpus, tmp_path, cache, teacher):  # noqa: F811
    other = _edited_teacher(teacher, tmp_path, lambda m: m.update(iteration=m["iteration"] + 1))
    cached_teacher(tiny_corpus, tmp_path, cache, "--teacher-load", teacher)  # the cache's own teacher: fine
    with pytest.raises(CheckpointError, match="another teacher checkpoint"):
        cached_teacher(tiny_corpus, tmp_path, cache, "--teacher-load", other)


@pytest.mark.parametrize("damage", ["corrupted", "truncated"])
def test_damaged_shard_is_named(tiny_corpus, tmp_path, cache, damage):
    copy = edited_cache(cache, tmp_path, lambda index: None)
    victim = copy / tc.read_index(copy)["shards"][1]["file"]
    data = bytearray(victim.read_bytes())
    if damage == "corrupted":
        data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data if damage == "corrupted" else data[:-100]))
    with pytest.raises(CheckpointError) as err:
        _check_coverage(cached_teacher(tiny_corpus, tmp_path, copy), tiny_corpus, tmp_path)
    message = str(err.value)
    assert victim.name in message and "\n" not in message
    assert ("fails its checksum" if damage == "corrupted" else "truncated") in message


def test_sizes_only_skips_the_checksums_not_the_sizes(tiny_corpus, tmp_path, cache):
    """--teacher-cache-verify sizes-only: the documented trade (a flipped bit passes), a truncated shard does not."""
    copy = edited_cache(cache, tmp_path, lambda index: None)
    victim = copy / tc.read_index(copy)["shards"][1]["file"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    source = cached_teacher(tiny_corpus, tmp_path, copy, "--teacher-cache-verify", "sizes-only")
    _check_coverage(source, tiny_corpus, tmp_path)  # the flipped bit is not read
    victim.write_bytes(bytes(data[:-100]))
    with pytest.raises(CheckpointError, match="truncated"):
        cached_teacher(tiny_corpus, tmp_path, copy, "--teacher-cache-verify", "sizes-only")


def _check_coverage(source, corpus, tmp_path) -> None:
    """What a run does with the cache before training: build its datasets, check coverage and shards."""
    from megatron_ddk.data.datasets import build_domain_datasets

    domains = build_domain_datasets(
        source.registry,
        tokenizer=_tokenizer(corpus),
        seq_length=32,
        seed=1234,
        cache_dir=str(tmp_path / "cache"),
    )
    source.check_coverage(domains, rank=0, world=1)


def _tokenizer(corpus):
    from megatron_ddk.data.tokenizer import build_tokenizer

    return build_tokenizer("SentencePieceTokenizer", corpus["tokenizer"])


# ------------------------------------------------------------------------------------- the tool
def test_tool_refuses_to_mix_identities(tiny_corpus, tmp_path, cache, teacher):  # noqa: F811
    copy = edited_cache(cache, tmp_path, lambda index: None)
    proc = torchrun(TOOL, 1, *tool_args(tiny_corpus, copy, teacher, "--top-k", "8"), check=False)
    assert proc.returncode != 0
    assert "holds a cache built for another --top-k" in proc.stderr


SMALL = ["--max-samples-per-domain", "6", "--val-samples", "2", "--shard-size", "1"]
"""A small selection, one sample per shard (32 shards): a kill lands between shards."""


def cache_files(directory: Path) -> dict[Path, bytes]:
    return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def small_cache(tiny_corpus, tmp_path_factory, teacher):  # noqa: F811
    """``SMALL`` built uninterrupted with the teacher at TP = PP = 1: what other builds must reproduce."""
    out = tmp_path_factory.mktemp("small_cache") / "whole"
    torchrun(TOOL, 1, *tool_args(tiny_corpus, out, teacher, *SMALL))
    return out


def test_pp2_build_is_byte_identical_to_pp1(tiny_corpus, tmp_path, teacher, small_cache):  # noqa: F811
    """Pipeline stages split the layers, not any reduction: every fp32 op runs on the same values in the
    same order, so the files (index included: it records no parallel layout) are byte-identical."""
    out = tmp_path / "pp2"
    torchrun(TOOL, 2, *tool_args(tiny_corpus, out, teacher, *SMALL, "--pipeline-model-parallel-size", "2"))
    whole, pp2 = cache_files(small_cache), cache_files(out)
    assert sorted(pp2) == sorted(whole) and len(whole) == 1 + 4 * 2 + 32 * 2
    assert all(pp2[name] == whole[name] for name in whole), [n for n in whole if pp2[n] != whole[n]]


def test_kill_and_resume_is_byte_identical(tiny_corpus, tmp_path, teacher, small_cache):  # noqa: F811
    killed = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=1",
        f"--master_port={free_port()}",
        "--master_addr=127.0.0.1",
        str(TOOL),
        *map(str, tool_args(tiny_corpus, killed, teacher, *SMALL)),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while (
            len(list(killed.glob("shards/*.sha256"))) < 3 and proc.poll() is None and time.time() < deadline
        ):
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = len(list(killed.glob("shards/*.sha256")))
    assert 3 <= finished < 32, finished  # killed mid-way
    resumed = torchrun(TOOL, 1, *tool_args(tiny_corpus, killed, teacher, *SMALL))
    assert f"{finished} finished and verified" in resumed.stdout or "finished and verified" in resumed.stdout
    whole, again = cache_files(small_cache), cache_files(killed)
    assert sorted(whole) == sorted(again) and len(whole) == 1 + 4 * 2 + 32 * 2
    assert all(whole[name] == again[name] for name in whole), [n for n in whole if whole[n] != again[n]]


# ------------------------------------------------------------------------- sampled tail (--tail-samples)
def test_tail_samples_are_drawn_by_text_and_train_forward_kl_only(tiny_corpus, tmp_path, teacher):  # noqa: F811
    """A cache with 4 tail samples: PP=2 builds it byte for byte as PP=1 (the draws are seeded by each
    sample's text, not by rank or order); the sampled columns are tail tokens with the teacher's
    log-probabilities; DDK trains from it; reverse KL and another --tail-samples are refused."""
    extra = [*RUN, "--shard-size", "16", "--top-k", "8", "--tail-samples", "4"]
    one, two = tmp_path / "pp1", tmp_path / "pp2"
    torchrun(TOOL, 1, *tool_args(tiny_corpus, one, teacher, *extra))
    torchrun(TOOL, 2, *tool_args(tiny_corpus, two, teacher, *extra, "--pipeline-model-parallel-size", "2"))
    files_one, files_two = cache_files(one), cache_files(two)
    assert sorted(files_one) == sorted(files_two)
    assert all(files_one[n] == files_two[n] for n in files_one), [
        n for n in files_one if files_one[n] != files_two[n]
    ]

    cache = tc.TeacherCache(one)
    assert cache.layout.tail_samples == 4 and cache.layout.columns == 12
    assert cache.identity["tail_samples"] == 4
    row = cache.row("train", 0, int(np.load(one / tc.plan_name("train", 0))[0]))
    ids, logp = row["ids"].astype(np.int64), row["log_probs"].astype(np.float32)
    assert not (ids[:, 8:, None] == ids[:, None, :8]).any()  # tail tokens only
    assert (logp[:, 8:] <= logp[:, 7:8] + 1e-3).all()  # none more likely than the top-k's last
    assert (np.diff(ids[:, 8:], axis=1) >= 0).all()  # systematic sampling walks the vocabulary in order

    run = pretrain(1, *ddk(tiny_corpus, tmp_path, 6, "--teacher-cache", one))
    assert sorted(run.metrics) == list(range(1, 7)) and all(v > 0 for v in run.series("kd loss"))
    from megatron_ddk.errors import ConfigError

    with pytest.raises(ConfigError, match="serve forward_kl only"):
        cached_teacher(tiny_corpus, tmp_path, one, "--kd-loss-type", "reverse_kl")
    proc = torchrun(TOOL, 1, *tool_args(tiny_corpus, one, teacher, *RUN, "--top-k", "8"), check=False)
    assert proc.returncode != 0 and "holds a cache built for another --tail-samples" in proc.stderr
