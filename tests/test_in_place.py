"""ext4 states checked in place on the shared base (checkout, replay with an undo file, the undo
written back) give what a copy per state gives, state by state; a revert that fails costs a
rebuilt base."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fixture_logs import fixture_recording

from crashlab import campaign, crashstates, filesystems, undofile
from crashlab.check import inplace

# Barriers off under a volatile host cache: corrupt, unmountable and clean states. The fixture's base
# is small, so the cost rule (check.inplace.COPY_RATIO) would build most of them as copies: the
# tests of the mechanism switch it off, the last test checks the rule.
CELL = campaign.Cell.parse({"fs": "ext4", "cache": "writeback", "barrier": "off", "recorder": "dm"})
PROMISES = '{"marker": "fsync200", "seq": 0}\n'


def judged(results: list[campaign.StateResult]) -> list[tuple[str, str, str, object]]:
    return [(r.state_id, r.outcome.value, r.detail["reason"], (r.detail.get("fsck") or {}).get("rc"))
            for r in results]


@pytest.fixture(scope="module")
def unit(tmp_path_factory: pytest.TempPathFactory) -> campaign.CheckUnit:
    rec = fixture_recording("ext4-dm-barrier-off.log.xz", tmp_path_factory.mktemp("rec") / "r", PROMISES)
    ids = tuple(campaign.generate_states(CELL, rec.out_dir, 30))
    return campaign.CheckUnit(CELL, str(rec.out_dir), ids, checker="userspace")


@pytest.fixture(scope="module")
def copies(unit: campaign.CheckUnit) -> list[tuple[str, str, str, object]]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(campaign, "checks_in_place", lambda u: False)
        return judged(campaign.run_check(unit))


def with_revert(mp: pytest.MonkeyPatch, argv: tuple[str, ...] = (),
                here: Callable[[Path, Path], object] | None = None) -> None:
    """The revert as a tool (`argv`) or in this process (`here`)."""
    fs = filesystems.FILESYSTEMS["ext4"]
    assert fs.replay is not None
    mp.setitem(filesystems.FILESYSTEMS, "ext4",
               replace(fs, replay=replace(fs.replay, revert=argv, revert_here=here)))


@pytest.fixture
def always_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inplace, "COPY_RATIO", 0)


def counting_checkouts(mp: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    checkout = crashstates.Materializer.checkout

    def counted(self: crashstates.Materializer, state: crashstates.CrashState) -> Any:
        seen.append(state.id)
        return checkout(self, state)

    mp.setattr(crashstates.Materializer, "checkout", counted)
    return seen


@pytest.mark.usefixtures("always_in_place")
def test_in_place_gives_what_a_copy_gives_state_by_state(unit: campaign.CheckUnit,
                                                         copies: list[tuple[str, str, str, object]],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    assert campaign.checks_in_place(unit)
    seen = counting_checkouts(monkeypatch)
    assert judged(campaign.run_check(unit)) == copies
    assert len(seen) == len(unit.state_ids)  # every state checked out, none copied
    # more than one outcome class to tell apart, and states the replay could not recover
    assert len({o for _, o, _, _ in copies}) >= 2 and ("unmountable" in {o for _, o, _, _ in copies}), copies


@pytest.mark.usefixtures("always_in_place")
def test_e2undo_itself_gives_what_a_copy_gives(unit: campaign.CheckUnit,
                                               copies: list[tuple[str, str, str, object]],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    with_revert(monkeypatch, ("e2undo", "{undo}", "{image}"))
    assert judged(campaign.run_check(unit)) == copies


def _refuse(undo: Path, image: Path) -> None:
    raise undofile.UndoError(f"{undo}: unfinished")


@pytest.mark.usefixtures("always_in_place")
@pytest.mark.parametrize("how", ["tool", "here"])
def test_a_failed_revert_rebuilds_the_base(
        unit: campaign.CheckUnit, copies: list[tuple[str, str, str, object]],
        monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    if how == "tool":
        with_revert(monkeypatch, ("false",))
    else:
        with_revert(monkeypatch, here=_refuse)
    assert judged(campaign.run_check(unit)) == copies


@pytest.mark.usefixtures("always_in_place")
def test_a_revert_that_does_nothing_is_caught_by_the_comparison(
        unit: campaign.CheckUnit, copies: list[tuple[str, str, str, object]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison above can fail: with the replays left on the base, later states differ."""
    with_revert(monkeypatch, ("true",))
    assert judged(campaign.run_check(unit)) != copies


def test_a_state_of_many_ops_on_a_small_base_is_built_as_a_copy(
        unit: campaign.CheckUnit, monkeypatch: pytest.MonkeyPatch) -> None:
    """No barriers, nothing flushed, an infinite window: hundreds of ops a state, more bytes to
    save and restore than a copy of this base moves."""
    many = replace(unit, cell=campaign.Cell.parse({**{k: CELL.config()[k] for k in ("fs", "recorder")},
                                                   "cache": "unsafe", "barrier": "off", "window": "inf"}))
    many = replace(many, state_ids=tuple(campaign.generate_states(many.cell, Path(unit.recording), 12)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(campaign, "checks_in_place", lambda u: False)
        want = judged(campaign.run_check(many))
    seen = counting_checkouts(monkeypatch)
    assert judged(campaign.run_check(many)) == want
    assert len(seen) < len(many.state_ids) // 2


def test_a_replay_that_cannot_be_undone_never_gets_a_shared_image() -> None:
    assert not campaign.checks_in_place(replace(campaign.CheckUnit(CELL, "", ()), checker="guest"))
    assert not campaign.checks_in_place(campaign.CheckUnit(CELL, "", (), host_mount=True))
    assert not campaign.checks_in_place(campaign.CheckUnit(replace(CELL, fs="xfs"), "", ()))
