"""Benchmark: batched Elo for a whole iteration (5,000 prompts × 11 judgments) against the per-prompt loop.

Run: python benchmarks/elo.py [--prompts 5000] [--judgments 11]
Prints both wall times, the speed-up, and the largest disagreement between the two. Target (issue 2): the
batched fit of a whole iteration in under 2 s on one core.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402  (thread limits must be set before numpy loads its BLAS)

from metareward.paper.elo import battle_matrices, elo_scores, elo_scores_batch, positional_weights  # noqa: E402


def iteration_battles(n_prompts: int, n_judgments: int, seed: int = 0) -> np.ndarray:
    """Battle matrices of a synthetic iteration: every ordered pair meta-judged once, with a positional bias."""
    rng = np.random.default_rng(seed)
    quality = rng.normal(size=(n_prompts, n_judgments))
    group, first, second = np.meshgrid(
        np.arange(n_prompts), np.arange(n_judgments), np.arange(n_judgments), indexing="ij"
    )
    keep = first != second
    group, first, second = group[keep], first[keep], second[keep]
    # P(first wins) = σ(q_first − q_second + 0.3): the meta-judge favours position A; 5% unparsed.
    p_first = 1.0 / (1.0 + np.exp(-(quality[group, first] - quality[group, second] + 0.3)))
    verdict = np.where(rng.random(group.size) < p_first, 1, -1)
    verdict[rng.random(group.size) < 0.05] = 0
    w1, w2 = positional_weights(int((verdict == 1).sum()), int((verdict == -1).sum()))
    return battle_matrices(group, first, second, verdict, n_prompts, n_judgments, w1, w2)


def main() -> None:
    """Time both fits on the same matrices and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=5000)
    parser.add_argument("--judgments", type=int, default=11)
    arguments = parser.parse_args()

    matrices = iteration_battles(arguments.prompts, arguments.judgments)
    start = time.perf_counter()
    batched = elo_scores_batch(matrices)
    batched_seconds = time.perf_counter() - start

    start = time.perf_counter()
    looped = np.stack([elo_scores(matrix) for matrix in matrices])
    loop_seconds = time.perf_counter() - start

    print(f"Elo fit, {arguments.prompts} prompts x {arguments.judgments} judgments, 1 thread")
    print(f"  batched       {batched_seconds:8.3f} s")
    print(f"  per-prompt    {loop_seconds:8.3f} s")
    print(f"  speed-up      {loop_seconds / batched_seconds:8.1f} x")
    print(f"  max |diff|    {np.abs(batched - looped).max():.2e}")
    print(f"  target (< 2 s batched): {'met' if batched_seconds < 2.0 else 'NOT met'}")


if __name__ == "__main__":
    main()
