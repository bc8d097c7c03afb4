"""Crash-state generation, ids and materialisation: generated logs (hypothesis), a log recorded by
QEMU's blklogwrites in the test, and the shared real-kernel fixtures."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from test_model import (
    DATA_SECTORS,
    FIXTURES,
    RECORDER_MODES,
    SS,
    TAIL_SLOTS,
    baseline_at,
    covers,
    gen_log,
    reference_image,
    steps,
    write_log,
    writer_of,
)

from crashlab import crashstates as cs
from crashlab import logformat, model
from crashlab.cachemodes import CACHE_MODES
from crashlab.cli import cli
from crashlab.logformat import FUA, LogReader

DEV = (DATA_SECTORS + TAIL_SLOTS) * SS  # the generated logs' device size


def build_all(r: LogReader, m: model.LogModel, states: list[cs.CrashState], digest: str,
              tmp: Path, checkout: bool = False) -> list[bytes]:
    out = []
    with cs.Materializer(r, m, digest, workdir=str(tmp), size=DEV) as mat:
        for k, s in enumerate(states):
            if checkout:
                with mat.checkout(s) as p:
                    out.append(p.read_bytes())
            else:
                mat.build(s, tmp / f"{k}.img")
                out.append((tmp / f"{k}.img").read_bytes())
    return out


def data_extents(path: Path) -> list[tuple[int, int]]:
    out, pos = [], 0
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        while pos < size:
            try:
                a = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(f.fileno(), a, os.SEEK_HOLE)
            out.append((a, pos))
    return out


def expected(r: LogReader, m: model.LogModel, res: cs.Resolved, size: int) -> bytearray:
    applied: dict[int, int | None] = dict.fromkeys(m.durable(res.cp))
    applied.update({i: res.tears.get(i) for i in res.chosen})
    return reference_image(r, m, applied, size)


@given(steps, st.sampled_from(RECORDER_MODES), st.sampled_from(["inf", 0.5, 3]),
       st.none() | st.sampled_from([512, 4096]), st.none() | baseline_at, st.integers(0, 2**32))
def test_states_hold_durable_writes_only_log_writes_in_log_order(
        tmp_path_factory: pytest.TempPathFactory, plan: list[tuple], rm: tuple[str, str],
        window: str | float, torn: int | None, base: float | None, seed: int) -> None:
    tmp = tmp_path_factory.mktemp("st")
    with gen_log(plan, base) as r:
        entries = r.index()
        m = model.LogModel(entries, model.config(*rm, window=window, torn=torn))
        digest = cs.log_digest(r)
        camp = cs.generate(m, digest, 6, seed)
        # Each random state with its all/nothing siblings: runs of states on one base, so a
        # checkout's undo journal must restore what the next state builds on.
        states = sorted({cs.CrashState(s.digest, s.cfg, s.end, sel) for s in camp.states
                         for sel in (s.sel, "a", "n")} | set(camp.states),
                        key=lambda s: (m.crash(s.end).stable, s.end, s.sel))
        size = DEV
        built = build_all(r, m, states, digest, tmp)
        assert build_all(r, m, states, digest, tmp, checkout=True) == built
        for st_, img in zip(states, built, strict=True):
            res = cs.resolve(m, st_)
            durable = m.durable(res.cp)
            applied = set(durable) | set(res.chosen)
            # The exact image: the applied ops, in log order, on zeroes.
            assert img == expected(r, m, res, size)
            for s in range(DATA_SECTORS):
                w = writer_of(img, s)
                if w is not None:  # only writes from the log, before the crash, where they wrote
                    assert w < st_.end and entries[w].is_write and covers(entries[w], s)
                    assert w in applied
                # A durable op is never lost: what is there now came from it or a later applied op.
                last_durable = max((i for i in durable if covers(entries[i], s)), default=None)
                if last_durable is not None:
                    if w is None:
                        later = [i for i in applied if i >= last_durable and covers(entries[i], s)]
                        assert any(entries[i].is_discard for i in later)
                    else:
                        assert w >= last_durable
            # Markers are never replayed: the marker tail stays zero.
            assert not any(img[DATA_SECTORS * SS:])


@given(steps, st.sampled_from(RECORDER_MODES), st.integers(0, 2**32),
       st.sampled_from(cs.STRATEGIES), st.none() | baseline_at)
def test_same_seed_same_ids_and_ids_round_trip(plan: list[tuple], rm: tuple[str, str], seed: int,
                                               strategy: str, base: float | None) -> None:
    with gen_log(plan, base) as r:
        cfg = model.config(*rm, torn=4096, baseline=None if base is None else model.DEFAULT_BASELINE)
        m = model.LogModel(r.index(), cfg)
        d = cs.log_digest(r)
        a = cs.generate(m, d, 8, seed, strategy)
        b = cs.generate(model.LogModel(r.index(), cfg), d, 8, seed, strategy)
        assert [s.id for s in a.states] == [s.id for s in b.states]
        assert len({s.id for s in a.states}) == len(a.states) <= 8
        for s in a.states:
            assert cs.parse_id(s.id) == s


@given(steps, st.sampled_from(["writethrough", "directsync"]), st.integers(0, 2**32))
def test_dm_writethrough_states_are_exact_prefixes(tmp_path_factory: pytest.TempPathFactory,
                                                   plan: list[tuple], mode: str, seed: int) -> None:
    tmp = tmp_path_factory.mktemp("wt")
    with gen_log(plan, 0.2) as r:
        m = model.LogModel(r.index(), model.config("dm", mode))
        d = cs.log_digest(r)
        camp = cs.generate(m, d, 5, seed)
        for s, img in zip(camp.states, build_all(r, m, camp.states, d, tmp), strict=True):
            ref = tmp / "ref.img"
            ref.unlink(missing_ok=True)
            logformat.replay(r, ref, stop=s.end)
            with ref.open("r+b") as f:
                f.truncate(DEV)
            assert img == ref.read_bytes()


@given(steps, st.integers(0, 2**32))
def test_torn_writes_change_only_whole_units_of_one_write(plan: list[tuple], seed: int) -> None:
    plan = [*plan, ("w", 0, 16, 0), ("w", 3, 13, 0)]  # always something multi-unit and unaligned
    with gen_log(plan) as r:
        m = model.LogModel(r.index(), model.config("qemu", "unsafe", window="inf", torn=4096,
                                                   baseline=None))
        size = DEV
        d = cs.log_digest(r)
        for s in cs.generate(m, d, 10, seed).states:
            res = cs.resolve(m, s)
            img = expected(r, m, res, size)
            for i, mask in res.tears.items():
                assert i in res.chosen and 0 < mask < (1 << len(m.units(i))) - 1
                whole = expected(r, m, cs.Resolved(res.cp, res.chosen, {**res.tears, i: None}), size)
                gone = expected(r, m, cs.Resolved(res.cp, tuple(c for c in res.chosen if c != i),
                                                  {k: v for k, v in res.tears.items() if k != i}), size)
                units = m.units(i)
                for off, length in units:
                    assert off % 4096 == 0 or off == r.index()[i].offset
                    piece = slice(off, off + length)
                    assert img[piece] in (whole[piece], gone[piece])
                e = r.index()[i]
                outside = [(0, e.offset), (e.offset + e.length, size)]
                assert all(img[a:b] == whole[a:b] == gone[a:b] for a, b in outside)


@given(steps)
def test_dedupe_key_is_sound(plan: list[tuple]) -> None:
    # States with equal keys build equal images (the key may miss coincidences, never invent them).
    with gen_log(plan, 0.3) as r:
        m = model.LogModel(r.index(), model.config("dm", "unsafe", window="inf", torn=4096))
        seen: dict[tuple[object, ...], bytearray] = {}
        for end in range(m.lo, m.n + 1):
            cp = m.crash(end)
            vol = cp.volatile[-5:]  # the last few, where overwrites of the same range meet
            for k in range(len(vol) + 1):
                for sub in itertools.combinations(vol, k):
                    multi = [i for i in sub if len(m.units(i)) > 1]
                    for tears in ({}, {i: 1 for i in multi[-1:]}, {i: 2 for i in multi[:1]}):
                        res = cs.Resolved(cp, sub, tears)
                        img = expected(r, m, res, DEV)
                        assert seen.setdefault(cs.image_key(m, res), img) == img


def test_exhaustive_enumerates_every_subset_of_small_epochs(tmp_path: Path) -> None:
    plan = [("w", 0, 2, 0), ("f", 0), ("w", 0, 1, 0), ("w", 4, 1, 0), ("w", 8, 4, 0), ("f", 0),
            ("w", 1, 1, 0), ("w", 2, 2, 0)]
    with gen_log(plan) as r:
        m = model.LogModel(r.index(), model.config("dm", "writeback", window="inf", baseline=None))
        d = cs.log_digest(r)
        camp = cs.generate(m, d, 1000, 7, "exhaustive")
        got = {bytes(i) for i in build_all(r, m, camp.states, d, tmp_path)}
        size = DEV
        want = set()
        for end in range(m.n + 1):
            cp = m.crash(end)
            for k in range(len(cp.volatile) + 1):
                for sub in itertools.combinations(cp.volatile, k):
                    want.add(bytes(expected(r, m, cs.Resolved(cp, sub), size)))
        assert got == want
        assert len(camp.states) == len(got)  # no duplicate images among those the key can tell apart
        small = cs.generate(m, d, 1000, 7, "exhaustive", max_volatile=1)
        assert small.skipped_epochs >= 1 and len(small.states) < len(camp.states)


def test_ids_refuse_the_wrong_log_and_bad_text(tmp_path: Path) -> None:
    with gen_log([("w", 0, 1, 0), ("f", 0), ("w", 1, 1, 0)]) as r:
        m = model.LogModel(r.index(), model.config("qemu", "none", baseline=None))
        d = cs.log_digest(r)
        s = cs.generate(m, d, 1, 0).states[0]
        assert s.id.startswith(d[:10] + "-qemu-none-w1-b-e")
        other = cs.CrashState("f" * 10, m.cfg, s.end, s.sel)
        with cs.Materializer(r, m, d, workdir=str(tmp_path)) as mat, \
                pytest.raises(cs.CrashStateError, match="is from log ffffffffff, not this log"):
            mat.build(other, tmp_path / "x.img")
        with pytest.raises(cs.CrashStateError, match="outside the crash window"):
            cs.resolve(m, cs.CrashState(d[:10], m.cfg, m.n + 1, "a"))
        with pytest.raises(cs.CrashStateError, match="selects op"):
            cs.resolve(m, cs.CrashState(d[:10], m.cfg, m.n, "xff"))
    for bad, why in [("nonsense", "expected DIGEST"), ("0123456789-qemu-fast-w1-e3-a", "unknown cache mode"),
                     ("0123456789-kvm-none-w1-e3-a", "unknown recorder"),
                     ("0123456789-qemu-none-w1-e3-q", "expected DIGEST"),
                     ("0123456789-qemu-none-wsoon-e3-a", "volatility window")]:
        with pytest.raises(cs.CrashStateError, match=why):
            cs.parse_id(bad)
    s = cs.CrashState("0123456789", model.config("dm", "unsafe", "inf", "my.odd-mark", 512), 12, "r00ff")
    assert cs.parse_id(s.id) == s and "-" not in s.id.split("-b")[1].split("-")[0]


def test_materializer_going_back_rebuilds_the_same_bytes(tmp_path: Path) -> None:
    plan = [("w", k % 50, 1 + k % 5, 0) if k % 4 else ("f", 0) for k in range(60)]
    with gen_log(plan) as r:
        m = model.LogModel(r.index(), model.config("qemu", "writeback", window="inf", baseline=None))
        d = cs.log_digest(r)
        states = cs.generate(m, d, 12, 3).states
        forward = build_all(r, m, states, d, tmp_path)
        with cs.Materializer(r, m, d, workdir=str(tmp_path), size=DEV) as mat:
            backward = []
            for s in reversed(states):
                with mat.checkout(s) as p:
                    backward.append(p.read_bytes())
            assert mat.rebuilds > 0
        assert backward[::-1] == forward


# --- a real QEMU blklogwrites log, recorded here --------------------------------------------------

def record_qemu(tmp: Path, cache: str) -> Path:
    data, log = tmp / f"{cache}.img", tmp / f"{cache}.log"
    with data.open("wb") as f:
        f.truncate(1 << 20)
    log.write_bytes(b"")  # blklogwrites appends to an existing log: always start fresh
    opts = (f"driver=blklogwrites,file.driver=file,file.filename={data},log.driver=file,"
            f"log.filename={log},log-sector-size=512")
    cmds = ["write -P 0x11 0 64k", "flush", "write -P 0x22 64k 64k", "write -P 0x33 0 4k",
            "write -P 0x44 128k 8k"]
    subprocess.run(["qemu-io", "-t", cache, "--image-opts", opts, *itertools.chain.from_iterable(
        ("-c", c) for c in cmds)], check=True, capture_output=True, timeout=60)
    return log


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io (qemu-utils)")
def test_qemu_blklogwrites_log_states_differ_per_cache_mode(tmp_path: Path) -> None:
    images: dict[str, set[bytes]] = {}
    kept_first: dict[str, bool] = {}
    for cache in ("writeback", "writethrough", "unsafe"):
        log = record_qemu(tmp_path, cache)
        with logformat.open_log(log) as r:
            m = model.LogModel(r.index(), model.config("qemu", cache, baseline=None))
            d = cs.log_digest(r)
            camp = cs.generate(m, d, 500, 1, "exhaustive")
            built = build_all(r, m, camp.states, d, tmp_path)
            images[cache] = set(built)
            # Crash just before the last entry (QEMU's flush at close, where there is one): every
            # subset of what is volatile there. Is the flushed 0x11 write certain to be there?
            end = m.n - 1
            late = [cs.CrashState(d[:10], m.cfg, end, f"x{bits:x}")
                    for bits in range(1 << len(m.crash(end).volatile))]
            kept_first[cache] = all(img[4096:65536] == b"\x11" * 61440
                                    for img in build_all(r, m, late, d, tmp_path))
    assert kept_first == {"writeback": True, "writethrough": True, "unsafe": False}
    assert len({frozenset(v) for v in images.values()}) == 3, {k: len(v) for k, v in images.items()}
    # unsafe keeps nothing for sure: the first write's absence is a state; flushing modes never lose it
    # once the flush is logged, so unsafe has strictly more distinct images.
    assert len(images["unsafe"]) > len(images["writeback"])


# --- real kernel fixtures -------------------------------------------------------------------------

def test_fixture_barrier_on_writeback_states_keep_all_writes_before_the_last_flush() -> None:
    with logformat.open_log(FIXTURES / "ext4-dm-barrier-on.log.xz") as r, \
            tempfile.TemporaryDirectory(dir=cs.default_workdir()) as tmp:
        entries = r.index()
        m = model.LogModel(entries, model.config("dm", "writeback", window="inf", baseline="mount"))
        d = cs.log_digest(r)
        camp = cs.generate(m, d, 6, 5)
        assert sum(len(m.crash(s.end).volatile) > 0 for s in camp.states) >= 3
        ref, at = Path(tmp) / "ref.img", 0
        with cs.Materializer(r, m, d, workdir=tmp) as mat:
            for s in camp.states:
                res = mat.resolve(s)
                last_flush = max(e.index for e in entries[:s.end] if e.is_flush)
                assert res.cp.flush == last_flush
                if last_flush < at:
                    ref.unlink()
                    at = 0
                logformat.replay(r, ref, stop=last_flush, start=at)  # the independent flushed prefix
                at = last_flush
                touched = sorted((e.offset, e.offset + e.length) for e in entries[last_flush:s.end]
                                 if e.is_write or e.is_discard)
                with mat.checkout(s) as p:
                    # Untouched since the last flush, where either file has data (holes in both are
                    # equal zeroes): must equal the flushed prefix.
                    gaps, pos = [], 0
                    for a, b in [*touched, (mat.size, mat.size)]:
                        if a > pos:
                            gaps.append((pos, a))
                        pos = max(pos, b)
                    data = data_extents(p) + data_extents(ref)
                    with p.open("rb") as f, ref.open("rb") as g:
                        for ga, gb in gaps:
                            for da, db in data:
                                a, b = max(ga, da), min(gb, db)
                                if a < b:
                                    assert os.pread(f.fileno(), b - a, a) == \
                                        os.pread(g.fileno(), b - a, a).ljust(b - a, b"\0")


@pytest.mark.parametrize(("name", "sha"), [
    ("ext4-dm-barrier-off", "c56b38d88a02c2681dfb99168fdf0f7988f92804deb8a554775741c90d0f0901"),
    ("ext4-qemu-noflush", "12e2d941070a60fb0980f6fc2c0d043b670d6d2942964b946ead9d9189ef2815"),
])
def test_fixture_full_prefix_state_is_the_recorded_disk(name: str, sha: str, tmp_path: Path) -> None:
    log = FIXTURES / f"{name}.log.xz"
    with logformat.open_log(log) as r:
        m = model.LogModel(r.index(), model.config("qemu", "unsafe", baseline=None))
        state = cs.CrashState(cs.log_digest(r)[:10], m.cfg, m.n, "a")
    cs.build_one(log, state.id, tmp_path / "a.img")
    h = hashlib.sha256()
    with (tmp_path / "a.img").open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    assert h.hexdigest() == sha


def test_cli_generate_then_build_twice_gives_identical_bytes(tmp_path: Path) -> None:
    log = str(FIXTURES / "ext4-qemu-noflush.log.xz")
    run = CliRunner().invoke
    res = run(cli, ["crash", "generate", log, "--cache", "unsafe", "--recorder", "qemu", "--count", "3",
                    "--seed", "9", "--baseline", "none", "--torn", "4096", "--window", "inf"])
    assert res.exit_code == 0, res.output
    ids = [line for line in res.stdout.splitlines() if not line.startswith("#")]
    assert len(ids) == 3 and all("-qemu-unsafe-winf-b-t4096-e" in i for i in ids)
    assert "duplicates_dropped" in res.stderr
    again = run(cli, ["crash", "generate", log, "--cache", "unsafe", "--recorder", "qemu", "--count", "3",
                      "--seed", "9", "--baseline", "none", "--torn", "4096", "--window", "inf"])
    assert again.stdout == res.stdout
    for name in ("a.img", "b.img"):
        out = run(cli, ["crash", "build", log, ids[0], str(tmp_path / name)])
        assert out.exit_code == 0, out.output
    assert (tmp_path / "a.img").read_bytes() == (tmp_path / "b.img").read_bytes()
    wrong = run(cli, ["crash", "build", str(FIXTURES / "ext4-dm-barrier-on.log.xz"), ids[0],
                      str(tmp_path / "c.img")])
    assert wrong.exit_code == 2 and "not this log" in wrong.output
    (tmp_path / "junk").write_bytes(b"not a log" * 100)
    bad = run(cli, ["crash", "generate", str(tmp_path / "junk"), "--cache", "none", "--recorder", "dm"])
    assert bad.exit_code == 2 and "not a dm-log-writes log" in bad.output
    mode = run(cli, ["crash", "generate", log, "--cache", "fast", "--recorder", "dm"])
    assert mode.exit_code == 2 and "valid modes: writeback, none" in mode.output


# --- torn writes never tear inside the log's own sector -------------------------------------------

BLOCKS = 16  # logical blocks on the device of a `sized_log`

_sized_step = st.one_of(
    st.tuples(st.just("w"), st.integers(0, BLOCKS - 1), st.integers(1, 8), st.sampled_from([0, 0, FUA])),
    st.tuples(st.just("f")),
)


def block_of(index: int, block: int, ss: int) -> bytes:
    """Entry `index`'s data for logical block `block`: unlike every other write's, in every byte
    range, so a block mixing two writes (or a write and the old contents) cannot pass as one."""
    return struct.pack("<II", index + 1, block).ljust(ss, bytes([index % 251 + 1]))


def write_sized_log(path: Path, ss: int, plan: list[tuple]) -> None:
    with logformat.LogWriter(path, ss) as w:
        for step in plan:
            if step[0] == "w":
                _, block, nr, flags = step
                nr = min(nr, BLOCKS - block)
                index = w.nr_entries
                w.write(block, b"".join(block_of(index, block + k, ss) for k in range(nr)), flags)
            else:
                w.flush()


@given(st.sampled_from(logformat.SECTOR_SIZES), st.sampled_from(model.TORN_UNITS),
       st.lists(_sized_step, min_size=1, max_size=30), st.integers(0, 2**32))
def test_no_state_tears_inside_one_logical_block(tmp_path_factory: pytest.TempPathFactory, ss: int,
                                                 torn: int, plan: list[tuple], seed: int) -> None:
    tmp = tmp_path_factory.mktemp("ss")
    plan = [*plan, ("w", 0, 8, 0), ("w", 3, 5, 0)]  # always something multi-block to tear
    log = tmp / "sized.log"
    write_sized_log(log, ss, plan)
    cfg = model.config("qemu", "unsafe", window="inf", baseline=None, torn=torn)
    with logformat.open_log(log) as r:
        if torn < ss:  # a unit the log cannot have: refused, for generating and for rebuilding by id
            with pytest.raises(model.ModelError, match="cannot tear inside its own logical block"):
                model.LogModel(r.index(), cfg)
            forged = cs.CrashState(cs.log_digest(r)[:cs.DIGEST_CHARS], cfg, r.index()[-1].index + 1, "a")
            with pytest.raises(cs.CrashStateError, match="cannot tear"):
                cs.build_one(log, forged.id, tmp / "forged.img")
            return
        m = model.LogModel(r.index(), cfg)
        d = cs.log_digest(r)
        states = cs.generate(m, d, 20, seed).states
        with cs.Materializer(r, m, d, workdir=str(tmp), size=BLOCKS * ss) as mat:
            for s in states:
                with mat.checkout(s) as p:
                    img = p.read_bytes()
                for b in range(BLOCKS):
                    legal = {bytes(ss)} | {block_of(e.index, b, ss) for e in r.index()[:s.end]
                                           if e.is_write and e.sector <= b < e.sector + e.nr_sectors}
                    assert img[b * ss:(b + 1) * ss] in legal, (s.id, b)


# --- a qemu log is read under the mode it was recorded in, unless a counterfactual is asked for ----

def ids_of(output: str) -> list[str]:
    return [line for line in output.splitlines() if line and not line.startswith("#")]


@given(steps, st.sampled_from(list(CACHE_MODES)), st.sampled_from(list(CACHE_MODES)),
       st.sampled_from(["inf", "3"]), st.integers(0, 2**32))
def test_a_contradicting_mode_is_refused_and_the_counterfactual_is_todays_states(
        tmp_path_factory: pytest.TempPathFactory, plan: list[tuple], recorded: str, asked: str, window: str,
        seed: int) -> None:
    rec = tmp_path_factory.mktemp("rec")
    write_log(rec / "write.log", plan, None)
    (rec / "run.json").write_text(json.dumps({"config": {"recorder": "qemu", "cache": recorded}}))
    run = CliRunner().invoke
    common = ["--window", window, "--baseline", "none", "--count", "8", "--seed", str(seed)]
    named = run(cli, ["crash", "generate", str(rec / "write.log"), "--cache", asked, "--recorder", "qemu",
                      *common])
    what_if = run(cli, ["crash", "generate", str(rec / "write.log"), "--what-if-cache", asked, *common])
    assert what_if.exit_code == 0, what_if.output
    # Today's states: the model read with the asked mode, straight from the library.
    with logformat.open_log(rec / "write.log") as r:
        m = model.LogModel(r.index(), model.config("qemu", asked, window, None))
        today = [s.id for s in cs.generate(m, cs.log_digest(r), 8, seed).states]
    assert ids_of(what_if.stdout) == today
    if asked == recorded:
        assert named.exit_code == 0 and ids_of(named.stdout) == today
        assert "reading: as recorded (run.json): recorder qemu" in what_if.stderr
    else:
        assert named.exit_code == 2 and named.stdout == ""
        assert f"recorded under cache {recorded}" in named.output
        assert f"--what-if-cache {asked}" in named.output
        assert f"reading: counterfactual: cache {asked} on a qemu log recorded under cache {recorded}" \
            in what_if.stderr
    if today:
        built = run(cli, ["crash", "build", str(rec / "write.log"), today[0], str(rec / "s.img")])
        assert built.exit_code == 0, built.output
        assert ("counterfactual" in built.stdout) == (asked != recorded)


def test_fixture_recorded_writeback_is_not_read_as_unsafe_unless_asked(tmp_path: Path) -> None:
    # The case: ext4-qemu-writecache-on, recorded under writeback, FLUSH at entry 22 after
    # the ext4 superblock write at 21 (sector 2). As recorded, no state after 22 can lose it.
    shutil.copy(FIXTURES / "ext4-qemu-writecache-on.log.xz", tmp_path)
    log = str(tmp_path / "ext4-qemu-writecache-on.log.xz")
    (tmp_path / "run.json").write_text(json.dumps({"config": {"recorder": "qemu", "cache": "writeback"}}))
    run = CliRunner().invoke
    common = ["--window", "inf", "--count", "40", "--seed", "3"]
    refused = run(cli, ["crash", "generate", log, "--cache", "unsafe", "--recorder", "qemu", *common])
    assert refused.exit_code == 2 and "contradicts" in refused.output
    as_recorded = run(cli, ["crash", "generate", log, *common])
    what_if = run(cli, ["crash", "generate", log, "--what-if-cache", "unsafe", *common])
    assert as_recorded.exit_code == what_if.exit_code == 0
    with logformat.open_log(log) as r:
        assert r.index()[21].offset == 1024 and r.index()[22].is_flush
        lost_superblock = {}
        for out in (as_recorded, what_if):
            states = [cs.parse_id(i) for i in ids_of(out.stdout)]
            m = model.LogModel(r.index(), states[0].cfg)
            lost = 0
            for s in states:
                res = cs.resolve(m, s)
                lost += s.end > 22 and 21 not in {*m.durable(res.cp), *res.chosen}
            lost_superblock[states[0].cfg.cache.name] = lost
    assert lost_superblock["writeback"] == 0 and lost_superblock["unsafe"] > 0


def test_zeroes_the_log_writes_become_holes_in_the_base_and_read_back_as_zeroes(tmp_path: Path) -> None:
    # mkfs.xfs zeroes its whole log: a base that stored those zeroes made every state's copy read
    # and write them. Each state still reads exactly as the ops the model applied.
    mib = 1 << 20
    log = tmp_path / "zeroes.log"
    with logformat.LogWriter(log, 512) as w:
        w.write(0, b"\xaa" * (3 * mib))
        w.flush()
        w.write(0, bytes(3 * mib - 4096) + b"\xbb" * 4096)  # zeroes, then a non-zero tail
        w.flush()
        w.write(mib // 512, b"\xcc" * 8192)
        w.flush()
        w.write(2 * mib // 512, b"\xdd" * 512)
    size = 4 * mib
    with logformat.open_log(log) as r:
        m = model.LogModel(r.index(), model.config("dm", "none", window="inf", baseline=None))
        d = cs.log_digest(r)
        states = cs.generate(m, d, 30, 1, strategy="exhaustive").states
        assert max(m.crash(s.end).stable for s in states) >= 4  # the base took the zeroes
        with cs.Materializer(r, m, d, workdir=str(tmp_path), size=size) as mat:
            for k, s in enumerate(states):
                res = mat.build(s, tmp_path / f"{k}.img")
                assert (tmp_path / f"{k}.img").read_bytes() == expected(r, m, res, size), s.id
                if res.cp.stable >= 4:
                    # Of the 3 MiB written twice, only the MiB that holds the non-zero tail is
                    # stored (a MiB is the stretch tested), and the small writes' blocks.
                    assert mat.copy_bytes() <= mib + (64 << 10), (s.id, mat.copy_bytes())
