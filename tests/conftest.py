"""Shared test fixtures: markers, the real ImageNet material in ../shared/data, tiny data dirs."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data; the calling test is skipped with a reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real ImageNet material not present: {path}")
    return path


@pytest.fixture
def imagenet_sample_dir() -> Path:
    """The 1000 real ILSVRC2012 JPEGs (one per class), named <wnid>_<label>.JPEG."""
    return shared_path("imagenet-sample")


@pytest.fixture
def imagenet_meta_dir() -> Path:
    """synset_words.txt, synsets.txt, val.txt, ILSVRC2012_validation_ground_truth.txt, ILSVRC2012_mapping.txt."""
    return shared_path("imagenet-meta")


@pytest.fixture
def ilsvrc2010_devkit_dir() -> Path:
    """The ILSVRC2010 devkit-1.0 data/ folder: meta.mat and ILSVRC2010_validation_ground_truth.txt."""
    return shared_path("ilsvrc2010-devkit", "data")
