"""Terminal progress bars per stage and the end-of-campaign summary table (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from metareward.jobs import Job, JobResult
from metareward.summary import SUMMARY_HEADER, summary_rows

console = Console(stderr=True)


class StageProgress:
    """One bar per (iteration, stage), advanced as each shard finishes or is found cached."""

    def __init__(self):
        self._progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=console)
        self._bars: dict[tuple[int, str], int] = {}

    def __enter__(self) -> StageProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def update(self, job: Job, result: JobResult) -> None:
        """Advance the bar of the job's stage (a job listener: see jobs.add_job_listener)."""
        key = (job.iteration, job.stage)
        if key not in self._bars:
            self._bars[key] = self._progress.add_task(f"iter-{job.iteration} {job.stage}", total=job.shard_count,
                                                      note="")
        note = "cached" if result.cached else f"{result.table.rows} rows"
        self._progress.update(self._bars[key], advance=1, note=note)


def print_summary(campaign: str, outcomes: list[dict]) -> None:
    """A table per iteration of every stage's rows, parse failures, mean score, lengths and speed."""
    out = Console()
    for outcome in outcomes:
        table = Table(title=f"{campaign} — iteration {outcome['iteration']}  (M_t {outcome['model_id']} → "
                            f"M_t+1 {outcome['next_model_id']})")
        for column in SUMMARY_HEADER:
            if column == "stage":
                table.add_column(column, no_wrap=True, min_width=14)
            else:
                table.add_column(column, justify="right")
        for row in summary_rows(outcome["stages"]):
            table.add_row(*row)
        out.print(table)
    if outcomes:
        out.print(f"final model: {outcomes[-1]['next_model']}")
