"""Op sequences: the durability model's promises, model against the real filesystem, reproducer
scripts, generation and hypothesis shrinking."""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from crashlab import opgen, oracle
from crashlab.opgen import Op
from crashlab.workload import WorkloadContext


def final_promises(ops: list[Op]) -> dict[str, dict]:
    return {p["path"]: p for _, ps in opgen.plan(ops) for p in ps}


def test_op_json_roundtrip_and_names() -> None:
    ops = [Op("write", "A/foo", off=4096, size=512, fill=7), Op("fsync", ""), Op("sync"),
           Op("setxattr", "foo", xattr="user.a", fill=3)]
    assert opgen.loads(opgen.dumps(ops)) == ops
    assert opgen.dumps([Op("sync")]) == '[{"kind": "sync"}]'
    assert [str(op) for op in ops] == ["write('A/foo', 4096, 512, 7)", "fsync('')", "sync()",
                                       "setxattr('foo', 'user.a', 3)"]


def test_validity() -> None:
    ops = [Op("mkdir", "A"), Op("creat", "A/foo"),
           Op("rmdir", "A"),               # not empty
           Op("rename", "A", "A/C"),       # into itself
           Op("link", "A/foo", "A/foo"),   # target exists
           Op("creat", "B/foo"),           # no parent
           Op("write", "A/foo", size=0),   # empty write
           Op("link", "A/foo", "bar"),
           Op("rename", "bar", "A/foo"),   # two names of one inode: rename is a no-op, skip it
           Op("removexattr", "bar", xattr="user.a"),
           Op("unlink", "A/foo"), Op("rmdir", "A")]
    assert opgen.normalize(ops) == [ops[0], ops[1], ops[7], ops[10], ops[11]]


def test_names_need_every_directory_synced() -> None:
    # POSIX-strict: fsync of a new file does not make its name durable; its directory and the
    # directory's own name must be synced too.
    ops = [Op("mkdir", "A"), Op("creat", "A/foo"), Op("write", "A/foo", size=4096, fill=0x41),
           Op("fsync", "A/foo"), Op("fsync", "A"), Op("fsync", "")]
    points = opgen.plan(ops)
    assert [name for name, _ in points] == ["3:fsync('A/foo')", "4:fsync('A')", "5:fsync('')"]
    assert points[0][1] == [] and points[1][1] == []
    # Not torn: the content did not change since the previous point, only the name became durable.
    assert points[2][1] == [oracle.exists("A", "dir"), oracle.file_state("A/foo", b"A" * 4096, {})]


def test_data_without_a_durable_name_and_names_without_durable_data() -> None:
    base = [Op("creat", "foo"), Op("fsync", "")]
    assert final_promises([*base, Op("write", "foo", size=10, fill=1), Op("fsync", "")])["foo"] == \
        {**oracle.exists("foo", "file"), "torn": True}
    fdatasynced = final_promises([*base, Op("setxattr", "foo", xattr="user.a", fill=2),
                                  Op("fdatasync", "foo")])
    assert fdatasynced["foo"] == {**oracle.file_state("foo", b""), "torn": True}  # xattrs not promised


def test_rename_of_a_directory_moves_durable_entries() -> None:
    ops = [Op("mkdir", "A"), Op("creat", "A/foo"), Op("write", "A/foo", size=5, fill=9), Op("sync"),
           Op("rename", "A", "B"), Op("fsync", "")]
    last_name, last = opgen.plan(ops)[-1]
    assert last_name == "5:fsync('')"
    assert last == [oracle.absent("A"), oracle.absent("A/foo"), oracle.exists("B", "dir"),
                    oracle.file_state("B/foo", bytes([9]) * 5, {})]


def test_rename_back_and_forth_is_torn_and_pending_names_are_released() -> None:
    ops = [Op("creat", "foo"), Op("sync"), Op("rename", "foo", "bar"), Op("rename", "bar", "foo"),
           Op("fsync", "")]
    assert final_promises(ops)["foo"] == {**oracle.file_state("foo", b"", {}), "torn": True}
    pending = final_promises([*ops, Op("unlink", "foo")])  # after the last point: ops-end releases it
    assert pending["foo"] == oracle.anything("foo")
    assert opgen.plan([*ops, Op("unlink", "foo")])[-1][0] == "ops-end"


def tree_state(root: Path) -> dict[str, object]:
    """What the oracle can see of a tree, hard links included."""
    out: dict[str, object] = {}
    inodes: dict[int, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        st = p.lstat()
        if p.is_dir():
            out[rel] = "dir"
        else:
            xattrs = {n: os.getxattr(p, n) for n in sorted(os.listxattr(p))}
            out[rel] = (p.read_bytes(), xattrs, inodes.setdefault(st.st_ino, rel))
    return out


SLOW_IO = settings(max_examples=30, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@SLOW_IO
@given(opgen.op_sequences(max_ops=10))
def test_model_matches_the_filesystem_at_every_point(tmp_path_factory: pytest.TempPathFactory,
                                                     ops: list[Op]) -> None:
    """Run on ext4: after every op the tree keeps the promises of the points it lies after, also when
    the following point's marker was not logged; a final sync promises everything, so the model's
    idea of every file must match the filesystem's."""
    tmp = tmp_path_factory.mktemp("ops")
    root = tmp / "root"
    root.mkdir()
    out = io.StringIO()
    ctx = WorkloadContext(root, 0, 1, out)
    snaps: list[tuple[Op, Path, int]] = []

    def snapshot(i: int, op: Op) -> None:
        snaps.append((op, shutil.copytree(root, tmp / f"s{i}", symlinks=True), ctx.points))

    ran = opgen.execute([*ops, Op("sync")], root, ctx, snapshot)
    assert ran == [*ops, Op("sync")]
    ps = oracle.parse_promises(out.getvalue().splitlines())
    assert oracle.check(root, ps) == []
    for op, snap, npoints in snaps:
        assert oracle.check(snap, ps, range(npoints)) == [], op
        if op.kind in opgen.DURABILITY:
            assert oracle.check(snap, ps, range(npoints - 1)) == [], op
    final = {p["path"]: p for p in ps.promises}
    for rel, state in tree_state(root).items():
        assert final[rel]["kind"] == ("exists" if state == "dir" else "file"), rel
    shutil.rmtree(tmp)


def test_reproducer_script_makes_the_same_tree(tmp_path: Path) -> None:
    ops = opgen.random_ops(random.Random(11), 30)
    assert {op.kind for op in ops} >= {"creat", "write", "rename", "link", "fsync"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    opgen.execute(ops, tmp_path / "a", opgen.Plan())
    script = tmp_path / "repro.py"
    script.write_text(opgen.render_script([Op("rmdir", "nope"), *ops]))  # invalid ops are left out
    run = subprocess.run([sys.executable, "-I", str(script), str(tmp_path / "b")],
                         capture_output=True, text=True, check=True)
    assert tree_state(tmp_path / "a") == tree_state(tmp_path / "b")
    assert run.stdout.splitlines() == [f"durable after {op}" for op in ops if op.kind in opgen.DURABILITY]
    assert "import crashlab" not in script.read_text()


def test_random_ops_deterministic_valid_bounded() -> None:
    a = opgen.random_ops(random.Random(5), 200, max_points=10)
    assert a == opgen.random_ops(random.Random(5), 200, max_points=10)
    assert a != opgen.random_ops(random.Random(6), 200, max_points=10)
    assert opgen.normalize(a) == a
    assert len(a) >= 200
    assert sum(op.kind in opgen.DURABILITY for op in a) == 10


def durable_4k_file(ops: list[Op]) -> bool:
    """A pure stand-in for "this sequence still corrupts": some point promises a file of 4 KiB."""
    return any(p["kind"] == "file" and p["size"] >= 4096 for _, ps in opgen.plan(ops) for p in ps)


def test_find_failing_shrinks_to_a_minimal_sequence() -> None:
    # The pure predicate is cheap: a generous budget keeps the search from depending on luck. One
    # full CI run on a loaded machine still saw seed 1 come back empty (it passes alone): up to three
    # searches, each asserted on in full below once one finds a sequence.
    found = None
    for seed in (1, 2, 3):
        if (found := opgen.find_failing(durable_4k_file, max_ops=8, max_examples=3000, seed=seed)):
            break
    assert found is not None
    assert durable_4k_file(found)
    for i in range(len(found)):  # 1-minimal: every op is needed
        assert not durable_4k_file(found[:i] + found[i + 1:]), found
    # creat, something that makes 4 KiB (write, truncate or falloc), a point that makes it durable
    assert len(found) == 3 and found[0].kind == "creat" and found[2].kind in opgen.DURABILITY, found
    assert f"op_creat(ROOT, {found[0].path!r})" in opgen.render_script(found)


def test_find_failing_gives_up() -> None:
    assert opgen.find_failing(lambda ops: False, max_examples=20) is None
