"""The NaN/Inf check names the iteration, the quantity, the domain(s) and a bad teacher, on one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_ddk.training.evaluation import DomainEvaluation
from megatron_ddk.training.nonfinite import NonFiniteError, evaluation_problem, raise_if, training_problem
from megatron_ddk.training.step import DOMAIN_LM_LOSS, KD_LOSS, LM_LOSS, TEACHER_LM_LOSS
from tests.helpers import MINIMAL_RUN_FLAGS

NAMES = ["code", "prose", "math"]
NAN = float("nan")


def totals(lm=1.0, kd=0.5, teacher=2.0, domains=(1.0, 1.0, 1.0)):
    return {
        LM_LOSS: torch.tensor([lm, 10.0]),
        KD_LOSS: torch.tensor([kd, 10.0]),
        TEACHER_LM_LOSS: torch.tensor([teacher, 10.0]),
        DOMAIN_LM_LOSS: torch.tensor([*domains, 3.0, 3.0, 4.0]),
    }


def problem(values, grad_norm=1.0, teacher="T"):
    return training_problem(values, grad_norm, iteration=7, domain_names=NAMES, teacher=teacher)


def test_finite_iteration_passes():
    assert problem(totals()) is None
    raise_if(None)


def test_nan_loss_names_quantity_and_domain():
    message = problem(totals(lm=NAN, kd=NAN, domains=(1.0, NAN, 1.0)), grad_norm=NAN)
    assert message.startswith("iteration 7: non-finite lm loss, kd loss, grad norm on domain(s) prose;")
    assert "stopped without saving" in message and "--lr" in message and "\n" not in message


def test_infinite_grad_norm_alone():
    message = problem(totals(), grad_norm=float("inf"))
    assert message.startswith("iteration 7: non-finite grad norm;") and "domain" not in message


def test_all_domains_bad_names_none():
    assert "domain" not in problem(totals(lm=NAN, domains=(NAN, NAN, NAN)))


def test_teacher_is_blamed_for_its_own_nan():
    message = problem(totals(teacher=NAN, kd=NAN))
    assert message.startswith("iteration 7: non-finite teacher lm loss, kd loss;")
    assert "the teacher --teacher-load T produces non-finite logits" in message
    assert problem(totals(teacher=NAN), teacher=None) is None  # cpt: no teacher, its slot is unused


def test_evaluation_names_teacher_then_student():
    bad_teacher = DomainEvaluation(
        ce_student=np.ones(3), ce_teacher=np.array([1.0, np.inf, NAN]), tokens=np.ones(3)
    )
    message = evaluation_problem(bad_teacher, iteration=0, domain_names=NAMES, teacher="T")
    assert message.startswith("iteration 0: non-finite teacher validation loss on domain(s) prose, math;")
    bad_student = DomainEvaluation(ce_student=np.array([NAN, 1, 1]), ce_teacher=None, tokens=np.ones(3))
    assert "student validation loss on domain(s) code" in evaluation_problem(
        bad_student, iteration=4, domain_names=NAMES, teacher=None
    )
    with pytest.raises(NonFiniteError):
        raise_if(evaluation_problem(bad_student, iteration=4, domain_names=NAMES, teacher=None))


def test_megatron_flag_is_on_by_default_and_can_be_turned_off():
    from megatron_ddk.arguments import parse_run_config

    flags = [*MINIMAL_RUN_FLAGS, "--ddk-mode", "cpt"]
    assert parse_run_config(flags, vocab_size=100).training.check_for_nan_in_loss_and_grad
    assert not parse_run_config(
        [*flags, "--no-check-for-nan-in-loss-and-grad"], vocab_size=100
    ).training.check_for_nan_in_loss_and_grad
