"""`crashlab validate`: the qemu-recorder model checked against what the host really wrote back."""

from __future__ import annotations

import json
from pathlib import Path

import click

from crashlab import campaign, validate
from crashlab.check.outcome import Outcome
from crashlab.cli import CrashlabError

# Corruption rates side by side: what each strategy reads out of which log of the same run.
SIDES = (("qemu", "random", "independent subsets (qemu log)"),
         ("qemu", "writeback-order", "writeback-order sweeps (qemu log)"),
         ("host-dm", "prefix", "real host states (host-dm prefixes)"))


@click.command("validate")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--check", "check_n", type=click.IntRange(0, 500), default=0, show_default=True,
              help="Also check N crash states per strategy (a checker guest) and print the corruption "
                   "rates side by side.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per recording.")
def command(runs: tuple[Path, ...], check_n: int, seed: int, as_json: bool) -> None:
    """Validate host-dm recordings (`record --recorder host-dm`): every prefix of each one's host log
    must be a state the qemu-recorder model of the same run allows under its cache mode. Exit 1 if
    one is not."""
    failed = False
    for run in runs:
        try:
            rep = validate.validate_recording(run)
        except (validate.RecordingError, ValueError) as e:
            raise CrashlabError(str(e)) from None
        rates = side_by_side(run, rep, check_n, seed) if check_n else {}
        failed |= not rep.passed
        if as_json:
            click.echo(json.dumps({**rep.as_dict(), "rates": rates}, sort_keys=True))
            continue
        where = "NESTED: an outer guest played the host" if rep.nested else rep.host
        click.echo(f"{run}: cache {rep.cache}, host-dm on {where}")
        w, ep, r = rep.sweeps
        click.echo(f"  host writeback: {w} writes in {ep} flush epochs, {r} ascending offset runs")
        for name, v in rep.readings.items():
            verdict = "PASS" if v.passed else f"FAIL ({v.violations} prefixes no allowed state)"
            click.echo(f"  qemu model, {name}: {verdict}; {v.prefixes} host prefixes, {v.host_states} host "
                       f"states; model allows up to 10^{v.allowed_log10:g} states over {v.candidates} "
                       f"maximal crash points, the host reached {v.visited} of them")
            for ex in v.examples[:3]:
                click.echo(f"    host entry {ex.host_entry} (near crash point {ex.candidate_end}), sector "
                           f"{ex.sector}: {ex.why}")
        for label, row in rates.items():
            click.echo(f"  {label}: {row['corrupt']}/{row['checked']} corrupt, {row['failures']}/"
                       f"{row['checked']} failing (model: {row['model']})")
    if failed:
        raise SystemExit(1)


def side_by_side(run: Path, rep: validate.RecordingReport, n: int, seed: int) -> dict[str, dict[str, object]]:
    """Corruption and failure rates of `n` states per strategy, each on the log it reads."""
    cfg = json.loads((run / "run.json").read_text())["config"]
    out: dict[str, dict[str, object]] = {}
    for rec, strategy, label in SIDES:
        recording = run / "qemu" if rec == "qemu" else run
        cell = campaign.Cell.parse({"fs": cfg["fs"], "cache": rep.cache, "recorder": rec,
                                    "workload": cfg["workload"], "seed": seed, "strategy": strategy,
                                    "barrier": cfg["barrier"], "data_mode": cfg["data_mode"],
                                    "scale": cfg["scale"]})
        try:
            ids = campaign.generate_states(cell, recording, n)
            results = campaign.run_check(campaign.CheckUnit(cell, str(recording), tuple(ids)))
        except campaign.CampaignError as e:
            raise CrashlabError(str(e)) from None
        checked = [r for r in results if r.outcome is not Outcome.CHECKER_ERROR]
        out[label] = {"checked": len(checked), "corrupt": sum(r.outcome.is_fs_corruption for r in checked),
                      "failures": sum(r.outcome.is_failure for r in checked),
                      "model": f"{cell.recorder} cache={rep.cache} window={_window(cell)} "
                               f"strategy={strategy}"}
    return out


def _window(cell: campaign.Cell) -> str:
    w = cell.model_config().window_s
    return "inf" if w == float("inf") else f"{w:g}s"
