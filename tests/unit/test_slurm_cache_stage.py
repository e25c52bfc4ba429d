"""The SLURM scripts' teacher-cache stage: STAGE=cache launches the cache tool with the run's own data, layout
and run configuration; TEACHER_CACHE=DIR trains from the cache (DRY_RUN=1 launch lines, parsed by our parsers)."""

from __future__ import annotations

import shlex
import sys

import pytest

from megatron_ddk.arguments import parse_run_config
from tests.helpers import REPO_ROOT
from tests.unit.test_slurm_scripts import SCRIPTS, SETUPS, flag_values, run_script

sys.path.insert(0, str(REPO_ROOT / "tools"))
import cache_teacher_logits  # noqa: E402


def launched(script, tmp_path, entry_name, **env):
    proc = run_script(script, tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    tokens = shlex.split(proc.stdout.strip())
    entry = next(i for i, t in enumerate(tokens) if t.endswith(entry_name))
    return tokens[entry + 1 :]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_cache_stage_caches_what_the_run_can_draw(script, tmp_path):
    flags = launched(script, tmp_path, "cache_teacher_logits.py", STAGE="cache")
    args = cache_teacher_logits.build_parser().parse_args(flags)
    assert cache_teacher_logits.check_args(args, world_size=16) == []
    train = flag_values(launched(script, tmp_path, "pretrain_ddk.py"))
    assert (args.top_k, args.tail_samples) == (24, 8)  # the defaults: 32 columns, sampled tail
    assert args.output == f"{tmp_path / 'ckpt'}_teacher_cache_k24_s8"
    for flag in (
        "--train-iters",
        "--global-batch-size",
        "--ddk-interval",
        "--ddk-alpha",
        "--seq-length",
        "--seed",
        "--domains",
        "--tokenizer-model",
        "--tensor-model-parallel-size",
    ):
        assert str(getattr(args, flag[2:].replace("-", "_"))) == train[flag][0], flag
    assert args.val_samples == int(train["--ddk-val-samples"][0]) and args.ddk_mode == train["--ddk-mode"][0]
    assert args.teacher_load == train["--teacher-load"][0]


def test_cache_stage_top_k_only(tmp_path):
    flags = launched(
        SCRIPTS[0], tmp_path, "cache_teacher_logits.py", STAGE="cache", TOP_K="16", TAIL_SAMPLES="0"
    )
    args = cache_teacher_logits.build_parser().parse_args(flags)
    assert (args.top_k, args.tail_samples) == (16, 0)
    assert args.output == f"{tmp_path / 'ckpt'}_teacher_cache_k16"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
@pytest.mark.parametrize("fallback", ["", "1"])
def test_training_from_the_cache(script, tmp_path, fallback):
    flags = launched(
        script, tmp_path, "pretrain_ddk.py", TEACHER_CACHE=str(tmp_path / "tc"), TEACHER_FALLBACK=fallback
    )
    values = flag_values(flags)
    assert values["--teacher-cache"] == [str(tmp_path / "tc")]
    assert ("--teacher-load" in values) == bool(fallback)
    cfg = parse_run_config(flags, vocab_size=SETUPS[script.name][2], world_size=16)
    assert cfg.distill.teacher_cache == str(tmp_path / "tc")


def test_cpt_has_nothing_to_cache(tmp_path):
    proc = run_script(SCRIPTS[0], tmp_path, STAGE="cache", DDK_MODE="cpt")
    assert proc.returncode != 0 and "nothing to cache" in proc.stderr
