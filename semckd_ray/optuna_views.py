"""A sweep as Optuna sees it: parameter importances and the optimization history, on the sweep's parent run.

After ``tuner.fit()``, ``semckd_ray.tune.summarize`` calls ``log_optuna_views``, which logs under
``optuna/`` of the parent run

- ``param_importances.csv``: columns ``param`` (the dotted config key), ``short`` (the name the
  trials' parameters go by in Tune's table and in the figures, ``tune.short_names``) and
  ``importance`` (fANOVA's share of the score's variance, seeded; they add up to 1), most important first;
- ``param_importances.png``: the same as a bar chart (``optuna.visualization.matplotlib``);
- ``history.png``: each trial's ``best_val_top1`` in the order the trials started, and the best so far;

and, per searched parameter, the metric ``importance/<short name>``. Where importances say nothing
(fewer than two completed trials, or a single searched parameter) the csv and its figure are left out
and the parent's tag ``optuna.param_importances`` says why; the history is drawn from one trial on.

The study is rebuilt from the trials' MLflow runs (their ``searched.*`` tags and score), not taken from
the ``OptunaSearch`` inside Tune's searcher: a resumed sweep's searcher holds only what Tune restored,
``ClusterLimiter`` and Tune's ``SearchGenerator`` wrap it, and its study names parameters by Tune's
flattened names. The runs are what the summary reports, after any resume. A completed trial is one
that trained (to its end, or until ASHA stopped it: the score Optuna itself was told) with a finite
score; failed ones are left out, as Optuna's importances leave them out.

Nothing here fails a sweep: an error is a warning, and the sweep's summary stands.
"""

from __future__ import annotations

import csv
import logging
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FOLDER = "optuna"
IMPORTANCES_CSV = "param_importances.csv"
IMPORTANCES_PNG = "param_importances.png"
HISTORY_PNG = "history.png"
NOTE_TAG = "optuna.param_importances"  # on the parent run, where the importances were left out
IMPORTANCE_METRIC = "importance/"  # + short name, on the parent run
COMPLETED = ("FINISHED", "STOPPED_EARLY")  # the summary's statuses of trials that trained
FANOVA_SEED = 0
DPI = 120


def distribution(spec):
    """The Optuna distribution of a ``tune.ParamSpec`` (randint's high is exclusive, as in Tune)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if spec.type == "choice":
        return CategoricalDistribution(list(spec.values))
    if spec.type == "randint":
        return IntDistribution(int(spec.low), int(spec.high) - 1)
    return FloatDistribution(spec.low, spec.high, log=spec.type == "loguniform")


def _value(text: str, dist) -> Any:
    """A searched value as its tag (``str(value)``) holds it, back in the distribution's type."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        for choice in dist.choices:
            if str(choice) == text:
                return choice
        raise ValueError(f"{text!r} is none of the choices {list(dist.choices)}")
    if isinstance(dist, IntDistribution):
        return int(float(text))
    return float(text)


def build_study(rows: list[dict[str, Any]], space: dict[str, Any], names: dict[str, str], metric: str = "best_val_top1"):
    """An Optuna study of the sweep's completed trials; returns ``(study, trials left out)``.

    ``rows``: the summary's rows (``searched.<dotted key>`` values as tagged, ``metric``, ``status``), in the
    order the trials started; ``space``: ``{dotted key: tune.ParamSpec}``; ``names``: ``{short name: dotted key}``.
    The study's parameters go by their short names.
    """
    import optuna

    dists = {short: distribution(space[key]) for short, key in names.items() if key in space}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory" line
    try:
        study = optuna.create_study(direction="maximize", study_name="sweep")
    finally:
        optuna.logging.set_verbosity(verbosity)
    left_out = 0
    for row in rows:
        score = row.get(metric)
        if row.get("status") not in COMPLETED or not isinstance(score, (int, float)) or not math.isfinite(score):
            left_out += 1
            continue
        try:
            params = {short: _value(str(row[f"searched.{names[short]}"]), dist) for short, dist in dists.items()}
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(score)))
        except (KeyError, ValueError) as exc:  # a trial of another search space (the file changed before --resume)
            log.info("trial %s left out of the Optuna study: %s", row.get("trial_id", "?"), exc)
            left_out += 1
    return study, left_out


def importances(study) -> dict[str, float]:
    """fANOVA's importance of each parameter (seeded: the same trials give the same numbers)."""
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    found = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=FANOVA_SEED))
    return {name: float(value) for name, value in found.items()}


def skip_reason(study) -> str | None:
    """Why importances would say nothing about ``study``, or None."""
    completed = len(study.trials)
    if completed < 2:
        return f"skipped: {completed} completed trial{'s' if completed != 1 else ''}, importances need at least 2"
    if len(study.trials[0].params) < 2:
        return "skipped: a single searched parameter has all the importance"
    return None


def write_views(study, names: dict[str, str], folder: Path) -> tuple[dict[str, float], str | None, list[Path]]:
    """Write the csv and figures of ``study`` into ``folder``; returns (importances by short name, note, files)."""
    import matplotlib

    from optuna.exceptions import ExperimentalWarning

    files: list[Path] = []
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), _agg(matplotlib):
        warnings.simplefilter("ignore", ExperimentalWarning)  # optuna.visualization.matplotlib is experimental
        from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

        found: dict[str, float] = {}
        note = skip_reason(study) if study.trials else "skipped: no completed trial"
        if note is None:
            found = importances(study)
            with open(folder / IMPORTANCES_CSV, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["param", "short", "importance"])
                for short, value in found.items():
                    writer.writerow([names.get(short, short), short, f"{value:.6g}"])
            files.append(folder / IMPORTANCES_CSV)
            from optuna.importance import FanovaImportanceEvaluator

            ax = plot_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=FANOVA_SEED),
                                        target_name="best_val_top1")
            files.append(_save(ax, folder / IMPORTANCES_PNG))
        if study.trials:
            ax = plot_optimization_history(study, target_name="best_val_top1")
            files.append(_save(ax, folder / HISTORY_PNG))
    return found, note, files


class _agg:
    """pyplot on the Agg backend while Optuna draws (no display is needed, none is opened)."""

    def __init__(self, matplotlib):
        self.matplotlib = matplotlib
        self.before = None

    def __enter__(self):
        import matplotlib.pyplot as plt

        self.before = self.matplotlib.get_backend()
        if self.before.lower() != "agg":
            plt.switch_backend("Agg")
        return self

    def __exit__(self, *exc):
        import matplotlib.pyplot as plt

        if self.before and self.before.lower() != "agg":
            try:
                plt.switch_backend(self.before)
            except Exception:  # an interactive backend that cannot start here: Agg stays
                pass
        return False


def _save(ax, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = ax.figure
    fig.set_size_inches(7, 4.5)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def log_optuna_views(client, parent_run_id: str, rows: list[dict[str, Any]], space: dict[str, Any],
                     names: dict[str, str]) -> dict[str, float]:
    """Build the study from ``rows`` (see ``build_study``) and log its views on the parent run; never raises.

    Returns the importances by short name (empty where they were left out or could not be computed).
    """
    try:
        study, _ = build_study(rows, space, names)
        with tempfile.TemporaryDirectory() as tmp:
            found, note, files = write_views(study, names, Path(tmp) / FOLDER)
            for path in files:
                client.log_artifact(parent_run_id, str(path), FOLDER)
        if note is not None:
            client.set_tag(parent_run_id, NOTE_TAG, note)
        for short, value in found.items():
            client.log_metric(parent_run_id, f"{IMPORTANCE_METRIC}{short}", value)
        return found
    except Exception as exc:  # the views are extras: the sweep's result stands without them
        from semckd_ray.tracking import redact

        log.warning("could not log Optuna's view of the sweep on run %s (%s: %s); the sweep's summary stands",
                    parent_run_id, type(exc).__name__, redact(str(exc))[:300])
        return {}
