"""A campaign's MLflow log as it runs and afterwards: each iteration's runs opened before its stages and logged from
the store after them — within seconds or not at all, so that an MLflow outage never fails or stalls model work
(what could not be logged is said: "tracking degraded: …") — and the catch-up (`metareward track`) that logs from
the store whatever an outage left out, without a second run of any iteration."""

from __future__ import annotations

from metareward.config.campaign import CampaignConfig
from metareward.config.sections import redact
from metareward.pipeline.manifests import stage_manifests
from metareward.pipeline.model_roles import starting_model
from metareward.pipeline.stages import SEED_STAGES, STAGES, stage, why_not_run
from metareward.pipeline.summary import iteration_title
from metareward.tracking.lineage import TAG
from metareward.tracking.record import logged_key
from metareward.tracking.tracker import Tracker, TrackingError, server_problem, tracking_target

HEALTH_TIMEOUT_S = 5.0
"""How long a tracking server has to answer /health before an iteration's tracking is given up: a server that is
down refuses at once, one that hangs is waited on this long, not for MLflow's retries of every call."""


class TrackingDegraded(TrackingError):
    """MLflow could not be used while a campaign ran; the message says what was not logged and how to log it."""


def start_iteration(config: CampaignConfig, iteration: int, model_digest: str, model_uri: str) -> dict[str, str] | None:
    """Open (or reopen, on a re-run) the campaign run and iteration t's nested run; their ids and where to see
    them (Tracker.run_link), or None when tracking is off. Raises TrackingDegraded — within HEALTH_TIMEOUT_S when
    the server does not answer, within one call's tracker.REQUEST_LIMITS when it fails mid-way — when MLflow cannot
    be used: the iteration then runs without a run, and `metareward track` logs it later."""
    if not config.tracking.enabled:
        return None
    try:
        tracker = _answering_tracker(config)
        parent = tracker.campaign_run()
        run = tracker.iteration_run(parent, iteration, model_digest, model_uri)
    # Whatever failed, the iteration's model work goes on; the catch-up raises the same error plainly.
    except Exception as error:  # noqa: BLE001
        raise _degraded(config, f"{iteration_title(iteration)} has no MLflow run from this campaign run", error
                        ) from error
    return {"campaign": parent, "iteration": run, "campaign_link": tracker.run_link(parent),
            "iteration_link": tracker.run_link(run)}


def finish_iteration(config: CampaignConfig, iteration: int, runs: dict[str, str], stages: list[str],
                     error: str | None = None) -> None:
    """Log the given finished stages of iteration t from the store (Tracker.log_iteration) and end its run:
    FAILED with the error's text, or FINISHED. The campaign run ends too when t failed (FAILED) or was the
    config's last (FINISHED). Raises TrackingDegraded (bounded as start_iteration) at the first call that fails,
    without trying the rest: the runs are left open for `metareward track` or a re-run to complete."""
    last = iteration == len(config.iterations)
    try:
        tracker = _answering_tracker(config)
        tracker.log_iteration(runs["campaign"], runs["iteration"], iteration, stages)
        failure = RuntimeError(error) if error else None
        tracker.end_run(runs["iteration"], failure)
        if failure is not None or last:
            tracker.end_run(runs["campaign"], failure)
    except Exception as problem:  # noqa: BLE001 — as in start_iteration
        left_open = f"run {runs['iteration']}" + (f" and the campaign run {runs['campaign']}" if last or error else "")
        raise _degraded(config, f"{iteration_title(iteration)} is not logged — its stages {', '.join(stages)}: "
                                f"metrics, datasets, figures, models — and {left_open} left open", problem
                        ) from problem


def catch_up(config: CampaignConfig) -> list[str]:
    """Log to MLflow what it lacks of the campaign's finished iterations, from the artifact store, as the campaign's
    own tracking would have: each iteration whose stages (those config runs in it) are all in the store gets its
    one run — found again by its tags, or created when an outage kept the campaign from opening it — with
    everything log_iteration logs, then ends FINISHED; one already logged and finished is left untouched; one
    the store holds only part of is not logged. The campaign run ends FINISHED once all of config's iterations
    are. Returns a line per iteration saying which it was. Raises TrackingError when MLflow cannot be used."""
    tracker = Tracker(config)
    manifests = stage_manifests(tracker.store, config.name)
    lines, complete, changed = [], True, False
    for iteration in ([0] if config.sft else []) + list(range(1, len(config.iterations) + 1)):
        title, stored = iteration_title(iteration), manifests.get(iteration, {})
        wanted = [entry.name for entry in STAGES if (entry in SEED_STAGES) == (iteration == 0)
                  and why_not_run(config, entry.name, iteration) is None]
        missing = [name for name in wanted if name not in stored]
        if missing:
            complete = False
            lines.append(f"{title}: not finished in {redact(tracker.store.root)} (no {', '.join(missing)}), not "
                         "logged: `metareward run` finishes it" if stored else f"{title}: not run yet")
            continue
        # The model the iteration trained from, as its run is tagged (whatever it was started from).
        digest = next(stored[name]["model_id"] for name in wanted if stage(name).writes_model)
        parent = tracker.existing_campaign_run()
        found = parent and tracker.existing_iteration_run(parent, iteration, digest)
        if found and found.info.status == "FINISHED" and found.data.tags.get(f"{TAG}.logged") == logged_key(
                {name: stored[name] for name in wanted}):
            lines.append(f"{title}: already logged (run {found.info.run_id})")
            continue
        parent = tracker.campaign_run()
        model_uri = config.model.path if iteration == 0 else starting_model(config, iteration, tracker.store)
        run = tracker.iteration_run(parent, iteration, digest, model_uri)
        tracker.log_iteration(parent, run, iteration, wanted)
        tracker.end_run(run)
        changed = True
        lines.append(f"{title}: logged ({'run reopened' if found else 'run created'}: {tracker.run_link(run)})")
    parent = tracker.existing_campaign_run()
    if complete and parent and (changed or tracker.client.get_run(parent).info.status != "FINISHED"):
        tracker.end_run(parent)
        lines.append(f"campaign run finished: {tracker.run_link(parent)}")
    return lines


def log_label_agreement(config: CampaignConfig, iteration: int, agreement: dict[str, dict], labels_csv: str) -> str:
    """Log a person's labels on iteration t's audit and the judge's agreement with them (audit/… metrics with their
    95% CIs, and the count `audit/labels`) on the iteration's run and, at step t, on the campaign run, where the
    charts show the judge drift over iterations; the labels as audit/labels.csv. Returns the iteration run's link.
    Raises TrackingError when MLflow cannot be used or the iteration has no run."""
    tracker = _answering_tracker(config)
    parent = tracker.existing_campaign_run()
    found = parent and tracker.client.search_runs(
        [tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}' AND tags.`{TAG}.iteration` = '{iteration}'",
        max_results=1, order_by=["attributes.start_time DESC"])
    if not found:
        raise TrackingError(f"{iteration_title(iteration)} of {config.name} has no MLflow run to log the labels to "
                            "(run the iteration, or `metareward track` it, first)")
    run_id = found[0].info.run_id
    metrics = {"audit/labels": float(agreement["labels"])}
    for name, estimate in agreement.items():
        if name != "labels":
            metrics |= {f"audit/{name}": estimate["value"], f"audit/{name}_ci_low": estimate["ci_low"],
                        f"audit/{name}_ci_high": estimate["ci_high"]}
    for run in (run_id, parent):
        for key, value in metrics.items():
            tracker.client.log_metric(run, key, value, step=iteration)
    tracker.client.log_text(run_id, labels_csv, "audit/labels.csv")
    return tracker.run_link(run_id)


def _answering_tracker(config: CampaignConfig) -> Tracker:
    """A Tracker, once the server (if any) answers /health within HEALTH_TIMEOUT_S; TrackingError otherwise."""
    problem = server_problem(tracking_target(config)[0], HEALTH_TIMEOUT_S)
    if problem:
        raise TrackingError(problem)
    return Tracker(config)


def _degraded(config: CampaignConfig, what: str, error: BaseException) -> TrackingDegraded:
    """'tracking degraded: WHAT …' with the error (no credentials, cut to 500 characters) and how to log it later."""
    uri = redact(tracking_target(config)[0])
    return TrackingDegraded(
        f"tracking degraded: {what} ({type(error).__name__}: {redact(str(error))[:500]}; MLflow at {uri}). "
        "The campaign goes on without it; once MLflow answers, `metareward track CONFIG` (this campaign's config) "
        "or running the campaign again logs it from the artifact store")
