from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's test data (../shared/data); tests that need it are skipped where it is absent."""
    if not (SHARED_DATA / "counterfact").is_dir():
        pytest.skip(f"{SHARED_DATA} not present (the project's shared test data)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(2)
