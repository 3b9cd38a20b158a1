"""The training corpus: the running interpreter's standard-library sources, split by file.

Every machine has this corpus offline. The file order is the sorted relative path and the held-out split is
a hash of that path, so both are stable across runs and independent of the seed.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
DEFAULT_MAX_FILE_BYTES = 512 * 1024
DEFAULT_HELD_OUT_FRACTION = 0.02


@dataclass(frozen=True)
class SourceFile:
    relpath: str
    text: str


@dataclass(frozen=True)
class CorpusSplit:
    root: Path
    train: tuple[SourceFile, ...]
    held_out: tuple[SourceFile, ...]

    @property
    def train_bytes(self) -> int:
        return sum(len(f.text.encode()) for f in self.train)

    @property
    def held_out_bytes(self) -> int:
        return sum(len(f.text.encode()) for f in self.held_out)


def stdlib_root() -> Path:
    """The standard-library directory of the running interpreter (the base one inside a virtualenv)."""
    return Path(sysconfig.get_paths()["stdlib"])


def discover_files(root: Path, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> list[Path]:
    """All `.py` files under `root`, sorted by relative path, skipping installed packages and huge files.

    Files above `max_file_bytes` are generated data tables (e.g. pydoc topics), not code.
    """
    if not root.is_dir():
        raise ValueError(f"root: {root} is not a directory")
    files = [
        p
        for p in root.rglob("*.py")
        if not _EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])
        and p.is_file()
        and p.stat().st_size <= max_file_bytes
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_held_out(relpath: str, fraction: float) -> bool:
    """Whether a file belongs to the held-out split: its path hash falls in the lowest `fraction`."""
    digest = hashlib.sha256(relpath.encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def load_split(
    root: Path | None = None,
    held_out_fraction: float = DEFAULT_HELD_OUT_FRACTION,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    limit_files: int | None = None,
) -> CorpusSplit:
    """Read the corpus and split it by file.

    `limit_files` keeps the first N training files and the first max(1, N // 10) held-out files, for smoke runs.
    Files that are not valid UTF-8 (a few encoding test fixtures) are skipped.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction: must be in (0, 1), got {held_out_fraction}")
    if limit_files is not None and limit_files < 1:
        raise ValueError(f"limit_files: must be >= 1, got {limit_files}")
    root = stdlib_root() if root is None else root
    max_train = limit_files
    max_held_out = max(1, limit_files // 10) if limit_files is not None else None
    train: list[SourceFile] = []
    held_out: list[SourceFile] = []
    for path in discover_files(root, max_file_bytes):
        relpath = path.relative_to(root).as_posix()
        bucket, cap = (
            (held_out, max_held_out) if is_held_out(relpath, held_out_fraction) else (train, max_train)
        )
        if cap is not None and len(bucket) >= cap:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            bucket.append(SourceFile(relpath, text))
    if not train or not held_out:
        raise ValueError(f"root: {root} yields {len(train)} training and {len(held_out)} held-out files")
    return CorpusSplit(root=root, train=tuple(train), held_out=tuple(held_out))
