"""Fixtures shared by several test files."""

from pathlib import Path

import pytest


@pytest.fixture()
def corpus(tmp_path, monkeypatch) -> Path:
    """A small text file with some structure to learn; datasets are cached inside tmp_path."""
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    lines = [f"the {a} {b} sat on the {c}.\n" for a in ("cat", "dog", "fox") for b in ("quietly", "slowly")
             for c in ("mat", "log", "hill", "wall")]
    path = tmp_path / "corpus.txt"
    path.write_text("".join(lines) * 40, encoding="utf-8")
    return path
