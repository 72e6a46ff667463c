import os

import pytest
import torch

# Two cores on CI: keep each test on one intra-op thread unless it asks for more.
torch.set_num_threads(int(os.environ.get("E2KD_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
