"""What the campaign tests share: fake units installed in place of recording and checking, a real
in-process Dask cluster that sees them, and the processes a run left behind.

Test modules load this with `pytest_plugins = ["campaign_fakes"]` (never import it: pytest must
load it first to rewrite its asserts) and take its fixtures: `install_fakes` for their own `fakes`
fixture (each file's fakes count different things), `inprocess`, `tagged`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from crashlab import campaign, cluster


class Units(Protocol):
    record: Callable[..., Any]
    check: Callable[..., Any]


@pytest.fixture
def install_fakes(monkeypatch: pytest.MonkeyPatch) -> Callable[[Units], None]:
    """Installs `fakes` as the units that record and check; states are s00, s01, ... (sorted as
    numbered); versions are fixed."""
    def install(fakes: Units) -> None:
        monkeypatch.setattr(campaign, "run_record", fakes.record)
        monkeypatch.setattr(campaign, "run_check", fakes.check)
        monkeypatch.setattr(campaign, "generate_states", lambda cell, rec, n: [f"s{i:02}" for i in range(n)])
        monkeypatch.setattr(campaign, "versions", lambda fs: {"crashlab": "test"})
    return install


@pytest.fixture(scope="module")
def inprocess() -> Iterator[cluster.Cluster]:
    """Dask's in-process cluster: the real scheduler and worker, the fakes visible to them."""
    with cluster.connect(None, 1, processes=False, resources={"qemu": 1}) as c:
        yield c


@pytest.fixture(scope="session")
def tagged() -> Callable[[str], list[str]]:
    """A function: the live processes whose environment carries a tag."""
    return processes_tagged


def processes_tagged(tag: str) -> list[str]:
    """Live processes whose environment carries `tag`: everything a run started, and nothing that
    other test sessions on the same machine started."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and tag.encode() in (proc / "environ").read_bytes():
                found.append(proc.name + " " + (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return found
