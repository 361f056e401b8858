"""Benchmark: the paper recipe's DPO time per campaign — TRL's default, precomputed reference log-probs, and ours
(precomputed and stopped at the kept epoch) — with peak memory, on the same data in one run.

The recipe (paper A.3) trains 10 epochs in each of 4 iterations and keeps epochs 6, 4, 2 and 2. Before, every
iteration trained all 10 epochs and saved a checkpoint each epoch; now training stops at the kept epoch with
the learning-rate schedule of the 10-epoch run (the same weights). The 10-epoch runs are measured once and
counted four times (the iterations differ only in which epoch is kept); the stopped runs are measured for
epochs 6, 4 and 2 (2 counted twice). Each run is a fresh process, so peak memory is its own (GPU: max
allocated; CPU: max RSS).

Run: python benchmarks/dpo.py [--model tiny|smollm2|random-1b|PATH] [--pairs 128] [--words 60]
Target: the recipe's DPO time per campaign >= 2.5x less than before; precomputing >= 1.3x over 10 epochs.

With --ray, the Ray Train path instead, on Ray's multi-node simulation (a head and two nodes of one CPU and one
logical GPU each): pairs/s of a gang of 2 workers against a gang of 1 on the same global batch, and the time one
killed worker costs (the worker is killed once it is past step --kill-at) with checkpoints every --save-steps
steps against none (the gang then starts over), each as a share of an uninterrupted run.
Run: python benchmarks/dpo.py --ray --pairs 64 [--model tiny] [--save-steps 4] [--kill-at 26]

With --ray-gpu, on a machine with a GPU: today's path (one process, no Ray) against a Ray Train gang of one worker on
that GPU — sharing by ddp.yaml, by fsdp.yaml (FSDP2, full state dicts), and by fsdp-sharded.yaml with a checkpoint
every --save-steps steps, uninterrupted and with its worker killed past step --kill-at — as pairs/s in the training
loop and over the whole run, and the peak GPU memory NVML saw (sampled every 0.1 s: the CUDA context and the caching
allocator's reserve included, as a scheduler sees it).
Run: python benchmarks/dpo.py --ray-gpu --model random-1b --pairs 128 --save-steps 32 --kill-at 40 [--without-faults]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 10
KEPT = (6, 4, 2, 2)


def _dataset(pairs: int, words: int):
    import polars as pl

    from metareward.artifacts.tables import DPO_DATASET

    rows = [
        {"prompt_id": str(i), "prompt": [{"role": "user", "content": f"Question {i}: " + "explain this " * words}],
         "chosen": [{"role": "assistant", "content": "A short, direct answer. " * (words // 8 + 1)}],
         "rejected": [{"role": "assistant", "content": "rambling " * words}], "kind": "actor", "iteration": 1,
         "model_id": "bench"}
        for i in range(pairs)
    ]
    return pl.DataFrame(rows, schema=DPO_DATASET)


def _model(name: str, scratch: Path) -> Path:
    if name == "tiny":
        from metareward.training.models import build_tiny_model

        return build_tiny_model(scratch / "tiny")
    if name == "smollm2":
        from metareward.training.models import smollm2_model

        return smollm2_model()
    if name == "random-1b":
        return _random_llama(scratch / "random-1b")
    return Path(name)


def _random_llama(path: Path) -> Path:
    """A randomly initialised 0.85B Llama (852.6M parameters: 16 layers, hidden 2048, MLP 5632, 32k vocabulary,
    untied embeddings) with the tiny tokenizer grown to 32k entries by the config only; no weights are downloaded."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from metareward.training.models import build_tiny_model

    tokenizer_source = build_tiny_model(path.parent / "tokenizer-source")
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(path)
    return path


def _all_epochs_saved(model: str, data, settings, folder: Path, dtype: str) -> None:
    """What DPO did before it stopped at the kept epoch: all epochs trained, a checkpoint written each epoch,
    the kept one reloaded and saved as the new model."""
    import dataclasses

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    from metareward.training.process import dpo_arguments

    torch_dtype = getattr(torch, dtype)
    data.select("prompt", "chosen", "rejected").write_parquet(folder / "pairs.parquet")
    # Every epoch's checkpoint kept, as before (dpo_arguments now keeps only the latest: save_total_limit=1).
    arguments = dataclasses.replace(
        dpo_arguments(settings, folder / "runs", 0, torch_dtype, on_gpu=torch.cuda.is_available()),
        save_strategy="epoch", save_only_model=True, save_total_limit=None)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype), args=arguments,
                         train_dataset=Dataset.from_parquet(str(folder / "pairs.parquet")),
                         processing_class=AutoTokenizer.from_pretrained(model))
    trainer.train()
    kept = folder / "runs" / f"checkpoint-{trainer.state.global_step // EPOCHS * settings.checkpoint_epoch}"
    AutoModelForCausalLM.from_pretrained(kept, dtype=torch_dtype).save_pretrained(folder / "model")


def _one(setting: str, model: str, pairs: int, words: int, kept: int) -> dict:
    import torch

    from metareward.config.campaign import DPOConfig
    from metareward.training.trainer import train_dpo

    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    settings = DPOConfig(num_epochs=EPOCHS, checkpoint_epoch=kept, global_batch_size=8, per_device_batch_size=4,
                         max_length=1024, precompute_ref_log_probs=setting != "default")
    data = _dataset(pairs, words)
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        if setting == "stopped":
            train_dpo(model, data, settings, scratch, dtype=dtype)
        else:
            _all_epochs_saved(model, data, settings, Path(scratch), dtype)
        seconds = time.perf_counter() - started
    if torch.cuda.is_available():
        peak_gb = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"setting": setting, "kept": kept, "seconds": seconds, "peak_gb": peak_gb}


def _in_child(options: list[str]):
    """This script run with `options` in a child process (its own memory peak, no CUDA memory left in this one): the
    JSON of its last line of output; its error output is printed when it fails."""
    completed = subprocess.run([sys.executable, __file__, *options], capture_output=True, text=True, cwd=REPO)
    if completed.returncode != 0:
        print(completed.stderr[-6000:], file=sys.stderr)
        completed.check_returncode()
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    """Run each setting in its own process and print the recipe's DPO time per campaign and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--words", type=int, default=60)
    parser.add_argument("--one", choices=["default", "precomputed", "stopped"], help=argparse.SUPPRESS)
    parser.add_argument("--kept", type=int, default=EPOCHS, help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--ray", action="store_true", help="benchmark the Ray Train gang instead")
    parser.add_argument("--ray-gpu", action="store_true", help="the Ray Train gang against one process, on a GPU")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--without-faults", action="store_true", help="--ray-gpu without the checkpointed runs")
    parser.add_argument("--save-steps", type=int, default=4)
    parser.add_argument("--kill-at", type=int, default=26)
    arguments = parser.parse_args()
    if arguments.ray:
        _ray_train(arguments)
        return
    if arguments.in_process:
        print(json.dumps(_train_in_process(arguments.model_path, arguments.pairs, arguments.words)))
        return
    if arguments.ray_gpu:
        _ray_train_on_gpu(arguments)
        return
    if arguments.one:
        print(json.dumps(_one(arguments.one, arguments.model_path, arguments.pairs, arguments.words, arguments.kept)))
        return
    runs = [("default", KEPT[0]), ("precomputed", KEPT[0])] + [("stopped", kept) for kept in sorted(set(KEPT))]
    measured = {}
    with tempfile.TemporaryDirectory() as scratch:
        model = _model(arguments.model, Path(scratch))
        for setting, kept in runs:
            measured[setting, kept] = _in_child(["--one", setting, "--kept", str(kept), "--model-path", str(model),
                                                 "--pairs", str(arguments.pairs), "--words", str(arguments.words)])
            print(json.dumps(measured[setting, kept]), file=sys.stderr, flush=True)
    per_campaign = {
        "default": len(KEPT) * measured["default", KEPT[0]]["seconds"],
        "precomputed": len(KEPT) * measured["precomputed", KEPT[0]]["seconds"],
        "stopped": sum(measured["stopped", kept]["seconds"] for kept in KEPT),
    }
    labels = {"default": "TRL default: reference in memory, 10 epochs saved",
              "precomputed": "precomputed reference, 10 epochs saved",
              "stopped": "ours: precomputed, stopped at the kept epoch"}
    print(f"DPO of the paper recipe (4 iterations x {EPOCHS} epochs, kept {', '.join(map(str, KEPT))}), model "
          f"{arguments.model}, {arguments.pairs} pairs an iteration")
    # pairs/s: pairs trained (pairs x epochs) per second of whole runs (loading, reference, training, saving).
    print(f"{'setting':<50} {'epochs':>7} {'s / campaign':>13} {'pairs/s':>8} {'peak GB':>8}")
    for setting in ("default", "precomputed", "stopped"):
        epochs = sum(KEPT) if setting == "stopped" else EPOCHS * len(KEPT)
        peak = max(row["peak_gb"] for (name, _), row in measured.items() if name == setting)
        rate = arguments.pairs * epochs / per_campaign[setting]
        print(f"{labels[setting]:<50} {epochs:>7} {per_campaign[setting]:>13.1f} {rate:>8.2f} {peak:>8.2f}")
    print(f"stopped at the kept epoch vs all epochs saved (both precomputed): "
          f"{per_campaign['precomputed'] / per_campaign['stopped']:.2f}x less time (target >= 2.5x); "
          f"vs TRL default: {per_campaign['default'] / per_campaign['stopped']:.2f}x; "
          f"precomputing alone: {per_campaign['default'] / per_campaign['precomputed']:.2f}x")


def _gang_run(address: str, model: Path, data, workers: int, save_steps: int | None, kill_at: int | None,
              scratch: Path, sharing: str = "ddp", dtype: str = "float32", per_device: int = 2,
              keep: Path | None = None) -> tuple[float, float]:
    """Wall seconds of one gang training (its last rank killed once past step kill_at, when given), and the seconds
    its last attempt spent in the Trainer's training loop (train_runtime: no worker start, model load or reference
    log-probs). `sharing` names the accelerate config (deployments/accelerate/); the kept model is copied to `keep`
    when given."""
    import json as json_module
    import os
    import signal
    import threading

    from metareward.config.campaign import DPOConfig
    from metareward.placement.gang import GangTraining, train_on_cluster
    from metareward.training.checkpoints import CheckpointStore

    folder = Path(tempfile.mkdtemp(dir=scratch))
    settings = DPOConfig(num_epochs=2, global_batch_size=4, per_device_batch_size=per_device, max_length=1024,
                         num_processes=workers, save_steps=save_steps,
                         accelerate_config=str(REPO / "deployments" / "accelerate" / f"{sharing}.yaml"))
    training = GangTraining("dpo", str(model), data, settings, 0, dtype, None,
                            CheckpointStore(str(folder / "store"), "job/checkpoints"), "job/model")
    release = folder / "release"
    os.environ.pop("METAREWARD_INJECT_FAULT", None)
    if kill_at is not None:
        os.environ["METAREWARD_INJECT_FAULT"] = (f"checkpoint:all:step={kill_at}:rank={workers - 1}:"
                                                 f"hold={release}")
    started = time.perf_counter()
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(train_on_cluster(address, training, 300, 2)))
    thread.start()
    if kill_at is not None:
        held = release.with_name("release.started")
        while not held.exists() and thread.is_alive():
            time.sleep(0.1)
        os.kill(json_module.loads(held.read_text())["pid"], signal.SIGKILL)
    thread.join()
    os.environ.pop("METAREWARD_INJECT_FAULT", None)
    wall = time.perf_counter() - started
    result, uri = outcome[0]
    if keep is not None:
        shutil.copytree(uri, keep)
    shutil.rmtree(folder, ignore_errors=True)
    return wall, next(entry["train_runtime"] for entry in result.log_history if "train_runtime" in entry)


def _ray_train(arguments) -> None:
    """The Ray Train figures (see the module docstring)."""
    import ray
    from ray.cluster_utils import Cluster

    pairs = arguments.pairs
    data = _dataset(pairs, arguments.words)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
    try:
        with tempfile.TemporaryDirectory() as scratch:
            model = _model(arguments.model, Path(scratch))

            def run(workers: int, save_steps: int | None, kill_at: int | None) -> float:
                return _gang_run(cluster.address, model, data, workers, save_steps, kill_at, Path(scratch))

            one, two = run(1, None, None), run(2, None, None)
            kept = run(2, arguments.save_steps, arguments.kill_at)
            lost = run(2, None, arguments.kill_at)
    finally:
        ray.shutdown()
        cluster.shutdown()
    steps = 2 * pairs // 4
    print(f"DPO as a Ray Train gang, model {arguments.model}, {pairs} pairs x 2 epochs ({steps} steps of 4 pairs), "
          f"CPU workers (gloo)")
    print(f"{'run':<58} {'wall s':>7} {'train s':>8} {'pairs/s':>8}")
    for label, (wall, train) in (("1 worker", one), ("2 workers on 2 nodes", two),
                                 (f"2 workers, one killed past step {arguments.kill_at}, checkpoints every "
                                  f"{arguments.save_steps}", kept),
                                 (f"2 workers, one killed past step {arguments.kill_at}, no checkpoints", lost)):
        # A resumed run's training loop covers only the steps after its checkpoint: no pairs/s for it.
        rate = f"{2 * pairs / train:>8.2f}" if "killed" not in label else f"{'—':>8}"
        print(f"{label:<58} {wall:>7.1f} {train:>8.1f} {rate}")
    print(f"2 workers vs 1: {one[1] / two[1]:.2f}x the pairs/s in the training loop ({one[0] / two[0]:.2f}x wall, "
          f"with worker start, model load and reference log-probs); a killed worker costs "
          f"{kept[0] - two[0]:.1f} s ({(kept[0] - two[0]) / two[0]:.0%} of an uninterrupted run) with checkpoints, "
          f"{lost[0] - two[0]:.1f} s ({(lost[0] - two[0]) / two[0]:.0%}) without: "
          f"{(lost[0] - two[0]) / (kept[0] - two[0]):.2f}x more")


class _PeakGPUMemory:
    """The most memory in use on GPU 0, as NVML reports it (sampled every 0.1 s), above what was in use when the
    context opened: what the run inside took, its CUDA contexts and allocator reserve included."""

    def __enter__(self):
        import threading

        import pynvml

        pynvml.nvmlInit()
        device = pynvml.nvmlDeviceGetHandleByIndex(0)
        self._before = pynvml.nvmlDeviceGetMemoryInfo(device).used / 2**30
        self.peak_gb, self._done = 0.0, threading.Event()

        def sample() -> None:
            while not self._done.wait(0.1):
                used = pynvml.nvmlDeviceGetMemoryInfo(device).used / 2**30
                self.peak_gb = max(self.peak_gb, used - self._before)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def _in_process_run(model: Path, pairs: int, words: int) -> tuple[float, float]:
    """Today's path without Ray, on the settings of _gang_run (1 process, bf16), in a child process (so that this
    one keeps no CUDA memory for the gang runs that follow): wall and training-loop seconds."""
    return tuple(_in_child(["--in-process", "--model-path", str(model), "--pairs", str(pairs), "--words", str(words)]))


def _train_in_process(model: str, pairs: int, words: int) -> tuple[float, float]:
    from metareward.config.campaign import DPOConfig
    from metareward.training.trainer import train_dpo

    settings = DPOConfig(num_epochs=2, global_batch_size=4, per_device_batch_size=4, max_length=1024)
    data = _dataset(pairs, words)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        result = train_dpo(model, data, settings, folder, dtype="bfloat16")
        wall = time.perf_counter() - started
    return wall, next(entry["train_runtime"] for entry in result.log_history if "train_runtime" in entry)


def _largest_difference(first: Path, second: Path) -> float:
    """The largest absolute difference between two saved models' weights (float32)."""
    import torch
    from safetensors.torch import load_file

    def weights(folder: Path) -> dict:
        return {name: tensor for file in sorted(folder.glob("*.safetensors")) for name, tensor in
                load_file(str(file)).items()}

    a, b = weights(first), weights(second)
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[name].to(torch.float32) - b[name].to(torch.float32)).abs().max()) for name in a)


def _ray_train_on_gpu(arguments) -> None:
    """The Ray Train gang on a real GPU against today's one-process path (see the module docstring)."""
    import ray
    from ray.cluster_utils import Cluster

    pairs = arguments.pairs
    data = _dataset(pairs, arguments.words)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = _model(arguments.model, scratch)
        with _PeakGPUMemory() as peak:
            rows.append(("today's path: one process, no Ray", *_in_process_run(model, pairs, arguments.words), peak))
        print(rows[-1][:3], f"{peak.peak_gb:.2f} GiB", file=sys.stderr, flush=True)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 1,
                                                                 "include_dashboard": False})
        ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
        try:
            runs = [("gang of 1, ddp.yaml", "ddp", None, None), ("gang of 1, fsdp.yaml (FSDP2)", "fsdp", None, None)]
            if not arguments.without_faults:
                runs += [(f"gang of 1, fsdp-sharded.yaml, checkpoint every {arguments.save_steps}", "fsdp-sharded",
                          arguments.save_steps, None),
                         (f"the same, worker killed past step {arguments.kill_at}", "fsdp-sharded",
                          arguments.save_steps, arguments.kill_at)]
            for label, sharing, save_steps, kill_at in runs:
                keep = scratch / label.split(",")[-1].strip().replace(" ", "-")
                with _PeakGPUMemory() as peak:
                    wall, train = _gang_run(cluster.address, model, data, 1, save_steps, kill_at, scratch,
                                            sharing=sharing, dtype="bfloat16", per_device=4,
                                            keep=keep if sharing == "fsdp-sharded" else None)
                rows.append((label, wall, train, peak))
                print(rows[-1][:3], f"{peak.peak_gb:.2f} GiB", file=sys.stderr, flush=True)
            kept = sorted(p for p in scratch.iterdir() if p.name.startswith(("checkpoint-every", "worker-killed")))
        finally:
            ray.shutdown()
            cluster.shutdown()
        difference = _largest_difference(*kept) if len(kept) == 2 else float("nan")
    steps = 2 * pairs // 4
    print(f"DPO on one GPU, model {arguments.model}, {pairs} pairs x 2 epochs ({steps} steps of 4 pairs), bf16")
    print(f"{'run':<62} {'wall s':>7} {'train s':>8} {'pairs/s loop':>13} {'pairs/s run':>12} {'peak GiB':>9}")
    for label, wall, train, peak in rows:
        loop = f"{2 * pairs / train:>13.2f}" if "killed" not in label else f"{'—':>13}"
        print(f"{label:<62} {wall:>7.1f} {train:>8.1f} {loop} {2 * pairs / wall:>12.2f} {peak.peak_gb:>9.2f}")
    today, gang = rows[0], rows[1]
    print(f"gang of 1 (ddp.yaml) vs one process: {gang[1] / today[1]:.2f}x the wall time, "
          f"{gang[2] / today[2]:.2f}x the training loop's")
    if len(rows) == 5:
        print(f"a killed worker costs {rows[4][1] - rows[3][1]:.1f} s with checkpoints every {arguments.save_steps} "
              f"steps; its kept weights differ from the uninterrupted run's by at most {difference:.3g} (bf16)")


if __name__ == "__main__":
    main()
