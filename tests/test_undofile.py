"""Undo files written back in process: byte for byte what e2undo gives, and nothing written from a
file that cannot be applied whole."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from crashlab import undofile


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture(scope="module")
def rewritten(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(the image as it was, the image after a tool rewrote it keeping an undo file, that file).
    mke2fs over an existing filesystem rewrites its whole metadata: with small groups and no
    flex_bg that is a run of blocks in each of 128 groups, so more keys than one key block holds."""
    d = tmp_path_factory.mktemp("undo")
    tree = d / "tree"
    tree.mkdir()
    for n in range(40):
        (tree / f"f{n}").write_bytes(bytes([n]) * (3000 + 997 * n))
    before, after, undo = d / "before.img", d / "after.img", d / "undo"
    layout = ("-b", "1024", "-g", "256", "-O", "^flex_bg")
    sh("mkfs.ext4", "-q", "-F", *layout, "-d", str(tree), str(before), "32M")
    shutil.copy(before, after)
    sh("mke2fs", "-q", "-F", "-t", "ext4", *layout, "-E", "lazy_itable_init=0", "-z", str(undo),
       str(after), "32M")
    assert after.read_bytes() != before.read_bytes()
    return before, after, undo


def test_it_gives_back_what_e2undo_gives_back(rewritten: tuple[Path, Path, Path], tmp_path: Path) -> None:
    before, after, undo = rewritten
    saved = undofile.read(undo)
    assert len(saved) > 2 * (1024 // 16 - 1)  # more keys than two key blocks hold
    ours, theirs = tmp_path / "ours.img", tmp_path / "theirs.img"
    shutil.copy(after, ours)
    shutil.copy(after, theirs)
    assert undofile.apply(undo, ours) == sum(len(s.data) for s in saved)
    sh("e2undo", str(undo), str(theirs))
    assert ours.read_bytes() == theirs.read_bytes() == before.read_bytes()


def test_a_journal_replay_is_given_back(tmp_path: Path) -> None:
    """The case the engine has: `e2fsck -E journal_only` of a state whose journal needs recovery."""
    from fixture_logs import fixture_recording

    from crashlab import campaign

    cell = campaign.Cell.parse({"fs": "ext4", "cache": "writeback", "barrier": "off", "recorder": "dm"})
    rec = fixture_recording("ext4-dm-barrier-off.log.xz", tmp_path / "r", "")
    replayed = 0
    for sid in campaign.generate_states(cell, rec.out_dir, 8):
        img = tmp_path / "state.img"
        campaign.reproduce(cell, rec.out_dir, sid, keep=img)
        pristine = img.read_bytes()
        undo = tmp_path / "u"
        undo.unlink(missing_ok=True)
        subprocess.run(["e2fsck", "-E", "journal_only", "-y", "-z", str(undo), str(img)], capture_output=True)
        if undo.exists() and img.read_bytes() != pristine:
            replayed += 1
            undofile.apply(undo, img)
            assert img.read_bytes() == pristine, sid
    assert replayed >= 2


@pytest.mark.parametrize("damage", ["unfinished", "truncated", "not-undo", "incompat"])
def test_a_file_that_cannot_be_applied_whole_writes_nothing(rewritten: tuple[Path, Path, Path],
                                                             tmp_path: Path, damage: str) -> None:
    _, after, undo = rewritten
    raw = bytearray(undo.read_bytes())
    if damage == "unfinished":  # what a replay killed before it closed the file leaves
        raw[44:48] = b"\0\0\0\0"
    elif damage == "truncated":
        del raw[len(raw) // 2:]
    elif damage == "not-undo":
        raw[:8] = b"E2UNDO01"
    else:
        raw[52:56] = (1).to_bytes(4, "little")
    bad, img = tmp_path / "bad", tmp_path / "img"
    bad.write_bytes(bytes(raw))
    shutil.copy(after, img)
    with pytest.raises(undofile.UndoError, match=str(bad)):
        undofile.apply(bad, img)
    assert img.read_bytes() == after.read_bytes()


def test_an_extent_past_the_image_writes_nothing(rewritten: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, after, undo = rewritten
    small = tmp_path / "small.img"
    small.write_bytes(after.read_bytes()[: 1 << 20])
    with pytest.raises(undofile.UndoError, match="past"):
        undofile.apply(undo, small)
    assert small.read_bytes() == after.read_bytes()[: 1 << 20]
