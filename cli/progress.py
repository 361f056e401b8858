"""Terminal progress bars per stage and the end-of-campaign summary table (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from metareward.inference.progress import add_request_listener, remove_request_listener, stage_label
from metareward.pipeline.jobs import Job, JobResult, add_job_listener, remove_job_listener
from metareward.pipeline.summary import SUMMARY_HEADER, decision_text, iteration_title, summary_rows, win_rate_text

console = Console(stderr=True)


class StageProgress:
    """One bar per (iteration, stage). A stage that calls the model counts its requests — the bar's total grows
    as each shard announces its requests and advances as each one finishes; the others count their jobs. The
    note says how many shards are done and how many of them were found cached."""

    def __init__(self):
        self._progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[unit]:<9}"), TextColumn("{task.fields[note]}"),
                                  TimeElapsedColumn(), console=console)
        self._bars: dict[str, int] = {}
        self._shards: dict[str, list[int]] = {}

    def __enter__(self) -> StageProgress:
        self._progress.start()
        add_job_listener(self.job_finished)
        add_request_listener(self.requests)
        return self

    def __exit__(self, *exc) -> None:
        remove_request_listener(self.requests)
        remove_job_listener(self.job_finished)
        self._progress.stop()

    def _bar(self, label: str) -> int:
        if label not in self._bars:
            self._bars[label] = self._progress.add_task(label, total=0, unit="jobs", note="")
            self._shards[label] = [0, 0]
        return self._bars[label]

    def requests(self, label: str, expected: int, done: int, tokens: int = 0) -> None:
        """Grow and advance the bar of the stage whose requests these are (a request listener); the first
        request turns a bar of jobs into one of requests."""
        bar = self._bar(label)
        task = self._progress.tasks[bar]
        if task.fields["unit"] == "jobs":
            self._progress.update(bar, total=expected, completed=done, unit="requests")
        else:
            self._progress.update(bar, total=(task.total or 0) + expected, advance=done)

    def job_finished(self, job: Job, result: JobResult) -> None:
        """Count the job's shard as done (a job listener); a stage that made no request advances by its jobs."""
        label = stage_label(job.stage, job.iteration)
        bar = self._bar(label)
        shards = self._shards[label]
        shards[0] += 1
        shards[1] += result.cached
        if self._progress.tasks[bar].fields["unit"] == "jobs":
            self._progress.update(bar, total=job.shard_count, advance=1)
        cached = f", {shards[1]} cached" if shards[1] else ""
        self._progress.update(bar, note=f"{shards[0]}/{job.shard_count} shard(s){cached}")


def print_summary(campaign: str, outcomes: list[dict]) -> None:
    """A table per iteration of every stage's rows, parse failures, mean score, lengths and speed."""
    out = Console()
    for outcome in outcomes:
        models = ("base " if outcome["iteration"] == 0 else "M_t ") + f"{outcome['model_id']} → " + (
            "M_1 " if outcome["iteration"] == 0 else "M_t+1 ") + str(outcome["next_model_id"])
        table = Table(title=f"{campaign} — {iteration_title(outcome['iteration'])}  ({models})")
        for column in SUMMARY_HEADER:
            if column == "stage":
                table.add_column(column, no_wrap=True, min_width=14)
            else:
                table.add_column(column, justify="right")
        for row in summary_rows(outcome["stages"]):
            table.add_row(*row)
        _fit_log(out, table)
        out.print(table)
        if outcome.get("health_decision"):
            out.print("health: " + decision_text(outcome["health_decision"]).replace("**", ""), markup=False)
        if "win_rate" in outcome["stages"].get("win_rate", {}):
            out.print(f"M_t+1 against the reference: {win_rate_text(outcome['stages']['win_rate'])}")
    if outcomes:
        out.print(f"final model: {outcomes[-1]['next_model']}")


def _fit_log(out: Console, table: Table) -> None:
    """A terminal wraps the table to its width; a log (output not a terminal, e.g. a Prefect worker's or CI's) is
    widened to the table's natural width, not rich's 80 columns that would cut every header to "sco…"."""
    if not out.is_terminal:
        out.width = max(out.width, out.measure(table, options=out.options.update_width(1000)).maximum)
