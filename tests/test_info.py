"""`latent-prior info PATH`: a real cache (complete, then partial), an exported prior, a sample file, a run
folder, text and --json; an unknown folder is refused with one sentence."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from latent_prior.cli import main

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def cache(default_vae_prior, tmp_path_factory):
    """A real cache of 9 digits from the embedded VAE, in 3 shards (4 + 4 + 1)."""
    _, _, data = default_vae_prior
    out = tmp_path_factory.mktemp("info") / "cache"
    assert main(["encode", "--data", str(data), "--out", str(out), "--shard-size", "4", "--num-workers", "0", "--quiet"]) == 0
    return out


def info_json(path: Path, capsys) -> dict:
    assert main(["info", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_describes_a_complete_and_a_partial_cache(cache, tmp_path, capsys):
    d = info_json(cache, capsys)
    assert d["kind"] == "cache" and d["complete"] is True
    assert (d["count"], d["shards"], d["shard_size"], d["latent_shape"]) == (9, 3, 4, [4, 8, 8])
    assert d["resolution"] == 32 and d["dtype"] == "float32" and d["format_version"] == 1
    assert d["vae"]["class_name"] == "AutoencoderKL" and d["normalization"]["scaling_factor"] == pytest.approx(0.98492116)
    assert d["size_bytes"] == sum(p.stat().st_size for p in cache.iterdir())

    assert main(["info", "--path", str(cache)]) == 0  # the flag form, text output
    text = capsys.readouterr().out
    assert "complete, 9 latents" in text and "4×8×8" in text and "32 px" in text and "AutoencoderKL" in text

    partial = tmp_path / "partial"
    shutil.copytree(cache, partial)
    (partial / "manifest.json").unlink()
    (partial / "shard-00001.safetensors").unlink()  # as if killed while encoding the second chunk
    d = info_json(partial, capsys)
    assert d["complete"] is False and d["resumable"] is True
    assert (d["shards_done"], d["shards"], d["count_so_far"], d["num_files"]) == (2, 3, 5, 9)
    assert main(["info", str(partial)]) == 0
    assert "PARTIAL: 2 of 3 shards" in capsys.readouterr().out


def test_info_describes_a_prior_and_a_sample_file(default_vae_prior, tmp_path, capsys):
    latents, prior_dir, _ = default_vae_prior
    d = info_json(prior_dir, capsys)
    config = json.loads((prior_dir / "config.json").read_text())
    assert d["kind"] == "prior" and d["latent_shape"] == [4, 8, 8] and d["latent_dims"] == 256
    assert d["log_z"] == config["log_z"] and d["log_z_ess"] == config["log_z_info"]["ess"]
    assert d["heldout_gain_nats"] == config["training"]["summary"]["heldout_gain_nats"]
    assert d["training"]["steps"] == 10 and d["training"]["config"]["latents"] == str(latents.resolve())
    # keep_checkpoints=2 most recent (steps 5 and 10) and the selected one, when it is not among them
    kept = {5, 10} | {config["training"]["summary"]["selected_step"]}
    assert d["energy"]["parameters"] > 0 and d["flow"]["parameters"] > 0 and d["checkpoints"] == len(kept)
    assert d["files"]["model.safetensors"] == (prior_dir / "model.safetensors").stat().st_size
    assert d["provenance"]["class_name"] == "AutoencoderKL" and d["latent_prior_version"]
    assert main(["info", str(prior_dir)]) == 0
    text = capsys.readouterr().out
    assert "EVaLP prior" in text and "log Ẑ" in text and "ESS" in text and "ELBO gain" in text and "10 steps" in text

    samples = tmp_path / "z.safetensors"
    assert main(["sample", "--prior", str(prior_dir), "-n", "7", "--out", str(samples)]) == 0
    capsys.readouterr()
    d = info_json(samples, capsys)
    assert d["kind"] == "latents_file" and d["count"] == 7 and d["written_by"] == "latent-prior sample"
    assert d["method"] == "sampler" and d["deterministic"] is True


def test_info_describes_a_run_folder(default_vae_prior, cache, tmp_path, capsys):
    _, prior_dir, _ = default_vae_prior
    run = tmp_path / "run"
    shutil.copytree(prior_dir, run / "prior")
    shutil.copytree(cache, run / "cache")
    (run / "report.md").write_text("# report\n")
    d = info_json(run, capsys)
    assert d["kind"] == "run" and d["prior"]["kind"] == "prior" and d["cache"]["count"] == 9
    assert d["files"] == {"report.md": 9}
    assert main(["info", str(run)]) == 0
    text = capsys.readouterr().out
    assert "run folder" in text and "EVaLP prior" in text and "latent cache" in text


def test_info_describes_an_unfinished_fit(default_vae_prior, tmp_path, capsys):
    _, prior_dir, _ = default_vae_prior
    unfinished = tmp_path / "fit"
    shutil.copytree(prior_dir.parent, unfinished)
    shutil.rmtree(unfinished / "prior")  # as if killed before the export
    (unfinished / "train" / "fit_summary.json").unlink()
    d = info_json(unfinished, capsys)
    assert d["kind"] == "fit_in_progress" and d["last_checkpoint_step"] == 10 and d["steps_planned"] == 10
    assert main(["info", str(unfinished)]) == 0
    assert "--resume" in capsys.readouterr().out


def test_info_refuses_an_unknown_folder_with_one_sentence(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path) in err and "not a latent cache" in err
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["info"]) == 2
    assert "latent-prior info PATH" in capsys.readouterr().err
