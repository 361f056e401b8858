"""The health gate of an iteration flow: its checks as a task, then — when one fails and health.action is ask — a
person's decision, asked in the Prefect UI (a run-input form on the paused or suspended flow run) or on the terminal
of a `metareward run`, with health.on_timeout when nobody answers; decisions are kept in the store
(metareward/pipeline/health_gate.py) so that a re-run does not ask again."""

from __future__ import annotations

import select
import sys
import threading
import time

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.flow_runs import suspend_flow_run
from prefect.input.run_input import RunInput, keyset_from_paused_state
from prefect.settings import get_current_settings
from prefect.states import Paused
from prefect.utilities.urls import url_for
from pydantic import Field

from metareward.artifacts.store import open_store
from metareward.config.campaign import CampaignConfig
from metareward.config.sections import HealthChoice
from metareward.host.stopping import raise_if_stopped, stop_requested, wait_unless_stopped
from metareward.inference.engines import close_shared_backends
from metareward.paper.report import HealthCheck, HealthCheckError, health_checks
from metareward.pipeline.health_gate import (
    CHECKS_PASSED,
    CHOICE_MEANING,
    CHOICES,
    Decision,
    decided,
    decision_key,
    parse_choice,
    record_decision,
    recorded_decision,
)
from metareward.placement.replicas import close_shared_pools

ANSWER_POLL_S = 2.0
"""Seconds between two reads of a paused flow run's state while it waits for a decision."""


class HealthDecision(RunInput):
    """The form the Prefect UI shows on a flow run paused by a failed health check."""

    decision: HealthChoice = Field(
        description="continue: train on the DPO set as it is; drop_judge_pairs: train on the actor pairs only; "
        "keep_model: skip this iteration's training (M_{t+1} = M_t); stop: stop the campaign before training.")
    note: str = Field(default="", description="Why (kept with the decision, logged to MLflow and the summary).")


@task(name="health", task_run_name="health iter-{iteration}", cache_policy=NO_CACHE)
def check_health(config: CampaignConfig, iteration: int, stages: dict[str, dict]) -> list[HealthCheck]:
    """The health checks of config.health on the iteration's stage statistics before it trains, each value logged
    with its threshold and each failed one as a warning; returns them."""
    checks = health_checks(config.health, stages)
    logger = get_run_logger()
    logger.info("health before training iteration %d: %s", iteration,
                "; ".join(map(str, checks)) or "no check applies (no judgments or verdicts)")
    for check in checks:
        if check.failed:
            logger.warning("health check: %s", check.problem)
    return checks


def health_gate(config: CampaignConfig, iteration: int, checks: list[HealthCheck], data: dict[str, list[str]],
                audit_link: str | None = None) -> Decision:
    """What iteration t does after its checks (`checks`) on the tables `data` (digests by stage): the decision
    already kept for these tables, if any; else continue when every check passed or health.action is warn, raise
    HealthCheckError when one failed and the action is stop, and with ask the decision of a person (kept in the
    store, so a re-run goes on without asking). A kept or given `stop` raises HealthCheckError too."""
    logger = get_run_logger()
    store = open_store(config.artifact_root)
    failed = [check for check in checks if check.failed]
    decision = recorded_decision(store, config.name, iteration, data)
    if decision is not None:
        logger.info("iteration %d: health decision taken earlier on these tables: %s", iteration, decision.summary())
    elif not failed:
        return decided("continue", iteration, CHECKS_PASSED, data, checks)
    elif config.health.action == "stop":
        raise HealthCheckError(f"iteration {iteration} failed its health checks, not training: "
                               + "; ".join(check.problem for check in failed))
    elif config.health.action == "warn":
        return decided("continue", iteration, "health.action warn", data, checks)
    else:
        decision = _ask(config, iteration, failed, data, audit_link)
        uri = record_decision(store, config.name, decision)
        logger.warning("iteration %d: health decision %s (kept in %s)", iteration, decision.summary(), uri)
    if decision.choice == "stop":
        raise HealthCheckError(
            f"iteration {iteration} failed its health checks and the decision is stop ({decision.decided_by}"
            f"{': ' + decision.note if decision.note else ''}), not training: "
            + "; ".join(check.problem for check in failed)
            + f". Delete {store.uri(decision_key(config.name, iteration))} to be asked again")
    return decision


def _ask(config: CampaignConfig, iteration: int, failed: list[HealthCheck], data: dict[str, list[str]],
         audit_link: str | None) -> Decision:
    """A person's decision: in the Prefect UI when the run talks to a Prefect server, on the terminal when the
    process has one (both at once when both are there), else — and when nobody answers within
    health.ask_timeout_s — health.on_timeout. The engines are released while the run waits."""
    logger = get_run_logger()
    health = config.health
    server = get_current_settings().api.url is not None
    terminal = sys.stdin is not None and sys.stdin.isatty()
    if not server and not terminal:
        logger.warning("iteration %d failed its health checks and nobody can be asked (no Prefect server, no "
                       "terminal): health.on_timeout %s applies at once", iteration, health.on_timeout)
        return decided(health.on_timeout, iteration, "health.on_timeout (no Prefect server and no terminal to ask)",
                       data, failed)
    close_shared_backends()  # no engine holds a GPU while the run waits for a person
    close_shared_pools()
    flow_run = FlowRunContext.get().flow_run
    form = HealthDecision.with_initial_data(description=_form_description(iteration, failed, audit_link))
    key = f"health-iter-{iteration}"
    link = url_for(flow_run) if server else None
    where = " or ".join(filter(None, [f"in the Prefect UI ({link or 'the flow run ' + flow_run.name})" if server
                                      else None, "on this terminal" if terminal else None]))
    wait = f"up to {health.ask_timeout_s:.0f} s" if health.ask_timeout_s else "until answered"
    if server and not terminal and health.ask_timeout_s is None and flow_run.deployment_id \
            and not flow_run.parent_task_run_id:
        # Suspended, the run's process exits and its infrastructure (GPUs) is released; the answer reschedules it,
        # its finished tasks come from the cache, and this call returns the form's input.
        logger.warning("iteration %d failed its health checks: suspended until a decision is given %s", iteration,
                       where)
        answer = suspend_flow_run(wait_for_input=form, key=key)
        return decided(answer.decision, iteration, "the Prefect UI", data, failed, answer.note)
    logger.warning("iteration %d failed its health checks: waiting %s for a decision %s (health.on_timeout %s "
                   "then)", iteration, wait, where, health.on_timeout)
    answer, by = _pause_for_answer(flow_run.id, form, key, health.ask_timeout_s, health.on_timeout,
                                   _terminal_prompt(iteration, failed, link) if terminal else None)
    return decided(answer.decision, iteration, by, data, failed, answer.note)


def _pause_for_answer(flow_run_id, form: type[HealthDecision], key: str, timeout_s: float | None, on_timeout: str,
                      prompt: str | None) -> tuple[HealthDecision, str]:
    """Pause the flow run (its process waits: Prefect's blocking pause, with the form as its run input) until it is
    resumed — by the UI's form, by an answer typed on the terminal (`prompt` shown; None: no terminal) or, after
    timeout_s, with on_timeout — and return the answer and who gave it. A stop requested meanwhile (a cancel, SIGTERM)
    raises RunStopped."""
    state = Paused(reschedule=False, pause_key=key)  # no server-side deadline: on_timeout is applied here
    keyset = keyset_from_paused_state(state)
    state.state_details.run_input_keyset = keyset
    answered = {"by": None}
    lock = threading.Lock()

    def resume(decision: str, note: str, by: str) -> None:
        with lock, get_client(sync_client=True) as client:
            if answered["by"] is None and client.resume_flow_run(
                    flow_run_id, run_input={"decision": decision, "note": note}).status.value == "ACCEPT":
                answered["by"] = by

    with get_client(sync_client=True) as client:
        proposed = client.set_flow_run_state(flow_run_id, state)
        if not proposed.state.is_running():  # Running: this pause fired before and was answered
            form.save(keyset, flow_run_id=flow_run_id)
            if prompt is not None:
                threading.Thread(target=_read_terminal, args=(prompt, resume, lambda: answered["by"] is not None),
                                 name="health-terminal", daemon=True).start()
            deadline = time.monotonic() + timeout_s if timeout_s else None
            while not (current := client.read_flow_run(flow_run_id).state).is_running():
                if current.is_cancelling() or current.is_final() or stop_requested():
                    raise_if_stopped("waiting for a health decision")
                    raise RuntimeError(f"flow run left its pause as {current.name}: no health decision")
                if deadline is not None and time.monotonic() >= deadline:
                    resume(on_timeout, "", f"health.on_timeout after {timeout_s:.0f} s without an answer")
                    continue
                wait_unless_stopped(ANSWER_POLL_S)
    with lock:
        by = answered["by"] or "the Prefect UI"
        answered["by"] = by  # a terminal answer typed from now on is too late
    return form.load(keyset, flow_run_id=flow_run_id), by


def _read_terminal(prompt: str, resume, answered) -> None:
    """Show `prompt` on stderr and read answers from stdin until one names a decision (see parse_choice); resume the
    run with it. Stops reading once the run was answered elsewhere (`answered()`) or a stop was requested."""
    print(prompt, file=sys.stderr, flush=True)
    while not stop_requested() and not answered():
        ready, _, _ = select.select([sys.stdin], [], [], 1.0)
        if not ready:
            continue
        line = sys.stdin.readline()
        if not line:
            return
        parsed = parse_choice(line)
        if parsed is None:
            print(f"not a decision: {line.strip()!r}; type one of {', '.join(CHOICES)} (or 1-{len(CHOICES)}), "
                  "optionally followed by a note", file=sys.stderr, flush=True)
            continue
        resume(parsed[0], parsed[1], "the terminal")
        return


def _terminal_prompt(iteration: int, failed: list[HealthCheck], link: str | None) -> str:
    lines = [f"\niteration {iteration} failed its health checks:"]
    lines += [f"  - {check.problem}" for check in failed]
    lines.append("Decide here" + (f" or in the Prefect UI ({link})" if link else "") + ":")
    lines += [f"  {number} {choice}: {CHOICE_MEANING[choice]}" for number, choice in enumerate(CHOICES, 1)]
    lines.append("Type a decision (name or number), optionally followed by a note, then Enter:")
    return "\n".join(lines)


def _form_description(iteration: int, failed: list[HealthCheck], audit_link: str | None) -> str:
    """The markdown the Prefect UI shows above the decision form: the failed checks, the audit, the choices."""
    rows = "\n".join(f"| {check.metric} | {check.value:.1%} | {check.threshold:.1%} | `health.{check.setting}` |"
                     for check in failed)
    audit = f"\n\nLook at the judge first: [judge audit of iteration {iteration}]({audit_link})." if audit_link else ""
    choices = "\n".join(f"- **{choice}**: {meaning}" for choice, meaning in CHOICE_MEANING.items())
    return (f"### Iteration {iteration} failed its health checks\n\n| check | value | threshold | setting |\n"
            f"|---|---|---|---|\n{rows}{audit}\n\nDecide what the iteration does:\n\n{choices}")
