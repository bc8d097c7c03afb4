"""The evidence matrix (results/evidence*.toml): several cross products in one TOML, all checked
before anything runs, and the rows issue 14 asks for."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from crashlab import campaign
from crashlab.cli import EXIT_USAGE, cli

RESULTS = Path(__file__).resolve().parent.parent / "results"


def test_evidence_matrix_has_the_issue_rows() -> None:
    blocks = campaign.load_matrices(RESULTS / "evidence.toml")
    per_cell = {c.key: (c, m.states) for m in blocks for c in m.cells()}
    cells = [c for c, _ in per_cell.values()]
    assert len(per_cell) == sum(len(m.cells()) for m in blocks)  # no cell in two blocks
    modern = [c for c in cells if c.fs in ("ext4", "xfs", "btrfs")]
    assert {c.workload for c in modern} == {"smallfiles", "nofsync", "sqlite_wal"}
    assert Counter(c.fs for c in modern) == {"ext4": 30, "btrfs": 30, "xfs": 15}  # XFS: barrier on only
    assert not [c for c in modern if c.fs == "xfs" and not c.barrier]
    assert {c.cache.name for c in modern} == {"writeback", "none", "writethrough", "directsync", "unsafe"}
    assert all(states >= (1000 if c.fs == "ext4" else 300) for c, states in per_cell.values()
               if c.fs in ("ext4", "xfs", "btrfs"))
    old = [c for c in cells if c.fs == "ext3"]
    assert {(c.data_mode, c.barrier) for c in old} == {("ordered", False)}
    assert {c.disk for c in old} == {"ide", "virtio-blk"}
    assert {c.cache.name for c in old} == {"writethrough", "writeback", "none"}


def test_window_sweep_matrix() -> None:
    (m,) = campaign.load_matrices(RESULTS / "evidence-window.toml")
    assert (m.cache, m.barrier, m.window) == (("writeback", "none"), ("on", "off"),
                                              ("0.1", "1", "5", "30", "inf"))
    assert m.workload == ("mailserver",)  # the long workload: 60 s of guest time
    assert len(m.cells()) == 2 * 2 * 5  # cells validate the workload's name


def test_blocks_take_the_top_level_keys_as_defaults(tmp_path: Path) -> None:
    f = tmp_path / "m.toml"
    f.write_text('states = 7\ncache = ["none"]\n[[matrix]]\nfs = ["ext4"]\n'
                 '[[matrix]]\nfs = ["btrfs"]\nstates = 3\n')
    a, b = campaign.load_matrices(f, seed=4)
    assert (a.fs, a.cache, a.states, a.seed) == (("ext4",), ("none",), 7, 4)
    assert (b.fs, b.cache, b.states, b.seed) == (("btrfs",), ("none",), 3, 4)
    with pytest.raises(campaign.CampaignError, match="holds 2"):
        campaign.Matrix.from_toml(f)


@pytest.mark.parametrize(("toml", "needle"), [
    ('[[matrix]]\nfs = ["ext4"]\n[[matrix]]\nstatez = 1\n', "[[matrix]] 2: unknown keys statez"),
    ('[[matrix]]\nfs = ["ext4"]\n[[matrix]]\nstates = 0\n', "[[matrix]] 2: states 0 is out of range"),
    ("matrix = [1, 2]\n", "[[matrix]] must be one or more tables"),
    # Valid keys, but the second block names a cache mode that does not exist: refused before the
    # first block records anything.
    ('[[matrix]]\ncache = ["none"]\n[[matrix]]\ncache = ["nonne"]\n', "unknown cache mode 'nonne'"),
])
def test_a_bad_block_is_refused_before_any_block_runs(tmp_path: Path, toml: str, needle: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kw: object) -> object:
        raise AssertionError("bad input reached the campaign driver")

    monkeypatch.setattr(campaign, "run_matrix", refuse)
    (tmp_path / "m.toml").write_text(toml)
    res = CliRunner().invoke(cli, ["matrix", "--config", str(tmp_path / "m.toml"),
                                   "--store", str(tmp_path / "r" / "s.sqlite")])
    assert res.exit_code == EXIT_USAGE, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.toml"]


def test_every_block_runs_though_an_earlier_one_failed_units(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[tuple[str, ...]] = []

    def fake_run_matrix(cells: list[campaign.Cell], states: int, *args: object,
                        **kw: object) -> campaign.Progress:
        ran.append(tuple(sorted({c.fs for c in cells})))
        prog = campaign.Progress(cells=len(cells), states=states)
        if len(ran) == 1:
            prog.failed_units.append("record ext4: the guest did not boot")
        return prog

    monkeypatch.setattr(campaign, "run_matrix", fake_run_matrix)
    (tmp_path / "m.toml").write_text('cache = ["none"]\nbarrier = ["on"]\nworkload = ["smallfiles"]\n'
                                     '[[matrix]]\nfs = ["ext4"]\n[[matrix]]\nfs = ["ext3"]\n')
    res = CliRunner().invoke(cli, ["matrix", "-q", "--config", str(tmp_path / "m.toml"),
                                   "--store", str(tmp_path / "s.sqlite")])
    assert ran == [("ext4",), ("ext3",)]
    assert res.exit_code == 1 and "the guest did not boot" in res.stderr
