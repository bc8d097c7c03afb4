"""The recorder table and the typed configuration: names parsed once at the edges, and every stored
form (run.json, store keys, recording slugs, crash-state ids) spelled exactly as before."""

from __future__ import annotations

import json

import pytest

from crashlab import campaign, crashstates, gate, model
from crashlab.cachemodes import CACHE_MODES
from crashlab.record import RecordConfig
from crashlab.recorders import LOGGING, RECORDERS, Recorder, UnknownRecorder, recorder


def test_the_table_says_what_each_recorder_is() -> None:
    assert list(RECORDERS) == ["qemu", "dm", "none", "host-dm"]
    assert [r for r in Recorder if r.logs] == list(LOGGING) == [Recorder.QEMU, Recorder.DM, Recorder.HOST_DM]
    assert [r for r in Recorder if r.in_guest] == [Recorder.DM]  # the log on a second disk
    assert all(r.meaning for r in Recorder)
    assert model.RECORDERS == ("qemu", "dm")  # above the host page cache: the cache mode's rules
    assert model.READABLE == ("qemu", "dm", "host-dm")
    # Crash-state ids are '-'-separated: each recorder has a token without one, the old ones unchanged.
    assert [r.token for r in Recorder] == ["qemu", "dm", "none", "hostdm"]


def test_lookup_names_the_valid_choices() -> None:
    assert recorder(" QEMU ") is Recorder.QEMU and recorder(Recorder.DM) is Recorder.DM
    with pytest.raises(UnknownRecorder, match="unknown recorder 'tape'; valid recorders: qemu, dm, none"):
        recorder("tape")
    with pytest.raises(UnknownRecorder, match=r"valid recorders: qemu, dm, host-dm$"):
        recorder("none", LOGGING)
    with pytest.raises(model.ModelError, match="unknown recorder 'none'; valid recorders: qemu, dm"):
        model.config("none", "writeback")


def test_run_json_config_is_byte_identical_to_the_string_fields() -> None:
    c = RecordConfig(fs="btrfs", cache=CACHE_MODES["none"], barrier=False, recorder=Recorder.QEMU,
                     params=(("ops", "[]"),), workload_path=("x",))
    assert json.dumps(c.as_dict(), sort_keys=True) == (
        '{"accel": "auto", "barrier": false, "cache": "none", "data_mode": "ordered", "disk_mib": null, '
        '"fs": "btrfs", "memory_mib": 512, "params": [["ops", "[]"]], "recorder": "qemu", '
        '"reserved_mib": 4, "scale": 1, "seed": 0, "timeout_s": 600.0, "transport": "auto", '
        '"workload": "smallfiles", "workload_path": ["x"]}')
    assert type(c.as_dict()["recorder"]) is str


def test_store_keys_and_recording_slugs_are_unchanged() -> None:
    # Values from the string-typed Cell this replaced: existing stores and recordings keep working.
    default = campaign.Cell()
    assert default.key == ("fs=ext4 cache=writeback barrier=on recorder=qemu workload=smallfiles "
                           "window=default torn=0 data_mode=ordered seed=1 scale=1 strategy=random")
    assert default.recording_slug == "0749c9e3358c35c6"
    other = campaign.Cell.parse({"fs": "btrfs", "cache": "unsafe", "barrier": "off", "recorder": "dm",
                                 "window": "inf", "torn": 4096})
    assert other.recording_slug == "187dd21a2cceb3f8"
    assert other.config() == {
        "fs": "btrfs", "cache": "unsafe", "barrier": "off", "recorder": "dm", "workload": "smallfiles",
        "window": "inf", "torn": 4096, "data_mode": "ordered", "seed": 1, "scale": 1, "strategy": "random",
        "window_spec": "inf",
        # Each cell's states are drawn from its own seed (sha256 of the key): stored beside the
        # config for reports, derived, so it changes no key or slug.
        "sampling_seed": 5290536736661259239}
    assert other.config()["sampling_seed"] == campaign.sampling_seed(other)
    assert campaign.Cell.from_config(other.config()) == other


def test_crash_state_ids_spell_the_recorder_by_name() -> None:
    cfg = model.config(Recorder.QEMU, CACHE_MODES["none"])
    assert crashstates.CrashState("0123abcd", cfg, 5, "a").id == "0123abcd-qemu-none-w1-e5-a"
    assert model.config("qemu", "none") == cfg


def test_cell_parse_turns_names_into_types_and_bad_names_into_one_line() -> None:
    c = campaign.Cell.parse({"cache": "None", "barrier": "OFF", "recorder": "dm"})
    assert (c.cache, c.barrier, c.recorder) == (CACHE_MODES["none"], False, Recorder.DM)
    assert campaign.Cell.parse({"seed": 3}, c) == campaign.Cell(cache=CACHE_MODES["none"], barrier=False,
                                                                recorder=Recorder.DM, seed=3)
    for values, why in (({"cache": "sometimes"}, "valid modes"), ({"recorder": "tape"}, "valid recorders"),
                        ({"barrier": "maybe"}, "barrier must be on or off"),
                        ({"cach": "none"}, "unknown cell fields cach")):
        with pytest.raises(campaign.CampaignError, match=why):
            campaign.Cell.parse(values)
    with pytest.raises(campaign.CampaignError, match="valid recorders: qemu, dm"):
        campaign.Cell(recorder=Recorder.NONE).validate()  # a cell is checked from a log


def test_policy_is_a_cell_on_each_filesystem_plus_the_gates_thresholds() -> None:
    cell = campaign.Cell.parse({"cache": "writeback", "workload": "append_log", "seed": 9})
    p = gate.Policy(cell, fs=("ext4", "ext3"), states=7, sensitivity=False)
    assert [c.fs for c in p.cells()] == ["ext4", "ext3"]
    assert {c.cache.name for c in p.cells()} == {"writeback"} and p.states == 7 and not p.sensitivity
    ref = p.sensitivity_cell()
    assert (ref.fs, ref.cache.name, ref.barrier, ref.seed) == ("ext4", "unsafe", False, 9)
    with pytest.raises(campaign.CampaignError, match="at least one filesystem"):
        gate.Policy(cell, fs=()).cells()
    assert gate.Policy().cells()[0].cache is CACHE_MODES["none"]
