"""The reference log-probs kept beside a DPO's checkpoints: read back exactly, ignored for a training set of another
size, removed with the checkpoints, and never taken for a checkpoint step."""

from __future__ import annotations

import numpy as np

from metareward.training.checkpoints import REFERENCE_FILE, CheckpointStore


def test_kept_reference_log_probs_are_read_back_for_the_same_training_set_only(tmp_path, caplog):
    checkpoints = CheckpointStore(str(tmp_path), "job/checkpoints")
    assert checkpoints.read_reference(3) is None
    chosen, rejected = [-1.25, -7.5, -0.1], [-2.0, -3.0, -4.75]
    checkpoints.keep_reference(chosen, rejected)
    kept = checkpoints.read_reference(3)
    # float32, as TRL's precompute gives them (the values a training computed are float32 already: exact).
    assert kept["ref_chosen_logps"].to_list() == [-1.25, -7.5, float(np.float32(-0.1))]
    assert kept["ref_rejected_logps"].to_list() == rejected
    assert checkpoints.read_reference(4) is None  # another training set: computed again, and the log says why
    assert "are for 3 pairs, not 4" in caplog.text
    assert checkpoints.latest() is None  # the file is no checkpoint step
    checkpoints.clear()
    assert not (tmp_path / "job" / "checkpoints" / REFERENCE_FILE).exists()
