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


# Modules with no GPU test that import the front end's optional libraries (kserve, tritonclient) at the
# top: `make test-gpu` (pytest -m gpu) on the GPU machine, whose image lacks them, must not fail to collect
# them. Under `make test` they are installed (the test extra) and collected as usual.
_NO_GPU_TESTS_OPTIONAL_IMPORTS = ("test_oip.py", "test_deploy.py")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if config.getoption("markexpr", "") == "gpu" and collection_path.name in _NO_GPU_TESTS_OPTIONAL_IMPORTS:
        return True
    return None


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """`make demo`'s planted synthetic model and days, made by the demo's own steps in a temp dir
    (once per test run): accuracy claims about the demo data are tested on every `make test`."""
    from prepare.demo import prepare_data

    return prepare_data(Path(tmp_path_factory.mktemp("demo_data")))
