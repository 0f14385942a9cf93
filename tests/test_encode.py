"""latent_prior.encode: image folder -> cache with a real tiny diffusers AutoencoderKL.

Covers the Python API and the CLI, bad files, refused resumes, a real kill -9 and resume in a
subprocess, fp16 overflow to NaN, and a real 2-process `accelerate launch` (gloo on CPU).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import argv
from _encode_helpers import make_tiny_vae, sample_photos, write_images
from _launch import run_two_gloo_processes
from PIL import Image

from latent_prior.adapters import load_vae
from latent_prior.cache import open_latents, shard_name
from latent_prior.cli import main
from latent_prior.data import ImageFolder
from latent_prior.encode import EncodeConfig, encode_images
from latent_prior.errors import LatentPriorError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny")


@pytest.fixture(scope="module")
def adapter(vae_dir):
    return load_vae(vae_dir)


def _direct_moments(adapter, data_dir, paths, resolution, flip=False):
    """Reference: encode the same files one by one, without the cache machinery."""
    dataset = ImageFolder(data_dir, resolution, files=paths)
    images = torch.stack([dataset[i]["image"] for i in range(len(paths))])
    if flip:
        images = torch.flip(images, dims=[-1])
    posterior = adapter.encode(images)
    return posterior.mean, posterior.logvar


def _subprocess_env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def small_config(tmp_path: Path, vae: str, out: str = "cache", **options) -> EncodeConfig:
    """The tests' encode run: the images under tmp_path/img at 16 px into tmp_path/`out`, in this process, quietly."""
    settings = dict(vae=vae, data=str(tmp_path / "img"), out=str(tmp_path / out), resolution=16, num_workers=0, quiet=True)
    return EncodeConfig(**{**settings, **options})


def test_python_api_writes_a_cache_equal_to_direct_encoding(tmp_path, adapter):
    files = write_images(tmp_path / "img", 10)
    config = small_config(tmp_path, "tiny", batch_size=3, shard_size=4, num_workers=1, flip=True)
    summary = encode_images(adapter, config)
    assert summary["count"] == 10 and summary["encoded"] == 10 and summary["shards"] == 3
    assert summary["skipped"] == [] and summary["reused_shards"] == 0 and summary["size_mb"] > 0

    source = open_latents(tmp_path / "cache")
    assert len(source) == 10 and source.latent_shape == (4, 8, 8) and not source.deterministic
    assert source.sources() == files
    assert source.provenance == adapter.provenance.to_dict()
    assert source.normalization == adapter.normalization
    manifest = source.manifest
    assert manifest["resolution"] == 16 and manifest["dtype"] == "float32" and manifest["flip"] is True
    assert manifest["world_size"] == 1 and manifest["latent_prior_version"]

    mean, logvar = source.read(range(10))
    ref_mean, ref_logvar = _direct_moments(adapter, tmp_path / "img", files, 16)
    torch.testing.assert_close(mean, ref_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logvar, ref_logvar, atol=1e-5, rtol=1e-5)
    flips = open_latents(tmp_path / "cache", include_flips=True)
    flip_mean, _ = flips.read(range(10, 20))
    ref_flip, _ = _direct_moments(adapter, tmp_path / "img", files, 16, flip=True)
    torch.testing.assert_close(flip_mean, ref_flip, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(flip_mean, mean)


def _write_odd_and_bad_files(folder: Path) -> tuple[set[str], set[str]]:
    """Convertible odd modes (kept) and unreadable files (skipped), as real files."""
    (folder / "odd").mkdir(parents=True)
    (folder / "bad").mkdir()
    photo = Image.fromarray(sample_photos()[2][50:150, 100:220])
    photo.convert("CMYK").save(folder / "odd" / "cmyk.jpg")
    Image.fromarray((np.asarray(photo.convert("L"), np.uint16) * 257)).save(folder / "odd" / "grey16.png")
    photo.convert("P", palette=Image.ADAPTIVE, colors=32).save(folder / "odd" / "palette.png")
    jpeg = io.BytesIO()
    photo.save(jpeg, format="JPEG")
    (folder / "bad" / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 3])
    (folder / "bad" / "text.png").write_text("hello, I am text\n")
    (folder / "bad" / "empty.jpeg").write_bytes(b"")
    return {"odd/cmyk.jpg", "odd/grey16.png", "odd/palette.png"}, {"bad/truncated.jpg", "bad/text.png", "bad/empty.jpeg"}


def test_cli_skips_unreadable_files_and_keeps_convertible_ones(tmp_path, vae_dir, capsys):
    good = set(write_images(tmp_path / "img", 5))
    odd, bad = _write_odd_and_bad_files(tmp_path / "img")
    flags = "--resolution 16 --batch-size 2 --shard-size 3 --num-workers 2"
    rc = main(argv("encode --vae", vae_dir, "--data", tmp_path / "img", "--out", tmp_path / "cache", flags))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert {s["path"] for s in manifest["skipped"]} == bad
    assert all(s["reason"] for s in manifest["skipped"])
    source = open_latents(tmp_path / "cache")
    assert set(source.sources()) == good | odd and len(source) == 8
    # One summary line with the figures; each skipped file named on stderr with its reason.
    assert "8 images encoded" in captured.out and "3 files skipped" in captured.out and "MB on disk" in captured.out
    for name in bad:
        assert f"skipped {tmp_path / 'img' / name}:" in captured.err


def test_empty_and_missing_folders_are_one_sentence_errors(tmp_path, vae_dir, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    args = ["encode", "--vae", str(vae_dir), "--out", str(tmp_path / "cache"), "--resolution", "16"]
    assert main([*args, "--data", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert f"--data {tmp_path / 'empty'}: no images found" in err and "Traceback" not in err
    assert main([*args, "--data", str(tmp_path / "missing")]) == 2
    assert f"--data {tmp_path / 'missing'}: no such folder" in capsys.readouterr().err
    assert main(["encode", "--vae", str(vae_dir), "--data", str(tmp_path / "empty")]) == 2
    assert "--out is required" in capsys.readouterr().err


def test_resume_with_other_settings_is_refused(tmp_path, vae_dir, capsys):
    write_images(tmp_path / "img", 4)
    base = ["encode", "--data", str(tmp_path / "img"), "--out", str(tmp_path / "cache"), "--num-workers", "0", "--quiet"]
    assert main([*base, "--vae", str(vae_dir), "--resolution", "16"]) == 0
    capsys.readouterr()
    other_vae = make_tiny_vae(tmp_path / "other_vae", seed=1)
    for extra, expected in [
        (["--vae", str(vae_dir), "--resolution", "8"], "resolution 16 then, 8 now"),
        (["--vae", str(vae_dir), "--resolution", "16", "--dtype", "bf16"], "dtype 'float32' then, 'bfloat16' now"),
        (["--vae", str(other_vae), "--resolution", "16"], "another VAE"),
        (["--vae", str(vae_dir), "--resolution", "16", "--flip"], "flip False then, True now"),
    ]:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert expected in err and "choose a new --out" in err, err
    # The refused runs changed nothing: the cache is still complete and readable.
    assert len(open_latents(tmp_path / "cache")) == 4


def test_rerun_encodes_only_the_missing_shards(tmp_path, adapter):
    write_images(tmp_path / "img", 9)
    config = small_config(tmp_path, "tiny", shard_size=3)
    encode_images(adapter, config)
    before, _ = open_latents(tmp_path / "cache").read(range(9))
    again = encode_images(adapter, config)  # nothing to do
    assert again["encoded"] == 0 and again["reused_shards"] == 3
    (tmp_path / "cache" / shard_name(1)).unlink()
    with pytest.raises(LatentPriorError, match="missing shard-00001"):
        open_latents(tmp_path / "cache")
    resumed = encode_images(adapter, config)
    assert resumed["encoded"] == 3 and resumed["reused_shards"] == 2 and resumed["count"] == 9
    after, _ = open_latents(tmp_path / "cache").read(range(9))
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


def _solid(path: Path, value: int) -> None:
    Image.fromarray(np.full((40, 40, 3), value, np.uint8)).save(path)


def test_fp16_overflow_stops_the_run_and_names_the_images(tmp_path):
    # A real fp16 overflow, as in SD-XL's VAE: conv_in weights of 4000 keep grey images finite
    # (|sum| ~ 400) but push a white image to 27 * 4000 = 108000 > 65504 (fp16's max) -> inf -> NaN.
    vae_dir = make_tiny_vae(tmp_path / "hot_vae", force_upcast=False, edit=lambda vae: vae.encoder.conv_in.weight.fill_(4000.0))
    (tmp_path / "img").mkdir()
    _solid(tmp_path / "img" / "a_grey.png", 128)
    _solid(tmp_path / "img" / "b_grey.png", 127)
    _solid(tmp_path / "img" / "c_white.png", 255)
    _solid(tmp_path / "img" / "d_grey.png", 128)
    config = small_config(tmp_path, "hot", "cache16", shard_size=2, dtype="fp16")
    with pytest.raises(LatentPriorError) as info:
        encode_images(load_vae(vae_dir, dtype="fp16"), config)
    message = str(info.value)
    assert "NaN/inf latents for 1 image(s)" in message and "c_white.png" in message and "b_grey" not in message
    assert "--dtype fp32 or --dtype bf16" in message
    # The shard of the failing chunk was not written; the finished one was kept; no manifest.
    assert (tmp_path / "cache16" / shard_name(0)).exists()
    assert not (tmp_path / "cache16" / shard_name(1)).exists() and not (tmp_path / "cache16" / "manifest.json").exists()
    assert not list((tmp_path / "cache16").glob(".*.tmp"))
    # The same VAE in fp32 encodes every image: the NaN came from fp16, not from the weights.
    summary = encode_images(load_vae(vae_dir), EncodeConfig(**{**config.__dict__, "out": str(tmp_path / "cache32"), "dtype": "fp32"}))
    assert summary["count"] == 4


def test_nan_weights_are_reported_as_a_vae_problem(tmp_path):
    vae_dir = make_tiny_vae(tmp_path / "nan_vae", edit=lambda vae: vae.encoder.conv_in.bias.fill_(float("nan")))
    write_images(tmp_path / "img", 3)
    config = small_config(tmp_path, "nan")
    with pytest.raises(LatentPriorError, match=r"NaN/inf latents for 3 image\(s\).*float32.*check the VAE's weights"):
        encode_images(load_vae(vae_dir), config)


def test_kill_minus_nine_then_resume_encodes_every_image_exactly_once(tmp_path, vae_dir, adapter):
    files = write_images(tmp_path / "img", 24)
    out = tmp_path / "cache"
    flags = "--resolution 16 --shard-size 2 --batch-size 2 --num-workers 0 --quiet"
    command = argv([sys.executable], "-m latent_prior encode --vae", vae_dir, "--data", tmp_path / "img", "--out", out, flags)
    process = subprocess.Popen(command, env=_subprocess_env(), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / shard_name(0)).exists() and not (out / shard_name(1)).exists():
        assert process.poll() is None, process.communicate()[1].decode()
        assert time.monotonic() < deadline, "the encode wrote no shard within 120 s"
        time.sleep(0.002)
    os.killpg(process.pid, signal.SIGKILL)  # our own process group: the encoder and nothing else
    process.wait()
    assert process.returncode == -signal.SIGKILL
    done = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert 1 <= len(done) < 12, f"the kill landed after {len(done)} of 12 shards"
    assert not (out / "manifest.json").exists()
    with pytest.raises(LatentPriorError, match="incomplete.*resume"):
        open_latents(out)

    resumed = subprocess.run(command, env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{24 - 2 * len(done)} images encoded (24 in cache, {len(done)} of 12 shards reused)" in resumed.stdout
    source = open_latents(out)
    assert len(source) == 24 and source.sources() == files  # every image exactly once, in order
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.tmp"))
    mean, _ = source.read(range(24))
    ref, _ = _direct_moments(adapter, tmp_path / "img", files, 16)
    torch.testing.assert_close(mean, ref, atol=1e-5, rtol=1e-5)


def test_two_process_accelerate_launch_splits_the_chunks(tmp_path, vae_dir, adapter):
    files = write_images(tmp_path / "img", 14)
    (tmp_path / "img" / "broken.png").write_text("not a png")
    out = tmp_path / "cache"
    result = run_two_gloo_processes(
        "encode",
        "--vae",
        vae_dir,
        "--data",
        tmp_path / "img",
        "--out",
        out,
        "--resolution",
        "16",
        "--shard-size",
        "3",
        "--batch-size",
        "2",
        "--num-workers",
        "0",
        "--quiet",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert {s["world_size"] for s in manifest["shards"]} == {2}
    assert [s["rank"] for s in manifest["shards"]] == [0, 1, 0, 1, 0]  # chunk k -> rank k % 2
    assert manifest["skipped"] == [{"path": "broken.png", "reason": manifest["skipped"][0]["reason"]}]
    source = open_latents(out)
    assert source.sources() == files and len(source) == 14
    mean, _ = source.read(range(14))
    ref, _ = _direct_moments(adapter, tmp_path / "img", files, 16)
    torch.testing.assert_close(mean, ref, atol=1e-5, rtol=1e-5)


def test_deterministic_vae_stores_no_logvar(tmp_path):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
    ).save_pretrained(tmp_path / "taesd")
    files = write_images(tmp_path / "img", 5)
    tiny = load_vae(tmp_path / "taesd")
    config = small_config(tmp_path, "taesd", shard_size=2, flip=True)
    encode_images(tiny, config)
    source = open_latents(tmp_path / "cache", include_flips=True)
    assert source.deterministic and source.manifest["deterministic"] is True and len(source) == 10
    mean, logvar = source.read(range(5))
    assert logvar is None
    ref, _ = _direct_moments(tiny, tmp_path / "img", files, 16)
    torch.testing.assert_close(mean, ref, atol=1e-5, rtol=1e-5)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "cache" / shard_name(0)), framework="pt") as f:
        assert sorted(f.keys()) == ["mean", "mean_flip"]


def test_defaults_resolve_to_the_embedded_vae_settings(tmp_path):
    from latent_prior import defaults
    from latent_prior.encode import resolve_data_dir, resolve_resolution

    assert resolve_resolution(EncodeConfig(out="x")) == defaults.DEFAULT_RESOLUTION
    assert resolve_resolution(EncodeConfig(out="x", vae="default")) == defaults.DEFAULT_RESOLUTION
    assert resolve_resolution(EncodeConfig(out="x", vae="stabilityai/sd-vae-ft-mse")) == 256
    assert resolve_resolution(EncodeConfig(out="x", vae="v", resolution=64)) == 64
    assert resolve_data_dir(EncodeConfig(out="x")) == Path(defaults.DEFAULT_DATA_DIR)
    with pytest.raises(LatentPriorError, match="--resolution"):
        resolve_resolution(EncodeConfig(out="x", resolution=0))


@pytest.mark.slow
def test_embedded_default_vae_encodes_the_bundled_digits(tmp_path):
    from latent_prior import defaults

    if not (Path(defaults.DEFAULT_VAE_DIR) / "config.json").is_file():
        pytest.skip("the embedded default VAE has not been trained into the package yet")
    summary = encode_images(load_vae(defaults.DEFAULT_VAE_DIR), EncodeConfig(out=str(tmp_path / "cache"), quiet=True))
    source = open_latents(tmp_path / "cache")
    assert summary["count"] == len(source) == defaults.DEFAULT_NUM_IMAGES
    assert source.manifest["resolution"] == defaults.DEFAULT_RESOLUTION
