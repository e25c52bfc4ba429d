"""GPU smoke test: CPT, KD and DDK for a few iterations in bf16 and (with Transformer Engine) FP8.

    python -m pytest tests/gpu -s          # one GPU; skipped where there is none

Checks that losses are finite, that FP8 tracks bf16 on the same data, and prints throughput.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.runs import data_args, pretrain

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODEL = [
    "--num-layers",
    "4",
    "--hidden-size",
    "256",
    "--num-attention-heads",
    "8",
    "--num-query-groups",
    "4",
    "--ffn-hidden-size",
    "704",
    "--swiglu",
    "--disable-bias-linear",
    "--untie-embeddings-and-output-weights",
    "--seq-length",
    "128",
]
TRAIN = [
    "--micro-batch-size",
    "4",
    "--global-batch-size",
    "16",
    "--lr",
    "1e-3",
    "--min-lr",
    "1e-4",
    "--log-interval",
    "1",
    "--ddk-val-samples",
    "16",
    "--seed",
    "1234",
    "--bf16",
]


def _te_available() -> bool:
    from megatron_ddk.models.gpt import transformer_engine_available

    return transformer_engine_available()


def _check(run, what):
    losses = run.series("lm loss")
    assert losses and all(math.isfinite(v) for v in losses), (what, losses)
    speed = sorted(run.series("tokens/s"))[len(losses) // 2]
    print(f"\n{what}: lm loss {losses[0]:.4f} -> {losses[-1]:.4f}, median {speed:.0f} tokens/s")
    return losses


@pytest.fixture(scope="module")
def teacher_dir(tiny_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_teacher")
    run = pretrain(
        1,
        *MODEL,
        *TRAIN,
        "--train-iters",
        "30",
        *data_args(tiny_corpus, tmp / "cache"),
        "--ddk-mode",
        "cpt",
        "--save",
        tmp / "ckpt",
    )
    _check(run, "teacher cpt bf16")
    return tmp / "ckpt"


@pytest.mark.parametrize("mode", ["kd", "ddk"])
def test_distillation_bf16_and_fp8(tiny_corpus, tmp_path, teacher_dir, mode):
    student = ["--num-layers", "2", *MODEL[2:]]
    common = [
        *student,
        *TRAIN,
        "--train-iters",
        "8",
        *data_args(tiny_corpus, tmp_path / "cache"),
        "--ddk-mode",
        mode,
        "--teacher-load",
        teacher_dir,
        "--ddk-interval",
        "4",
    ]
    bf16 = _check(pretrain(1, *common), f"{mode} bf16")
    if not _te_available():
        pytest.skip("Transformer Engine not importable: FP8 not checked")
    fp8 = _check(pretrain(1, *common, "--fp8-format", "hybrid", "--fp8-recipe", "delayed"), f"{mode} fp8")
    for a, b in zip(fp8, bf16):
        assert abs(a - b) <= 0.05 * abs(b), (fp8, bf16)


def test_fp8_refused_without_transformer_engine(tiny_corpus, tmp_path):
    if _te_available():
        pytest.skip("Transformer Engine present")
    run = pretrain(
        1,
        *MODEL,
        *TRAIN,
        "--train-iters",
        "2",
        *data_args(tiny_corpus, tmp_path / "cache"),
        "--ddk-mode",
        "cpt",
        "--fp8-format",
        "hybrid",
        check=False,
    )
    assert run.returncode != 0 and "needs Transformer Engine" in run.stderr
