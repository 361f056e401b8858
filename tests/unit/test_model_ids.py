"""Model digests without reloading: a local folder without model_id.txt is hashed once per machine, and again only
when one of its files changes."""

from __future__ import annotations

import os

import metareward.training.models as models
from metareward.training.models import MODEL_DIGEST_FILE, compute_model_digest, model_digest, model_id_of


def test_a_folder_without_model_id_is_hashed_once_and_again_when_a_file_changes(tmp_path, monkeypatch):
    folder = tmp_path / "seed"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    cache = tmp_path / "cache"
    calls = []
    monkeypatch.setattr(models, "compute_model_digest", lambda path: calls.append(path) or compute_model_digest(path))

    first = model_digest(folder, cache)
    assert first == model_digest(folder, cache) == model_id_of(str(folder), cache) == compute_model_digest(folder)
    assert len(calls) == 1 and not (folder / MODEL_DIGEST_FILE).exists()

    (folder / "model.safetensors").write_bytes(b"\1" * 4096)  # same size, new bytes, new mtime
    stat = (folder / "model.safetensors").stat()
    os.utime(folder / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert model_digest(folder, cache) != first and len(calls) == 2


def test_model_id_txt_wins_and_a_hub_id_is_named_by_its_name(tmp_path):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / MODEL_DIGEST_FILE).write_text("abc123\n")
    assert model_id_of(str(folder), tmp_path) == "abc123"
    assert (model_id_of("org/model", tmp_path) == model_id_of("org/model", tmp_path)
            != model_id_of("org/other", tmp_path))
