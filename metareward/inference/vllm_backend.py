"""vLLM as the production engine: OpenAI-compatible servers started from vLLM's own virtual environment."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from metareward.host.devices import replica_devices, visible_gpus
from metareward.host.ports import free_port
from metareward.inference.base import BackendUnavailableError, InferenceError
from metareward.inference.openai_backend import OpenAIBackend

DEFAULT_VLLM_PYTHON = ".venv-vllm/bin/python"
"""Where `metareward` looks for vLLM's interpreter unless METAREWARD_VLLM_PYTHON or the config says otherwise.
vLLM cannot live beside Prefect (their fastapi pins conflict), so it has its own virtual environment."""


DIES_WITH_PARENT = "METAREWARD_ENGINE_DIES_WITH_PARENT"
"""Set by an engine replica's process (placement.replicas): its vLLM servers get SIGTERM when it dies, so that a
replica killed by the OOM killer leaves no server holding its GPUs for the replica that replaces it. Not set
elsewhere: Linux sends the signal when the *thread* that started the server ends, and a Prefect task thread may
end while the engine is meant to stay; a replica runs its jobs on the one thread it lives on."""


_KILL_WAIT_S = 60.0
"""How long stop() waits for SIGKILLed processes to end (the kernel frees their memory first)."""
_DEATH_WAIT_S = 5.0
"""How long a server that stopped answering is given to show it died."""


class VLLMServer:
    """One `vllm.entrypoints.openai.api_server` subprocess on 127.0.0.1: on the CPU, or on `devices` (the GPUs of its
    replicas, as the parent's CUDA_VISIBLE_DEVICES names them) with `data_parallel_size` replicas of
    `tensor_parallel_size` GPUs each, balanced by vLLM itself.

    Starts on construction and returns once /health answers; raises BackendUnavailableError with the tail
    of the server's log if it exits or is not ready within startup_timeout_s. stop() ends it (SIGTERM,
    then SIGKILL) and waits, so its GPU memory is free when stop() returns.
    """

    def __init__(
        self,
        python: str | Path,
        model_path: str | Path,
        served_model_name: str,
        dtype: str = "auto",
        max_model_len: int | None = None,
        seed: int = 0,
        devices: Sequence[str] = (),
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
        extra_args: Sequence[str] = (),
        log_path: str | Path | None = None,
        startup_timeout_s: float = 900.0,
        cpu_kv_cache_gib: int = 2,
    ):
        python = Path(python)
        if not python.exists():
            raise BackendUnavailableError(
                f"vLLM's Python {python} does not exist: create vLLM's own environment (README, 'vLLM') "
                "or set METAREWARD_VLLM_PYTHON / inference.vllm_python"
            )
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        command = [
            str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_path),
            "--served-model-name", served_model_name,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--dtype", dtype,
            "--seed", str(seed),
            "--enable-prefix-caching",
        ]
        if max_model_len:
            command += ["--max-model-len", str(max_model_len)]
        if tensor_parallel_size > 1:
            command += ["--tensor-parallel-size", str(tensor_parallel_size)]
        if data_parallel_size > 1:
            command += ["--data-parallel-size", str(data_parallel_size)]
        command += list(extra_args)
        environment = {**os.environ, "VLLM_NO_USAGE_STATS": "1",
                       "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        if devices:
            environment["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        else:
            # vLLM on CPU refuses to start without a KV-cache size, and per-request seeds crash with
            # chunked prefill there (PLATFORM.md).
            environment.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gib))
            command.append("--no-enable-chunked-prefill")
        self.log_path = Path(log_path) if log_path else Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-{self.port}.log"
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=environment, start_new_session=True,
            preexec_fn=_terminated_with_parent if os.environ.get(DIES_WITH_PARENT) else None,
        )
        self._wait_until_ready(startup_timeout_s)

    def _wait_until_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._close_log()
                raise BackendUnavailableError(
                    f"vLLM server exited with status {self.process.returncode} while starting; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(self.base_url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1.0)
        self.stop()
        raise BackendUnavailableError(
            f"vLLM server not ready after {timeout_s:.0f} s; last lines of {self.log_path}:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        """Whether the server process is still running."""
        return self.process.poll() is None

    def ended_within(self, seconds: float) -> bool:
        """Whether the server process has ended, or ends within `seconds`: a killed server refuses connections
        (its sockets are closed) a moment before it can be reaped, so a refusal alone does not show it alive."""
        try:
            self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return False
        return True

    def stop(self, grace_s: float = 30.0) -> None:
        """End the server and every process it started (vLLM's engine core and workers live in its process
        group and outlive a server that died on its own): SIGTERM, SIGKILL after `grace_s`, then wait up to
        a minute for the killed processes to be gone; idempotent."""
        group = self.process.pid
        if _group_alive(group):
            os.killpg(group, signal.SIGTERM)
            if not self._group_ended(grace_s):
                os.killpg(group, signal.SIGKILL)
                self._group_ended(_KILL_WAIT_S)
        self.process.wait()
        self._close_log()

    def _group_ended(self, within_s: float) -> bool:
        """Whether the server's process group has ended within `within_s` seconds (a killed process is still
        alive while the kernel frees its memory, which takes seconds for GBs)."""
        deadline = time.monotonic() + within_s
        while _group_alive(self.process.pid):
            if time.monotonic() >= deadline:
                return False
            self.process.poll()
            time.sleep(0.2)
        return True

    def _close_log(self) -> None:
        if not self._log.closed:
            self._log.close()


class VLLMBackend(OpenAIBackend):
    """vLLM servers (one per GPU, or one on CPU) driven through their OpenAI-compatible API with token-id
    prompts, `n`, per-request seeds and prefix caching; or an already running server at base_url.

    Forced verdicts use vLLM's `allowed_token_ids`. close() stops the servers this backend started.
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str | Path,
        python: str | Path | None = None,
        base_url: str | None = None,
        dtype: str = "auto",
        chat_template: str | None = None,
        max_model_len: int | None = None,
        seed: int = 0,
        replicas: int | None = None,
        tensor_parallel_size: int = 1,
        extra_args: Sequence[str] = (),
        max_concurrency: int = 64,
        max_retries: int = 3,
        timeout_s: float = 600.0,
        startup_timeout_s: float = 900.0,
        log_dir: str | Path | None = None,
    ):
        self.servers: list[VLLMServer] = []
        served_name = "metareward-model"
        replica_count = 1
        if base_url is None:
            python = Path(python or os.environ.get("METAREWARD_VLLM_PYTHON", DEFAULT_VLLM_PYTHON))
            layout = replica_devices(replicas, tensor_parallel_size, visible_gpus())
            replica_count = len(layout)
            log_path = Path(log_dir) / "vllm.log" if log_dir else None
            self.servers.append(VLLMServer(
                python, model_path, served_name, dtype, max_model_len, seed,
                devices=[device for replica in layout for device in replica],
                tensor_parallel_size=tensor_parallel_size, data_parallel_size=replica_count, extra_args=extra_args,
                log_path=log_path, startup_timeout_s=startup_timeout_s))
            base_urls = [self.servers[0].base_url]
        else:
            base_urls = [base_url]
            served_name = _served_model(base_url)
        if max_model_len is None:
            max_model_len = _max_model_len(base_urls[0], served_name)
        super().__init__(
            base_urls,
            served_name,
            tokenizer_path=model_path,
            chat_template=chat_template,
            max_concurrency=max_concurrency,
            max_retries=max_retries,
            timeout_s=timeout_s,
            max_model_len=max_model_len,
            choice_restriction="allowed_token_ids",
            extra_body={"return_token_ids": True},
        )
        self.engines = replica_count

    def _post(self, server: str, path: str, body: dict) -> dict | None:
        try:
            return super()._post(server, path, body)
        except BackendUnavailableError as error:
            dead = [s for s in self.servers if s.base_url == server and s.ended_within(_DEATH_WAIT_S)]
            if dead:
                raise BackendUnavailableError(
                    f"vLLM server {server} died (exit status {dead[0].process.returncode}); last lines of "
                    f"{dead[0].log_path}:\n{dead[0].log_tail()}"
                ) from error
            raise

    def prefix_cache_stats(self) -> tuple[float, float]:
        """(queried, hit) prompt tokens of vLLM's prefix cache, summed over the servers' /metrics."""
        queried = hits = 0.0
        for url in self.base_urls:
            text = httpx.get(url + "/metrics", timeout=10.0).text
            queried += _metric(text, "vllm:prefix_cache_queries_total")
            hits += _metric(text, "vllm:prefix_cache_hits_total")
        return queried, hits

    def alive(self) -> bool:
        """Whether the client is open and every server this backend started is still running."""
        return super().alive() and all(server.alive() for server in self.servers)

    def close(self) -> None:
        """Close connections and stop the servers this backend started (frees their GPU memory)."""
        super().close()
        for server in self.servers:
            server.stop()


def _metric(text: str, name: str) -> float:
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})?\s+([0-9.eE+-]+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(text))


def _served_model(base_url: str) -> str:
    try:
        models = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=10.0).json()["data"]
    except (httpx.HTTPError, KeyError, ValueError) as error:
        raise BackendUnavailableError(f"cannot reach the vLLM server at {base_url}: {error}") from None
    if not models:
        raise InferenceError(f"the vLLM server at {base_url} serves no model")
    return models[0]["id"]


def _max_model_len(base_url: str, served_name: str) -> int | None:
    try:
        models = httpx.get(base_url + "/v1/models", timeout=10.0).json()["data"]
    except (httpx.HTTPError, KeyError, ValueError):
        return None
    for model in models:
        if model.get("id") == served_name:
            return model.get("max_model_len")
    return None


def _group_alive(group: int) -> bool:
    """Whether a live (not zombie) process is left in the process group. Orphaned zombies are not counted:
    they hold no memory, and in a container whose init does not reap them they never go away."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return False


def _terminated_with_parent() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
