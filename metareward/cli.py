"""The `metareward` command line: run a campaign, check configs and prompt files."""

from __future__ import annotations

import argparse
import os
import sys

from metareward.config import CampaignConfig, ConfigError
from metareward.evaluation import HealthCheckError
from metareward.execution import add_job_listener, remove_job_listener
from metareward.inference.base import InferenceError
from metareward.pipeline import preflight
from metareward.progress import StageProgress, print_summary, stored_outcomes
from metareward.store import ArtifactStore, StoreError
from metareward.tables import PromptFileError, load_prompts
from metareward.training import EmptyPreferenceSetError


def _run(arguments: argparse.Namespace) -> int:
    config = CampaignConfig.from_yaml(arguments.config).with_environment()
    preflight(config)
    _prefect_defaults()
    # The CLI is the one place in metareward that starts the orchestrator: flows import metareward, never
    # the reverse, so the import happens here, at run time.
    from flows.campaign import campaign_flow

    with StageProgress() as progress:
        add_job_listener(progress.update)
        try:
            outcomes = campaign_flow(config, start_iteration=arguments.start_iteration,
                                     start_model=arguments.start_model)
        finally:
            remove_job_listener(progress.update)
    print_summary(config.name, outcomes)
    return 0


def _show(arguments: argparse.Namespace) -> int:
    root = arguments.artifact_root or os.environ.get("METAREWARD_ARTIFACT_ROOT", "./artifacts")
    store = ArtifactStore(root)
    outcomes = stored_outcomes(store, arguments.campaign)
    if not outcomes:
        raise StoreError(f"no campaign {arguments.campaign!r} under {store.root} (stage manifests not found)")
    print_summary(arguments.campaign, outcomes)
    return 0


def _prefect_defaults() -> None:
    # Prefect's ephemeral API takes 10-25 s to start on 2 cores; its default timeouts are 20-30 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _config_show(arguments: argparse.Namespace) -> int:
    config = CampaignConfig.from_yaml(arguments.config)
    sys.stdout.write(config.to_yaml())
    return 0


def _prompts_check(arguments: argparse.Namespace) -> int:
    prompt_set = load_prompts(arguments.file, column=arguments.column)
    print(f"{arguments.file}: {prompt_set.summary()}")
    return 0


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
                     help="checkpoint URI to start from (default: model.path), e.g. a previous iteration's")
    run.set_defaults(handler=_run)

    show = commands.add_parser("show", help="a campaign's iterations, from the artifact store")
    show.add_argument("campaign", help="campaign name")
    show.add_argument("--artifact-root", default=None,
                      help="artifact root (default: $METAREWARD_ARTIFACT_ROOT or ./artifacts)")
    show.set_defaults(handler=_show)

    config = commands.add_parser("config", help="campaign configuration files")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    config_show = config_commands.add_parser("show", help="validate a config and print it with every default filled in")
    config_show.add_argument("config", help="campaign YAML file")
    config_show.set_defaults(handler=_config_show)

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
    try:
        return arguments.handler(arguments)
    except (ConfigError, PromptFileError, StoreError, InferenceError, EmptyPreferenceSetError,
            HealthCheckError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
