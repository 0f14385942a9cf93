"""latent_prior.data: image folders -> (3, R, R) tensors in [-1, 1], bad files skipped, not fatal."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from _encode_helpers import sample_photos, write_images
from PIL import Image

from latent_prior.data import ImageFolder, collate_images, image_loader, list_images, load_image
from latent_prior.errors import LatentPriorError


def test_list_images_is_recursive_sorted_and_case_insensitive(tmp_path):
    written = write_images(tmp_path, 7)
    Image.fromarray(sample_photos()[0][:40, :40]).save(tmp_path / "UPPER.JPG")
    Image.fromarray(sample_photos()[1][:40, :40]).save(tmp_path / "group0" / "Mixed.Png", format="PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    Image.fromarray(sample_photos()[0][:40, :40]).save(tmp_path / ".hidden" / "x.png")
    found = list_images(tmp_path)
    assert found == sorted(written + ["UPPER.JPG", "group0/Mixed.Png"])
    assert any("/deeper/" in p for p in found)  # two levels down
    assert list_images(tmp_path) == found  # stable


def test_symlinked_folders_are_followed_once_even_in_a_cycle(tmp_path):
    data = tmp_path / "data"
    written = write_images(data, 3)
    outside = tmp_path / "outside"
    write_images(outside, 1)
    (data / "linked").symlink_to(outside, target_is_directory=True)
    (data / "group0" / "loop").symlink_to(data, target_is_directory=True)  # a cycle back to the root
    found = list_images(data)
    assert found == sorted(written + ["linked/group0/deeper/img000.png"])


def test_missing_empty_and_non_folder_data_are_clear_errors(tmp_path):
    with pytest.raises(LatentPriorError, match="no such folder"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("hi")
    with pytest.raises(LatentPriorError, match=r"empty: no images found"):
        list_images(tmp_path / "empty")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(LatentPriorError, match="not a folder"):
        list_images(tmp_path / "file.png")


def test_load_image_resizes_shorter_side_then_center_crops(tmp_path):
    # 90x30 image: red, green, blue vertical thirds. Shorter side 30 -> 16, width 48, center crop 16 px
    # keeps exactly the green middle third.
    array = np.zeros((30, 90, 3), np.uint8)
    array[:, :30, 0] = 255
    array[:, 30:60, 1] = 255
    array[:, 60:, 2] = 255
    Image.fromarray(array).save(tmp_path / "thirds.png")
    x = load_image(tmp_path / "thirds.png", 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    inner = x[:, :, 2:-2]  # away from the bicubic transition at the crop borders
    assert torch.allclose(inner[1], torch.ones_like(inner[1]), atol=0.02)
    assert torch.allclose(inner[0], -torch.ones_like(inner[0]), atol=0.02)
    assert torch.allclose(inner[2], -torch.ones_like(inner[2]), atol=0.02)


def test_load_image_maps_uint8_to_minus_one_one_exactly(tmp_path):
    photo = sample_photos()[0][:32, :32]
    Image.fromarray(photo).save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png", 32)  # no resize at the native size
    expected = torch.from_numpy(photo).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(x, expected)


def _save_modes(folder):
    photo = sample_photos()[0][100:164, 100:164]  # real RGB crop
    rgb = Image.fromarray(photo)
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    grey16 = np.asarray(rgb.convert("L"), np.uint16) * 257  # full 16-bit range
    Image.fromarray(grey16).save(folder / "grey16.png")
    rgb.convert("P", palette=Image.ADAPTIVE, colors=64).save(folder / "palette.png")
    palette_t = rgb.convert("P", palette=Image.ADAPTIVE, colors=64)
    palette_t.info["transparency"] = 0
    palette_t.save(folder / "palette_transparent.png", transparency=0)
    rgba = rgb.copy()
    rgba.putalpha(255)
    rgba.save(folder / "rgba.png")
    rgb.convert("L").save(folder / "grey.png")
    rgb.save(folder / "photo.webp", lossless=True)
    return photo


def test_convertible_modes_become_rgb(tmp_path):
    photo = _save_modes(tmp_path)
    reference = load_image(tmp_path / "photo.webp", 32)
    grey = load_image(tmp_path / "grey.png", 32)
    for name in ["cmyk.jpg", "grey16.png", "palette.png", "palette_transparent.png", "rgba.png"]:
        x = load_image(tmp_path / name, 32)
        assert x.shape == (3, 32, 32) and torch.isfinite(x).all(), name
    # A 16-bit PNG is rescaled, not clipped to white: it matches the 8-bit grey version.
    assert torch.allclose(load_image(tmp_path / "grey16.png", 32), grey, atol=2 / 127.5)
    # Fully opaque alpha changes nothing; the palette image stays close to the photo.
    assert torch.equal(load_image(tmp_path / "rgba.png", 32), reference)
    assert (load_image(tmp_path / "palette.png", 32) - reference).abs().mean() < 0.1
    assert (load_image(tmp_path / "cmyk.jpg", 32) - reference).abs().mean() < 0.1
    assert photo.shape == (64, 64, 3)


def test_greyscale_output_for_one_channel_vaes(tmp_path):
    write_images(tmp_path, 2)
    dataset = ImageFolder(tmp_path, 16, channels=1)
    assert dataset[0]["image"].shape == (1, 16, 16)


def _write_bad_files(folder):
    good = io.BytesIO()
    Image.fromarray(sample_photos()[1]).save(good, format="JPEG")
    (folder / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (folder / "text.png").write_text("this is not a PNG at all\n")
    (folder / "zero.webp").write_bytes(b"")
    return {"truncated.jpg", "text.png", "zero.webp"}


def test_bad_files_become_skipped_records_through_worker_processes(tmp_path):
    good = write_images(tmp_path, 6)
    bad = _write_bad_files(tmp_path)
    dataset = ImageFolder(tmp_path, 24)
    assert len(dataset) == 9
    records = [dataset[i] for i in range(len(dataset))]
    assert {r["path"] for r in records if "error" in r} == bad
    truncated = next(r for r in records if r["path"] == "truncated.jpg")
    assert "truncated" in truncated["error"].lower() or "OSError" in truncated["error"]

    # Same through a DataLoader with 2 worker processes: no worker crashes, order is kept.
    batches = [list(range(0, 4)), list(range(4, 8)), [8]]
    seen_good, seen_bad = [], []
    for batch in image_loader(dataset, batches, num_workers=2):
        assert batch.images.shape[0] == len(batch.indices)
        if batch.indices:
            assert batch.images.shape == (len(batch.indices), 3, 24, 24)
        seen_good += batch.paths
        seen_bad += [path for _, path, _ in batch.skipped]
    assert seen_good == [p for p in dataset.files if p not in bad]
    assert sorted(seen_good) == sorted(good) and set(seen_bad) == bad


def test_collate_of_an_all_bad_batch_is_empty_not_an_error():
    batch = collate_images([{"index": 0, "path": "x.png", "error": "OSError: broken"}])
    assert batch.images.shape[0] == 0 and batch.indices == [] and batch.skipped == [(0, "x.png", "OSError: broken")]


def test_bad_arguments(tmp_path):
    write_images(tmp_path, 1)
    with pytest.raises(LatentPriorError, match="--resolution"):
        ImageFolder(tmp_path, 0)
    with pytest.raises(LatentPriorError, match="--num-workers"):
        image_loader(ImageFolder(tmp_path, 8), [[0]], num_workers=-1)
