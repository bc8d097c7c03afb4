"""Model validation on simulated host writeback: a page cache that sweeps dirty pages in offset order
and writes everything back at a guest flush produces only states the qemu model allows (with torn
writes at the page size), and a host that loses a flushed write or tears a guest write is caught."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from crashlab import logformat, model, validate
from crashlab.logformat import LogWriter

SS = 512
PAGE = 4096
PAGES = 24  # a small image: collisions between guest writes, sweeps and flushes are frequent


def guest_plan(seed: int, n: int = 60) -> list[tuple]:
    """Guest ops: 1 KiB writes anywhere, some two-page writes, flushes."""
    rng = random.Random(seed)
    plan: list[tuple] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.15:
            plan.append(("f",))
        elif r < 0.3:
            page = rng.randrange(PAGES - 1)
            plan.append(("w", page * 8, 16, rng.randbytes(16 * SS)))
        else:
            plan.append(("w", rng.randrange(PAGES * 4) * 2, 2, rng.randbytes(2 * SS)))
    return plan


def simulate(plan: list[tuple], seed: int, qemu: Path, host: Path, lose_at: int | None = None,
             tear_guest_writes: bool = False) -> None:
    """The qemu log of `plan`, and the host log a page cache would write for it: between guest ops,
    now and then one cyclic sweep of some dirty pages in offset order; at a flush, every dirty page
    in offset order, then the host's FLUSH. `lose_at`: the host forgets the dirty pages of that
    many first flushes (a broken fdatasync). `tear_guest_writes`: the host writes the first page of
    a two-page write before the guest's copy of its second page is in the cache."""
    rng = random.Random(seed)
    cache = bytearray(PAGES * PAGE)
    dirty: set[int] = set()
    cursor = 0
    flushes = 0
    with LogWriter(qemu, SS) as q, LogWriter(host, SS) as h:

        def writeback(pages: list[int]) -> None:
            for p in pages:
                h.write(p * 8, bytes(cache[p * PAGE:(p + 1) * PAGE]))
                dirty.discard(p)

        for op in plan:
            if op[0] == "f":
                q.flush()
                flushes += 1
                if lose_at is not None and flushes <= lose_at:
                    dirty.clear()  # written nowhere: the flush lied
                writeback(sorted(dirty))
                h.flush()
                continue
            _, sector, nr, data = op
            first = sector * SS // PAGE
            if tear_guest_writes and nr == 16:
                cache[sector * SS:sector * SS + PAGE] = data[:PAGE]
                writeback([first])
                cache[sector * SS + PAGE:sector * SS + 2 * PAGE] = data[PAGE:]
                dirty.add(first + 1)
            else:
                cache[sector * SS:sector * SS + len(data)] = data
                dirty.update(range(first, (sector * SS + len(data) - 1) // PAGE + 1))
            q.write(sector, data)
            if dirty and rng.random() < 0.3:
                order = sorted(dirty)
                k = next((i for i, p in enumerate(order) if p >= cursor), 0)
                sweep = (order[k:] + order[:k])[:rng.randint(1, len(order))]
                writeback(sweep)
                cursor = sweep[-1] + 1


def run(tmp: Path, cache: str = "writeback", torn: int | None = PAGE, **kw: object) -> validate.Validation:
    qemu, host = tmp / "qemu.log", tmp / "host.log"
    simulate(guest_plan(kw.pop("plan_seed", 1)), 7, qemu, host, **kw)  # type: ignore[arg-type]
    with logformat.open_log(qemu) as qr, logformat.open_log(host) as hr:
        m = model.LogModel(qr.index(), model.config("qemu", cache, "inf", None, torn))
        return validate.validate(m, qr, hr.index(), hr, PAGES * PAGE)


@pytest.mark.parametrize("seed", range(6))
def test_page_cache_writeback_is_always_an_allowed_state(tmp_path: Path, seed: int) -> None:
    r = run(tmp_path, plan_seed=seed)
    assert r.passed, r.examples
    assert r.prefixes > 20 and r.host_states > 10
    assert 1 <= r.visited <= r.candidates
    assert r.allowed_log10 > 1  # the model allows far more than the host ever did


def test_a_host_that_loses_flushed_writes_is_caught(tmp_path: Path) -> None:
    r = run(tmp_path, lose_at=2)
    assert not r.passed
    assert "durable" in r.examples[0].why


def test_untorn_subsets_forbid_what_page_writeback_does_to_multi_page_writes(tmp_path: Path) -> None:
    # A two-page guest write whose first page reached the disk alone: allowed only with torn units.
    torn = run(tmp_path, tear_guest_writes=True)
    whole = run(tmp_path, tear_guest_writes=True, torn=None)
    assert torn.passed, torn.examples
    assert not whole.passed
    assert whole.violations < whole.prefixes  # the rest of the run still validates


def test_unsafe_has_one_epoch_and_still_validates(tmp_path: Path) -> None:
    # The qemu log of a cache=unsafe guest has no flushes: one epoch, every write volatile.
    qemu, host = tmp_path / "q.log", tmp_path / "h.log"
    plan = [op for op in guest_plan(3) if op[0] != "f"]
    simulate(plan, 5, qemu, host)
    with logformat.open_log(qemu) as qr, logformat.open_log(host) as hr:
        m = model.LogModel(qr.index(), model.config("qemu", "unsafe", "inf", None, PAGE))
        r = validate.validate(m, qr, hr.index(), hr, PAGES * PAGE)
    assert r.passed and r.candidates == 1 and r.visited == 1


def test_sweeps_count_offset_order_runs() -> None:
    def entry(i: int, sector: int, flags: int = 0) -> logformat.Entry:
        return logformat.Entry(i, sector, 0 if flags else 8, flags, 0, 0, SS)

    es = [entry(0, 0), entry(1, 8), entry(2, 0), entry(3, 0, logformat.FLUSH), entry(4, 16), entry(5, 24)]
    assert validate.sweeps(es) == (5, 2, 3)
