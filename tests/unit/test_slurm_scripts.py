"""examples/slurm/*.sbatch and the Dockerfile: syntax, and the DRY_RUN=1 launch line, parsed and checked.

The printed pretrain_ddk.py flags go through the project's own argument parser (so every flag exists
and the combination validates), the student's shape is compared with the estimator's presets (taken
from the public config.json files), and the paper's hyperparameters are checked one by one.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ddk.arguments import parse_run_config
from megatron_ddk.data.tokenizer import padded_vocab_size
from tests.helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tools"))
import estimate_memory  # noqa: E402

SLURM_DIR = REPO_ROOT / "examples" / "slurm"
SCRIPTS = sorted(SLURM_DIR.glob("*.sbatch"))

# script -> (student preset, teacher preset, tokenizer vocabulary size, nodes of 8 GPUs, teacher embedding rows
# after conversion: the preset's, or the tokenizer's with --vocab-size-from-tokenizer)
SETUPS = {
    "qwen1.5-14b_to_1.8b.sbatch": ("qwen1.5-1.8b", "qwen1.5-14b", 151646, 2, 152064),
    "llama2-13b_to_tinyllama-1.1b.sbatch": ("tinyllama-1.1b", "llama2-13b", 32000, 2, 32000),
    "llama3.1-8b_to_llama3.2-1b.sbatch": ("llama3.2-1b", "llama3.1-8b", 128256, 1, 128256),
    "qwen3-30b-a3b_to_qwen3-1.7b.sbatch": ("qwen3-1.7b", "qwen3-30b-a3b", 151669, 1, 151669),
}


def run_script(
    script: Path, tmp_path: Path, *, dry_run: bool = True, **env: str
) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    base.update(
        {"NNODES": str(SETUPS[script.name][3]), "CKPT_DIR": str(tmp_path / "ckpt"), "PATH": "/usr/bin:/bin"}
    )
    if dry_run:
        base["DRY_RUN"] = "1"
    base.update(env)
    return subprocess.run(
        ["bash", str(script)], cwd=REPO_ROOT, env=base, capture_output=True, text=True, timeout=60
    )


def launch_line(script: Path, tmp_path: Path, **env: str) -> dict:
    proc = run_script(script, tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    tokens = shlex.split(lines[0])
    start = tokens.index("torchrun")
    entry = next(i for i, t in enumerate(tokens) if t.endswith("pretrain_ddk.py"))
    torchrun_opts = dict(zip(tokens[start + 1 : entry : 2], tokens[start + 2 : entry : 2]))
    return {
        "srun": tokens[:start],
        "torchrun": torchrun_opts,
        "entry": tokens[entry],
        "flags": tokens[entry + 1 :],
    }


def flag_values(flags: list[str]) -> dict[str, list[str]]:
    """--name [values...] -> {name: [values]} (switches map to [])."""
    out: dict[str, list[str]] = {}
    current = None
    for token in flags:
        if token.startswith("--"):
            current = token
            assert current not in out, f"{current} given twice"
            out[current] = []
        else:
            out[current].append(token)
    return out


@pytest.mark.parametrize("path", [*SCRIPTS, SLURM_DIR / "common.sh"], ids=lambda p: p.name)
def test_bash_syntax(path):
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_paper_setups_and_llama3_qwen3_recipes_are_shipped():
    assert {p.name for p in SCRIPTS} == set(SETUPS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_sbatch_header_requeues_and_signals(script):
    text = script.read_text()
    header = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in header
    assert any(line.startswith("#SBATCH --signal=B:USR1@") for line in header)
    assert any(line.startswith("#SBATCH --nodes=") for line in header)
    assert "#SBATCH --ntasks-per-node=1" in header
    common = (SLURM_DIR / "common.sh").read_text()
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in common
    assert 'scontrol requeue "$SLURM_JOB_ID"' in common


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_dry_run_prints_a_valid_multi_node_torchrun_line(script, tmp_path):
    student_name, teacher_name, vocab, nodes, teacher_rows = SETUPS[script.name]
    launch = launch_line(script, tmp_path)
    assert launch["srun"][0] == "srun" and "--ntasks-per-node=1" in launch["srun"]
    assert f"#SBATCH --nodes={nodes}" in script.read_text().splitlines()
    opts = launch["torchrun"]
    nnodes, nproc = int(opts["--nnodes"]), int(opts["--nproc-per-node"])
    assert (nnodes, nproc) == (nodes, 8)
    assert opts["--rdzv-backend"] == "c10d" and opts["--rdzv-id"] == "dryrun"
    assert opts["--rdzv-endpoint"].rsplit(":", 1)[1].isdigit()
    assert Path(launch["entry"]) == REPO_ROOT / "pretrain_ddk.py"

    world = nnodes * nproc
    cfg = parse_run_config(launch["flags"], vocab_size=vocab, world_size=world)  # raises on a bad combination
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    ep = cfg.parallel.expert_model_parallel_size
    assert world % (tp * pp * ep) == 0
    teacher = estimate_memory.PRESETS[teacher_name]
    assert cfg.model.num_layers % pp == 0 and teacher.num_layers % pp == 0
    assert not teacher.is_moe or teacher.num_experts % ep == 0

    # The student's architecture is the published one.
    preset = estimate_memory.PRESETS[student_name]
    for field in (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "ffn_hidden_size",
        "norm_epsilon",
        "rotary_base",
        "add_qkv_bias",
        "add_bias_linear",
        "untie_embeddings_and_output_weights",
        "max_position_embeddings",
        "swiglu",
        "normalization",
        "position_embedding_type",
        "qk_layernorm",
        "use_rope_scaling",
        "rope_scaling_factor",
        "rope_scaling_original_max_position_embeddings",
        "num_experts",
    ):
        assert getattr(cfg.model, field) == getattr(preset, field), field
    assert cfg.model.query_groups == preset.query_groups
    # ... and its logits are exactly as wide as the teacher's.
    assert padded_vocab_size(vocab, tp, cfg.model.make_vocab_size_divisible_by) == padded_vocab_size(
        teacher_rows, tp, 128
    )

    # The paper's hyperparameters.
    t, d, k = cfg.training, cfg.distill, cfg.ddk
    assert (d.mode, d.teacher_load) == ("ddk", str(REPO_ROOT / "checkpoints" / teacher_name))
    assert (d.kd_weight, d.kd_temperature, d.kd_loss_type) == (0.2, 1.0, "forward_kl")
    assert (k.interval, k.alpha, k.val_samples, k.mixing) == (1000, 0.5, 500, "ddk")
    assert (t.lr, t.min_lr, t.lr_warmup_iters, t.lr_decay_style) == (3e-5, 3e-6, 1000, "cosine")
    assert t.train_iters == 30000 and t.lr_decay_iters == 30000
    tokens = t.train_iters * t.global_batch_size * cfg.data.seq_length
    assert tokens == pytest.approx(15e9, rel=0.1)
    assert cfg.precision.bf16 and cfg.parallel.use_distributed_optimizer
    assert cfg.data.tokenizer_type == "HuggingFaceTokenizer" and cfg.data.domains


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_fits_80_gib_by_the_estimator(script, tmp_path):
    student_name, teacher_name, vocab, nodes, _ = SETUPS[script.name]
    world = 8 * nodes
    cfg = parse_run_config(launch_line(script, tmp_path)["flags"], vocab_size=vocab, world_size=world)
    p = cfg.parallel
    layout = estimate_memory.Layout(
        tp=p.tensor_model_parallel_size,
        pp=p.pipeline_model_parallel_size,
        ep=p.expert_model_parallel_size,
        dp=world // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size),
        micro_batch_size=cfg.training.micro_batch_size,
        global_batch_size=cfg.training.global_batch_size,
        seq_length=cfg.data.seq_length,
        use_distributed_optimizer=p.use_distributed_optimizer,
        sequence_parallel=p.sequence_parallel,
        kd_chunk_size=cfg.distill.kd_chunk_size,
    )
    result = estimate_memory.estimate(
        estimate_memory.PRESETS[teacher_name], estimate_memory.PRESETS[student_name], layout
    )
    assert result.total < 70 * 1024**3  # 10 GiB of headroom on an 80 GiB GPU


@pytest.mark.parametrize("tp", ["1", "2", "4", "8"])
def test_qwen_vocab_padding_matches_the_teacher_at_every_tp(tp, tmp_path):
    script = SLURM_DIR / "qwen1.5-14b_to_1.8b.sbatch"
    launch = launch_line(script, tmp_path, TP=tp)
    cfg = parse_run_config(launch["flags"], vocab_size=151646, world_size=16)
    assert cfg.parallel.tensor_model_parallel_size == int(tp)
    assert cfg.parallel.sequence_parallel == (tp != "1")
    assert padded_vocab_size(151646, int(tp), cfg.model.make_vocab_size_divisible_by) == padded_vocab_size(
        152064, int(tp), 128
    )


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_resume_loads_the_save_dir_once_it_holds_a_checkpoint(script, tmp_path):
    student_name = SETUPS[script.name][0]
    first = flag_values(launch_line(script, tmp_path)["flags"])
    assert first["--load"] == [str(REPO_ROOT / "checkpoints" / student_name)] and "--finetune" in first
    assert first["--save"] == [str(tmp_path / "ckpt")]

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("500\n")
    resumed = flag_values(launch_line(script, tmp_path)["flags"])
    assert resumed["--load"] == resumed["--save"] == [str(tmp_path / "ckpt")]
    assert "--finetune" not in resumed

    fresh = flag_values(launch_line(script, tmp_path / "other", STUDENT_CKPT="")["flags"])
    assert fresh["--load"] == fresh["--save"] and "--finetune" not in fresh


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_baselines_and_options_from_the_environment(script, tmp_path):
    vocab = SETUPS[script.name][2]
    cpt = launch_line(script, tmp_path, DDK_MODE="cpt")["flags"]
    assert "--teacher-load" not in cpt
    assert parse_run_config(cpt, vocab_size=vocab, world_size=16).distill.mode == "cpt"
    kd = parse_run_config(
        launch_line(script, tmp_path, DDK_MODE="kd", DDK_MIXING="equal")["flags"],
        vocab_size=vocab,
        world_size=16,
    )
    assert (kd.distill.mode, kd.ddk.mixing) == ("kd", "equal")
    fp8 = parse_run_config(
        launch_line(script, tmp_path, FP8="hybrid")["flags"], vocab_size=vocab, world_size=16
    )
    assert fp8.precision.fp8_format == "hybrid"
    one_node = launch_line(script, tmp_path, NNODES="1")
    assert one_node["torchrun"]["--nnodes"] == "1"
    parse_run_config(one_node["flags"], vocab_size=vocab, world_size=8)
    container = launch_line(script, tmp_path, CONTAINER="/images/ddk.sqsh", CONTAINER_MOUNTS="/data:/data")
    assert "--container-image=/images/ddk.sqsh" in container["srun"]
    assert "--container-mounts=/data:/data" in container["srun"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PP": "3"}, "PP=3 does not divide the teacher's 40 layers"),
        ({"TP": "16"}, "TP=16 does not divide GPUS_PER_NODE=8"),
        (
            {"PP": "2", "NNODES": "1", "GPUS_PER_NODE": "3", "TP": "1"},
            "TP=1 x PP=2 does not divide the 3 GPUs",
        ),
        ({"GLOBAL_BATCH": "100"}, "GLOBAL_BATCH=100 is not a multiple of MICRO_BATCH"),
    ],
)
def test_bad_layouts_fail_before_launch(env, message, tmp_path):
    proc = run_script(SLURM_DIR / "llama2-13b_to_tinyllama-1.1b.sbatch", tmp_path, **env)
    assert proc.returncode != 0 and proc.stdout == ""
    assert message in proc.stderr


def test_tinyllama_layers_limit_pp_to_two(tmp_path):
    proc = run_script(SLURM_DIR / "llama2-13b_to_tinyllama-1.1b.sbatch", tmp_path, PP="4")
    assert proc.returncode != 0 and "PP=4 does not divide the student's 22 layers" in proc.stderr


def test_real_launch_needs_existing_paths_and_a_slurm_job(tmp_path):
    script = SLURM_DIR / "llama2-13b_to_tinyllama-1.1b.sbatch"
    proc = run_script(script, tmp_path, dry_run=False)
    assert proc.returncode != 0 and "not found: DOMAINS=" in proc.stderr and proc.stdout == ""
    for name in ("domains.yaml", "tokenizer.json", "teacher", "student"):
        (tmp_path / name).touch()
    paths = {
        "DOMAINS": str(tmp_path / "domains.yaml"),
        "TOKENIZER": str(tmp_path / "tokenizer.json"),
        "TEACHER_CKPT": str(tmp_path / "teacher"),
        "STUDENT_CKPT": str(tmp_path / "student"),
    }
    proc = run_script(script, tmp_path, dry_run=False, **paths)
    assert proc.returncode != 0 and "not inside a SLURM job" in proc.stderr
    assert not (tmp_path / "ckpt").exists()  # nothing was started or created


# ------------------------------------------------------------------------------------- Dockerfile


def _dockerfile_from_image() -> str:
    args: dict[str, str] = {}
    for line in (REPO_ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["ARG"] and "=" in words[1]:
            name, value = words[1].split("=", 1)
            args[name] = value
        if words[:1] == ["FROM"]:
            image = words[1]
            for name, value in args.items():
                image = image.replace("${" + name + "}", value).replace("$" + name, value)
            return image
    raise AssertionError("Dockerfile has no FROM line")


def test_dockerfile_builds_on_an_ngc_pytorch_image():
    image = _dockerfile_from_image()
    match = re.fullmatch(r"nvcr\.io/nvidia/pytorch:(\d\d)\.(\d\d)-py3", image)
    assert match, image
    assert int(match.group(1)) in (25, 26) and 1 <= int(match.group(2)) <= 12


def test_dockerfile_installs_the_exact_megatron_core_pin_of_pyproject():
    import tomllib

    from megatron_ddk.platform.startup import REQUIRED_MEGATRON_CORE

    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in deps if d.replace(" ", "").startswith("megatron-core==")]
    assert len(pins) == 1
    version = pins[0].split("==", 1)[1].strip()
    assert version == REQUIRED_MEGATRON_CORE
    text = (REPO_ROOT / "Dockerfile").read_text()
    assert re.findall(r"megatron-core==([0-9][0-9A-Za-z.]*)", text) == [version]
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert any("--no-deps" in line and f"megatron-core=={version}" in line for line in installs)
    assert any("--no-deps" in line and "-e ." in line for line in installs)
    assert not any(re.search(r"\btorch\b|transformer.engine|\[cpu\]|\.\[", line) for line in installs), (
        installs
    )


def test_moe_recipe_refuses_ep_not_dividing_dp(tmp_path):
    proc = run_script(SLURM_DIR / "qwen3-30b-a3b_to_qwen3-1.7b.sbatch", tmp_path, EP="16")
    assert proc.returncode != 0 and proc.stdout == ""
    assert "EP=16 does not divide DP=8" in proc.stderr


def test_moe_recipe_needs_expert_parallelism_to_fit(tmp_path):
    """Without EP the Qwen3-30B-A3B teacher alone takes 57 GiB per GPU: the estimator says it does not fit."""
    cfg = parse_run_config(
        launch_line(SLURM_DIR / "qwen3-30b-a3b_to_qwen3-1.7b.sbatch", tmp_path, EP="1")["flags"],
        vocab_size=151669,
        world_size=8,
    )
    layout = estimate_memory.Layout(
        dp=8,
        micro_batch_size=cfg.training.micro_batch_size,
        seq_length=cfg.data.seq_length,
        use_distributed_optimizer=True,
        kd_chunk_size=cfg.distill.kd_chunk_size,
    )
    presets = estimate_memory.PRESETS
    assert (
        estimate_memory.estimate(presets["qwen3-30b-a3b"], presets["qwen3-1.7b"], layout).total > 80 * 1024**3
    )
