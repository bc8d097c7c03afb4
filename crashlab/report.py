"""Reports from the results store: terminal, mail, markdown, CSV, JSON and a PNG plot.

Every format carries the same numbers: per cell, how many crash states were checked and how each
ended, the rate of filesystem corruption (fsck errors after recovery, or recovery failed) and of
fsynced-data loss (fsck clean, a promise broken), each with its Wilson 95 % interval, and the exact
95 % upper bound when nothing failed. `checker-error` states are shown, never counted as either.
"""

from __future__ import annotations

import csv
import io
import json
import textwrap
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from crashlab import claims, stats
from crashlab.check.outcome import Outcome
from crashlab.record import OPTIONAL_FIELDS
from crashlab.store import Store

OUTCOMES = tuple(Outcome)  # the column order of every format
# The terminal table's narrow column headings.
SHORT = {Outcome.CONSISTENT: "ok", Outcome.DATA_LOSS: "loss", Outcome.FS_INCONSISTENT: "bad",
         Outcome.UNMOUNTABLE: "unm", Outcome.CHECKER_ERROR: "err"}
CELL_KEYS = ("fs", "cache", "barrier", "recorder", "workload", "window")
# Axes added after reports existed: a column only when some cell is off its default, so a report of
# cells that do not use them reads as it always did. Defaults from the one table of them.
LATER_KEYS = {k: OPTIONAL_FIELDS[k] for k in ("storage", "disk")}


def cell_keys(cells: list[CellResult]) -> tuple[str, ...]:
    later = (k for k, default in LATER_KEYS.items()
             if any(c.config.get(k, default) != default for c in cells))
    return (*CELL_KEYS, *later)
MAIL_WIDTH = 72
# The bound a cell with no failure is read against: "how many states for < 0.3 %" (about 1000).
TARGET_BOUND = 0.003


@dataclass(frozen=True)
class CellResult:
    cell: str
    config: dict[str, Any]
    counts: Counter[Outcome]

    @property
    def checked(self) -> int:
        """States that count: every state whose checkers worked."""
        return sum(self.counts[o] for o in OUTCOMES if o is not Outcome.CHECKER_ERROR)

    @property
    def corrupt(self) -> stats.Rate:
        return stats.rate(sum(self.counts[o] for o in OUTCOMES if o.is_fs_corruption), self.checked)

    @property
    def lost(self) -> stats.Rate:
        return stats.rate(self.counts[Outcome.DATA_LOSS], self.checked)

    @property
    def failed(self) -> stats.Rate:
        """Corrupt or lost: what a gate refuses."""
        return stats.rate(sum(self.counts[o] for o in OUTCOMES if o.is_failure), self.checked)

    def label(self, keys: tuple[str, ...] = CELL_KEYS) -> str:
        return " ".join(f"{k}={self.config[k]}" for k in keys if k in self.config)

    @property
    def states_for_bound(self) -> int | None:
        """States that, none failing, bound the failure rate below TARGET_BOUND; None once a state
        has failed (a bound on zero no longer applies)."""
        return stats.states_needed(TARGET_BOUND) if self.failed.n and not self.failed.k else None

    @property
    def bound_text(self) -> str:
        need = self.states_for_bound
        if need is None:
            return "-"
        return "met" if self.failed.n >= need else f"{need} ({need - self.failed.n} more)"


def results(store: Store, match: dict[str, str] | None = None) -> list[CellResult]:
    """Every cell with at least one state, optionally only those whose config matches `match`."""
    out = []
    for row in store.cells():
        if match and any(str(row.config.get(k)) != v for k, v in match.items()):
            continue
        counts = store.counts(row.cell)
        if counts:
            out.append(CellResult(row.cell, row.config, counts))
    return sorted(out, key=lambda r: tuple(sort_value(k, r.config.get(k, "")) for k in CELL_KEYS))


def sort_value(key: str, value: Any) -> tuple[float, str]:
    """A cell key's value as rows are ordered: text, but a window by its length (0.1s, 1s, 5s,
    30s, inf; as text, 30s came before 5s)."""
    text = str(value)
    if key == "window" and text:
        try:
            return float(text.removesuffix("s")), ""
        except ValueError:
            pass
    return 0.0, text


def environment(store: Store, cells: list[CellResult]) -> dict[str, str]:
    """Versions behind these cells: the last run's host tools and each recording's guest (kernel,
    QEMU, mkfs, Python). A key with several values lists them all: the table mixes them."""
    runs = store.runs()
    sources = [runs[-1]["versions"]] if runs else []
    for c in cells:
        row = store.cell(c.cell)
        if row is not None and row.record:
            sources.append(row.record.get("versions", {}))
    values: dict[str, set[str]] = {}
    for src in sources:
        for k, v in src.items():
            values.setdefault(k, set()).add(str(v))
    return {k: " | ".join(sorted(v)) for k, v in sorted(values.items())}


def _short_rate(r: stats.Rate, count: bool = True) -> str:
    if not r.n:
        return "-"
    if r.k == 0:
        return f"0 (<={100 * r.upper95:.0f}%)" if r.upper95 >= 0.1 else f"0 (<={100 * r.upper95:.1f}%)"
    return (f"{r.k} " if count else "") + f"{100 * r.value:.0f}% [{100 * r.low:.0f},{100 * r.high:.0f}]"


def _widths(heads: Sequence[str], table: Sequence[Sequence[str]]) -> list[int]:
    return [1 + max([len(h), *(len(r[i]) for r in table)]) for i, h in enumerate(heads)]


def mail_table(heads: Sequence[str], rows: Callable[[bool], Sequence[Sequence[str]]]
               ) -> tuple[list[str], list[Sequence[str]], list[int]]:
    """A mail table's header lines, rows and column widths: columns as wide as their widest
    value, never cut (a cut "1000" reads "100"); `rows(True)` renders rates with their counts,
    `rows(False)` without, which is what a table too wide for 72 columns gets."""
    table = list(rows(True))
    if sum(_widths(heads, table)) - 1 > MAIL_WIDTH:
        table = list(rows(False))
    widths = _widths(heads, table)
    return (["".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip(),
             "-" * (sum(widths) - 1)], table, widths)


def mail_row(vals: Sequence[str], widths: Sequence[int]) -> str:
    return "".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)).rstrip()


def table_rows(cells: list[CellResult]) -> list[dict[str, Any]]:
    rows = []
    keys = cell_keys(cells)
    for c in cells:
        row: dict[str, Any] = {k: c.config.get(k, LATER_KEYS.get(k, "")) for k in keys}
        row.update({"states": c.checked, **{str(o): c.counts[o] for o in OUTCOMES}})
        row["sampling_seed"] = c.config.get("sampling_seed")
        for name, r in (("corrupt", c.corrupt), ("lost", c.lost)):
            row[f"{name}_rate"] = round(r.value, 4) if r.n else None
            row[f"{name}_low"], row[f"{name}_high"] = round(r.low, 4), round(r.high, 4)
            row[f"{name}_upper95"] = round(r.upper95, 4)
        row[f"states_for_{100 * TARGET_BOUND:g}pct"] = c.states_for_bound
        rows.append(row)
    return rows


# --- formats -------------------------------------------------------------------------------------

def split_keys(cells: list[CellResult]) -> tuple[list[str], dict[str, str]]:
    """The config keys that vary between cells (columns) and those that do not (said once)."""
    varying, fixed = [], {}
    for k in cell_keys(cells):
        values = {str(c.config.get(k, LATER_KEYS.get(k, ""))) for c in cells}
        if len(values) > 1:
            varying.append(k)
        else:
            fixed[k] = values.pop() if values else ""
    return varying, fixed


def terminal(cells: list[CellResult], file: IO[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    varying, fixed = split_keys(cells)
    table = Table(title="crash states: " + ", ".join(f"{k} {v}" for k, v in fixed.items()),
                  caption=" · ".join(f"{SHORT[o]} {o}" for o in OUTCOMES) + " (not counted) · "
                  "k rate [95 % Wilson interval], 0 (<=x%): 95 % bound")
    for col in (*varying, "n", *(SHORT[o] for o in OUTCOMES), "corrupt", "fsync data lost"):
        table.add_column(col, justify="left" if col in (*varying, "corrupt", "fsync data lost") else "right",
                         no_wrap=True)
    for c in cells:
        table.add_row(*(str(c.config.get(k, "")) for k in varying), str(c.checked),
                      *(str(c.counts[o]) for o in OUTCOMES), _short_rate(c.corrupt), _short_rate(c.lost))
    console = Console()
    if file is not None:  # plain text whatever the environment asks of terminals (FORCE_COLOR)
        console = Console(file=file, width=160, color_system=None, force_terminal=False)
    elif not console.is_terminal:  # a log or a pipe: no reason to squeeze the table
        console = Console(width=160)
    console.print(table)


def markdown(cells: list[CellResult], env: dict[str, Any] | None = None,
             costs: list[CostResult] | None = None) -> str:
    keys = cell_keys(cells)
    head = [*keys, "states", *OUTCOMES, "corrupt (95 % CI)", "fsync data lost (95 % CI)",
            f"states for < {100 * TARGET_BOUND:g} %", "sampling seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] if cells or not costs else []
    for c in cells:
        cols = [str(c.config.get(k, LATER_KEYS.get(k, ""))) for k in keys] + [str(c.checked)]
        cols += [str(c.counts[o]) for o in OUTCOMES] + [str(c.corrupt), str(c.lost), c.bound_text,
                                                      f"{c.config.get('sampling_seed', '-')}"]
        lines.append("| " + " | ".join(cols) + " |")
    if costs:
        lines += [*([""] if lines else []), cost_markdown(costs).rstrip("\n")]
    if env:
        lines += ["", "Environment:", ""] + [f"- {k}: `{v}`" for k, v in sorted(env.items())]
    return "\n".join(lines) + "\n"


def csv_text(cells: list[CellResult]) -> str:
    rows = table_rows(cells)
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def json_text(cells: list[CellResult], env: dict[str, Any] | None = None) -> str:
    return json.dumps({"cells": table_rows(cells), "claims": claims.as_json(claims.evaluate(cells)),
                       "environment": env or {}}, indent=2, sort_keys=True)


def mail(cells: list[CellResult], env: dict[str, Any], commands: list[str],
         costs: list[CostResult] | None = None) -> str:
    """Plain text for a mailing-list reply: at most 72 columns, nothing that needs rendering."""
    heads = ("fs", "cache", "bar", "workload", "n", "corrupt", "fsync-lost")
    out = ["crashlab: host power loss at random instants, per guest config.",
           "corrupt = fsck errors after journal replay, or replay failed;",
           "fsync-lost = fsck clean but fsync'd data missing. n = states checked.",
           "k rate [95% Wilson interval]; 0 (<=x%) = 95% upper bound.", ""]
    # What else tells rows apart (a disk model, a window sweep) heads a group of rows, which keeps
    # the table within 72 columns. A default window follows from the cache mode (said below it).
    swept = any(c.config.get("window_spec", "default") != "default" for c in cells)
    shown = ("fs", "cache", "barrier", "workload", *(() if swept else ("window",)))
    extra = [k for k in split_keys(cells)[0] if k not in shown]

    def group_of(c: CellResult) -> tuple[str, ...]:
        return tuple(str(c.config.get(k, LATER_KEYS.get(k, ""))) for k in extra)

    ordered = sorted(cells, key=lambda c: tuple(map(sort_value, extra, group_of(c))))

    def rows(count: bool) -> list[tuple[str, ...]]:
        return [tuple(str(v) for v in (c.config.get("fs", ""), c.config.get("cache", ""),
                                       c.config.get("barrier", ""), c.config.get("workload", ""), c.checked,
                                       _short_rate(c.corrupt, count), _short_rate(c.lost, count)))
                for c in ordered]

    lines, table, widths = mail_table(heads, rows)
    out += lines
    group = None
    for c, vals in zip(ordered, table, strict=True):
        heading = " ".join(f"{k}={v}" for k, v in zip(extra, group_of(c), strict=True))
        if extra and group != (group := heading):
            out.append(f"{group}:")
        out.append(mail_row(vals, widths))
    errors = sum(c.counts[Outcome.CHECKER_ERROR] for c in cells)
    if errors:
        out += ["", f"{errors} state(s) ended in {Outcome.CHECKER_ERROR} (not counted above)."]
    out += cost_mail(costs or [])
    windows = sorted({str(c.config.get("window", "")) for c in cells}, key=lambda w: sort_value("window", w))
    recorders = sorted({str(c.config.get("recorder", "")) for c in cells})
    out += ["", f"Volatility window(s): {', '.join(windows)}; recorder(s): {', '.join(recorders)}."]
    need = stats.states_needed(TARGET_BOUND)
    out += textwrap.wrap(f"Each cell's states are drawn with its own seed (sha256 of its key: report.csv "
                         f"lists them). {need} states without a failure bound a rate below "
                         f"{100 * TARGET_BOUND:g} % at 95 %.", MAIL_WIDTH)
    out += ["", "The thread, point by point (failed = corrupt or fsync-lost;",
            "Fisher exact two-sided, Holm-adjusted over each claim's pairs):", ""]
    for line in [*claims.lines(claims.evaluate(cells)), *claims.assumptions(cells)]:
        indent = " " * (len(line) - len(line.lstrip()) + 2)
        out += textwrap.wrap(line, MAIL_WIDTH, subsequent_indent=indent, break_on_hyphens=False) or [""]
    out += ["", "Environment:"]
    for k, v in sorted(env.items()):
        out += textwrap.wrap(f"{k}: {v}", MAIL_WIDTH, initial_indent="  ", subsequent_indent="    ")
    out += ["", "Reproduce:"]
    for cmd in commands:
        out += shell_lines(cmd, MAIL_WIDTH, indent="  ")
    return "\n".join(line.rstrip() for line in out) + "\n"


def shell_lines(cmd: str, width: int, indent: str = "") -> list[str]:
    """A command folded at option boundaries with backslash continuations: still pastes into a
    shell after a mail client has had it."""
    words = cmd.split(" ")
    chunks: list[str] = []
    for w in words:  # keep each option with its value
        if chunks and not w.startswith("-") and chunks[-1].startswith("-") and " " not in chunks[-1]:
            chunks[-1] += " " + w
        else:
            chunks.append(w)
    lines, line = [], indent
    for chunk in chunks:
        candidate = f"{line} {chunk}" if line.strip() else line + chunk
        if len(candidate) + 2 > width and line.strip():
            lines.append(line + " \\")
            line = indent + "    " + chunk
        else:
            line = candidate
    return [*lines, line]


def plot(cells: list[CellResult], path: Path, title: str = "") -> None:
    """Corruption and data-loss rates with 95 % interval bars per cache mode and barrier setting,
    one panel per filesystem."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    filesystems = sorted({str(c.config.get("fs")) for c in cells}) or ["-"]
    widest = max(sum(str(c.config.get("fs")) == fs for c in cells) for fs in filesystems)
    width = max(6.5, 0.45 * widest + 2) * len(filesystems)
    fig, axes = plt.subplots(1, len(filesystems), figsize=(width, 5.2), squeeze=False)
    for ax, fs in zip(axes[0], filesystems, strict=True):
        mine = [c for c in cells if str(c.config.get("fs")) == fs]
        labels = [f"{c.config.get('cache')} barrier={c.config.get('barrier')} {c.config.get('workload')}"
                  for c in mine]
        xs = range(len(mine))
        series: tuple[tuple[str, Callable[[CellResult], stats.Rate], str], ...] = (
            ("corrupt", lambda c: c.corrupt, "tab:red"), ("fsync data lost", lambda c: c.lost, "tab:blue"))
        for offset, (name, get, colour) in enumerate(series):
            rates = [get(c) for c in mine]
            ys = [100 * r.value if r.n else 0 for r in rates]
            err = [[max(0.0, y - 100 * r.low) for y, r in zip(ys, rates, strict=True)],
                   [max(0.0, 100 * r.high - y) for y, r in zip(ys, rates, strict=True)]]
            ax.errorbar([x + (offset - 0.5) * 0.3 for x in xs], ys, yerr=err, fmt="o", capsize=3,
                        color=colour, label=name)
        ax.set_xticks(list(xs), labels, fontsize=7, rotation=40, ha="right")
        ax.set_ylim(-2, 102)
        ax.set_ylabel("% of crash states (95 % Wilson interval)")
        ax.set_title(fs)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    """The PNG with no Software/date text: the same cells give the same bytes (results/ is rebuilt
    and compared byte for byte)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def window_cells(cells: list[CellResult]) -> list[CellResult]:
    """The cells of a window sweep: an explicit window, cache writeback or none."""
    return [c for c in cells if c.config.get("window_spec", "default") != "default"
            and c.config.get("cache") in ("writeback", "none")]


def _window_seconds(c: CellResult) -> float:
    spec = str(c.config.get("window_spec"))
    return float("inf") if spec == "inf" else float(spec)


def _axes(c: CellResult, *keys: str) -> tuple[str, ...]:
    return tuple(str(c.config.get(k)) for k in keys)


def plot_windows(cells: list[CellResult], path: Path, title: str = "") -> None:
    """Failure rate (corrupt or fsynced data lost) against the volatility window, 95 % intervals as
    bars: one line per cache mode and barrier setting, one panel per filesystem and workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = window_cells(cells)
    panels = sorted({_axes(c, "fs", "workload") for c in sweep})
    if not panels:
        raise ValueError("no window-sweep cells (an explicit --window, cache writeback or none)")
    windows = sorted({_window_seconds(c) for c in sweep})
    where = {w: i for i, w in enumerate(windows)}  # even spacing: inf has no place on a log axis
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.6), squeeze=False)
    for ax, (fs, workload) in zip(axes[0], panels, strict=True):
        mine = [c for c in sweep if _axes(c, "fs", "workload") == (fs, workload)]
        lines = sorted({_axes(c, "cache", "barrier") for c in mine})
        for offset, (cache, barrier) in enumerate(lines):
            line = sorted((c for c in mine if _axes(c, "cache", "barrier") == (cache, barrier)),
                          key=_window_seconds)
            rates = [c.failed for c in line]
            ys = [100 * r.value for r in rates]
            err = [[max(0.0, y - 100 * r.low) for y, r in zip(ys, rates, strict=True)],
                   [max(0.0, 100 * r.high - y) for y, r in zip(ys, rates, strict=True)]]
            xs = [where[_window_seconds(c)] + (offset - (len(lines) - 1) / 2) * 0.08 for c in line]
            ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, label=f"{cache} barrier={barrier}")
        ax.set_xticks(range(len(windows)), [w if w == "inf" else f"{w:g} s"
                                            for w in ("inf" if w == float("inf") else w for w in windows)])
        ax.set_xlabel("volatility window")
        ax.set_ylim(-2, 102)
        ax.set_ylabel("% of crash states failed (95 % Wilson interval)")
        ax.set_title(f"{fs}, {workload}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path)


def compare(a: CellResult, b: CellResult) -> str:
    """Fisher's exact test between two cells, for corruption and for data loss."""
    lines = [f"A: {a.label()}", f"B: {b.label()}"]
    for name, ra, rb in (("corrupt", a.corrupt, b.corrupt), ("fsync data lost", a.lost, b.lost),
                         ("either", a.failed, b.failed)):
        p = stats.fisher_rates(ra, rb)
        lines.append(f"{name}: A {ra}  vs  B {rb}  (Fisher exact, two-sided p = {p:.4g})")
    return "\n".join(lines)


def compare_runs(first: list[CellResult], second: list[CellResult]) -> str:
    """Two runs of the same matrix (two stores or exports), cell by cell: each cell's failure rate in
    both, Fisher's exact p that they differ, Holm-adjusted over the cells both hold; which differ."""
    theirs = {c.cell: c for c in second}
    both = [(c, theirs[c.cell]) for c in first if c.cell in theirs and c.checked and theirs[c.cell].checked]
    tests = stats.compare_many([(a.failed, b.failed) for a, b in both])
    keys = cell_keys([c for pair in both for c in pair])
    out = [f"{len(both)} cells in both runs ({len(first) - len(both)} only in the first, "
           f"{len(second) - len(both)} only in the second); failed = corrupt or fsync data lost;",
           "Fisher exact two-sided p, Holm-adjusted over the cells.", ""]
    differ = []
    for (a, b), (p, q) in zip(both, tests, strict=True):
        mark = "DIFFERS" if q < claims.ALPHA else "same"
        out.append(f"{a.label(keys)}: {a.failed} vs {b.failed}; p = {p:.3g}, Holm {q:.3g}: {mark}")
        differ += [a.label(keys)] if q < claims.ALPHA else []
    out += ["", f"{len(differ)} of {len(both)} cells differ significantly at {claims.ALPHA:g} (Holm)"
            + (": " + "; ".join(differ) if differ else ".")]
    return "\n".join(out) + "\n"


# --- every format, to a file ---------------------------------------------------------------------

FORMATS = ("terminal", "mail", "markdown", "csv", "json", "png", "window-png", "cost-png")
# What `report --all DIR` writes (results/ ships them): one file a format.
SHIPPED = {"report.txt": "mail", "report.md": "markdown", "report.csv": "csv", "report.json": "json",
           "report-terminal.txt": "terminal", "rates.png": "png", "window.png": "window-png"}
PLOT_VERSIONS = ("guest_kernel", "qemu", "e2fsck", "crashlab")  # named in a plot's title


def text(fmt: str, cells: list[CellResult], env: dict[str, str], commands: list[str],
         costs: list[CostResult] | None = None) -> str:
    """One text format; the cost-of-safety table joins mail, markdown and terminal when there are costs."""
    if fmt == "terminal":
        buf = io.StringIO()
        if cells or not costs:
            terminal(cells, buf)
        return buf.getvalue() + cost_markdown(costs or [])
    return {"mail": lambda: mail(cells, env, commands, costs),
            "markdown": lambda: markdown(cells, env, costs),
            "csv": lambda: csv_text(cells), "json": lambda: json_text(cells, env)}[fmt]()


def write(fmt: str, cells: list[CellResult], env: dict[str, str], commands: list[str], path: Path,
          costs: list[CostResult] | None = None) -> bool:
    """One format to `path`; False (nothing written) for a window plot with no sweep cells, or a
    cost plot with no costs."""
    title = "; ".join(f"{k}: {env[k]}" for k in PLOT_VERSIONS if k in env)
    if fmt == "png":
        plot(cells, path, title)
    elif fmt == "window-png":
        if not window_cells(cells):
            return False
        plot_windows(cells, path, title)
    elif fmt == "cost-png":
        if not costs:
            return False
        plot_cost(costs, path, title)
    else:
        path.write_text(text(fmt, cells, env, commands, costs))
    return True


# --- the cost of safety (crashlab.cost) ----------------------------------------------------------

COST_FIGURES = (("seq_mb_s", "seq write MB/s", "{:.1f}"), ("rand_iops", "rand write IOPS", "{:.0f}"),
                ("fsync_p50_ms", "fsync p50 ms", "{:.2f}"), ("fsync_p99_ms", "fsync p99 ms", "{:.2f}"))
COST_MATCH = ("fs", "cache", "barrier", "disk")  # what a cost row and a cell must share to sit side by side
COST_NOTE = ("fio in the guest, no recorder in the path; TCG = emulated CPU: compare modes within one "
             "accelerator, not with real disks. corrupt: every matching cell's states pooled.")


@dataclass(frozen=True)
class CostResult:
    """One stored fio measurement, beside the corruption rate of the cells of its configuration."""

    config: dict[str, Any]
    figures: dict[str, float]
    corrupt: stats.Rate  # pooled over `cells` (every workload of that fs, cache, barrier, disk)
    cells: int
    detail: dict[str, Any]  # crashlab.cost.Measured.detail: argv, versions, the command

    @property
    def accel(self) -> str:
        return str(self.config.get("accel", "")).upper()

    @property
    def command(self) -> str:
        return str(self.detail.get("command", "crashlab cost"))

    def label(self) -> str:
        return f"{self.config.get('cache')} barrier={self.config.get('barrier')}"


def cost_results(store: Store, cells: list[CellResult], match: dict[str, str] | None = None
                 ) -> list[CostResult]:
    """Every stored cost measurement (those `match` does not rule out on a key they have) with its
    configuration's pooled corruption rate; [] for a store without costs."""
    out = []
    for row in store.costs():
        if match and any(k in row.config and str(row.config[k]) != v for k, v in match.items()):
            continue
        want = {k: str(row.config.get(k)) for k in COST_MATCH}
        mine = [c for c in cells if all(str(c.config.get(k, OPTIONAL_FIELDS.get(k, ""))) == v
                                        for k, v in want.items())]
        k = sum(c.corrupt.k for c in mine)
        n = sum(c.corrupt.n for c in mine)
        out.append(CostResult(row.config, row.figures["figures"], stats.rate(k, n), len(mine), row.figures))
    return sorted(out, key=lambda r: tuple(str(r.config.get(k, "")) for k in (*COST_MATCH, "accel")))


def host_storage(costs: list[CostResult]) -> str:
    """Where the measured guests' images lived: what a host fdatasync cost them."""
    seen = sorted({f"{h.get('fstype')} on {h.get('device')}" for r in costs
                   if (h := r.detail.get("host_storage"))})
    return ", ".join(seen) or "(storage not recorded)"


def _cost_values(r: CostResult) -> list[str]:
    return [fmt.format(r.figures[key]) for key, _, fmt in COST_FIGURES]


def cost_markdown(costs: list[CostResult]) -> str:
    """The cost-of-safety table, or "" when there is nothing to show (the report reads as before)."""
    if not costs:
        return ""
    head = ["fs", "cache", "barrier", "disk", "accel", *(name for _, name, _ in COST_FIGURES),
            "fio size, runtime", "corrupt (95 % CI)"]
    lines = [f"Cost of safety: {COST_NOTE} Guest images on the host's {host_storage(costs)}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in costs:
        cols = [str(r.config.get(k, "")) for k in COST_MATCH] + [r.accel, *_cost_values(r)]
        cols += [f"{r.config.get('size_mib')} MiB, {r.config.get('runtime_s')} s",
                 str(r.corrupt) if r.cells else "no cells"]
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


def cost_mail(costs: list[CostResult]) -> list[str]:
    """The cost table's mail lines (72 columns), none when there are no costs."""
    if not costs:
        return []
    heads = ("fs", "cache", "bar", "accel", "MB/s", "IOPS", "p50ms", "p99ms", "corrupt")
    out = ["", "Cost of safety (fio in the guest, no recorder in the path;",
           "TCG = emulated CPU: compare modes only within one accelerator;",
           "corrupt pools every workload's states of that configuration):", ""]

    def rows(count: bool) -> list[tuple[str, ...]]:
        return [tuple(str(v) for v in (r.config.get("fs", ""), r.config.get("cache", ""),
                                       r.config.get("barrier", ""), r.accel, *_cost_values(r),
                                       _short_rate(r.corrupt, count)))
                for r in costs]

    lines, table, widths = mail_table(heads, rows)
    out += lines + [mail_row(vals, widths) for vals in table]
    sizes = sorted({f"{r.config.get('size_mib')} MiB file, {r.config.get('runtime_s')} s a job"
                    for r in costs})
    said = f"fio: {', '.join(sizes)}; guest images on the host's {host_storage(costs)}; measured with:"
    out += ["", *textwrap.wrap(said, MAIL_WIDTH)]
    for cmd in sorted({str(r.command) for r in costs}):
        out += shell_lines(cmd, MAIL_WIDTH, indent="  ")
    return out


def plot_cost(costs: list[CostResult], path: Path, title: str = "") -> None:
    """Cost of safety against corruption rate: one point per cache mode and barrier setting (95 %
    Wilson interval bars), one panel per fio figure; the accelerator is in every panel's title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in costs if r.cells]
    panels = COST_FIGURES[:2] + COST_FIGURES[3:]  # MB/s, IOPS, fsync p99
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    accels = ", ".join(sorted({r.accel for r in shown})) or "-"
    for ax, (key, name, _) in zip(axes[0], panels, strict=True):
        for r in shown:
            y = 100 * r.corrupt.value
            err = [[max(0.0, y - 100 * r.corrupt.low)], [max(0.0, 100 * r.corrupt.high - y)]]
            ax.errorbar([r.figures[key]], [y], yerr=err, fmt="o" if r.config.get("barrier") == "on" else "s",
                        capsize=3)
            ax.annotate(r.label(), (r.figures[key], y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(f"{name} ({accels})")
        ax.set_ylabel("% of crash states corrupt (95 % Wilson interval)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    fig.suptitle((title + "\n" if title else "") + "cost of safety: " + COST_NOTE.split(";")[0], fontsize=8)
    _save(fig, path)
