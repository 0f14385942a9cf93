"""latent_prior.files: every write the package makes lands whole or not at all."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latent_prior.files import atomic_save_safetensors, atomic_write, atomic_write_json, is_temporary_of, temporary_path


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"step": 1})

    def half_then_crash(tmp):
        tmp.write_text('{"step": ')
        raise KeyboardInterrupt  # as a killed run

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_crash)
    assert json.loads(target.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_safetensors_and_json_round_trip_with_usual_permissions(tmp_path):
    path = atomic_save_safetensors({"x": torch.arange(4.0)}, tmp_path / "a.safetensors", {"k": "v"})
    assert torch.equal(load_file(str(path))["x"], torch.arange(4.0))
    assert path.stat().st_mode & 0o044  # readable by others, unlike safetensors' own 0600
    atomic_write_json(tmp_path / "p.json", {"path": tmp_path})  # what JSON cannot hold is written as text
    assert json.loads((tmp_path / "p.json").read_text()) == {"path": str(tmp_path)}


def test_leftover_temporaries_are_recognised_by_their_target():
    shard = re.compile(r"shard-\d{5}\.safetensors")
    assert is_temporary_of(temporary_path(Path("shard-00001.safetensors")).name, shard)
    assert is_temporary_of(".shard-00001.safetensors.tmp", shard)  # written before temporaries carried a PID
    assert not is_temporary_of(".notes.txt.tmp-12", shard) and not is_temporary_of("shard-00001.safetensors", shard)
