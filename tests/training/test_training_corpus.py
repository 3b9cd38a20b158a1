"""The stdlib corpus: which files it takes, and the stable split by path hash."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from training.corpus import discover_files, is_held_out, load_split, stdlib_root


def _write(root: Path, rel: str, data: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_discover_skips_installed_packages_caches_and_large_files(tmp_path: Path) -> None:
    _write(tmp_path, "zeta.py", b"x = 1\n")
    _write(tmp_path, "alpha/mod.py", b"y = 2\n")
    _write(tmp_path, "site-packages/pkg/mod.py", b"z = 3\n")
    _write(tmp_path, "dist-packages/mod.py", b"z = 3\n")
    _write(tmp_path, "__pycache__/mod.py", b"z = 3\n")
    _write(tmp_path, "notes.txt", b"not python\n")
    _write(tmp_path, "huge.py", b"#" * 2000)
    found = [p.relative_to(tmp_path).as_posix() for p in discover_files(tmp_path, max_file_bytes=1000)]
    assert found == ["alpha/mod.py", "zeta.py"]


def test_split_follows_the_path_hash_and_skips_bad_files(tmp_path: Path) -> None:
    for i in range(300):
        _write(tmp_path, f"pkg{i % 7}/m{i}.py", f"VALUE = {i}\n".encode())
    _write(tmp_path, "latin1.py", "s = 'caf\xe9'\n".encode("latin-1"))
    _write(tmp_path, "empty.py", b"   \n")
    split = load_split(tmp_path, held_out_fraction=0.1)

    def expected(rel: str) -> bool:
        return int(hashlib.sha256(rel.encode()).hexdigest()[:16], 16) / 2**64 < 0.1

    train = [f.relpath for f in split.train]
    held = [f.relpath for f in split.held_out]
    assert sorted(train + held) == sorted(f"pkg{i % 7}/m{i}.py" for i in range(300))
    assert all(expected(r) for r in held) and not any(expected(r) for r in train)
    assert train == sorted(train) and held == sorted(held)
    assert 10 <= len(held) <= 55


def test_limit_files_keeps_a_prefix_of_each_split(tmp_path: Path) -> None:
    for i in range(200):
        _write(tmp_path, f"m{i:03d}.py", f"V = {i}\n".encode())
    full = load_split(tmp_path, held_out_fraction=0.2)
    small = load_split(tmp_path, held_out_fraction=0.2, limit_files=20)
    assert small.train == full.train[:20]
    assert small.held_out == full.held_out[:2]


def test_bad_arguments_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="held_out_fraction"):
        load_split(tmp_path, held_out_fraction=1.5)
    with pytest.raises(ValueError, match="limit_files"):
        load_split(tmp_path, limit_files=0)
    with pytest.raises(ValueError, match="root"):
        discover_files(tmp_path / "missing")


def test_real_stdlib_split_is_disjoint_and_about_two_percent(stdlib_split) -> None:
    assert stdlib_split.root == stdlib_root()
    train = {f.relpath for f in stdlib_split.train}
    held = {f.relpath for f in stdlib_split.held_out}
    assert not train & held
    assert all(is_held_out(r, 0.02) for r in held)
    assert 0.005 < len(held) / (len(train) + len(held)) < 0.05
    assert "os.py" in train | held
