"""Shared fixtures: tiny random models written as real HF folders, so the real loader runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from qshard.tools.tiny import init_tiny
from tests.helpers import ROWS, write_rows


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64) with a BPE tokenizer trained on ROWS; ~50k parameters."""
    texts = [" ".join(r.values()) for r in ROWS]
    return init_tiny(tmp_path_factory.mktemp("models") / "micro-llama", arch="llama", size="micro", texts=texts)


@pytest.fixture(scope="session")
def micro_qwen(tmp_path_factory) -> Path:
    texts = [" ".join(r.values()) for r in ROWS]
    return init_tiny(tmp_path_factory.mktemp("models") / "micro-qwen2", arch="qwen2", size="micro", texts=texts)


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    write_rows(path)
    return path
