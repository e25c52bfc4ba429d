"""tools/plot_ddk.py: a PNG from a synthetic DDK log, and clear errors on bad logs."""

from __future__ import annotations

import importlib
import json

import pytest

from tests.helpers import REPO_ROOT, python

DOMAINS = ["web", "code", "math"]


def record(iteration, weights, ratio=(1.5, 1.2, 1.8)):
    return {
        "iteration": iteration,
        "window": iteration // 10,
        "mixing": "ddk",
        "domains": DOMAINS,
        "ce_student": [2.0, 1.5, 2.5],
        "ce_teacher": [1.6, 1.3, 1.9],
        "ppl_student": [7.4, 4.5, 12.2],
        "ppl_teacher": [4.9, 3.7, 6.7],
        "ratio": None if ratio is None else list(ratio),
        "weights": weights,
    }


def write_log(path, records, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(extra_lines))
    return path


@pytest.fixture
def plot_ddk(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "tools"))
    return importlib.import_module("plot_ddk")


def png_size(path):
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


def test_cli_writes_a_two_panel_png(tmp_path):
    log = write_log(
        tmp_path / "ddk_log.jsonl",
        [
            record(0, [0.3, 0.3, 0.4]),
            record(10, [0.28, 0.27, 0.45], (1.4, 1.1, 1.7)),
            record(20, [0.27, 0.25, 0.48], (1.3, 1.1, 1.5)),
        ],
        extra_lines=["\n"],
    )
    out = tmp_path / "plots" / "ddk.png"
    proc = python("tools/plot_ddk.py", log, "--output", out)
    assert "3 updates, 3 domains" in proc.stdout
    assert png_size(out) == (9 * 120, 7 * 120)  # weights panel + ratio panel
    assert sorted(p.name for p in out.parent.iterdir()) == ["ddk.png"]  # no temp file left


def test_a_log_without_teacher_gets_only_the_weights_panel(tmp_path, plot_ddk):
    log = write_log(tmp_path / "log.jsonl", [record(0, [0.2, 0.3, 0.5], ratio=None)])
    out = tmp_path / "cpt.png"
    assert plot_ddk.main([str(log), "--output", str(out)]) == 0
    assert png_size(out) == (9 * 120, 4 * 120)


@pytest.mark.parametrize(
    "lines,needle",
    [
        (None, "no such file"),
        ([], "empty log"),
        ([json.dumps(record(0, [0.3, 0.3, 0.4])), "{not json"], "log.jsonl:2: not JSON"),
        (['{"iteration": 0}'], "log.jsonl:1: record lacks domains, weights, ratio"),
        ([json.dumps(record(0, [0.5, 0.5]))], "log.jsonl:1: 'weights' must be 3 numbers"),
        (
            [
                json.dumps(record(0, [0.3, 0.3, 0.4])),
                json.dumps(dict(record(1, [0.3, 0.3, 0.4]), domains=["a", "b", "c"])),
            ],
            "log.jsonl:2: domains",
        ),
        (["[1, 2]"], "log.jsonl:1: expected a JSON object"),
    ],
)
def test_bad_logs_fail_with_the_line(tmp_path, plot_ddk, capsys, lines, needle):
    log = tmp_path / "log.jsonl"
    if lines is not None:
        log.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "x.png"
    out.write_bytes(b"old plot")
    assert plot_ddk.main([str(log), "--output", str(out)]) == 2
    assert needle in capsys.readouterr().err
    assert out.read_bytes() == b"old plot"  # nothing overwritten
