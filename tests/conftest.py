from pathlib import Path

import pytest

# Read-only shared materials (checkpoints, tokenizers, paper) live beside the project root, not inside it.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"../shared/{'/'.join(parts)} not found: expected at {path}")
    return path
