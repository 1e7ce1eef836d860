"""Shared pytest configuration: the gpu marker runs only where CUDA is present."""
from __future__ import annotations

from pathlib import Path

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run `make test-gpu` on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """`make demo`'s planted synthetic model and days, made by the demo's own steps in a temp dir
    (once per test run): accuracy claims about the demo data are tested on every `make test`."""
    from prepare.demo import prepare_data

    return prepare_data(Path(tmp_path_factory.mktemp("demo_data")))
