"""The `metareward` command line: check configs and prompt files (campaign commands arrive with the pipeline)."""

from __future__ import annotations

import argparse
import sys

from metareward.config import CampaignConfig, ConfigError
from metareward.tables import PromptFileError, load_prompts


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

    config = commands.add_parser("config", help="campaign configuration files")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser("show", help="validate a config and print it with every default filled in")
    show.add_argument("config", help="campaign YAML file")
    show.set_defaults(handler=_config_show)

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
    except (ConfigError, PromptFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
