"""`metareward audit label`: a person's labels on an iteration's judge audit back into the campaign — kept beside the
audit, the judge's agreement with them printed for every labelled iteration (the judge's drift) and logged to MLflow."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import polars as pl
from rich.console import Console
from rich.table import Table

from cli.artifacts import add_artifact_root, campaign_store
from metareward.config.campaign import CampaignConfig
from metareward.pipeline.audit import audit_keys
from metareward.pipeline.audit_labels import agreement_by_iteration, keep_labels, label_agreement, load_labels
from metareward.pipeline.input_files import InputFileError
from metareward.tracking.campaign_log import log_label_agreement


def _label(arguments: argparse.Namespace) -> int:
    config = None
    if arguments.campaign.endswith((".yaml", ".yml")) and Path(arguments.campaign).is_file():
        config = CampaignConfig.from_yaml(arguments.campaign).with_environment()
        campaign, store = config.name, campaign_store(argparse.Namespace(artifact_root=config.artifact_root))
    else:
        campaign, store = arguments.campaign, campaign_store(arguments)
    key = audit_keys(campaign, arguments.iteration)["template"]
    if not store.exists(key):
        raise InputFileError(f"no judge audit of iteration {arguments.iteration} of {campaign} in {store.root} (its "
                             f"label template {store.uri(key)} is missing): run the iteration first")
    template = pl.read_csv(io.BytesIO(store.read_bytes(key)), infer_schema=False)
    labels = load_labels(arguments.file, template)
    estimates = label_agreement(labels, arguments.bootstrap, seed=arguments.iteration)
    print(f"{labels.height} of the {template.height} audited judgments labelled; kept in "
          f"{keep_labels(store, campaign, arguments.iteration, labels, estimates)}")
    agreement = agreement_by_iteration(store, campaign)
    table = Table(title=f"{campaign}: the judge's agreement with the audit labels (95% bootstrap CI over prompts)")
    for column in ("iteration", "labels", *estimates):
        table.add_column(column, justify="right")
    for iteration, kept in agreement.items():
        table.add_row(str(iteration), str(kept["labels"]), *(
            f"{kept[name]['value']:.3f} [{kept[name]['ci_low']:.3f}, {kept[name]['ci_high']:.3f}]"
            if name in kept else "" for name in estimates))
    Console().print(table)
    if config is not None and config.tracking.enabled:
        kept = store.read_bytes(audit_keys(campaign, arguments.iteration)["labels"]).decode()
        link = log_label_agreement(config, arguments.iteration, agreement[arguments.iteration], kept)
        print(f"MLflow: logged to {link}")
    else:
        print("not logged to MLflow: give the campaign's config file instead of its name to log the agreement "
              "(audit/… metrics on the iteration's run and, by iteration, on the campaign run)", file=sys.stderr)
    return 0


def add_audit_commands(commands: argparse._SubParsersAction) -> None:
    """Add `audit label` to the command line's subcommands."""
    audit = commands.add_parser("audit", help="the judge audit of each iteration")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    label = audit_commands.add_parser(
        "label", help="a person's labels on an iteration's audited judgments: the judge's agreement with them",
        description="Read FILE — the iteration's label template (audit/labels-template.csv beside its audit) with "
        "the label column filled: right / wrong, or the 0-5 score the judgment should have given; empty labels are "
        "skipped — keep it beside the audit, and print the judge's agreement with it (with bootstrap 95%% CIs over "
        "prompts) for every iteration labelled so far. Given the campaign's config file, the agreement is also "
        "logged to MLflow: audit/... metrics on the iteration's run and, by iteration, on the campaign run.")
    label.add_argument("campaign", help="campaign name (its store: --artifact-root), or its config file (store and "
                                        "MLflow from the config)")
    label.add_argument("file", help="the labels: CSV or JSONL with judgment_id and label")
    label.add_argument("--iteration", type=int, required=True, help="the audited iteration")
    label.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of prompts (default 1000)")
    add_artifact_root(label)
    label.set_defaults(handler=_label)
