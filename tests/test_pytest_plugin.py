"""The pytest plugin, through pytest's own pytester: the ready gate suite passing, failing with the
crash-state ids in the report and the JUnit XML, and its sensitivity check catching a blind model.

The guest tests share one store with tests/test_gate.py (same session path), and every inner run
is handed that store, so each cell is recorded and checked once per session.
"""

from __future__ import annotations

import os
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from crashlab import gate
from crashlab.cachemodes import CACHE_MODES
from crashlab.campaign import Cell
from crashlab.store import Store

pytest_plugins = ["pytester"]

SUITE = Path(__file__).parent / "gate" / "test_cache_policy.py"
# ext4 only, few states, host mounts: the checker-guest path is tested in test_campaign.py.
# A max rate of 60 %: 4 clean states bound the rate below 52.7 %, enough to pass here.
CHEAP = ["--crashlab-fs", "ext4", "--crashlab-states", "4", "--crashlab-max-rate", "60",
         "--crashlab-workers", "1", "--crashlab-host-mount"]
TIMEOUT = 900


@pytest.fixture(scope="session")
def gate_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.getbasetemp() / "crashlab-gate-store"  # the same as test_gate.py's
    d.mkdir(exist_ok=True)
    return d / "crashlab.sqlite"


def run_suite(pytester: pytest.Pytester, store: Path, *args: str) -> pytest.RunResult:
    """The shipped suite, copied as a project would copy it, in a fresh pytest process."""
    pytester.makepyfile(test_cache_policy=SUITE.read_text())
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", *CHEAP,
                                         "--crashlab-store", str(store), *args, timeout=TIMEOUT)


def junit_cases(path: Path) -> dict[str, ET.Element]:
    return {case.get("name", ""): case for case in ET.parse(path).getroot().iter("testcase")}


def properties(case: ET.Element) -> dict[str, str]:
    return {p.get("name", ""): p.get("value", "") for p in case.iter("property")}


# --- without guests -------------------------------------------------------------------------------

def test_options_and_marker_are_registered(pytester: pytest.Pytester) -> None:
    help_text = pytester.runpytest("--help").stdout.str()
    for opt in ("--crashlab-fs", "--crashlab-cache", "--crashlab-barrier", "--crashlab-states",
                "--crashlab-max-rate", "--crashlab-seed", "--crashlab-store", "--crashlab-host-mount",
                "--crashlab-scheduler"):
        assert opt in help_text
    markers = pytester.runpytest("--markers").stdout.str()
    assert "@pytest.mark.crashlab: boots QEMU guests" in markers


def test_crashlab_fs_runs_once_per_filesystem_and_the_marker_deselects(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="""
        def test_fs(crashlab_fs, crashlab_options):
            assert crashlab_fs in crashlab_options.fs

        def test_uses_cell(crashlab_cell):
            raise AssertionError("must be deselected by -m 'not crashlab'")

        def test_plain():
            pass
    """)
    result = pytester.runpytest("--crashlab-fs", "ext4, xfs", "-m", "not crashlab", "-v",
                                "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, deselected=1)
    result.stdout.fnmatch_lines(["*test_fs?ext4? PASSED*", "*test_fs?xfs? PASSED*"])


def test_bad_options_stop_the_session(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_nothing(): pass")
    for args in (["--crashlab-states", "0"], ["--crashlab-fs", " , "], ["--crashlab-max-rate", "0"],
                 ["--crashlab-max-rate", "101"], ["--crashlab-scheduler", "http://x"],
                 ["--crashlab-scale", "0"]):
        result = pytester.runpytest(*args)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        assert "--crashlab-" in result.stderr.str()


def test_the_scheduler_comes_from_the_option_or_the_ini_file(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="""
        import os

        def test_scheduler(crashlab_options):
            assert crashlab_options.scheduler == os.environ["WANT"]
    """)
    pytester.makeini("[pytest]\ncrashlab_scheduler = sched.example:8786\n")
    for args, want in (([], "tcp://sched.example:8786"), (["--crashlab-scheduler", "tcp://o:1"], "tcp://o:1")):
        os.environ["WANT"] = want
        try:
            pytester.runpytest("-p", "no:cacheprovider", *args).assert_outcomes(passed=1)
        finally:
            del os.environ["WANT"]


def test_a_bad_cell_fails_its_test_before_any_guest_boots(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="""
        def test_bad_cache(crashlab_cell):
            crashlab_cell(cache="writebak")

        def test_bad_field(crashlab_cell):
            crashlab_cell(cach="none")
    """)
    result = pytester.runpytest("-p", "no:cacheprovider", "--crashlab-store", str(pytester.path / "s.db"))
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["crashlab_cell: unknown cache mode 'writebak'; valid modes: *",
                                 "crashlab_cell: unknown cell fields cach; known: *"])
    assert "During handling" not in result.stdout.str()
    assert not (pytester.path / "s.db").exists()


def test_default_store_is_under_the_rootdir(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="""
        def test_store(crashlab_options, pytestconfig):
            assert crashlab_options.store == pytestconfig.rootpath / "results" / "crashlab.sqlite"
            assert crashlab_options.policy.cells()[0].cache.name == "none"
    """)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


# --- the gate suite on real recordings ------------------------------------------------------------

@pytest.mark.guest
def test_gate_suite_passes_a_safe_policy(pytester: pytest.Pytester, gate_store: Path) -> None:
    xml = pytester.path / "gate.xml"
    result = run_suite(pytester, gate_store, "--crashlab-cache", "none", "--crashlab-barrier", "on",
                       f"--junitxml={xml}")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*- crashlab -*",
                                 "ext4 cache=none barrier=on workload=smallfiles window=1s: 0/4 failed*"
                                 "95 % upper bound 52.7 %*",
                                 "ext4 cache=unsafe barrier=off*"])
    cases = junit_cases(xml)
    props = properties(cases["test_policy_keeps_filesystem_and_fsynced_data[ext4]"])
    assert props["crashlab failed"] == "0/4" and props["crashlab upper95"] == "0.5271"
    assert "cache=none" in props["crashlab cell"]
    assert not [c for c in cases.values() if c.find("failure") is not None]


@pytest.mark.guest
def test_gate_suite_fails_an_unsafe_policy_naming_each_crash_state(pytester: pytest.Pytester,
                                                                  gate_store: Path) -> None:
    xml = pytester.path / "gate.xml"
    result = run_suite(pytester, gate_store, "--crashlab-cache", "unsafe", "--crashlab-barrier", "off",
                       f"--junitxml={xml}")
    # The policy is the gate's own reference here: its test fails, the sensitivity test passes.
    result.assert_outcomes(failed=1, passed=1)
    cell = gate.Policy(Cell(cache=CACHE_MODES["unsafe"], barrier=False)).cells()[0]
    with Store(gate_store) as store:
        bad = gate.check(store, cell, 4).failures
    assert bad
    out = result.stdout.str()
    assert "REFUSED:" in out
    failure = junit_cases(xml)["test_policy_keeps_filesystem_and_fsynced_data[ext4]"].find("failure")
    assert failure is not None
    reported = (failure.get("message") or "") + (failure.text or "")
    for r in bad:
        for where in (out, reported):
            assert f"crash state {r.state_id}: {r.outcome}" in where
            assert f"crashlab reproduce {r.state_id} --store {gate_store} --host-mount" in where
    fsck = bad[0].record.fsck
    assert fsck is not None and fsck.rc is not None
    assert f"fsck: {shlex.join(fsck.argv)} -> exit {fsck.rc}" in out
    assert "Captured crashlab call" in out  # the cell's rates as a report section


@pytest.mark.guest
def test_sensitivity_check_fails_when_the_model_is_blind(pytester: pytest.Pytester, gate_store: Path) -> None:
    # prefix: every write up to the crash point persisted, nothing volatile: a model that cannot
    # see a lost cache. The known-unsafe reference then looks safe, and the gate must say so.
    result = run_suite(pytester, gate_store, "--crashlab-strategy", "prefix",
                       "-k", "sees_failures_of_a_known_unsafe_configuration")
    result.assert_outcomes(failed=1, deselected=1)
    result.stdout.fnmatch_lines(["*GATE BROKEN: the known-unsafe configuration showed no failure in 4 *",
                                 "*cell: ext4 cache=unsafe barrier=off*strategy=prefix: 0/4 failed*"])


def test_disk_kernel_and_domain_xml_options_reach_the_policy_cell(pytester: pytest.Pytester) -> None:
    xml = pytester.path / "disk.xml"
    xml.write_text("<disk type='file' device='disk'><driver name='qemu' type='raw' cache='writethrough'/>"
                   "<target dev='hda' bus='ide'/></disk>")
    pytester.makepyfile(test_x="""
        def test_cell(crashlab_options):
            cell = crashlab_options.policy.cell
            assert (cell.cache.name, cell.disk, cell.qemu) == ("writethrough", "ide", "qemu-system-x86_64")
    """)
    result = pytester.runpytest("-p", "no:cacheprovider", "--crashlab-domain-xml", str(xml),
                                "--crashlab-qemu", "qemu-system-x86_64")
    result.assert_outcomes(passed=1)
    for args in (["--crashlab-domain-xml", str(xml), "--crashlab-disk", "ide"],
                 ["--crashlab-domain-xml", str(pytester.path / "missing.xml")]):
        result = pytester.runpytest(*args)
        assert result.ret == pytest.ExitCode.USAGE_ERROR and "--crashlab-domain-xml" in result.stderr.str()
