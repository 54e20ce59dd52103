import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)  # tiny models: one thread is fastest, and CI machines are shared


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
