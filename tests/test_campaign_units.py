"""Campaign pieces that need no guest: cells, matrices, TOML, recording sharing, marker sets."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from crashlab import campaign, crashstates, logformat, markers


def test_cells_differing_only_in_the_crash_model_share_a_recording() -> None:
    base = campaign.Cell()
    for model_only in ({"window": "inf"}, {"torn": 4096}, {"strategy": "prefix"}):
        other = campaign.Cell.parse(model_only)
        assert other.key != base.key
        assert other.recording_slug == base.recording_slug
    for recorded in ({"cache": "none"}, {"barrier": "off"}, {"seed": 2}, {"workload": "nofsync"}):
        assert campaign.Cell.parse(recorded).recording_slug != base.recording_slug


def test_cell_round_trips_through_its_stored_config() -> None:
    for cell in (campaign.Cell(), campaign.Cell.parse({"cache": "none", "window": "inf", "torn": 512})):
        config = cell.config()
        assert config["window"] in ("30s", "inf")  # what reports show
        assert campaign.Cell.from_config(config) == cell


def test_matrix_skips_what_cannot_exist() -> None:
    cells = campaign.Matrix(fs=("ext4", "xfs"), cache=("none",), barrier=("on", "off"),
                            workload=("smallfiles",)).cells()
    assert {(c.fs, c.barrier) for c in cells} == {("ext4", True), ("ext4", False), ("xfs", True)}


def test_default_matrix_is_the_readme_one() -> None:
    cells = campaign.Matrix().cells()
    assert len(cells) == 5 * 2 * 2
    assert {c.cache.name for c in cells} == {"writeback", "none", "writethrough", "directsync", "unsafe"}
    assert {c.workload for c in cells} == {"smallfiles", "nofsync"}


def test_matrix_from_toml(tmp_path: Path) -> None:
    f = tmp_path / "m.toml"
    f.write_text('[matrix]\nfs = ["ext4"]\ncache = ["none", "unsafe"]\ntorn = [0, 4096]\nstates = 5\n')
    m = campaign.Matrix.from_toml(f, seed=9)
    assert (m.cache, m.torn, m.states, m.seed) == (("none", "unsafe"), (0, 4096), 5, 9)
    assert len(m.cells()) == 2 * 2 * 2 * 2
    f.write_text('cache = ["none"]\nstatez = 3\n')
    with pytest.raises(campaign.CampaignError, match="unknown keys statez"):
        campaign.Matrix.from_toml(f)
    f.write_text('cache = ["nonne"]\n')
    with pytest.raises(campaign.CampaignError, match="valid modes"):
        campaign.Matrix.from_toml(f).cells()


def test_present_markers_are_those_before_the_crash_point(tmp_path: Path) -> None:
    log = tmp_path / "m.log"
    with logformat.LogWriter(log) as w:
        for seq, name in enumerate(("workload-start", "tick", "fsync-1", "fsync-2")):
            w.write(100, markers.encode(markers.Marker(seq, seq, name)))
            w.write(seq, bytes(512))
    with logformat.open_log(log) as reader:
        entries = reader.index()
    assert crashstates.present_markers(entries, 0) == set()
    assert crashstates.present_markers(entries, 5) == {0, 1, 2}
    assert crashstates.present_markers(entries, len(entries)) == {0, 1, 2, 3}


def test_matrix_command_spells_out_everything_and_parses_back() -> None:
    import shlex

    from crashlab.cli.campaign import _matrix_from, matrix_command

    m = campaign.Matrix(cache=("none", "unsafe"), barrier=("on",), window=("inf", "default"), torn=(0, 4096),
                        states=7, seed=3)
    argv = shlex.split(m.command())
    assert argv[:2] == ["crashlab", "matrix"]
    ctx = matrix_command.make_context("matrix", argv[2:])
    assert _matrix_from(ctx.params, campaign.Matrix(fs=("btrfs",), seed=99)) == m


def test_a_cell_reads_its_recording_only_as_recorded(tmp_path: Path) -> None:
    with logformat.LogWriter(tmp_path / "write.log", 4096) as w:
        w.write(0, bytes(8192))
        w.flush()
    cell = campaign.Cell.parse({"cache": "writeback", "recorder": "qemu", "workload": "smallfiles"})
    (tmp_path / "run.json").write_text(json.dumps({"config": {"recorder": "qemu", "cache": "writeback"}}))
    assert campaign.generate_states(cell, tmp_path, 3)
    with pytest.raises(campaign.CampaignError, match="cannot tear inside its own logical block"):
        campaign.generate_states(replace(cell, torn=512), tmp_path, 3)
    (tmp_path / "run.json").write_text(json.dumps({"config": {"recorder": "qemu", "cache": "none"}}))
    with pytest.raises(campaign.CampaignError, match="recorded under cache none"):
        campaign.generate_states(cell, tmp_path, 3)


def test_cells_that_can_share_a_guest_are_recorded_in_one_spread_over_the_workers() -> None:
    """Hot-plug recording (record.series) pays one boot for several cells; the driver still cuts
    them into as many guests as there are workers, and a cell that cannot share records alone."""
    cells = [campaign.Cell.parse({"cache": m, "barrier": b})
             for m in ("writeback", "none", "unsafe") for b in ("on", "off")]
    ide = campaign.Cell.parse({"disk": "ide"})
    dirs = [Path(f"/r/{n}") for n in range(7)]
    units = campaign.record_units([*cells, ide], dirs, workers=2)
    assert sorted(len(u.cells) for u in units) == [1, 2, 4]  # at most ceil(7 / 2) a guest
    assert [c for u in units for c in u.cells] == [*cells, ide]
    assert [d for u in units for d in u.out_dirs] == [str(d) for d in dirs]
    assert next(u for u in units if len(u.cells) == 1).cells == (ide,)
    assert len(campaign.record_units(cells, dirs[:6], workers=1)) == 1
    assert campaign.record_units([], [], workers=2) == []
