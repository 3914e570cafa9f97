"""What a benchmark ran on, for the first lines of its output: the card, torch, Triton and the code.

The code is named twice: by the git commit of the tree (with "dirty" when it has changes), and by a fingerprint of
the sources that run (`kernels/`, `mixers/`, `linear_moe/`): a device machine's copy of the tree may carry a stale
.git, while the fingerprint always names the code measured. `python benchmarks/provenance.py` prints both for a tree,
so a result can be matched to its commit.
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("kernels", "mixers", "linear_moe")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              check=False).stdout.strip()
    except OSError:
        return ""


def fingerprint() -> str:
    """sha1 (12 hex digits) over the paths and contents of the Python sources under SOURCES."""
    digest = hashlib.sha1()
    for path in sorted(p for d in SOURCES for p in (ROOT / d).rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def code() -> str:
    """'commit <short hash>[ (dirty)], sources <fingerprint>'."""
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = " (dirty)" if _git("status", "--porcelain") else ""
    return f"commit {commit}{dirty}, sources {fingerprint()}"


def info(gpu: str | None = None) -> dict[str, str]:
    """{gpu, torch, triton, code}; `gpu` overrides the card's name (e.g. a count of cards, or a CPU run)."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "n/a"
    if gpu is None:
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton_version, "code": code()}


def header(*extra: str, gpu: str | None = None) -> dict[str, str]:
    """Print `info` one item a line, then the extra lines; return the info."""
    out = info(gpu)
    print("\n".join([f"{k}: {v}" for k, v in out.items()] + list(extra)), flush=True)
    return out


if __name__ == "__main__":
    print(code())
