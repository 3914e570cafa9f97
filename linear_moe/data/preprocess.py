"""Tokenize jsonl or plain-text files into Megatron's indexed dataset format (PREFIX.bin + PREFIX.idx).

    python -m linear_moe.data.preprocess --input a.jsonl b.txt --output-prefix data/corpus --append-eod

jsonl: one JSON object per line, the document in `--json-key` (default `text`); blank lines are skipped.
txt: one document per line (`--txt-mode line`, default) or the whole file as one document (`--txt-mode file`).
Empty documents are skipped. Files are written under temporary names and renamed only when complete, so a failed
run leaves no PREFIX.bin / PREFIX.idx behind (nor replaces existing ones). Errors are one line with a non-zero exit.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from linear_moe.data.tokenizer import build_tokenizer

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


class PreprocessError(ValueError):
    """Bad input or output; the message is one line naming the file (and line) and the problem."""


@dataclass
class PreprocessStats:
    """What one run wrote."""

    documents: int
    tokens: int
    skipped_empty: int
    seconds: float


def _input_format(path: Path, input_format: str) -> str:
    if input_format != "auto":
        return input_format
    return "jsonl" if path.suffix.lower() in JSONL_SUFFIXES else "txt"


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline); only '\\n' ends a line, so bytes round-trip exactly."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PreprocessError(f"{path}:{n}: not valid UTF-8 at column {e.start + 1}: {e.reason}") from None
            yield n, text.removesuffix("\n").removesuffix("\r")


def _raw_documents(path: Path, fmt: str, txt_mode: str) -> Iterator[tuple[str, str, bool]]:
    """(location for messages, raw text, is_json) per document candidate, in file order."""
    if fmt == "txt" and txt_mode == "file":
        try:
            # Bytes, not read_text: newline translation would change '\r\n' and break the exact round trip.
            yield str(path), path.read_bytes().decode("utf-8"), False
        except UnicodeDecodeError as e:
            raise PreprocessError(f"{path}: not valid UTF-8 at byte {e.start}: {e.reason}") from None
        return
    is_json = fmt == "jsonl"
    for n, line in _lines(path):
        if is_json and not line.strip():
            continue
        yield f"{path}:{n}", line, is_json


_WORKER_TOKENIZER = None
_WORKER_JSON_KEY = "text"


def _init_worker(tokenizer_spec: str, json_key: str) -> None:
    global _WORKER_TOKENIZER, _WORKER_JSON_KEY
    _WORKER_TOKENIZER = build_tokenizer(tokenizer_spec)
    _WORKER_JSON_KEY = json_key


def _encode(item: tuple[str, str, bool]) -> np.ndarray:
    """Token ids of one document (int32), parsing its JSON line first where it is one."""
    where, raw, is_json = item
    text = raw
    if is_json:
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise PreprocessError(f"{where}: bad JSON line: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise PreprocessError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if _WORKER_JSON_KEY not in obj:
            keys = ", ".join(map(str, list(obj)[:8])) or "none"
            raise PreprocessError(f"{where}: no key {_WORKER_JSON_KEY!r} (keys: {keys}); set --json-key")
        text = obj[_WORKER_JSON_KEY]
        if not isinstance(text, str):
            raise PreprocessError(f"{where}: {_WORKER_JSON_KEY!r} is {type(text).__name__}, expected a string")
    return _WORKER_TOKENIZER.tokenize_array(text)


def _remove(*paths: Path) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def preprocess(inputs: Sequence[str | Path], output_prefix: str | Path, *, tokenizer: str = "byte",
               append_eod: bool = False, json_key: str = "text", txt_mode: str = "line",
               input_format: str = "auto", workers: int = 1, log_every_s: float | None = 5.0) -> PreprocessStats:
    """Tokenize `inputs` (in order) into `output_prefix`.bin/.idx; raise PreprocessError on bad input or output.

    `log_every_s`: seconds between progress lines on stderr; None for none.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    if not inputs:
        raise PreprocessError("no --input files given")
    if workers < 1:
        raise PreprocessError(f"--workers={workers} must be >= 1")
    if txt_mode not in ("line", "file"):
        raise PreprocessError(f"--txt-mode={txt_mode!r} must be 'line' or 'file'")
    if input_format not in ("auto", "jsonl", "txt"):
        raise PreprocessError(f"--input-format={input_format!r} must be 'auto', 'jsonl' or 'txt'")
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            what = "is not a file" if p.exists() else "not found"
            raise PreprocessError(f"input file {str(p)!r} {what}")
    try:
        tok = build_tokenizer(tokenizer)
    except (FileNotFoundError, ImportError, ValueError) as e:
        raise PreprocessError(str(e)) from None

    prefix = Path(output_prefix)
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    tag = f".tmp{os.getpid()}"
    tmp_bin, tmp_idx = Path(f"{bin_path}{tag}"), Path(f"{idx_path}{tag}")
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=DType.optimal_dtype(tok.vocab_size))
    except OSError as e:
        raise PreprocessError(f"cannot write output {str(bin_path)!r}: {e.strerror or e}") from None

    def items():
        for p in paths:
            yield from _raw_documents(p, _input_format(p, input_format), txt_mode)

    docs = tokens = skipped = 0
    t0 = t_log = time.perf_counter()
    pool = None
    try:
        if workers > 1:
            # fork where there is one: spawned workers would re-import torch (seconds) before tokenizing anything.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = multiprocessing.get_context(method).Pool(workers, _init_worker, (tokenizer, json_key))
            encoded = pool.imap(_encode, items(), chunksize=64)
        else:
            _init_worker(tokenizer, json_key)
            encoded = map(_encode, items())
        for ids in encoded:
            if ids.size == 0:
                skipped += 1
                continue
            if append_eod:
                ids = np.append(ids, np.int32(tok.eod))
            builder.add_document(ids, [ids.size])
            docs += 1
            tokens += ids.size
            now = time.perf_counter()
            if log_every_s is not None and now - t_log >= log_every_s:
                t_log = now
                print(f"preprocess: {docs} docs, {tokens} tokens, {tokens / (now - t0):.3g} tokens/s",
                      file=sys.stderr, flush=True)
        if docs == 0:
            raise PreprocessError(f"no non-empty documents in {', '.join(map(str, paths))}")
        builder.finalize(str(tmp_idx))
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    except OSError as e:
        builder.data_file.close()
        _remove(tmp_bin, tmp_idx)
        raise PreprocessError(f"cannot write output {str(prefix)!r}: {e.strerror or e}") from None
    except BaseException:
        builder.data_file.close()
        _remove(tmp_bin, tmp_idx)
        raise
    finally:
        if pool is not None:
            pool.terminate()
    return PreprocessStats(documents=docs, tokens=tokens, skipped_empty=skipped, seconds=time.perf_counter() - t0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="linear-moe-preprocess", description="Tokenize jsonl/txt files into a Megatron indexed dataset.")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="jsonl (.jsonl/.json/.ndjson) or plain-text files, read in order")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--tokenizer", default="byte", help="'byte' (ids 0..255 + eod 256) or a local tokenizer.json")
    p.add_argument("--append-eod", action="store_true", help="end every document with the tokenizer's eod id")
    p.add_argument("--json-key", default="text", help="jsonl field holding the document (default: text)")
    p.add_argument("--txt-mode", choices=("line", "file"), default="line",
                   help="plain text: one document per line, or the whole file as one document")
    p.add_argument("--input-format", choices=("auto", "jsonl", "txt"), default="auto",
                   help="auto: jsonl by file suffix, else txt")
    p.add_argument("--workers", type=int, default=1,
                   help="tokenizer processes (default 1: in-process, fastest for the byte tokenizer; more help HF)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: returns 0 on success; on an error prints one line to stderr and exits with status 1."""
    args = build_parser().parse_args(argv)
    # Importing megatron.core warns that TE and apex are absent; irrelevant to tokenizing.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    try:
        stats = preprocess(args.input, args.output_prefix, tokenizer=args.tokenizer, append_eod=args.append_eod,
                           json_key=args.json_key, txt_mode=args.txt_mode, input_format=args.input_format,
                           workers=args.workers)
    except PreprocessError as e:
        print(f"linear-moe-preprocess: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("linear-moe-preprocess: interrupted; no output written", file=sys.stderr)
        raise SystemExit(130) from None
    s = max(stats.seconds, 1e-9)
    skipped = f", {stats.skipped_empty} empty skipped" if stats.skipped_empty else ""
    print(f"wrote {args.output_prefix}.bin/.idx: {stats.documents} docs, {stats.tokens} tokens{skipped} in "
          f"{stats.seconds:.2f}s ({stats.documents / s:.4g} docs/s, {stats.tokens / s:.4g} tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
