"""tools/preprocess_data.py: read back token for token, independent of --workers, safe on bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_ddk.data.tokenizer import build_tokenizer
from tests.helpers import python, train_sentencepiece
from tools.preprocess_data import PreprocessError, main, preprocess

DOCS = [
    "def f(x):\n    return x + 1",
    "The quick brown fox jumps over the lazy dog.",
    "12 + 30 = 42",
    '{"id": 7, "ok": true}',
    "ünïcödé text ✓",
] * 8


def lines(records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    (root / "docs.jsonl").write_text(lines({"text": d} for d in DOCS))
    train_sentencepiece(root / "docs.jsonl", root / "tok", vocab_size=400)
    return str(root / "tok.model")


def run(spm, src, prefix, **kwargs):
    kwargs.setdefault("progress", False)
    return preprocess(
        [str(src)], str(prefix), tokenizer_type="SentencePieceTokenizer", tokenizer_model=spm, **kwargs
    )


def test_reads_back_token_for_token_and_workers_agree(spm, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(lines({"text": d} for d in DOCS))
    stats = run(spm, src, tmp_path / "one" / "out", append_eod=True)
    tok = build_tokenizer("SentencePieceTokenizer", spm)
    expected = [tok.tokenize(d) + [tok.eod] for d in DOCS]
    assert (stats.documents, stats.tokens) == (len(DOCS), sum(map(len, expected)))
    dataset = IndexedDataset(str(tmp_path / "one" / "out_text_document"))
    assert dataset.index.dtype == np.uint16  # DType.optimal_dtype(400)
    assert [dataset[i].tolist() for i in range(len(dataset))] == expected
    run(spm, src, tmp_path / "two" / "out", append_eod=True, workers=2)
    for ext in (".bin", ".idx"):
        assert (tmp_path / "one" / f"out_text_document{ext}").read_bytes() == (
            tmp_path / "two" / f"out_text_document{ext}"
        ).read_bytes()


def test_gpt_dataset_builds_on_the_output(spm, tmp_path):
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import Split

    src = tmp_path / "in.jsonl"
    src.write_text(lines({"text": d} for d in DOCS))
    run(spm, src, tmp_path / "out", append_eod=True)
    tok = build_tokenizer("SentencePieceTokenizer", spm)
    prefix = str(tmp_path / "out_text_document")
    config = GPTDatasetConfig(
        random_seed=1,
        sequence_length=16,
        blend=([prefix], None),
        split="1,0,0",
        tokenizer=tok,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=str(tmp_path / "c"),
    )
    indexed = IndexedDataset(prefix)
    dataset = GPTDataset(indexed, prefix, np.arange(len(indexed), dtype=np.int32), None, Split.train, config)
    total = int(indexed.sequence_lengths.sum())
    assert len(dataset) == (total - 1) // 16  # one epoch of (16 + 1)-token windows
    sample = dataset[0]
    assert sample["tokens"].shape == (16,) and torch_equal(sample["tokens"][1:], sample["labels"][:-1])


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_several_keys_and_int32_vocabulary(tmp_path):
    """Two keys give two aligned datasets; a > 65500-token vocabulary is stored as int32; truncation saved
    in a tokenizer.json is not applied (as in transformers)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(70000)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.enable_truncation(max_length=1)
    raw.save(str(tmp_path / "tokenizer.json"))
    src = tmp_path / "in.jsonl"
    src.write_text(lines([{"q": "w1 w69999", "a": "w5"}, {"q": "w70", "a": "w8 w9 w10"}]))
    stats = preprocess(
        [str(src)],
        str(tmp_path / "out"),
        tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=str(tmp_path),
        json_keys=["q", "a"],
        append_eod=True,
        progress=False,
    )
    assert (stats.documents, stats.tokens) == (2, 3 + 2 + 2 + 4)
    q, a = IndexedDataset(str(tmp_path / "out_q_document")), IndexedDataset(str(tmp_path / "out_a_document"))
    assert q.index.dtype == np.int32
    assert [q[0].tolist(), q[1].tolist()] == [[3, 70001, 1], [72, 1]]
    assert [a[0].tolist(), a[1].tolist()] == [[7, 1], [10, 11, 12, 1]]
    assert build_tokenizer("HuggingFaceTokenizer", tmp_path).tokenize("w8 w9 w10") == [10, 11, 12]


BAD = [
    {"text": "hello world"},
    "{not json",
    {"body": "x"},
    {"text": ""},
    {"text": 5},
    "",
    "[1, 2]",
    {"text": "again"},
]


def test_bad_lines_fail_by_default_and_write_nothing(spm, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(lines(BAD))
    with pytest.raises(
        PreprocessError, match=r"in.jsonl:2: malformed JSON .*--on-bad-lines skip.*nothing was written"
    ):
        run(spm, src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no outputs, no temporary files
    assert (
        main(
            [
                "--input",
                str(src),
                "--output-prefix",
                str(tmp_path / "out"),
                "--tokenizer-type",
                "SentencePieceTokenizer",
                "--tokenizer-model",
                spm,
                "--no-progress",
            ]
        )
        == 2
    )
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and message[0].startswith(f"preprocess_data.py: error: {src}:2: malformed JSON")


def test_bad_lines_skipped_and_counted(spm, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(lines(BAD))
    stats = run(spm, src, tmp_path / "out", on_bad_lines="skip")
    assert stats.documents == 2 and stats.blank_lines == 1
    assert dict(stats.bad) == {"malformed JSON": 2, "missing key": 1, "empty document": 1, "not a string": 1}
    assert stats.first_bad["malformed JSON"] == [f"{src}:2", f"{src}:7"]
    assert len(IndexedDataset(str(tmp_path / "out_text_document"))) == 2
    out = python(
        "tools/preprocess_data.py",
        "--input",
        str(tmp_path / "*.jsonl"),
        "--output-prefix",
        tmp_path / "cli",
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        spm,
        "--on-bad-lines",
        "skip",
        "--no-progress",
        "--log-interval",
        "1",
    )
    final = out.stdout.strip().splitlines()[-1]
    assert final.startswith(f"{tmp_path / 'cli_text_document'}: documents=2, tokens=")
    assert (
        "tokens/s=" in final
        and "2 malformed JSON" in final
        and f"{src}:3" in final
        and "blank lines: 1" in final
    )
    assert "processed 2 documents" in out.stderr


def test_never_overwrites_silently(spm, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(lines([{"text": "one two"}]))
    run(spm, src, tmp_path / "out")
    before = (tmp_path / "out_text_document.bin").read_bytes()
    with pytest.raises(PreprocessError, match="out_text_document.bin exists; pass --overwrite"):
        run(spm, src, tmp_path / "out")
    src.write_text("{bad\n")
    with pytest.raises(PreprocessError, match="malformed JSON"):
        run(spm, src, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out_text_document.bin").read_bytes() == before  # old output intact
    src.write_text(lines([{"text": "three four five"}, {"text": "six"}]))
    run(spm, src, tmp_path / "out", overwrite=True)
    assert len(IndexedDataset(str(tmp_path / "out_text_document"))) == 2


def test_bad_arguments(spm, tmp_path):
    with pytest.raises(PreprocessError, match="--input: no such file"):
        run(spm, tmp_path / "missing.jsonl", tmp_path / "out")
    src = tmp_path / "in.jsonl"
    src.write_text("\n\n")
    with pytest.raises(PreprocessError, match="no usable documents"):
        run(spm, src, tmp_path / "out")
    with pytest.raises(PreprocessError, match="--on-bad-lines 'maybe'.*--workers must be >= 1"):
        run(spm, src, tmp_path / "out", workers=0, on_bad_lines="maybe")
    with pytest.raises(PreprocessError, match="--tokenizer-model .*no such file"):
        preprocess(
            [str(src)],
            str(tmp_path / "out"),
            tokenizer_type="SentencePieceTokenizer",
            tokenizer_model=str(tmp_path / "nope.model"),
            progress=False,
        )
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


def test_non_utf8_line_is_named_as_such(spm, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n{"text": "also fine"}\n')
    with pytest.raises(PreprocessError, match=r"in.jsonl:2: not UTF-8 .*nothing was written"):
        run(spm, src, tmp_path / "out")
    stats = run(spm, src, tmp_path / "out", on_bad_lines="skip")
    assert stats.documents == 2 and dict(stats.bad) == {"not UTF-8": 1}
    assert stats.first_bad["not UTF-8"] == [f"{src}:2"]


def test_many_chunks_and_workers_keep_order_and_line_numbers(spm, tmp_path, monkeypatch):
    """Several chunks per file over two workers: same bytes as one worker, bad lines numbered per file."""
    import tools.preprocess_data as tool

    monkeypatch.setattr(
        tool, "CHUNK_BYTES", 200
    )  # the spawned workers never read it: only the main process chunks
    records = [{"text": d} for d in DOCS] + ["{broken"] + [{"text": d} for d in DOCS]
    src = tmp_path / "in.jsonl"
    src.write_text(lines(records))
    one = run(spm, src, tmp_path / "one", append_eod=True, on_bad_lines="skip")
    two = run(spm, src, tmp_path / "two", append_eod=True, on_bad_lines="skip", workers=2)
    assert one.first_bad == two.first_bad == {"malformed JSON": [f"{src}:{len(DOCS) + 1}"]}
    assert one.documents == two.documents == 2 * len(DOCS)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"one_text_document{ext}").read_bytes() == (
            tmp_path / f"two_text_document{ext}"
        ).read_bytes()


def test_killed_run_leaves_nothing_the_next_run_keeps(spm, tmp_path):
    """SIGKILL during --overwrite leaves its hidden staging file; the next run on the prefix removes it
    (a staging file of a process still alive is left alone)."""
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import REPO_ROOT, subprocess_env

    src = tmp_path / "in.jsonl"
    src.write_text(lines({"text": d * 40} for d in DOCS * 40))  # long enough to be caught mid-run
    args = [
        "--input",
        str(src),
        "--output-prefix",
        str(tmp_path / "out"),
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        spm,
        "--no-progress",
        "--overwrite",
    ]
    proc = subprocess.Popen(
        [sys.executable, "tools/preprocess_data.py", *args],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    staged = tmp_path / f".out_text_document.bin.tmp{proc.pid}"
    deadline = time.time() + 60
    while (
        not (staged.exists() and staged.stat().st_size > 0) and time.time() < deadline and proc.poll() is None
    ):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert staged.exists(), "the run finished before it could be killed; make the input longer"
    alive = tmp_path / f".out_text_document.idx.tmp{os.getppid()}"  # as if a live process were writing it
    alive.write_bytes(b"in progress")
    stats = run(spm, src, tmp_path / "out", overwrite=True)
    assert not staged.exists() and alive.exists()
    assert len(IndexedDataset(str(tmp_path / "out_text_document"))) == stats.documents == len(DOCS) * 40


def test_tool_imports_neither_torch_nor_megatron(spm, tmp_path):
    """Start-up cost: the tool and its workers load the tokenizer library and numpy only."""
    src = tmp_path / "in.jsonl"
    src.write_text(lines({"text": d} for d in DOCS))
    code = (
        "import runpy, sys; sys.argv = ['preprocess_data.py', '--input', sys.argv[1], '--output-prefix', "
        "sys.argv[2], '--tokenizer-type', 'SentencePieceTokenizer', '--tokenizer-model', sys.argv[3], "
        "'--workers', '2', '--no-progress']\n"
        "try:\n    runpy.run_path('tools/preprocess_data.py', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')))"
    )
    out = python("-c", code, src, tmp_path / "out", spm)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out_text_document.idx").exists()
