"""The `metareward` command line: run a campaign, show it, list and tidy its tables, evaluate models, check files.

It sits above the flows (cli → flows → tasks → metareward): `run` starts the campaign flow; the other
commands use the library alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from cli.artifacts import add_artifact_commands, add_artifact_root, campaign_store
from cli.audit import add_audit_commands
from cli.progress import StageProgress, print_summary
from metareward.artifacts.store import StoreError
from metareward.config.campaign import CampaignConfig, ConfigError
from metareward.inference.base import InferenceError
from metareward.paper.report import HealthCheckError
from metareward.pipeline.evaluation import EvaluationInputError
from metareward.pipeline.input_files import InputFileError, load_prompts
from metareward.pipeline.jobs import code_fingerprint, settings_digest
from metareward.pipeline.lease import LeaseError, lease_status
from metareward.pipeline.paper_tables import paper_tables
from metareward.pipeline.stages import MODEL_ROLES, SEED_STAGES, STAGES, why_not_run
from metareward.pipeline.summary import stored_outcomes
from metareward.preflight import check_evaluation, preflight
from metareward.tracking.campaign_log import catch_up
from metareward.tracking.tracker import TrackingError, check_tracking, log_evaluation
from metareward.training.models import ModelNotFoundError
from metareward.training.trainer import EmptyTrainingSetError


def _run(arguments: argparse.Namespace) -> int:
    config = CampaignConfig.from_yaml(arguments.config).with_environment()
    model = preflight(config, arguments.start_iteration, arguments.start_model)
    if arguments.start_iteration > 1 and not arguments.start_model:
        print(f"iteration {arguments.start_iteration} starts from M_{arguments.start_iteration} = {model} "
              f"(iteration {arguments.start_iteration - 1}'s checkpoint in the artifact store)", file=sys.stderr)
    _check_prefect_api()
    _prefect_defaults()
    # Prefect reads its settings when it is first imported: after the defaults above.
    from flows.campaign import campaign_flow
    from tasks.stopping import mark_cancelled, watch_for_cancel

    # Iteration 1 without --start-model starts from the flow's own choice: the seed model, or the seed SFT's
    # output when config has an sft section (preflight returned the base model it checked).
    from_model = model if arguments.start_model or arguments.start_iteration > 1 else ""
    # No worker watches this process: the UI's Cancel button is acted on by the flow run's own watcher.
    watched = campaign_flow.with_options(on_running=[watch_for_cancel])
    try:
        with StageProgress():
            outcomes = watched(config, start_iteration=arguments.start_iteration, start_model=from_model)
    except Exception:
        if not mark_cancelled():
            raise
        print(f"error: campaign {config.name!r} was cancelled from the Prefect UI; finished shards and checkpoints "
              "are kept: run it again to resume", file=sys.stderr)
        return 130
    print_summary(config.name, outcomes)
    return 0


def _show(arguments: argparse.Namespace) -> int:
    store = campaign_store(arguments)
    outcomes = stored_outcomes(store, arguments.campaign)
    if not outcomes:
        raise StoreError(f"no campaign {arguments.campaign!r} under {store.root} (stage manifests not found)")
    if arguments.paper:
        print(paper_tables(store, arguments.campaign), end="")
    else:
        print_summary(arguments.campaign, outcomes)
    status = lease_status(store, arguments.campaign)
    if status:
        print(status, file=sys.stderr)
    return 0


def _track(arguments: argparse.Namespace) -> int:
    config = CampaignConfig.from_yaml(arguments.config).with_environment()
    if not config.tracking.enabled:
        raise ConfigError(f"{arguments.config}: tracking.enabled is false, there is no MLflow record to complete")
    check_tracking(config)
    for line in catch_up(config):
        print(line)
    return 0


def _evaluate_agreement(arguments: argparse.Namespace) -> int:
    from metareward.pipeline.evaluation import evaluate_judge_agreement

    config = CampaignConfig.from_yaml(arguments.config).with_environment()
    check_evaluation(config, arguments.model, arguments.output)
    estimates, evaluation = evaluate_judge_agreement(config, arguments.rankings, arguments.model,
                                                     arguments.num_judgments, arguments.bootstrap)
    log_evaluation(config, evaluation)
    table = Table(title=f"judge agreement with {arguments.rankings} (95% bootstrap CI over prompts)")
    for column in ("statistic", "value", "95% CI"):
        table.add_column(column, justify="left" if column == "statistic" else "right")
    for name, estimate in estimates.items():
        table.add_row(name, f"{estimate.value:.3f}", f"[{estimate.low:.3f}, {estimate.high:.3f}]")
    Console().print(table)
    if arguments.output:
        payload = {name: estimate.as_dict() for name, estimate in estimates.items()}
        Path(arguments.output).write_text(json.dumps(payload, indent=2))
    return 0


def _evaluate_alpaca_eval(arguments: argparse.Namespace) -> int:
    from metareward.pipeline.evaluation import export_alpaca_eval

    config = CampaignConfig.from_yaml(arguments.config).with_environment()
    check_evaluation(config, arguments.model, arguments.output)
    load_prompts(arguments.prompts, arguments.column, "--column")
    evaluation = export_alpaca_eval(config, arguments.prompts, arguments.output, arguments.model, arguments.generator,
                                    arguments.column)
    log_evaluation(config, evaluation)
    outputs = evaluation.rows.to_dicts()
    print(f"{arguments.output}: {len(outputs)} answers in AlpacaEval's format (generator {outputs[0]['generator']!r})"
          if outputs else f"{arguments.output}: no prompts")
    return 0


def _evaluate_arena_hard(arguments: argparse.Namespace) -> int:
    from metareward.pipeline.arena_hard import export_arena_hard, load_arena_hard_questions

    config = CampaignConfig.from_yaml(arguments.config).with_environment()
    check_evaluation(config, arguments.model, arguments.output)
    questions = load_arena_hard_questions(arguments.questions)
    evaluation = export_arena_hard(config, arguments.questions, arguments.output, arguments.model, arguments.model_id)
    log_evaluation(config, evaluation)
    model_id = evaluation.rows["model_id"][0]
    print(f"{arguments.output}: answers to {len(questions.questions)} questions in Arena-Hard's {questions.layout!r} "
          f"format (model {model_id!r}, {evaluation.metrics['export/mean_tokens']:.0f} tokens per answer on average)")
    if Path(arguments.output).name != f"{model_id}.jsonl":
        print(f"Arena-Hard names a model by its answer file: put it at data/BENCH/model_answer/{model_id}.jsonl")
    return 0


def _check_prefect_api() -> None:
    """A Prefect server named by PREFECT_API_URL must answer /health in seconds (else the run would hang in
    Prefect's retries); without one, Prefect's local ephemeral API is started."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return
    try:
        httpx.get(url.rstrip("/") + "/health", timeout=10).raise_for_status()
    except httpx.HTTPError as error:
        raise ConfigError(f"PREFECT_API_URL {url} does not answer /health ({type(error).__name__}: {error}): start "
                          "the server (prefect server start), fix the URL, or unset it to use the local ephemeral API"
                          ) from None


def _prefect_defaults() -> None:
    # Prefect's ephemeral API takes 10-25 s to start on 2 cores; its default timeouts are 20-30 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # What metareward's own modules log (a training resumed from a checkpoint, …) goes to the run's log in the UI.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "metareward")


def _config_show(arguments: argparse.Namespace) -> int:
    config = CampaignConfig.from_yaml(arguments.config)
    sys.stdout.write(config.to_yaml())
    return 0


def _config_check(arguments: argparse.Namespace) -> int:
    from metareward.placement.resources import (
        ASSUMPTIONS,
        GB,
        architecture,
        campaign_estimates,
        first_load_host_bytes,
        problems,
        smallest_trainings,
        visible_gpu_memory,
    )

    config = CampaignConfig.from_yaml(arguments.config)
    arch = architecture(config.model.path, arguments.model_config, config.model.dtype)
    print(f"{config.name}: {config.model.path} — {arch.parameters / 1e9:.2f}B parameters, {arch.dtype_bytes} bytes "
          f"each ({arch.source})")
    estimates = campaign_estimates(config, arch)
    for estimate in estimates:
        parts = ", ".join(f"{name} {value / GB:.1f}" for name, value in estimate.parts.items())
        print(f"  {estimate.title}\n    per GPU ≈ {estimate.total / GB:.1f} GB ({parts} GB)")
        for note in estimate.notes:
            print(f"    {note}")
    needed = max(estimate.gpus for estimate in estimates)
    print(f"needs {needed} GPU(s) with ≥ {max(e.total for e in estimates) / GB:.0f} GB each")
    if arguments.gpus:
        gpus = [(f"given GPU {index}", arguments.gpu_memory * GB) for index in range(arguments.gpus)]
    else:
        gpus = visible_gpu_memory()
    print(f"checked against: {len(gpus)} GPU(s)" + (f" of {min(m for _, m in gpus) / GB:.0f} GB" if gpus else "")
          + (" (--gpus/--gpu-memory)" if arguments.gpus else " visible here"))
    found = problems(estimates, gpus)
    for problem in found:
        print(f"warning: {problem}")
    memory = min(m for _, m in gpus) if gpus else arguments.gpu_memory * GB
    largest_dpo = max((it.dpo for it in config.iterations), key=lambda dpo: (dpo.max_length or 0,
                                                                           dpo.per_device_batch_size))
    for size in smallest_trainings(arch, largest_dpo, memory, lora_rank=64):
        print(f"training, {size.what}: " + (
            f"≥ {size.gpus} GPU(s) of {memory / GB:.0f} GB (≈{size.per_gpu / GB:.1f} GB each"
            f"{', sharded' if size.gpus > 1 else ''}), "
            f"{size.nodes(arguments.gpus_per_node)} node(s) of {arguments.gpus_per_node}" if size.gpus else
            f"does not fit GPUs of {memory / GB:.0f} GB at global_batch_size {largest_dpo.global_batch_size}"))
    trainings = [("DPO", largest_dpo)] + ([("SFT", config.sft.training())] if config.sft else [])
    for kind, settings in trainings:
        host = first_load_host_bytes(arch, settings, arguments.gpus_per_node)
        print(f"host memory, {kind}: ≈ {host / GB:.0f} GB per node of {arguments.gpus_per_node} GPU(s) while M_t first "
              f"loads ({min(settings.num_processes, arguments.gpus_per_node)} rank(s) on the node, each holding the "
              "whole model on the host)")
        if arguments.host_memory is not None and host > arguments.host_memory * GB:
            found.append(f"{kind}: the first load needs ≈ {host / GB:.0f} GB of host memory per node, over the "
                         f"{arguments.host_memory:.0f} GB given (--host-memory)")
            print(f"warning: {found[-1]}")
    print("assumptions: " + "; ".join(ASSUMPTIONS))
    return 1 if found else 0


def _prompts_check(arguments: argparse.Namespace) -> int:
    prompt_set = load_prompts(arguments.file, column=arguments.column, column_setting="--column")
    print(f"{arguments.file}: {prompt_set.summary()}")
    return 0


def _stages(arguments: argparse.Namespace) -> int:
    config = CampaignConfig.from_yaml(arguments.config) if arguments.config else None
    if config:
        print(f"{config.name}, iteration {arguments.iteration}: each stage's settings as hashed into its cache key\n")
    for entry in STAGES:
        runs = "per shard" if entry.sharded else "once"
        runs += f", runs {MODEL_ROLES[entry.model]}" if entry.model else ""
        inputs = ", ".join(entry.inputs) or "(a file)"
        print(f"{entry.name}  <- {inputs}  ({runs})  code {code_fingerprint(entry.name)}")
        print(f"    {entry.summary}")
        if config:
            iteration = 0 if entry in SEED_STAGES else arguments.iteration
            reason = why_not_run(config, entry.name, iteration)
            if reason:
                print(f"    not run: {reason}")
                continue
            settings = entry.settings(config, iteration)
            shown = " ".join(f"{name}={json.dumps(value, default=_shown)}" for name, value in settings.items())
            print(f"    settings {settings_digest(settings)}: {shown or '(none)'}")
    return 0


def _shown(value):
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return f"{value.path} (content {value.digest})"


def _positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="metareward", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run",
        help="run (or resume) a campaign: Prefect's local API unless PREFECT_API_URL is set",
        description="Run a campaign. Re-running the same command resumes it: finished shards are read "
        "from the artifact store, never recomputed.",
    )
    run.add_argument("config", help="campaign YAML file")
    run.add_argument("--start-iteration", type=int, default=1, help="first iteration to run (default 1)")
    run.add_argument("--start-model", default=None,
                     help="model folder or checkpoint URI to start from (default: model.path for iteration 1, the "
                     "previous iteration's checkpoint in the artifact store for a later one)")
    run.set_defaults(handler=_run)

    show = commands.add_parser("show", help="a campaign's iterations, from the artifact store, and which run holds "
                                            "it now")
    show.add_argument("campaign", help="campaign name")
    add_artifact_root(show)
    show.add_argument("--paper", action="store_true",
                      help="print the paper's Table 1 (win rates, lengths), Table 5 (meta-judge biases) and Fig. 5 "
                           "(judge score shares) from the stored stages, as markdown")
    show.set_defaults(handler=_show)

    track = commands.add_parser(
        "track", help="log to MLflow what a campaign's finished iterations lack (after an MLflow outage)",
        description="Log each finished iteration of the campaign from the artifact store to MLflow as `run` would "
        "have: its one run (found again by its tags, or created), metrics, datasets, figures and models. Iterations "
        "already logged are left as they are, so running it twice changes nothing; an iteration the store holds only "
        "part of is not logged. For when a campaign said \"tracking degraded\" (running the campaign again does the "
        "same, its stages found in the store).")
    track.add_argument("config", help="campaign YAML file (where its artifacts and MLflow runs are)")
    track.set_defaults(handler=_track)

    evaluate = commands.add_parser("evaluate",
                                   help="evaluate a model: judge agreement, AlpacaEval 2 and Arena-Hard exports")
    evaluate_commands = evaluate.add_subparsers(dest="evaluate_command", required=True)
    agreement = evaluate_commands.add_parser(
        "agreement", help="judge agreement with labelled rankings (paper sec. 3.4), bootstrap 95%% CIs",
        description="Judge every labelled response N times with the paper's judge prompt, average the valid "
        "scores, and compare with the reference ranks: pairwise agreement (ties 0.5), agreement without ties, "
        "mean Spearman over prompts. Rankings file: JSONL/Parquet/CSV with prompt, response, rank (1 = best).")
    agreement.add_argument("config", help="campaign YAML file (engine, judge sampling, verdict mode, MLflow)")
    agreement.add_argument("--rankings", required=True, help="labelled rankings file")
    agreement.add_argument("--model", default=None, help="model or checkpoint URI to judge with (default: model.path)")
    agreement.add_argument("--num-judgments", type=int, default=None, help="N (default: the last iteration's)")
    agreement.add_argument("--bootstrap", type=_positive, default=1000,
                           help="bootstrap resamples for the 95%% CIs, at least 1 (default 1000)")
    agreement.add_argument("--output", default=None, help="also write the estimates as JSON here")
    agreement.set_defaults(handler=_evaluate_agreement)
    alpaca = evaluate_commands.add_parser(
        "alpaca-eval", help="write a model's answers in AlpacaEval's model-outputs format",
        description="Answer every prompt of a file once (the last iteration's actor sampling) and write "
        "[{instruction, output, generator}] JSON for AlpacaEval 2 (for Arena-Hard: evaluate arena-hard).")
    alpaca.add_argument("config", help="campaign YAML file (engine, sampling, MLflow)")
    alpaca.add_argument("--prompts", required=True, help="prompt file (JSONL/Parquet/CSV)")
    alpaca.add_argument("--output", required=True, help="JSON file to write")
    alpaca.add_argument("--model", default=None, help="model or checkpoint URI (default: model.path)")
    alpaca.add_argument("--generator", default=None, help="generator name (default: CAMPAIGN-DIGEST)")
    alpaca.add_argument("--column", default="prompt", help="prompt column (default: prompt)")
    alpaca.set_defaults(handler=_evaluate_alpaca_eval)
    arena_hard = evaluate_commands.add_parser(
        "arena-hard", help="write a model's answers to an Arena-Hard question file in Arena-Hard's answer format",
        description="Answer every question of an Arena-Hard question file (the last iteration's actor sampling; "
        "a multi-turn question turn by turn, each with the conversation so far) and write Arena-Hard's answer "
        "JSONL, one line per question keyed by its id, with the model's token counts. The question file's layout "
        "picks the format: {uid, prompt} (arena-hard-auto v2.0 and later) gives {uid, model, messages, metadata}, "
        "{question_id, turns} (its v0.1 release) gives {question_id, model_id, choices[].turns[], conv_metadata}. "
        "Arena-Hard names a model by its answer file: write to data/BENCH/model_answer/MODEL_ID.jsonl.")
    arena_hard.add_argument("config", help="campaign YAML file (engine, sampling, MLflow)")
    arena_hard.add_argument("--questions", required=True,
                            help="Arena-Hard question file (JSONL, e.g. data/arena-hard-v2.0/question.jsonl)")
    arena_hard.add_argument("--output", required=True, help="JSONL file to write")
    arena_hard.add_argument("--model", default=None, help="model or checkpoint URI (default: model.path)")
    arena_hard.add_argument("--model-id", default=None, help="model name in the answers (default: CAMPAIGN-DIGEST)")
    arena_hard.set_defaults(handler=_evaluate_arena_hard)

    config = commands.add_parser("config", help="campaign configuration files")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    config_show = config_commands.add_parser("show", help="validate a config and print it with every default filled in")
    config_show.add_argument("config", help="campaign YAML file")
    config_show.set_defaults(handler=_config_show)
    config_check = config_commands.add_parser(
        "check", help="estimate the GPU memory a config needs and check it against the GPUs",
        description="Estimate per-GPU memory of DPO (weights, gradients, optimizer states, reference, activations) "
        "and of the inference engines from the model's architecture, warn when it exceeds the visible GPUs "
        "(or the ones given with --gpus/--gpu-memory) and exit 1 then, and say how many GPUs and nodes training "
        "needs with full fine-tuning and with LoRA, and how much host memory a node needs while a training first "
        "loads the model (checked against --host-memory when given).")
    config_check.add_argument("config", help="campaign YAML file")
    config_check.add_argument("--model-config", default=None,
                              help="config.json of the model when model.path is a hub id not in the local cache")
    config_check.add_argument("--gpus", type=int, default=None, help="check against this many GPUs instead")
    config_check.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU with --gpus (default 80)")
    config_check.add_argument("--gpus-per-node", type=int, default=8,
                              help="GPUs per node, to say how many nodes a training needs (default 8)")
    config_check.add_argument("--host-memory", type=float, default=None,
                              help="GB of host memory per node: warn (exit 1) when a training's first load needs more")
    config_check.set_defaults(handler=_config_check)

    add_artifact_commands(commands)
    add_audit_commands(commands)

    stages = commands.add_parser(
        "stages", help="the stages of an iteration: inputs, code fingerprints, and a config's settings",
        description="Print the stage registry: what each stage reads, how it runs, the fingerprint of its code and "
        "(with a config) the settings hashed into its cache key for one iteration. A stage is recomputed when "
        "its settings, code fingerprint, input tables or model change.")
    stages.add_argument("config", nargs="?", help="campaign YAML file (optional)")
    stages.add_argument("--iteration", type=int, default=1, help="iteration whose settings to show (default 1)")
    stages.set_defaults(handler=_stages)

    prompts = commands.add_parser("prompts", help="prompt files")
    prompts_commands = prompts.add_subparsers(dest="prompts_command", required=True)
    check = prompts_commands.add_parser("check", help="validate a JSONL/Parquet/CSV prompt file")
    check.add_argument("file", help="prompt file")
    check.add_argument("--column", default="prompt", help="column holding the prompt text (default: prompt)")
    check.set_defaults(handler=_prompts_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; user errors print one clear message and exit with status 2."""
    arguments = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage reports from a pipeline's runs
    try:
        return arguments.handler(arguments)
    except (ConfigError, InputFileError, StoreError, InferenceError, EmptyTrainingSetError,
            HealthCheckError, TrackingError, EvaluationInputError, ModelNotFoundError, LeaseError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
