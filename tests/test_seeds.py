"""Per-cell sampling seeds: each cell's crash states are an independent sample, whatever else the
matrix holds and in whatever order it lists its cells."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from crashlab import campaign, crashstates, logformat

MATRIX = campaign.Matrix(cache=("writeback", "none", "unsafe"), barrier=("on", "off"),
                         workload=("smallfiles", "nofsync"), window=("default", "inf", "5"))
CELLS = MATRIX.cells()


def _recording(where: Path, cache: str) -> Path:
    """A log of 40 volatile writes between two flushes: plenty of distinct subsets to draw."""
    where.mkdir(parents=True, exist_ok=True)
    with logformat.LogWriter(where / "write.log", 4096) as w:
        w.write(0, bytes(4096))
        w.flush()
        for i in range(40):
            w.write(8 * (i + 1), bytes([i + 1]) * 4096)
        w.flush()
    (where / "run.json").write_text(json.dumps({"config": {"recorder": "qemu", "cache": cache}}))
    return where


def test_the_seed_is_derived_from_the_run_seed_and_the_cell_key_alone() -> None:
    seeds = {c.key: campaign.sampling_seed(c) for c in CELLS}
    assert len(set(seeds.values())) == len(CELLS)  # no two cells draw alike
    for cell in CELLS:
        assert campaign.sampling_seed(campaign.Cell.from_config(cell.config())) == seeds[cell.key]
        assert cell.config()["sampling_seed"] == seeds[cell.key]  # what the store and reports show
    other_run = campaign.Matrix(**{**MATRIX.__dict__, "seed": 2}).cells()
    assert not {campaign.sampling_seed(c) for c in other_run} & set(seeds.values())


@settings(max_examples=30, deadline=None)
@given(st.permutations(range(len(CELLS))), st.integers(1, len(CELLS)))
def test_seeds_do_not_depend_on_the_rest_of_the_matrix(order: list[int], keep: int) -> None:
    """A matrix's cells in another order, or a subset of them, or them beside other cells, keep
    their seeds (so a cell's states are the same in every matrix that holds it)."""
    alone = {c.key: campaign.sampling_seed(c) for c in CELLS}
    subset = [CELLS[i] for i in order[:keep]]
    wider = campaign.Matrix(fs=("ext4", "btrfs"), cache=("writeback", "none", "unsafe", "directsync"),
                            barrier=("on", "off"), workload=("smallfiles", "nofsync", "sqlite_wal"),
                            window=("default", "inf", "5", "30")).cells()
    for cells in (subset, [*subset, *wider], [*wider, *reversed(subset)]):
        assert {c.key: campaign.sampling_seed(c) for c in cells if c.key in alone} == \
            {c.key: alone[c.key] for c in cells if c.key in alone}


def test_generated_ids_are_the_same_in_any_order(tmp_path: Path) -> None:
    cells = [c for c in CELLS if c.cache.name == "writeback" and c.workload == "smallfiles"]
    rec = _recording(tmp_path / "rec", "writeback")
    forward = {c.key: campaign.generate_states(c, rec, 8) for c in cells}
    backward = {c.key: campaign.generate_states(c, rec, 8) for c in reversed(cells)}
    assert forward == backward
    assert forward[cells[0].key] == campaign.generate_states(cells[0], rec, 8)


def test_cells_sharing_a_recording_draw_different_states(tmp_path: Path) -> None:
    # Windows 5 s and inf: one recording (the window is the crash model's), and with no clock
    # markers in this log the window changes nothing, so only the seed can tell their draws apart.
    five, inf = (campaign.Cell.parse({"cache": "writeback", "window": w}) for w in ("5", "inf"))
    assert five.recording_slug == inf.recording_slug
    rec = _recording(tmp_path / "rec", "writeback")

    def draws(cell: campaign.Cell) -> list[tuple[int, str]]:
        return [(s.end, s.sel) for s in map(crashstates.parse_id, campaign.generate_states(cell, rec, 12))]

    a, b = draws(five), draws(inf)
    assert len(a) == len(b) == 12
    assert set(a) != set(b)
    assert not {sel for _, sel in a if sel.startswith("r")} & {sel for _, sel in b if sel.startswith("r")}
