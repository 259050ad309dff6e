import pytest
import torch

import wildcat


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


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def randn(*shape, dtype=torch.float32, device="cpu"):
    """Normal samples drawn in float64, then rounded to `dtype`: the same values for every dtype."""
    return torch.randn(*shape, dtype=torch.float64).to(device=device, dtype=dtype)
