"""fla's autotuned choices, saved and reused: its kernels then skip minutes of autotuning in the next process.

fla 0.6.0 autotunes every kernel on its first call per shape key (minutes per shape on one CPU core), longer than a
device call allows for all shapes in one run. Its `CachedAutotuner` reads best configs from JSON files in
$FLA_CONFIG_DIR when FLA_CACHE_MODE is set ('strict': exact key only). This module writes those files from the
choices fla's own autotuner made in this process, so processes that autotune side by side (timings discarded) leave
configs for one process that then times fla and our kernels one after the other, without autotuning.

fla's state kernels (`fla.ops.common.chunk_h`) autotune with plain `triton.autotune` instead, whose choices only
Triton's on-disk autotune cache keeps (TRITON_CACHE_AUTOTUNING=1). A config dir carries those files under `triton/`,
laid out as in the Triton cache dir (a folder per cache key); `setup()` copies them into this machine's cache.

    FLA_DUMP_DIR=dir python benchmarks/bench_delta_rule.py   # the bench calls setup() first
    python benchmarks/fla_cache.py merge OUT_DIR DIR...      # one config dir from several
"""
from __future__ import annotations

import atexit
import gc
import json
import os
import shutil
import signal
import sys
from pathlib import Path


def _collect(items) -> dict[str, dict[str, dict]]:
    """{kernel name: {key hash: entry}} from (name, hash, entry) items. Kernels of one name in different modules can
    share a key with different configs; such keys are dropped (fla autotunes them again), not guessed."""
    out: dict[str, dict[str, dict]] = {}
    clash: set[tuple[str, str]] = set()
    for name, h, entry in items:
        have = out.setdefault(name, {}).get(h)
        if have is not None and have["config"] != entry["config"]:
            clash.add((name, h))
        out[name][h] = entry
    for name, h in clash:
        del out[name][h]
    return out


def _tuned():
    """(kernel name, key hash, entry) of every key that an fla autotuner in this process has tuned."""
    from fla.ops.utils.cache import AutotuneKey, CachedAutotuner

    for tuner in (o for o in gc.get_objects() if isinstance(o, CachedAutotuner)):
        for key, cfg in tuner.cache.items():
            yield tuner.kernel_name, AutotuneKey.key_hash(key), {
                "autotune_key": AutotuneKey.normalize_autotune_key(list(key)),
                "config": {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                           "num_ctas": cfg.num_ctas, "maxnreg": cfg.maxnreg}}


def _write(entries: dict[str, dict[str, dict]], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, by_key in entries.items():
        tmp = out_dir / f".{name}.json.tmp"
        tmp.write_text(json.dumps({"kernel_name": name, "autotune_entries": by_key}, indent=1))
        tmp.replace(out_dir / f"{name}.json")


def describe() -> str:
    """Where fla's configs come from in this process, for the benchmark's header."""
    mode = os.environ.get("FLA_CACHE_MODE", "disabled")
    if mode == "disabled":
        return "fla configs: its own autotuning"
    return f"fla configs: {os.environ.get('FLA_CONFIG_DIR', 'fla/configs')} ({mode}; keys not there autotune)"


def _triton_cache() -> Path:
    return Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def _copy_autotune_results(src: Path, dst: Path) -> int:
    """Copy src's Triton autotune results (<key>/<kernel>.autotune.json) into dst; files dst has stay. Returns the
    number copied."""
    n = 0
    for f in src.glob("*/*.autotune.json"):
        target = dst / f.parent.name / f.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
            n += 1
    return n


def setup() -> None:
    """Call first, before fla is imported: Triton's autotune cache on, the Triton autotune results of
    $FLA_CONFIG_DIR/triton restored into it, and with $FLA_DUMP_DIR set, this process's autotuned fla configs written
    there when it exits, also when a time limit stops it (SIGTERM): what was tuned by then is kept."""
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    config_dir = os.environ.get("FLA_CONFIG_DIR")
    if config_dir and (Path(config_dir) / "triton").is_dir():
        _copy_autotune_results(Path(config_dir) / "triton", _triton_cache())
    target = os.environ.get("FLA_DUMP_DIR")
    if not target:
        return
    atexit.register(_dump, target)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def _dump(target: str) -> None:
    if "fla" not in sys.modules:
        return
    entries = _collect(_tuned())
    _write(entries, Path(target))
    _copy_autotune_results(_triton_cache(), Path(target) / "triton")
    print(f"fla configs: {sum(map(len, entries.values()))} keys of {len(entries)} kernels -> {target}", flush=True)


def merge(out_dir: str, *dirs: str) -> None:
    """One config dir from several. A key that two dirs tuned differently (processes that autotuned side by side on
    one GPU time each config with noise) keeps the first dir's choice: each dir is already free of clashes between
    kernels of one name, so a second choice is a second measurement, not a second kernel."""
    merged: dict[str, dict[str, dict]] = {}
    for d in dirs:
        for f in Path(d).glob("*.json"):
            data = json.loads(f.read_text())
            for h, entry in data["autotune_entries"].items():
                merged.setdefault(data["kernel_name"], {}).setdefault(h, entry)
    _write(merged, Path(out_dir))
    for d in dirs:
        _copy_autotune_results(Path(d) / "triton", Path(out_dir) / "triton")
    print(f"merged {sum(map(len, merged.values()))} keys of {len(merged)} kernels into {out_dir}")


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[1] != "merge":
        sys.exit("usage: python benchmarks/fla_cache.py merge OUT_DIR DIR [DIR...]")
    merge(sys.argv[2], *sys.argv[3:])
