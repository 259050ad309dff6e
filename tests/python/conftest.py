import pytest
import torch

import wildcat
import wildcat.functional

# The library's default: short sequences run exact SDPA (faster there). The tests exercise WildCat
# itself at small sizes, so they run with min_seq_len = 0 unless they ask for the default.
LIBRARY_MIN_SEQ_LEN = wildcat.functional.DEFAULT_MIN_SEQ_LEN


def cuda_ready() -> bool:
    return torch.cuda.is_available() and wildcat.cuda_built()


DEVICES = ["cpu"] + (["cuda"] if cuda_ready() else [])


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU and a CUDA build of wildcat")
    for item in items:
        if "cuda" in item.keywords and not cuda_ready():
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws its random inputs from a fixed seed: failures reproduce."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _wildcat_at_every_length(monkeypatch):
    monkeypatch.setattr(wildcat.functional, "DEFAULT_MIN_SEQ_LEN", 0)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def randn(*shape, dtype=torch.float32, device="cpu"):
    """Normal samples drawn in float64, then rounded to `dtype`: the same values for every dtype."""
    return torch.randn(*shape, dtype=torch.float64).to(device=device, dtype=dtype)
