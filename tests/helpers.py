"""Plain helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

ROWS = [
    {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "What color is the sky?", "input": "", "output": "The sky is blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 plus 3 is 5."},
    {"instruction": "What is the opposite of hot?", "input": "", "output": "The opposite of hot is cold."},
    {"instruction": "Name a fruit.", "input": "", "output": "An apple is a fruit."},
    {"instruction": "What do cats say?", "input": "", "output": "Cats say meow."},
    {"instruction": "Spell dog.", "input": "", "output": "D O G."},
    {"instruction": "What is ice?", "input": "", "output": "Ice is frozen water."},
]


def recipe_dict(model: Path, data: Path, out: Path, **train) -> dict:
    """A small, fast recipe as a plain dict (tests override what they exercise)."""
    return {
        "model": {"path": str(model), "dtype": "float32"},
        "quantization": {"method": "nf4"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": str(data), "max_length": 64},
        "train": {"output_dir": str(out), "max_steps": 4, "micro_batch_size": 4, "learning_rate": 1e-2,
                  "warmup_steps": 0, "seed": 0, **train},
    }
