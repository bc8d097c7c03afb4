"""In crashlab's own repository the gate suite runs through pytester in tests/test_pytest_plugin.py,
sharing one store with the other plugin tests; collected directly with the default 32 states it
would record and check everything again, so here it is slow: `pytest tests/gate -m slow`.

Projects copy test_cache_policy.py only, not this file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)  # before -m 'not slow' deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.slow)
