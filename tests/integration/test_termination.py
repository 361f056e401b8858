"""SIGTERM from a scheduler (a Kubernetes eviction, a spot notice; a Prefect worker's cancel sends the same) while a
model stage runs on vLLM: the run ends within seconds, its engine's processes with it, finished shards stay
finished."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.integration.campaigns import cli_environment, start_cli, wait_for, write_config

pytestmark = pytest.mark.slow

EXIT_WITHIN_S = 30
"""How long the process may take to end after SIGTERM: Prefect's hooks, the engine's stop (SIGTERM to its process
group, SIGKILL after a grace), the held job's next check."""


def markers(root: Path) -> dict[str, str]:
    """finished_at of every job marker of the campaign, by path."""
    return {str(path.relative_to(root)): json.loads(path.read_text())["finished_at"]
            for path in root.glob("tiny/iter-*/*/*.json") if path.name != "manifest.json"}


def engine_processes(model: Path) -> list[int]:
    """Pids of the live vLLM server processes of `model` (its api_server and the engine core it starts)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().decode(errors="replace").split("\0")
            state = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any("vllm" in word for word in words) and str(model) in words:
            found.append(int(cmdline.parent.name))
    return found


def terminate_while_judging(tmp_path: Path, config: Path, env: dict[str, str], root: Path,
                            before_signal=lambda: None) -> tuple[str, float]:
    """Start the run with judgments' shard-0001 held as it starts (never let go) and SIGTERM the `metareward run`
    process (not its group: a scheduler signals the container's main process) once that job is held and another
    judging shard has finished (and before_signal() has run); its log and the seconds it took to end."""
    release = tmp_path / "never-released"
    held = {**env, "METAREWARD_INJECT_FAULT": f"judgments:shard-0001:hold={release}"}
    log = tmp_path / "terminated.log"
    process = start_cli(["run", str(config)], held, log)
    judgments = root / "tiny/iter-1/judgments"
    wait_for(lambda: release.with_name("never-released.started").exists() and list(judgments.glob("shard-*.json")),
             process, log, "judgments' shard-0001 held and another judging shard finished", timeout_s=600)
    before_signal()
    signalled_at = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=EXIT_WITHIN_S * 4)
    finally:
        if process.poll() is None:
            process.kill()
    seconds = time.monotonic() - signalled_at
    text = log.read_text()
    assert process.returncode != 0, text[-3000:]
    assert seconds < EXIT_WITHIN_S, f"the run took {seconds:.1f} s to end after SIGTERM:\n{text[-3000:]}"
    assert "terminat" in text and "Crashed" in text, text[-3000:]
    return text, seconds


def test_sigterm_mid_stage_leaves_no_vllm_server(tmp_path, tiny_model, vllm_python):
    root = tmp_path / "root"
    config = write_config(tmp_path, tiny_model, str(root),
                          inference={"backend": "vllm", "vllm_python": str(vllm_python), "verdict_mode": "forced",
                                     "max_model_len": 2048})
    env = cli_environment(tmp_path / "prefect")
    assert not engine_processes(tiny_model)
    running = []
    # The engine that generated the responses judges them too: it is up while judgments' shard-0001 is held.
    text, seconds = terminate_while_judging(tmp_path, config, env, root,
                                            before_signal=lambda: running.extend(engine_processes(tiny_model)))
    assert running, f"no vLLM server ran while judging:\n{text[-3000:]}"
    left = engine_processes(tiny_model)
    assert not left, f"vLLM processes {left} outlived the run ({seconds:.1f} s after SIGTERM):\n{text[-3000:]}"
    # Finished shards stay finished, nothing of the held job is written. That a re-run resumes from them is
    # tested for SIGTERM during DPO (test_training_resume.py) and for a cancel (test_deployments.py).
    finished_judgments = [key for key in markers(root) if "/judgments/" in key]
    assert 1 <= len(finished_judgments) < 3 and not any("shard-0001" in key for key in finished_judgments)
    assert not list(root.glob("tiny/iter-1/judgments/shard-0001-*"))
