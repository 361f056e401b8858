"""The commands that read and tidy a campaign's artifact store: `tables` (the current tables' URIs) and `gc`."""

from __future__ import annotations

import argparse
import os
import sys

from metareward.artifacts.store import ArtifactStore, open_store
from metareward.pipeline.manifests import current_tables
from metareward.pipeline.superseded import collect_garbage, garbage


def campaign_store(arguments: argparse.Namespace) -> ArtifactStore:
    """The artifact store a command's --artifact-root names (default: $METAREWARD_ARTIFACT_ROOT, else ./artifacts)."""
    return open_store(arguments.artifact_root or os.environ.get("METAREWARD_ARTIFACT_ROOT", "./artifacts"))


def _tables(arguments: argparse.Namespace) -> int:
    for _, _, table in current_tables(campaign_store(arguments), arguments.campaign, arguments.iteration,
                                      arguments.stage):
        print(table.uri)
    return 0


def _gc(arguments: argparse.Namespace) -> int:
    store = campaign_store(arguments)
    found = (garbage if arguments.dry_run else collect_garbage)(store, arguments.campaign)
    verb = "would remove" if arguments.dry_run else "removed"
    for key in found.keys:
        print(store.uri(key))
    for folder in found.folders:
        print(store.uri(folder) + "/")
    print(f"{arguments.campaign}: {verb} {len(found.keys)} superseded file(s) and {len(found.folders)} superseded "
          f"model/checkpoint folder(s), {found.size / 1e6:.1f} MB", file=sys.stderr)
    return 0


def add_artifact_root(parser: argparse.ArgumentParser) -> None:
    """The --artifact-root option of the commands that read a campaign from its store (see campaign_store)."""
    parser.add_argument("--artifact-root", default=None,
                        help="artifact root (default: $METAREWARD_ARTIFACT_ROOT or ./artifacts)")


def add_artifact_commands(commands: argparse._SubParsersAction) -> None:
    """Add `tables` and `gc` to the command line's subcommands."""
    tables = commands.add_parser(
        "tables", help="the URIs of a campaign's current tables, one per line",
        description="Print the URI of every current table of a campaign (the shards its stage manifests list), one "
        "per line, in iteration, stage and shard order. A glob of a stage's folder reads the same tables; in Python, "
        "metareward.pipeline.manifests.read_stage(ROOT, CAMPAIGN, STAGE, iteration=T) reads them into polars.")
    tables.add_argument("campaign", help="campaign name")
    tables.add_argument("stage", nargs="?", default=None, help="only this stage (e.g. judgments)")
    tables.add_argument("--iteration", type=int, default=None, help="only this iteration")
    add_artifact_root(tables)
    tables.set_defaults(handler=_tables)

    gc = commands.add_parser(
        "gc", help="remove a campaign's superseded tables and models",
        description="Remove the tables a changed setting superseded (kept under CAMPAIGN/_superseded/ so that a "
        "setting changed back finds them) and the model and checkpoint folders of superseded training jobs. Current "
        "tables, and the folders of a training still running, are never touched. MLflow model versions of a removed "
        "model keep their record but lose their files.")
    gc.add_argument("campaign", help="campaign name")
    gc.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    add_artifact_root(gc)
    gc.set_defaults(handler=_gc)
