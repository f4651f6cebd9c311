"""Every table and line the CLI prints, and the study's dashboard note, rendered from the same
dictionaries `--json` prints (the read models in `status`, the finalizer's metrics, the
benchmarks' results). No I/O here, and no torch."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from typing import Any

import optuna

import hpo
from hpo import attrs
from hpo.search.status import search_over
from hpo.settings.config import StudyConfig
from hpo.settings.durations import format_duration


def time_note(deadline: Any) -> str:
    if deadline is None:
        return ""
    return f", time budget {format_duration(deadline.time_s)} ({format_duration(deadline.left())} left)"


def final_text(metrics: dict[str, Any], out_dir: Path, name: str) -> str:
    """What the finalizer reports: the test accuracy, each member, the ensemble's gain, the files."""
    lines = []
    ens = metrics["ensemble"]
    what = "one model" if ens["models"] == 1 else f"ensemble of {ens['models']}"
    tta = ", flip TTA" if ens["tta"] == "flip" else ""
    lines.append(
        f"test accuracy {describe_accuracy(metrics['test_accuracy'], metrics['test_ci95'])}, {what}{tta}  "
        f"(loss {metrics['test_loss']:.4f}, {metrics['test_images']} test images, {metrics['epochs']} epochs, "
        f"{metrics['wall_time_s']:.0f}s)"
    )
    for member in metrics["members"]:
        lines.append(
            f"  member trial {member['trial']} (val {member['value']:.4f}, seed {member['seed']}): "
            f"{describe_accuracy(member['test_accuracy'], member['ci95'])}, "
            + (
                f"trained in {member['train_time_s']:.0f}s"
                if member["trained_by"] == "final-train"
                else "its trial's own model, trained by the search"
            )
        )
    if ens["models"] > 1:
        lines.append(f"  gain of the ensemble over its best member: {100 * ens['gain_over_best_member']:+.2f} points")
    if ens["shrunk"]:
        lines.append(f"  {ens['shrunk']}")
    lines.append(
        f"wrote model.pt, metrics.json, confusion_matrix.png, learning_curve.png and misclassified.png "
        f"to {out_dir}, and uploaded them to study {name!r} in the artifact store"
    )
    return "\n".join(lines)


def _status_tail(summary: dict[str, Any]) -> list[str]:
    """The ETA, the time budget and the final result, when the study has them."""
    lines: list[str] = []
    clock = summary.get("time_budget")
    if not search_over(summary):
        how = (
            f"{len(summary['running'])} worker(s) at {format_duration(summary['mean_trial_s'])} per trial"
            if summary["running"]
            else "no worker is running"
        )
        if clock and summary["eta_s"] is not None and summary["eta_s"] > clock["left_s"]:
            # An ETA past the deadline reads as hours to go; the clock ends the search first.
            lines.append(f"  the clock ends this search before its {summary['remaining']} remaining trial(s) ({how})")
        else:
            eta = format_duration(summary["eta_s"])
            lines.append(f"  ETA {eta} for {summary['remaining']} remaining trial(s) ({how})")
    if clock:
        lines.append(
            f"  time budget {format_duration(clock['time_s'])}: deadline {clock['deadline']}, "
            + (f"{format_duration(clock['left_s'])} left" if clock["left_s"] else "over: no new trial starts")
        )
    if summary["final"]:
        final = summary["final"]
        members = final.get("members", [final["best_trial"]])
        what = f"trial {members[0]}" if len(members) == 1 else f"ensemble of trials {', '.join(map(str, members))}"
        if final.get("trial_models"):
            what += f" + the search's own model of trial(s) {', '.join(map(str, final['trial_models']))}"
        ci = f" (95% CI {final['test_ci95'][0]:.4f}-{final['test_ci95'][1]:.4f})" if final.get("test_ci95") else ""
        lines.append(
            f"  final-train: test accuracy {final['test_accuracy']:.4f}{ci}, {what}, "
            f"{final['epochs']} epochs, in {final['output_dir']}"
        )
    return lines


def status_text(summary: dict[str, Any]) -> str:
    clock, states = summary.get("time_budget"), summary["states"]
    lines = []
    if clock:  # the clock, not the count, ends a timed search: say so first
        left = f"{format_duration(clock['left_s'])} of {format_duration(clock['time_s'])} left"
        lines.append(
            f"study {summary['study']}: {left if clock['left_s'] else 'time budget spent'}, "
            f"{summary['started']} trials run ({states['COMPLETE']} complete, {states['PRUNED']} pruned, "
            f"{states['RUNNING']} running)"
        )
    lines += [
        f"study {summary['study']}  ({summary['direction']} {summary['metric']}, budget {summary['n_trials']} "
        f"finished trials of {summary['epochs_per_trial']} epochs{', or the time' if clock else ''})",
        "",
        "  state       trials",
    ]
    lines += [f"  {state:<10}{n:>7}" for state, n in summary["states"].items() if n or state in ("COMPLETE", "PRUNED")]
    lines += [_extension_line(extension) for extension in summary["extended"]]
    epochs = summary["epochs"]
    capped = clock and summary["finished"] < summary["n_trials"]  # a timed study that met its trial cap says so
    finished = f"{summary['finished']}" + (
        f" (the clock ends this search; {summary['n_trials']} is only a cap)" if capped else f"/{summary['n_trials']}"
    )
    lines += [
        "",
        f"  finished {finished}, pruned share {summary['pruned_share']:.0%}, "
        f"{epochs['saved_by_pruning']} epochs saved by pruning ({epochs['saved_share']:.0%} of "
        f"{epochs['trained'] + epochs['saved_by_pruning']})",
    ]
    if summary["best"]:
        best = summary["best"]
        lines.append(f"  best trial {best['number']}: {summary['metric']} {best['value']:.4f}")
        lines.append(
            "    "
            + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
        )
    for row in summary.get("running", []):
        age = "no heartbeat yet" if row["heartbeat_age_s"] is None else f"heartbeat {row['heartbeat_age_s']:.0f}s ago"
        lines.append(
            f"  running trial {row['number']}: epoch {row['epoch']}/{row['epochs']} on {row['host']} "
            f"pid {row['pid']} {row['device']}, {age}"
        )
    return "\n".join(lines + _status_tail(summary))


def _extension_line(extension: dict[str, Any]) -> str:
    """One `hpo extend` in the status: when, and what it raised."""
    when = datetime.datetime.fromtimestamp(extension["at"]).strftime("%Y-%m-%d %H:%M")
    trials = extension["n_trials"]
    changes = [f"trials {trials[0]} -> {trials[1]}"] if trials[0] != trials[1] else []
    changes += [f"time {format_duration(extension['time_s'])} from then"] if extension["time_s"] else []
    return f"  extended {when}: {', '.join(changes)}"


def studies_text(found: list[dict[str, Any]]) -> str:
    """`hpo studies` as a table."""
    rows = [("study", "metric", "finished", "best", "test acc", "running")]
    for study in found:
        best = "-" if study["best_value"] is None else f"{study['best_value']:.4f} (trial {study['best_trial']})"
        test = "-" if study["test_accuracy"] is None else f"{100 * study['test_accuracy']:.2f} %"
        metric, finished = (
            f"{study['direction'][:3]} {study['metric'] or '?'}",
            f"{study['finished']}/{study['n_trials'] or '?'}",
        )
        rows.append((study["study"], metric, finished, best, test, str(study["running"]) if study["running"] else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def best_text(found: dict[str, Any]) -> str:
    """`hpo best`: the trial, its value and its parameters, one per line."""
    lines = [
        f"best trial {found['number']} of study {found['study']}: {found['metric']} {found['value']:.4f} "
        f"({found['epochs']} epochs, {found['duration_s']}s)"
    ]
    for key, value in found["params"].items():
        lines.append(f"  {key:<13} {value:.4g}" if isinstance(value, float) else f"  {key:<13} {value}")
    return "\n".join(lines)


def bench_search_banner(time_s: float, fidelity_top: int, work_dir: Path) -> str:
    """What `hpo bench --search` is about to do, and where its figures go."""
    each = format_duration(time_s)
    fidelity = f", then {fidelity_top} finalists retrained for the fidelity report" if fidelity_top else ""
    return (
        f"hpo bench --search: {each} of search + final model, then {each} of the fixed notebook CNN{fidelity}; "
        f"the search's storage and outputs go to {work_dir}/, and each stage's figures to "
        f"{work_dir / 'bench-search.json'} as it ends"
    )


def bench_pruners_banner(time_s: float, n_pruners: int, seeds: int, work_dir: Path) -> str:
    """What `hpo bench --search T --pruners A,B` is about to do, and where its studies go."""
    return (
        f"hpo bench --pruners: {n_pruners} pruners x {seeds} seed(s), {format_duration(time_s)} of search each "
        f"(about {format_duration(time_s * n_pruners * seeds)}); the studies go to {work_dir}/"
    )


def bench_search_text(result: dict[str, Any], time_s: float, threads: int, device: str | None) -> str:
    """`hpo bench --search`: both accuracies, their paired test and the fidelity report."""
    lines: list[str] = []
    searched, fixed, pair = result["search"], result["fixed"], result["paired"]
    lines.append(f"{result['cpu']}, {threads} thread(s), {device or 'cpu'}")
    lines.append(f"at {format_duration(time_s)} each, scored once on the 10,000 test images:")
    lines.append(
        f"  {searched['study']} search ({searched['trials']} trials: {searched['complete']} complete, "
        f"{searched['pruned']} pruned) + final model of {len(searched['members'])} member(s) "
        f"(trials {', '.join(map(str, searched['members']))}, {searched['epochs']} epochs"
        + (f"; and trial models {', '.join(map(str, searched['trial_models']))}" if searched["trial_models"] else "")
        + "): "
        f"{describe_accuracy(searched['test_accuracy'], searched['test_ci95'])} in {searched['wall_time_s']:.0f}s"
    )
    lines.append(
        f"  fixed notebook CNN (32/64 filters, FC 512, Adam 1e-3), {fixed['epochs']} epochs, TTA {fixed['tta']}: "
        f"{describe_accuracy(fixed['test_accuracy'], fixed['test_ci95'])} in {fixed['wall_time_s']:.0f}s"
    )
    lines.append(f"  difference: {100 * result['difference']:+.2f} points")
    lines.append(
        f"  paired (McNemar, exact): {pair['only_search']} images only the search's model gets right, "
        f"{pair['only_fixed']} only the fixed CNN; p = {pair['p_value']:.3g}"
    )
    fid = result.get("fidelity")
    if fid:
        lines.append(
            f"fidelity: the top {len(fid['finalists'])} trials by the search's value, retrained with another seed "
            f"for the whole {fid['epochs']} epochs on the trial training split, scored on validation:"
        )
        for row in fid["finalists"]:
            picked = "  <- the finalizer's pick" if row["trial"] == fid["pick"] else ""
            lines.append(
                f"  trial {row['trial']:>4}  {row['state'].lower():<8} search {row['search_value']:.4f} at epoch "
                f"{row['search_epochs']}  retrained {row['retrained_value']:.4f}  ({row['seconds']:.0f}s){picked}"
            )
        lines.append(f"  Spearman's rho {fid['spearman']:.2f}; regret of the pick {100 * fid['regret']:.2f} points")
    return "\n".join(lines)


def bench_pruners_text(result: dict[str, Any], workers: int, device: str | None, each: str) -> str:
    """`hpo bench --search T --pruners A,B`: each run, then each pruner's means."""
    lines = [f"{result['cpu']}, {workers} worker(s), {device or 'the default device'}"]
    lines.append(
        f"{result['study']}: {each} of search per run, best {result['metric']} at the final horizon "
        "and the join rule's ensemble (validation; the test split is not read):"
    )
    if result.get("calibration_s") is not None:
        lines.append(
            f"  one horizon for every run: {result['horizon']} epochs, fitted to {each} from one calibration here "
            f"({result['calibration_s']:.1f}s per trial epoch)"
        )
    lines += [_pruner_run_line(run) for run in result["runs"]]
    lines += [_pruner_mean_line(row, result["pruners"][0]["pruner"]) for row in result["pruners"]]
    lines.append(f"options: {json.dumps(result['options'])}")
    return "\n".join(lines)


def _pruner_run_line(run: dict[str, Any]) -> str:
    """One pruner's run for one seed: its best value at the horizon, its trials and its epochs."""
    best = "no COMPLETE trial"
    if run["best_value"] is not None:
        best = f"best {run['best_value']:.4f} (trial {run['best_trial']})"
    if run.get("ensemble_value") is not None:
        best += f", ensemble {run['ensemble_value']:.4f} (trial(s) {', '.join(map(str, run['members']))})"
    return (
        f"  {run['pruner']:<19} seed {run['seed']:>3}  {best} at {run['horizon']} epochs; "
        f"{run['trials']} trials ({run['complete']} complete, "
        f"{run['pruned']} pruned, {run['failed']} failed), {run['epochs']} epochs, {run['wall_time_s']:.0f}s"
    )


def _pruner_mean_line(row: dict[str, Any], first: str) -> str:
    """One pruner over its seeds, and its seed-by-seed difference from the first pruner."""
    mean = "-" if row["mean_best"] is None else f"{row['mean_best']:.4f}"
    versus = "" if row["vs_first"] is None else f"; {100 * row['vs_first']:+.2f} points against {first}, seed by seed"
    ensemble, gap = row.get("mean_ensemble"), row.get("ensemble_vs_first")
    mean += "" if ensemble is None else f", mean ensemble {ensemble:.4f}"
    versus += "" if gap is None else f" (ensemble {100 * gap:+.2f})"
    return (
        f"  {row['pruner']:<19} mean best {mean} over {len(row['best_values'])} run(s), "
        f"{row['mean_trials']:.1f} trials, {row['mean_complete']:.1f} complete, {row['mean_epochs']:.0f} epochs{versus}"
    )


SEARCHED = {"final-train": "", "search": ", its trial's own model"}


def describe_accuracy(accuracy: float, ci95: list[float]) -> str:
    """ "93.61 % (95 % CI 93.12-94.07)": the headline figure with its Wilson interval, in percent."""
    return f"{100 * accuracy:.2f} % (95 % CI {100 * ci95[0]:.2f}-{100 * ci95[1]:.2f})"


def dashboard_note(cfg: StudyConfig, best: optuna.trial.FrozenTrial, metrics: dict[str, Any]) -> str:
    """The study's dashboard note: the final result first, so a final-trained study is obvious."""
    test, ens = metrics["test_accuracy"], metrics["ensemble"]
    params = "\n".join(
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in best.params.items()
    )
    others = "" if ens["trained"] == 1 else f", and {ens['trained'] - 1} more"  # retrained members
    which = (
        "the warm start the study file names, which no trial of the search beat on validation"
        if attrs.WARM_START in best.user_attrs
        else "the best of the search"
    )
    subset = (
        f"{cfg.budget.train_subset:,} images of the trial training split"
        if cfg.budget.train_subset
        else ("the trial training split")
    )
    return f"""## Final-trained: test accuracy {describe_accuracy(test, metrics["test_ci95"])}

Trial {best.number}, {which}{others}, retrained from scratch by `hpo final-train` for
{metrics["epochs"]} epochs on all {metrics["train_images"]:,} training images, then scored once on the untouched
{metrics["test_images"]:,}-image test split. {_note_policy(cfg, ens)}

| | |
|---|---|
{_note_table(cfg, best, metrics)}

Trials train the same recipe for {cfg.budget.epochs} epochs on {subset}, unless a pruner or the time
budget stops them; the final run adds the validation images to its training data.

### Params of the first member (trial {best.number})

| param | value |
|---|---|
{params}

Study artifacts: `confusion_matrix.png`, `learning_curve.png`, `misclassified.png`, `model.pt`,
`metrics.json`. Written {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, hpo {hpo.__version__},
code {metrics["git_revision"] or "unknown"}.
"""


def _note_table(cfg: StudyConfig, best: optuna.trial.FrozenTrial, metrics: dict[str, Any]) -> str:
    """The note's figures: validation and test, each member's own, the ensemble's gain, the weakest class."""
    val, test, ens = metrics["best_trial_value"], metrics["test_accuracy"], metrics["ensemble"]
    worst = min(metrics["per_class_accuracy"].items(), key=lambda kv: kv[1])
    what = "the final model" if ens["models"] == 1 else f"the ensemble of {ens['models']}"
    rows = [
        f"| validation {cfg.metric} of trial {best.number} | {val:.4f} |",
        f"| test accuracy of {what} | {describe_accuracy(test, metrics['test_ci95'])} |",
    ]
    rows += [
        f"| member: trial {r['trial']} (val {r['value']:.4f}, seed {r['seed']}{SEARCHED[r['trained_by']]}) | "
        f"{describe_accuracy(r['test_accuracy'], r['ci95'])} |"
        for r in metrics["members"]
    ]
    if ens["models"] > 1:
        rows.append(f"| gain of the ensemble over its best member | {100 * ens['gain_over_best_member']:+.2f} points |")
    if cfg.metric == "val_accuracy":
        rows.append(f"| gap, test minus validation | {100 * (test - val):+.2f} points |")
    rows.append(f"| weakest class | {worst[0]} ({worst[1]:.4f}) |")
    return "\n".join(rows)


def _note_policy(cfg: StudyConfig, ens: dict[str, Any]) -> str:
    """How the members were chosen and trained, and what shrank to fit the time."""
    chosen_by = ens.get("chosen_by") or f"the best trial by validation {cfg.metric}"
    policy = (
        f"Members chosen on the validation split: {chosen_by}. Each is retrained with its own seed and the "
        f"recipe its trial trained with; softmax outputs averaged"
        f"{', each image also with its mirror image' if ens['tta'] == 'flip' else ''}. "
        "Nothing was chosen by test accuracy."
    )
    if ens["from_search"]:
        policy += (
            f" The ensemble also holds the {ens['from_search']} trial model(s) the search trained (`[final] "
            "trial_models`): the models whose validation outputs chose the members, trained on the trial split."
        )
    if ens["shrunk"]:
        policy += f" The {ens['shrunk']}."
    return policy


def prediction_line(result: Any, as_json: bool) -> str:
    """One image's prediction (an inference.Prediction): a tab-separated line, or a JSON object."""
    if as_json:
        top_k = [{"label": c, "probability": p} for c, p in result.top]
        row = {"path": result.path, "label": result.label, "probability": result.probability, "top": top_k}
        return json.dumps({**row, "error": result.error})
    others = "  ".join(f"{c} {p:.4f}" for c, p in result.top[1:])
    return f"{result.path}\t{result.label}\t{result.probability:.4f}" + (f"\t{others}" if others else "")


def export_line(target: Path, fmt: str, input_text: str, n_classes: int) -> str:
    """What `hpo export` wrote: the file, its input (inference.input_text) and output, what its metadata holds."""
    return (
        f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB, {fmt}): input {input_text}, "
        f"output log-probabilities (N, {n_classes}); class names and normalisation in its metadata"
    )


def export_check_line(result: Any) -> str:
    """The exported model against the PyTorch model on the test split (an inference check result)."""
    return (
        f"check on the {result.images:,} test images: max |output difference| {result.max_diff:.2e}, "
        f"same class for {result.agree:.2%}"
    )


def export_mismatch(result: Any, fmt: str) -> str:
    return (
        f"the exported {fmt} model does not match the PyTorch model (max difference "
        f"{result.max_diff:.2e}, {result.agree:.2%} same class). Report this with the versions of "
        "torch and the runtime."
    )
