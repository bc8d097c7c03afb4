"""In crashlab's own repository the gate suite runs through pytester in tests/test_pytest_plugin.py,
sharing one store with the other plugin tests; collected directly with its default 299 states it
would record and check everything again, so here it is slow: `pytest tests/gate -m slow`. Run so,
it runs as its docstring recommends, at `--crashlab-scale 8` at least: at scale 1 a policy cell
with barriers has too few distinct crash states to reach 299 (ext4 124, XFS 73), and the gate
says so, inconclusive.

Projects copy test_cache_policy.py only, not this file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


RECOMMENDED_SCALE = 8  # XFS under cache=none with barriers: 195 distinct states at 4, 299 at 8


def pytest_configure(config: pytest.Config) -> None:
    config.option.crashlab_scale = max(config.option.crashlab_scale, RECOMMENDED_SCALE)


@pytest.hookimpl(tryfirst=True)  # before -m 'not slow' deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.slow)
