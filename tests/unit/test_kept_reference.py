"""The reference log-probs kept beside a DPO's checkpoints: read back exactly, ignored for other pairs or another
order, removed with the checkpoints, and never taken for a checkpoint step."""

from __future__ import annotations

import numpy as np

from metareward.training.checkpoints import REFERENCE_FILE, CheckpointStore


def test_kept_reference_log_probs_are_read_back_for_the_same_training_set_only(tmp_path, caplog):
    checkpoints = CheckpointStore(str(tmp_path), "job/checkpoints")
    hashes = [11, 22, 33]
    assert checkpoints.read_reference(hashes) is None
    chosen, rejected = [-1.25, -7.5, -0.1], [-2.0, -3.0, -4.75]
    checkpoints.keep_reference(chosen, rejected, hashes)
    kept = checkpoints.read_reference(hashes)
    # float32, as TRL's precompute gives them (the values a training computed are float32 already: exact).
    assert kept["ref_chosen_logps"].to_list() == [-1.25, -7.5, float(np.float32(-0.1))]
    assert kept["ref_rejected_logps"].to_list() == rejected
    # Other pairs, or the same in another order: computed again, and the log says why.
    assert checkpoints.read_reference([11, 22, 33, 44]) is None
    assert checkpoints.read_reference([22, 11, 33]) is None
    assert "are for other pairs (3 kept, 3 now)" in caplog.text
    assert checkpoints.latest() is None  # the file is no checkpoint step
    checkpoints.clear()
    assert not (tmp_path / "job" / "checkpoints" / REFERENCE_FILE).exists()
