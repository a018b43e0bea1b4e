import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    """`slow` tests (the real demo model) run unless LEMS_SKIP_SLOW=1."""
    if os.environ.get("LEMS_SKIP_SLOW") == "1":
        skip = pytest.mark.skip(reason="LEMS_SKIP_SLOW=1")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama():
    from lems_core.model import tiny_model
    return tiny_model("llama", seed=0)


@pytest.fixture(scope="session")
def tiny_ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (4, 64), generator=g)


@pytest.fixture()
def one_thread():
    """One BLAS thread: tiny matmuls on a shared 2-core box are ~10x slower with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def budget_beyond_interpreter(monkeypatch):
    """Budgeted builds on tiny models set aside nothing for the process itself.

    A tiny model's budget is a few MB, below the interpreter's own ~0.3 GB that a user's
    --max-memory also covers (``memory.process_overhead``, tested on its own in
    tests/test_profile_budget.py), so these tests budget the statistics alone.
    """
    from lems_core.pipeline import artefacts

    monkeypatch.setattr(artefacts, "process_overhead", lambda *_: 0)


@pytest.fixture(scope="module")
def model():
    """A tiny random llama (seed 0), one per test module."""
    from lems_core.model import tiny_model
    return tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(0))
