"""Benchmark: DPO pairs/s and peak memory, TRL's default against our settings, on the same data in one run.

TRL's default keeps the reference model in memory and runs it on every step; ours precomputes the
reference log-probs once (`dpo.precompute_ref_log_probs`, default on), which pays off over the paper's
10 epochs. Each setting trains in a fresh process so peak memory is its own (GPU: max allocated; CPU:
max RSS).

Run: python benchmarks/dpo.py [--model tiny|smollm2|PATH] [--pairs 64] [--epochs 10] [--words 60]
On a GPU (e.g. a random ~1B Llama: --model random-1b) the issue's target is >= 1.3x over 10 epochs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _dataset(pairs: int, words: int):
    import polars as pl

    from metareward.tables import DPO_DATASET

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
        from metareward.models import build_tiny_model

        return build_tiny_model(scratch / "tiny")
    if name == "smollm2":
        from metareward.models import smollm2_model

        return smollm2_model()
    if name == "random-1b":
        return _random_llama(scratch / "random-1b")
    return Path(name)


def _random_llama(path: Path) -> Path:
    """A randomly initialised ~1.2B Llama (16 layers, hidden 2048, 32k vocabulary) with the tiny tokenizer
    grown to 32k entries by the config only; no weights are downloaded."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from metareward.models import build_tiny_model

    tokenizer_source = build_tiny_model(path.parent / "tokenizer-source")
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(path)
    return path


def _one(setting: str, model: str, pairs: int, epochs: int, words: int) -> dict:
    import torch

    from metareward.config import DPOConfig
    from metareward.training import train_dpo

    precompute = setting == "ours"
    settings = DPOConfig(num_epochs=epochs, global_batch_size=8, per_device_batch_size=4, max_length=1024,
                         precompute_ref_log_probs=precompute)
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        result = train_dpo(model, _dataset(pairs, words), settings, scratch,
                           dtype="bfloat16" if torch.cuda.is_available() else "float32")
        seconds = time.perf_counter() - started
    runtime = next(entry["train_runtime"] for entry in result.log_history if "train_runtime" in entry)
    if torch.cuda.is_available():
        peak_gb = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"setting": setting, "train_seconds": runtime, "total_seconds": seconds, "peak_gb": peak_gb,
            "pairs_per_second": pairs * epochs / runtime, "loss_last": result.summary.get("loss_last")}


def main() -> None:
    """Train with both settings in separate processes and print pairs/s, peak memory and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--words", type=int, default=60)
    parser.add_argument("--one", choices=["default", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.one:
        print(json.dumps(_one(arguments.one, arguments.model_path, arguments.pairs, arguments.epochs, arguments.words)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        model = _model(arguments.model, Path(scratch))
        results = []
        for setting in ("default", "ours"):
            command = [sys.executable, __file__, "--one", setting, "--model-path", str(model), "--pairs",
                       str(arguments.pairs), "--epochs", str(arguments.epochs), "--words", str(arguments.words)]
            output = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO).stdout
            results.append(json.loads(output.strip().splitlines()[-1]))
    print(f"DPO, model {arguments.model}, {arguments.pairs} pairs x {arguments.epochs} epochs")
    print(f"{'setting':<34} {'train s':>8} {'total s':>8} {'pairs/s':>8} {'peak GB':>8}")
    labels = {"default": "TRL default (reference in memory)", "ours": "ours (precomputed ref log-probs)"}
    for row in results:
        print(f"{labels[row['setting']]:<34} {row['train_seconds']:>8.1f} {row['total_seconds']:>8.1f} "
              f"{row['pairs_per_second']:>8.1f} {row['peak_gb']:>8.2f}")
    default, ours = results
    print(f"speed-up, training: {ours['pairs_per_second'] / default['pairs_per_second']:.2f}x; "
          f"end to end (incl. precompute, load, save): {default['total_seconds'] / ours['total_seconds']:.2f}x "
          f"(target >= 1.3x over 10 epochs)")


if __name__ == "__main__":
    main()
