"""Training resumes on this machine: checkpoints are kept in the artifact store every save_steps; a training process
killed mid-epoch (held at a step by METAREWARD_INJECT_FAULT until the test has killed it) resumes from the last
complete one, says so, and ends with the weights of an uninterrupted run — SFT called directly, DPO inside
`metareward run`; the checkpoints are gone once the job is recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from metareward.config.campaign import DPOConfig, SFTConfig
from metareward.pipeline.input_files import load_sft_examples
from metareward.training.checkpoints import COMPLETE_FILE, CheckpointStore
from metareward.training.trainer import train_dpo, train_sft
from tests.conftest import REPO
from tests.integration.campaigns import cli_environment, run_cli, start_cli, write_config
from tests.integration.test_training import dataset

pytestmark = pytest.mark.slow

SFT_EXAMPLES = REPO / "deployments" / "sft" / "eft-example.jsonl"


def wait_for(path: Path, process: subprocess.Popen, log: Path, timeout: float = 400) -> dict:
    """The hold's record once the held process wrote it; fails with the process's log if it ended first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)
    return json.loads(path.read_text())


def stored_steps(checkpoints: CheckpointStore) -> dict[int, bool]:
    """Each stored checkpoint's step and whether it is complete (the kept reference log-probs beside them aside)."""
    steps: dict[int, bool] = {}
    for key in checkpoints.store.list(checkpoints.prefix):
        if "/checkpoint-" not in key:
            continue
        step = int(key.split("checkpoint-")[1].split("/")[0])
        steps[step] = steps.get(step, False) or key.endswith(COMPLETE_FILE)
    return steps


def test_sft_killed_mid_epoch_resumes_from_its_checkpoint_with_the_weights_of_an_uninterrupted_run(
        tmp_path, tiny_model):
    examples = load_sft_examples(SFT_EXAMPLES).head(8)
    settings = SFTConfig(path="unused", num_epochs=2, checkpoint_epoch=None, global_batch_size=2,
                         per_device_batch_size=2, learning_rate=1e-3, max_length=2048, save_steps=2).training()
    checkpoints = CheckpointStore(str(tmp_path / "store"), "job/checkpoints")
    examples.write_parquet(tmp_path / "examples.parquet")
    release, log = tmp_path / "release", tmp_path / "killed.log"
    script = (
        "import polars as pl, sys\n"
        "from metareward.config.training import TrainingConfig\n"
        "from metareward.training.checkpoints import CheckpointStore\n"
        "from metareward.training.trainer import train_sft\n"
        f"train_sft({str(tiny_model)!r}, pl.read_parquet({str(tmp_path / 'examples.parquet')!r}),\n"
        f"          TrainingConfig.model_validate_json({settings.model_dump_json()!r}), {str(tmp_path / 'killed')!r},\n"
        f"          dtype='float32', checkpoints=CheckpointStore({checkpoints.root!r}, {checkpoints.prefix!r}))\n")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               env={**os.environ, "METAREWARD_INJECT_FAULT": f"sft:all:step=3:hold={release}"})
    held = wait_for(release.with_name("release.started"), process, log)
    assert held["pid"] == process.pid
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert stored_steps(checkpoints) == {2: True}  # step 3 was held before its save; save_steps=2 kept step 2

    resumed = train_sft(tiny_model, examples, settings, tmp_path / "resumed", dtype="float32", checkpoints=checkpoints)
    uninterrupted = train_sft(tiny_model, examples, settings, tmp_path / "whole", dtype="float32")
    assert resumed.resumed_from_step == 2 and uninterrupted.resumed_from_step == 0
    assert resumed.model_id == uninterrupted.model_id  # the same bytes: weights equal tensor by tensor
    steps = [entry["step"] for entry in resumed.log_history if "loss" in entry]
    assert steps == list(range(1, 9))  # the curve continues at step 3, with the killed run's steps 1–2 kept
    assert [e["loss"] for e in resumed.log_history if "loss" in e] == [
        e["loss"] for e in uninterrupted.log_history if "loss" in e]
    assert stored_steps(checkpoints) == {8: True}  # the latest only: older steps are removed as newer complete


def test_a_training_stopped_at_its_kept_epoch_keeps_no_checkpoint_past_it(tmp_path, tiny_model):
    """16 pairs in steps of 4: the kept epoch 2 of 3 ends at step 8. The checkpoint of step 8 is not kept (resumed
    from, the Trainer would train epoch 3 before stopping), so a training run again over the same checkpoints
    resumes from step 6 and ends with the same weights."""
    settings = DPOConfig(num_epochs=3, checkpoint_epoch=2, global_batch_size=4, per_device_batch_size=2,
                         learning_rate=1e-3, max_length=256, save_steps=2)
    checkpoints = CheckpointStore(str(tmp_path / "store"), "job/checkpoints")
    first = train_dpo(tiny_model, dataset(), settings, tmp_path / "first", dtype="float32", checkpoints=checkpoints)
    assert stored_steps(checkpoints) == {6: True}
    again = train_dpo(tiny_model, dataset(), settings, tmp_path / "again", dtype="float32", checkpoints=checkpoints)
    assert (first.resumed_from_step, again.resumed_from_step) == (0, 6)
    assert again.model_id == first.model_id and again.summary["epochs_trained"] == 2
    # The resumed DPO read the reference log-probs the first run kept instead of running the reference model again.
    assert (first.reference_reused, again.reference_reused) == (False, True)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_metareward_run_killed_during_dpo_resumes_from_the_checkpoint(tmp_path, tiny_model, how):
    """`metareward run` is SIGKILLed (its whole process group), or SIGTERMed (its main process alone, as a
    scheduler's eviction does: it must end within 30 s), while DPO holds at step 3; the next run resumes from the
    checkpoint of step 2, logs so, trains the model an uninterrupted DPO on the same pairs trains, and removes the
    checkpoints once the job is recorded."""
    overrides = {"dpo": {"num_epochs": 2, "global_batch_size": 2, "per_device_batch_size": 2, "max_length": 2048,
                         "learning_rate": 1e-4, "save_steps": 2}}
    config = write_config(tmp_path, tiny_model, str(tmp_path / "artifacts"), iteration_overrides=overrides)
    release, log = tmp_path / "release", tmp_path / "killed.log"
    env = cli_environment(tmp_path / "prefect", METAREWARD_INJECT_FAULT=f"checkpoint:all:step=3:hold={release}")
    process = start_cli(["run", str(config)], env, log)
    wait_for(release.with_name("release.started"), process, log)
    if how == "SIGKILL":
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    else:
        process.send_signal(signal.SIGTERM)
        signalled_at = time.monotonic()
        try:
            assert process.wait(timeout=120) != 0, log.read_text()[-3000:]
        finally:
            process.kill()
        assert time.monotonic() - signalled_at < 30, log.read_text()[-3000:]
        assert "aborted by a termination signal" in log.read_text(), log.read_text()[-3000:]
    stored = sorted((tmp_path / "artifacts").rglob(f"checkpoints/checkpoint-*/{COMPLETE_FILE}"))
    assert [path.parent.name for path in stored] == ["checkpoint-2"]

    rerun = run_cli(["run", str(config)], cli_environment(tmp_path / "prefect"))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "DPO resumes from the checkpoint of step 2" in rerun.stdout + rerun.stderr
    assert "DPO read the reference log-probs kept at" in rerun.stdout + rerun.stderr
    assert not list((tmp_path / "artifacts").rglob("checkpoints/*"))  # removed once the job was recorded
    marker = json.loads(next((tmp_path / "artifacts").rglob("checkpoint/all-*.json")).read_text())
    assert marker["stats"]["resumed_from_step"] == 2

    import polars as pl

    pairs = pl.read_parquet(next((tmp_path / "artifacts").rglob("dpo_dataset/all-*.parquet")))
    whole = train_dpo(tiny_model, pairs, DPOConfig(**overrides["dpo"]), tmp_path / "whole", seed=5, dtype="float32")
    assert marker["stats"]["model_id"] == whole.model_id


def test_a_stop_during_dpo_under_accelerate_launch_ends_every_rank_and_keeps_the_checkpoint(
        tmp_path, tiny_model, monkeypatch):
    """A stop (what a cancel or SIGTERM requests) while 2 ranks under `accelerate launch` train, rank 0 held after
    step 3: the launch is terminated, every rank has ended within 30 s, RunStopped is raised, and the checkpoint of
    step 2 stays in the store for the re-run."""
    from metareward.host import stopping

    monkeypatch.setattr(stopping, "_stop", threading.Event())  # this process's stop, for this test alone
    monkeypatch.setattr(stopping, "_reason", [])
    release = tmp_path / "release"
    monkeypatch.setenv("METAREWARD_INJECT_FAULT", f"checkpoint:all:step=3:hold={release}")
    settings = DPOConfig(num_epochs=2, num_processes=2, accelerate_config="deployments/accelerate/ddp.yaml",
                         global_batch_size=2, per_device_batch_size=1, learning_rate=1e-3, max_length=256,
                         save_steps=2)
    checkpoints = CheckpointStore(str(tmp_path / "store"), "job/checkpoints")
    outcome: dict[str, BaseException] = {}

    def train() -> None:
        try:
            train_dpo(tiny_model, dataset(8), settings, tmp_path / "out", dtype="float32", checkpoints=checkpoints)
        except BaseException as error:  # noqa: BLE001 (the test reads what ended the training)
            outcome["error"] = error

    thread = threading.Thread(target=train)
    thread.start()
    started, deadline = release.with_name("release.started"), time.monotonic() + 400
    while not started.exists():
        assert thread.is_alive(), outcome
        assert time.monotonic() < deadline, "rank 0 never reached step 3"
        time.sleep(0.1)
    rank_0 = json.loads(started.read_text())["pid"]
    stopping.request_stop("the test stops the run")
    stopped_at = time.monotonic()
    thread.join(timeout=120)
    assert not thread.is_alive() and time.monotonic() - stopped_at < 30
    assert isinstance(outcome.get("error"), stopping.RunStopped), outcome
    stat = Path(f"/proc/{rank_0}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", "rank 0 outlived the stop"
    assert stored_steps(checkpoints) == {2: True}
