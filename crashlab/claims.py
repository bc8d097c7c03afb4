"""The 2008 libvirt thread's claims, one table, and what the store's numbers say about each.

A claim is tested by pairs of cells: every stored cell matching its `a` filter beside the stored
cell matching `b` that is the same in every other respect (workload, filesystem, barrier, disk,
...). Each pair's failure rates (corrupt or fsynced data lost) are compared with Fisher's exact
test, Holm-adjusted over the claim's pairs, and the verdict is worded from those numbers alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from crashlab import stats


class CellResult(Protocol):
    """A cell as a report counts it (crashlab.report.CellResult, which imports this module)."""

    @property
    def cell(self) -> str: ...
    @property
    def config(self) -> dict[str, Any]: ...
    @property
    def failed(self) -> stats.Rate: ...

ALPHA = 0.05
# Config keys that never make two cells "the same configuration" or not: derived or a label.
NOT_PAIRED_ON = frozenset({"sampling_seed", "window"})


@dataclass(frozen=True)
class Claim:
    quote: str  # the thread's words, one line
    meaning: str  # what it predicts about the cells
    a: Mapping[str, str]  # the cells the claim is about
    b: Mapping[str, str]  # what they are compared with
    expect: str  # "worse": a fails more than b; "same": a fails no more than b


CLAIMS: tuple[Claim, ...] = (
    Claim("say goodbye to your filesystem",
          "host caching (cache=writeback) loses data on power loss, where writethrough does not",
          {"cache": "writeback"}, {"cache": "writethrough"}, "worse"),
    Claim("the host cache is just a big disk write cache",
          "writeback is as safe as none when the guest flushes (barrier on)",
          {"cache": "writeback", "barrier": "on"}, {"cache": "none", "barrier": "on"}, "same"),
    Claim("barrier=0 guests are the real danger",
          "a guest without barriers fails more than the same guest with them",
          {"barrier": "off"}, {"barrier": "on"}, "worse"),
    Claim("ext3 ships without barriers anyway",
          "on ext3 as shipped (barrier=0), host caching fails more than writethrough",
          {"fs": "ext3", "cache": "writeback"}, {"fs": "ext3", "cache": "writethrough"}, "worse"),
    Claim("qemu caches data for far, far longer than a typical IDE disk",
          "a 30 s volatility window (host dirty expiry) fails more than a 1 s one (a disk's cache)",
          {"window_spec": "30"}, {"window_spec": "1"}, "worse"),
)


@dataclass(frozen=True)
class Pair:
    a: CellResult
    b: CellResult
    p: float
    adjusted: float

    @property
    def differs(self) -> bool:
        return self.adjusted < ALPHA


@dataclass(frozen=True)
class Finding:
    claim: Claim
    pairs: list[Pair]

    @property
    def verdict(self) -> str:
        """One line, from the numbers."""
        c, n = self.claim, len(self.pairs)
        if not n:
            return (f"not tested: the store holds no cells {_filter(c.a)} with a matching "
                    f"{_filter(c.b)}")
        worse = [p for p in self.pairs if p.differs and p.a.failed.value > p.b.failed.value]
        better = [p for p in self.pairs if p.differs and p.a.failed.value < p.b.failed.value]
        pooled = stats.rate(sum(p.a.failed.k for p in self.pairs), sum(p.a.failed.n for p in self.pairs))
        if c.expect == "same":
            if worse:
                return (f"contradicted: {_filter(c.a)} fails more in {len(worse)} of {n} pairs "
                        f"(Holm p < {ALPHA})")
            return (f"supported: no pair differs (Holm p >= {ALPHA}) in {n} pairs; "
                    f"{_filter(c.a)} failed {pooled}")
        if worse and len(worse) == n:
            return f"supported: {_filter(c.a)} fails more in all {n} pairs (Holm p < {ALPHA})"
        if worse:
            return (f"partly: {_filter(c.a)} fails more in {len(worse)} of {n} pairs (Holm p < {ALPHA}): "
                    + "; ".join(_pair_name(p) for p in worse))
        if better:
            return f"contradicted: {_filter(c.a)} fails less in {len(better)} of {n} pairs (Holm p < {ALPHA})"
        return f"not shown: no pair of {n} differs (Holm p >= {ALPHA}); {_filter(c.a)} failed {pooled}"


def evaluate(cells: Sequence[CellResult], claims: Sequence[Claim] = CLAIMS) -> list[Finding]:
    return [Finding(c, _pairs(c, cells)) for c in claims]


def _pairs(claim: Claim, cells: Sequence[CellResult]) -> list[Pair]:
    ignored = NOT_PAIRED_ON | set(claim.a) | set(claim.b)
    if "window_spec" in ignored:
        ignored = ignored | {"window"}

    def matches(c: CellResult, f: Mapping[str, str]) -> bool:
        return all(str(c.config.get(k)) == v for k, v in f.items())

    def rest(c: CellResult) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((k, str(v)) for k, v in c.config.items() if k not in ignored))

    refs = {rest(c): c for c in cells if matches(c, claim.b)}
    found = [(a, refs[rest(a)]) for a in cells if matches(a, claim.a) and rest(a) in refs
             and a.failed.n and refs[rest(a)].failed.n]
    tests = stats.compare_many([(a.failed, b.failed) for a, b in found])
    return [Pair(a, b, p, q) for (a, b), (p, q) in zip(found, tests, strict=True)]


def _filter(f: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in f.items())


def _pair_name(p: Pair) -> str:
    """What distinguishes this pair from the claim's other pairs: the config it shares."""
    keys = ("fs", "cache", "barrier", "workload", "disk", "window")
    return " ".join(str(p.a.config[k]) for k in keys if k in p.a.config and k not in _keys_of(p))


def _keys_of(p: Pair) -> set[str]:
    return {k for k in p.a.config if str(p.a.config[k]) != str(p.b.config.get(k))}


def short_rate(r: stats.Rate) -> str:
    if r.k == 0:
        return f"0/{r.n} (<={100 * r.upper95:.2g}%)"
    return f"{r.k}/{r.n} {100 * r.value:.1f}% [{100 * r.low:.1f},{100 * r.high:.1f}]"


def lines(findings: Sequence[Finding]) -> list[str]:
    """Point by point, for the mail report: the quote, the cells, each pair's rates and test, the
    verdict."""
    out: list[str] = []
    for i, f in enumerate(findings, 1):
        c = f.claim
        out += [f'{i}. "{c.quote}"', f"   claim: {c.meaning}",
                f"   cells: {_filter(c.a)} vs {_filter(c.b)} (store filters)"]
        for p in f.pairs:
            out.append(f"   {_pair_name(p)}: {short_rate(p.a.failed)} vs {short_rate(p.b.failed)}, "
                       f"p={p.p:.2g} Holm {p.adjusted:.2g}")
        out += [f"   verdict: {f.verdict}", ""]
    return out


def as_json(findings: Sequence[Finding]) -> list[dict[str, Any]]:
    return [{"quote": f.claim.quote, "claim": f.claim.meaning, "a": dict(f.claim.a), "b": dict(f.claim.b),
             "verdict": f.verdict,
             "pairs": [{"a": p.a.cell, "b": p.b.cell, "a_failed": [p.a.failed.k, p.a.failed.n],
                        "b_failed": [p.b.failed.k, p.b.failed.n], "fisher_p": p.p, "holm_p": p.adjusted}
                       for p in f.pairs]} for f in findings]


def assumptions(cells: Sequence[CellResult]) -> list[str]:
    """What the numbers do not show: the crash model's assumptions (DESIGN.md) and the windows used."""
    windows = sorted({f"{c.config.get('cache')} {c.config.get('window')}" for c in cells})
    strategies = sorted({str(c.config.get("strategy", "random")) for c in cells})
    return [
        "What these numbers do not show:",
        "- Host power loss at an instant drawn uniformly over the log; each write after the last "
        f"flush persisted or not, independently (strategy {', '.join(strategies)}), not in the order "
        "a real host or disk writes back.",
        "- A write older than the volatility window is taken as persisted; the windows are "
        "assumptions (writeback/unsafe: host dirty expiry 30 s; none: a disk cache of 1 s), not "
        f"measurements. Used here: {'; '.join(windows)}.",
        "- The filesystem as created (mkfs, first mount) is taken as durable.",
        "- Only the workloads run here, at their scale; no torn writes unless a cell says torn=; "
        "the guest kernel is the one named under Environment.",
    ]
