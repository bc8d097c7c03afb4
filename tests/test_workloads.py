"""Every workload on the host at scale 1: runs through the real harness (markers written with O_DIRECT
to a plain file), its oracle passes on the final tree and on the tree at every durability point, and
fails with a precise message once a promised file is removed or truncated."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest

from crashlab import markers, oracle, workload
from crashlab.workload import WorkloadContext

WORKLOADS = ["append_log", "atomic_replace", "bigwrite", "mailserver", "metadata_storm", "nofsync", "ops",
             "smallfiles", "sqlite_rollback", "sqlite_wal"]
# mailserver runs 60 s by default: CI size is a couple of seconds with deliveries as often as the
# other workloads' durability points (passed the way a runner without arguments would).
CI_ENV = {"CRASHLAB_PARAM_DURATION": "2", "CRASHLAB_PARAM_DELIVER": "0.2"}
MARKER_REGION = 1 << 20
CONTENT_KINDS = ("file", "prefix", "log", "sqlite")


@pytest.fixture(scope="module", autouse=True)
def ci_size() -> object:
    with pytest.MonkeyPatch.context() as mp:
        for k, v in CI_ENV.items():
            mp.setenv(k, v)
        yield


def test_available_lists_every_workload() -> None:
    assert workload.available() == WORKLOADS


def run_harness(name: str, tmp: Path, seed: int = 1, tick: float = 0.0, *params: str
                ) -> tuple[Path, oracle.Promises, list[markers.Marker]]:
    """Run `name` as the guest runner does; return its root, promises and the markers written."""
    root, dev = tmp / "root", tmp / "markers"
    root.mkdir()
    with dev.open("wb") as f:
        f.truncate(MARKER_REGION)
    args = [name, "--root", str(root), "--seed", str(seed), "--scale", "1",
            "--promises", str(tmp / "p.jsonl"), "--marker-device", str(dev),
            "--marker-length", str(MARKER_REGION), "--tick", str(tick)]
    for p in params:
        args += ["--param", p]
    assert workload.main(args) == 0
    data = dev.read_bytes()
    found = [m for off in range(0, len(data), markers.PAYLOAD)
             if (m := markers.decode(data[off:off + markers.PAYLOAD])) is not None]
    return root, oracle.load_promises(tmp / "p.jsonl"), sorted(found, key=lambda m: m.seq)


@pytest.fixture(scope="module", params=WORKLOADS)
def ran(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> tuple[str, Path, oracle.Promises, list[markers.Marker]]:
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    return (name, *run_harness(name, tmp, tick=0.02))


def test_markers_match_points(ran: tuple[str, Path, oracle.Promises, list[markers.Marker]]) -> None:
    name, _, ps, found = ran
    names = [m.name for m in found if not m.is_tick]
    assert names[0] == markers.WORKLOAD_START and names[-1] == markers.WORKLOAD_END
    by_seq = {m.seq: m.name for m in found}
    assert [by_seq[s] for s, _ in ps.points] == [n for _, n in ps.points]
    if name != "nofsync":
        assert 3 <= len(ps.points) <= 30, "scale 1 is CI-small: a few dozen durability points at most"


def test_final_tree_keeps_every_promise(ran: tuple[str, Path, oracle.Promises, list[markers.Marker]]) -> None:
    name, root, ps, found = ran
    if name == "nofsync":
        assert ps.points == () and ps.promises == ()
        return
    assert ps.promises
    assert oracle.check(root, ps) == []
    assert oracle.check(root, ps, {m.seq for m in found}) == []  # ticks and start/end seqs are ignored


def promised_files(ps: oracle.Promises) -> dict[str, dict]:
    """Paths whose final promise is about content, with that promise."""
    final = {p["path"]: p for p in ps.promises}
    return {path: p for path, p in final.items() if p["kind"] in CONTENT_KINDS and p.get("size", 1)}


@pytest.mark.parametrize("ran", [w for w in WORKLOADS if w != "nofsync"], indirect=True)  # nofsync: nothing
@pytest.mark.parametrize("damage", ["remove", "truncate"])
def test_damaged_tree_breaks_a_promise(ran: tuple[str, Path, oracle.Promises, list[markers.Marker]],
                                       damage: str, tmp_path: Path) -> None:
    name, root, ps, _ = ran
    files = promised_files(ps)
    assert files, f"{name} promises no file content"
    path, promise = sorted(files.items())[-1]
    tree = tmp_path / "tree"
    shutil.copytree(root, tree, symlinks=True)
    victim = tree / path
    size = victim.stat().st_size
    if damage == "remove":
        victim.unlink()
    else:
        os.truncate(victim, size // 2)
    violations = oracle.check(tree, ps)
    mine = [v for v in violations if v.path == path]
    assert len(mine) == 1, violations
    msg = mine[0].message
    assert msg.startswith(f"{path}: promised {oracle.describe(promise)} after {promise['marker']}, found ")
    if damage == "remove":
        assert msg.endswith("found no entry")
    elif promise["kind"] in ("file", "prefix"):
        assert f"{size // 2} B" in msg


class SnapshottingContext(WorkloadContext):
    """Copies the tree right after each durability point: the state a crash just after it recovers
    to when everything before it persisted."""

    snaps: list[tuple[int, Path]]

    def durable(self, name: str, promises: list[dict] = ()) -> int:  # type: ignore[assignment,override]
        seq = super().durable(name, promises)
        snap = self.root.parent / f"snap{seq:04d}"
        shutil.copytree(self.root, snap, symlinks=True)
        self.snaps.append((seq, snap))
        return seq


@pytest.mark.parametrize("name", [w for w in WORKLOADS if w != "nofsync"])
def test_promises_hold_at_every_point(name: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    out = io.StringIO()
    ctx = SnapshottingContext(root, 3, 1, out)
    ctx.snaps = []
    workload.load(name)(ctx)
    ps = oracle.parse_promises(out.getvalue().splitlines())
    seqs = [s for s, _ in ps.points]
    for i, (seq, snap) in enumerate(ctx.snaps):
        # Lying after this point, or still before it with all of its operations persisted.
        assert oracle.check(snap, ps, seqs[:i + 1]) == [], (name, seq)
        assert oracle.check(snap, ps, seqs[:i]) == [], (name, seq)


def promises_text(name: str, tmp: Path, seed: int) -> str:
    tmp.mkdir()
    out = io.StringIO()
    workload.load(name)(WorkloadContext(tmp, seed, 1, out))
    return out.getvalue()


@pytest.mark.parametrize("name", [w for w in WORKLOADS if w != "nofsync"])
def test_same_seed_same_promises(name: str, tmp_path: Path) -> None:
    a = promises_text(name, tmp_path / "a", 7)
    assert a == promises_text(name, tmp_path / "b", 7)
    if name not in ("sqlite_wal", "sqlite_rollback", "bigwrite", "append_log", "mailserver"):
        return
    assert a != promises_text(name, tmp_path / "c", 8)


def test_nofsync_same_seed_same_tree(tmp_path: Path) -> None:
    def tree(d: Path) -> dict[str, bytes]:
        d.mkdir()
        workload.load("nofsync")(WorkloadContext(d, 5, 1, io.StringIO()))
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    assert tree(tmp_path / "a") == tree(tmp_path / "b")


def test_ops_workload_runs_a_given_sequence(tmp_path: Path) -> None:
    from crashlab import opgen

    ops = [opgen.Op("mkdir", "A"), opgen.Op("creat", "A/foo"),
           opgen.Op("write", "A/foo", size=4096, fill=0x41), opgen.Op("fsync", "A/foo"),
           opgen.Op("fsync", "A"), opgen.Op("fsync", "")]
    (tmp_path / "ops.json").write_text(opgen.dumps(ops))
    root, ps, _ = run_harness("ops", tmp_path, 0, 0.0, f"ops={tmp_path / 'ops.json'}")
    assert (root / "A/foo").read_bytes() == b"A" * 4096
    assert [n for _, n in ps.points] == ["3:fsync('A/foo')", "4:fsync('A')", "5:fsync('')"]
    final = {p["path"]: p for p in ps.promises}
    assert final["A/foo"] == {**oracle.file_state("A/foo", b"A" * 4096, {}),
                              "marker": "5:fsync('')", "seq": 3}  # seq 0 is workload-start
    assert oracle.check(root, ps) == []


def test_cli_list_check_repro(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from crashlab import opgen
    from crashlab.cli import cli

    runner = CliRunner()
    listed = runner.invoke(cli, ["workload", "list"])
    assert listed.exit_code == 0
    assert [line.split()[0] for line in listed.output.splitlines()] == WORKLOADS
    root, ps, _ = run_harness("atomic_replace", tmp_path)
    promises = str(tmp_path / "p.jsonl")
    ok = runner.invoke(cli, ["workload", "check", str(root), promises])
    assert ok.exit_code == 0 and ok.output.startswith("ok: 20 durability points")
    # The file first promised last: before that point, emptying it breaks nothing (other files may
    # break: the final tree is no crash state of an early point).
    first = {}
    for p in ps.promises:
        first.setdefault(p["path"], p["seq"])
    target = max(first, key=first.__getitem__)
    (root / target).write_bytes(b"")
    broken = runner.invoke(cli, ["workload", "check", str(root), promises])
    assert broken.exit_code == 1 and broken.output.startswith(f"{target}: promised sha256")
    assert broken.output.rstrip().endswith("found 0 B")
    before = max(seq for seq, _ in ps.points if seq < first[target])
    early = runner.invoke(cli, ["workload", "check", str(root), promises, "--after", str(before)])
    assert f"{target}:" not in early.output and "promised" in early.output
    (tmp_path / "ops.json").write_text(opgen.dumps([opgen.Op("creat", "foo"), opgen.Op("sync")]))
    script = runner.invoke(cli, ["workload", "repro", str(tmp_path / "ops.json")])
    assert script.exit_code == 0
    assert script.output.rstrip().endswith("op_sync(ROOT)\nprint('durable after sync()', flush=True)")
