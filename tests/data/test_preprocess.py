"""Preprocessing jsonl/txt into Megatron .bin/.idx: exact token round trip, CLI errors, no partial output."""
import importlib.util
import json

import pytest

from linear_moe.data import preprocess as pp
from linear_moe.data.tokenizer import ByteTokenizer

# Megatron-Core warns at import that TE and apex are absent, and that it logs as rank 0 without torch.distributed.
pytestmark = [pytest.mark.filterwarnings("ignore:Transformer Engine and Apex are not installed"),
              pytest.mark.filterwarnings("ignore:Could not determine rank")]

DOCS = ["hello world", "", "wörld ünïcode ✓ 𝄞", "  leading and trailing spaces  ", "tab\there", "x" * 5000]
EOD = ByteTokenizer.eod


def _read(prefix) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _files(d) -> set[str]:
    return {p.name for p in d.iterdir()}


def _write_jsonl(path, docs, key="text"):
    # A blank line and a trailing newline are allowed in jsonl and skipped.
    path.write_text("\n".join(json.dumps({key: d, "id": i}) for i, d in enumerate(docs)) + "\n\n", encoding="utf-8")


@pytest.mark.parametrize("append_eod", [False, True], ids=["no-eod", "eod"])
def test_jsonl_round_trip(tmp_path, append_eod, capsys):
    _write_jsonl(tmp_path / "in.jsonl", DOCS)
    argv = ["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "out" / "c")]
    assert pp.main(argv + (["--append-eod"] if append_eod else [])) == 0
    want = [_bytes(d) + ([EOD] if append_eod else []) for d in DOCS if d]
    assert _read(tmp_path / "out" / "c") == want
    assert (tmp_path / "out" / "c.bin").stat().st_size == 2 * sum(map(len, want))  # uint16 ids
    out = capsys.readouterr().out
    assert f"{len(want)} docs" in out and f"{sum(map(len, want))} tokens" in out and "tokens/s" in out
    assert _files(tmp_path / "out") == {"c.bin", "c.idx"}


def test_txt_lines_file_mode_and_input_order(tmp_path):
    lines = ["first line", "crlf line", "", "last line without newline ✓"]
    (tmp_path / "a.txt").write_bytes("first line\ncrlf line\r\n\nlast line without newline ✓".encode())
    _write_jsonl(tmp_path / "b.jsonl", ["from json"], key="body")
    pp.preprocess([tmp_path / "a.txt", tmp_path / "b.jsonl"], tmp_path / "lines", json_key="body", append_eod=True,
                  log_every_s=None)
    assert _read(tmp_path / "lines") == [_bytes(x) + [EOD] for x in lines + ["from json"] if x]

    whole = "para one\n\npara two\r\n"
    (tmp_path / "w.txt").write_bytes(whole.encode())
    stats = pp.preprocess([tmp_path / "w.txt"], tmp_path / "whole", txt_mode="file", log_every_s=None)
    assert _read(tmp_path / "whole") == [_bytes(whole)]
    assert (stats.documents, stats.tokens) == (1, len(whole.encode()))


def test_workers_write_identical_files(tmp_path):
    _write_jsonl(tmp_path / "in.jsonl", DOCS * 50)
    pp.preprocess([tmp_path / "in.jsonl"], tmp_path / "one", append_eod=True, log_every_s=None)
    pp.preprocess([tmp_path / "in.jsonl"], tmp_path / "two", append_eod=True, workers=2, log_every_s=None)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"one.{ext}").read_bytes() == (tmp_path / f"two.{ext}").read_bytes()


def _fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        pp.main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("linear-moe-preprocess: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_missing_input(tmp_path, capsys):
    err = _fails(["--input", str(tmp_path / "nope.jsonl"), "--output-prefix", str(tmp_path / "o")], capsys)
    assert "nope.jsonl" in err and "not found" in err
    assert _files(tmp_path) == set()


@pytest.mark.parametrize("workers", [1, 2], ids=["w1", "w2"])
def test_bad_json_line_leaves_nothing_behind(tmp_path, capsys, workers):
    good = json.dumps({"text": "ok"})
    (tmp_path / "in.jsonl").write_text(f"{good}\n{good}\n{{\"text\": \"broken\n{good}\n", encoding="utf-8")
    # An earlier good output must survive a failed run untouched.
    (tmp_path / "o.bin").write_bytes(b"old bin")
    (tmp_path / "o.idx").write_bytes(b"old idx")
    err = _fails(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "o"),
                  "--workers", str(workers)], capsys)
    assert "in.jsonl:3:" in err and "JSON" in err
    assert _files(tmp_path) == {"in.jsonl", "o.bin", "o.idx"}
    assert (tmp_path / "o.bin").read_bytes() == b"old bin" and (tmp_path / "o.idx").read_bytes() == b"old idx"


@pytest.mark.parametrize("line,match", [
    ('{"body": "x"}', "no key 'text'"),
    ('{"text": 3}', "'text' is int, expected a string"),
    ('["text"]', "expected a JSON object"),
], ids=["missing-key", "not-string", "not-object"])
def test_bad_json_content(tmp_path, capsys, line, match):
    (tmp_path / "in.jsonl").write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    err = _fails(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "o")], capsys)
    assert "in.jsonl:2:" in err and match in err
    assert _files(tmp_path) == {"in.jsonl"}


def test_bad_utf8_names_the_line(tmp_path, capsys):
    (tmp_path / "in.txt").write_bytes(b"fine\nalso fine\n\xff\xfe bad\n")
    err = _fails(["--input", str(tmp_path / "in.txt"), "--output-prefix", str(tmp_path / "o")], capsys)
    assert "in.txt:3:" in err and "UTF-8" in err
    assert _files(tmp_path) == {"in.txt"}


def test_unwritable_output(tmp_path, capsys):
    (tmp_path / "in.txt").write_text("doc\n")
    (tmp_path / "afile").write_text("")
    err = _fails(["--input", str(tmp_path / "in.txt"), "--output-prefix", str(tmp_path / "afile" / "o")], capsys)
    assert "cannot write output" in err and "afile" in err
    assert _files(tmp_path) == {"in.txt", "afile"}


def test_only_empty_documents(tmp_path, capsys):
    (tmp_path / "in.txt").write_text("\n\n")
    err = _fails(["--input", str(tmp_path / "in.txt"), "--output-prefix", str(tmp_path / "o")], capsys)
    assert "no non-empty documents" in err
    assert _files(tmp_path) == {"in.txt"}


HAVE_TOKENIZERS = importlib.util.find_spec("tokenizers") is not None


@pytest.mark.skipif(HAVE_TOKENIZERS, reason="checks the message shown when the optional package is missing")
def test_hf_tokenizer_without_package_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "in.txt").write_text("doc\n")
    (tmp_path / "tokenizer.json").write_text("{}")
    err = _fails(["--input", str(tmp_path / "in.txt"), "--output-prefix", str(tmp_path / "o"),
                  "--tokenizer", str(tmp_path / "tokenizer.json")], capsys)
    assert "tokenizers" in err and "pip install" in err


@pytest.mark.skipif(not HAVE_TOKENIZERS, reason="optional 'tokenizers' package not installed")
def test_hf_tokenizer_round_trip(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<pad>": 1, "[UNK]": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "in.txt").write_text("hello world\nworld other\n")
    pp.preprocess([tmp_path / "in.txt"], tmp_path / "o", tokenizer=str(tmp_path / "tokenizer.json"),
                  append_eod=True, log_every_s=None)
    assert _read(tmp_path / "o") == [[3, 4, 0], [4, 2, 0]]


def test_missing_tokenizer_file(tmp_path, capsys):
    (tmp_path / "in.txt").write_text("doc\n")
    err = _fails(["--input", str(tmp_path / "in.txt"), "--output-prefix", str(tmp_path / "o"),
                  "--tokenizer", str(tmp_path / "missing.json")], capsys)
    assert "missing.json" in err and "not found" in err
