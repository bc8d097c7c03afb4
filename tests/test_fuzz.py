"""Fuzzing the log reader and the crash-state builder: whatever the bytes, only `InputError` (the
project's own base of LogFormatError, CrashStateError and ImageError) may escape.

Inputs are real logs from tests/data/logs/ (their first entries) and small generated ones, then
mutated: flipped bytes, cut lengths, header fields set to huge sectors, counts and bad flags, stale or
broken superblocks, junk appended, and `.xz` streams flipped or cut. The default run takes >= 10^4
cases; `-m slow` runs >= 10^5.
"""

from __future__ import annotations

import lzma
import struct
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crashlab import crashstates, logformat, markers, model
from crashlab.logformat import InputError, LogWriter, open_log

FIXTURES = Path(__file__).parent / "data" / "logs"
PREFIX_BYTES = 48 << 10  # enough for a few dozen entries of each real log
SS = 512
ENTRY = struct.Struct("<QQQQ")
HUGE_WRITE = ENTRY.pack(0, 1 << 40, 0, 0).ljust(SS, b"\0")  # a header whose data no file holds

# Values that have broken readers: zero, one, powers of two at the edges of 32/55/63/64 bits.
EDGES = [0, 1, 2, 7, 8, 0x10, 0x1F, 0x20, 0xFF, 511, 512, 4096, 1 << 31, 1 << 32, (1 << 32) - 1,
         1 << 53, 1 << 54, 1 << 55, (1 << 63) // SS, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
u64 = st.sampled_from(EDGES) | st.integers(0, (1 << 64) - 1)


@cache
def real_prefixes() -> list[bytes]:
    """The first entries of every real log: decompressed once per session, not per case."""
    out = []
    for path in sorted(FIXTURES.glob("*.log.xz")):
        with lzma.open(path) as f:
            out.append(f.read(PREFIX_BYTES))
    return out


def synthetic(ops: list[tuple[str, int, int]], ss: int, blank: bool) -> bytes:
    with tempfile.NamedTemporaryFile() as tmp:
        with LogWriter(tmp.name, ss) as w:
            for kind, a, b in ops:
                if kind == "write":
                    w.write(a, bytes([b]) * ss * (1 + b % 3), (0, logformat.FUA, logformat.METADATA)[b % 3])
                elif kind == "discard":
                    w.discard(a, b)
                elif kind == "flush":
                    w.flush()
                elif kind == "mark":
                    w.mark(markers.WORKLOAD_START if b % 2 else f"m{a}")
                else:
                    name = (markers.TICK, markers.WORKLOAD_START, "fsync-1")[b % 3]
                    w.write(64 + a % 8, markers.encode(markers.Marker(a, a * 50_000_000, name), ss))
            w.close(blank_superblock=blank)
        return Path(tmp.name).read_bytes()


synthetic_logs = st.builds(
    synthetic,
    st.lists(st.tuples(st.sampled_from(["write", "discard", "flush", "mark", "marker"]),
                       st.integers(0, 63), st.integers(0, 255)), max_size=24),
    st.sampled_from([512, 4096]), st.booleans())
base_logs = st.integers(0, 7).map(lambda k: real_prefixes()[k]) | synthetic_logs


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(base_logs))
    for _ in range(draw(st.integers(0, 4))):
        what = draw(st.sampled_from(["flip", "field", "super", "cut", "append"]))
        if what == "flip" and raw:
            raw[draw(st.integers(0, len(raw) - 1))] ^= draw(st.integers(1, 255))
        elif what == "field" and len(raw) > 2 * SS:
            # A header field of some entry-aligned sector: most real entries start on one.
            at = draw(st.integers(1, len(raw) // SS - 1)) * SS + 8 * draw(st.integers(0, 3))
            raw[at:at + 8] = draw(u64).to_bytes(8, "little")
        elif what == "super" and len(raw) >= 28:
            at = draw(st.sampled_from([0, 8, 16]))
            raw[at:at + 8] = draw(u64).to_bytes(8, "little")
            if draw(st.booleans()):
                size = draw(st.sampled_from([0, 1, 511, 512, 1024, 4096, 8192, 1 << 31]))
                raw[24:28] = size.to_bytes(4, "little")
        elif what == "cut":
            del raw[draw(st.integers(0, len(raw))):]
        elif what == "append":
            raw += draw(st.sampled_from([bytes(SS), b"\xff" * SS, HUGE_WRITE]))
    return bytes(raw)


@st.composite
def log_file(draw: st.DrawFn) -> tuple[bytes, bool]:
    """(file bytes, is .xz)."""
    raw = draw(mutated())
    if not draw(st.booleans()):
        return raw, False
    packed = bytearray(lzma.compress(raw, preset=0))
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(packed)))
        if draw(st.booleans()):
            packed[min(cut, len(packed) - 1)] ^= draw(st.integers(1, 255))
        else:
            del packed[cut:]
    return bytes(packed), True


configs = st.builds(model.config, st.sampled_from(model.RECORDERS),
                    st.sampled_from(["writeback", "none", "writethrough", "directsync", "unsafe"]),
                    st.sampled_from([None, "inf", "0", "0.1"]),
                    st.sampled_from([None, markers.WORKLOAD_START]), st.sampled_from([None, 512, 4096]))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def exercise(work: Path, content: bytes, xz: bool, sector_size: int | None, cfg: model.Config,
             strategy: str, seed: int) -> None:
    """Read, model, generate, build and replay as `crashlab crash generate --out` and `crashlab log
    replay` do; an InputError anywhere is the right answer to bad bytes, anything else a bug."""
    log = work / ("fuzz.log.xz" if xz else "fuzz.log")
    log.write_bytes(content)
    try:
        with open_log(log, sector_size) as reader:
            entries = reader.index()
            reader.summary()
            for e in entries:
                e.describe()
                bytes(reader.data(e)[-1:])
            digest = crashstates.log_digest(reader)
            m = model.LogModel(entries, cfg)
            camp = crashstates.generate(m, digest, 3, seed, strategy)
            with crashstates.Materializer(reader, m, digest, workdir=str(work)) as mat:
                for state in camp.states[:2]:
                    mat.build(state, work / "state.img")
                    assert crashstates.parse_id(state.id) == state
            logformat.replay(reader, work / "replay.img", len(entries) // 2)
    except InputError:
        pass
    finally:
        for name in ("state.img", "replay.img"):
            (work / name).unlink(missing_ok=True)


def fuzz(examples: int) -> Callable[..., None]:
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(f=log_file(), sector_size=st.sampled_from([None, None, None, 512, 4096]), cfg=configs,
           strategy=st.sampled_from(crashstates.STRATEGIES), seed=st.integers(0, 2**32))
    def test(work: Path, f: tuple[bytes, bool], sector_size: int | None, cfg: model.Config,
             strategy: str, seed: int) -> None:
        exercise(work, f[0], f[1], sector_size, cfg, strategy, seed)
    return test


test_reader_and_builder_raise_only_input_errors = fuzz(10_000)
test_reader_and_builder_raise_only_input_errors_long = pytest.mark.slow(fuzz(100_000))


def read_as(path: Path, sector_size: int | None) -> object:
    """All a reader tells about a log, with the file's own name taken out of messages."""
    try:
        with open_log(path, sector_size) as r:
            s = r.summary().as_dict()
            del s["log_bytes"]  # an .xz is inflated only as far as its entries reach
            entries = [(e.index, e.sector, e.nr_sectors, e.flags, e.mark, e.marker, bytes(r.data(e)))
                       for e in r.index()]
            return s, entries, crashstates.log_digest(r)
    except logformat.LogFormatError as e:
        return type(e), str(e).replace(str(path), "LOG")


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=mutated(), sector_size=st.sampled_from([None, None, 512, 1024, 4096]))
def test_xz_reads_exactly_as_the_uncompressed_log(work: Path, raw: bytes, sector_size: int | None) -> None:
    """Inflating only as far as the entries reach changes nothing a reader can see."""
    plain, packed = work / "same.log", work / "same.log.xz"
    plain.write_bytes(raw)
    packed.write_bytes(lzma.compress(raw, preset=0))
    assert read_as(packed, sector_size) == read_as(plain, sector_size)


ids = st.builds(lambda c, end, sel: crashstates.CrashState("0123456789", c, end, sel).id, configs,
                st.integers(0, 10**6), st.sampled_from(["a", "n", "x5", "r00ff"]))


@st.composite
def id_text(draw: st.DrawFn) -> str:
    text = draw(ids)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        junk = draw(st.sampled_from(["\u00b2", "9" * 5000, "-", "e", "t", "b", "w", "x", "r", "\0", " "])
                    | st.text(max_size=4))
        text = text[:at] + junk + text[at + draw(st.integers(0, 3)):]
    return text


@settings(max_examples=2000, deadline=None)
@given(text=id_text() | st.text(max_size=80))
def test_state_ids_raise_only_crash_state_errors(text: str) -> None:
    try:
        state = crashstates.parse_id(text)
    except crashstates.CrashStateError:
        return
    assert crashstates.parse_id(state.id) == state
