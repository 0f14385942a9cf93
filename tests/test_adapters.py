"""The VAE adapters (`latent_prior.adapters`): real diffusers models with tiny configs, real images,
all offline. Nothing is mocked: "the Hub is unreachable" is a real refused connection to a local
port, and "a hub id from the cache" is a real Hugging Face cache layout in tmp_path."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import torch
from _encode_helpers import TINY_KL_CONFIG
from safetensors.torch import save_file

from latent_prior.adapters import (
    DiffusersKLAdapter,
    DiffusersTinyAdapter,
    TorchVAEAdapter,
    as_posterior,
    load_vae,
    wrap,
)
from latent_prior.errors import LatentPriorError
from latent_prior.vae import LatentNormalization, Posterior

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, AutoencoderTiny  # noqa: E402

TINY_KL = dict(TINY_KL_CONFIG, layers_per_block=1)
# Three encoder stages: two stride-2 convs, so 4x downsampling (TAESD has four stages, 8x).
TINY_TAESD = dict(
    encoder_block_out_channels=[8, 8, 8],
    decoder_block_out_channels=[8, 8, 8],
    num_encoder_blocks=[1, 1, 1],
    num_decoder_blocks=[1, 1, 1],
    latent_channels=4,
)
# stabilityai/sd-vae-ft-mse's config.json, minus bookkeeping keys; note it has no scaling_factor.
SD_VAE_FT_MSE = dict(
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    out_channels=3,
    sample_size=256,
    up_block_types=["UpDecoderBlock2D"] * 4,
)


# ---- real images ------------------------------------------------------------------------------------
def _photos(size: int, n: int = 2) -> torch.Tensor:
    """n real RGB crops (astronaut, then coffee, ...) resized to size x size, (n, 3, size, size) in [-1, 1]."""
    from skimage import data

    pictures = [data.astronaut(), data.coffee(), data.chelsea()]
    out = []
    for picture in pictures[:n]:
        side = min(picture.shape[:2])
        x = torch.from_numpy(np.ascontiguousarray(picture[:side, :side])).permute(2, 0, 1).float()[None] / 127.5 - 1
        out.append(torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True))
    return torch.cat(out).clamp(-1, 1)


def _digits(n: int = 16) -> torch.Tensor:
    """n real sklearn digits, (n, 1, 8, 8) in [-1, 1]."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images[:n]).float()
    return (images / 8.0 - 1.0)[:, None]


def _tiny_kl(seed: int = 0, **overrides) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**{**TINY_KL, **overrides}).eval()


def _tiny_taesd(seed: int = 0) -> AutoencoderTiny:
    torch.manual_seed(seed)
    return AutoencoderTiny(**TINY_TAESD).eval()


# ---- AutoencoderKL ----------------------------------------------------------------------------------
def test_kl_folder_encodes_like_diffusers(tmp_path):
    vae = _tiny_kl()
    vae.save_pretrained(tmp_path / "vae")
    adapter = load_vae(tmp_path / "vae")
    assert isinstance(adapter, DiffusersKLAdapter) and not adapter.deterministic

    images = _photos(32)
    posterior = adapter.encode(images)
    with torch.no_grad():
        reference = vae.encode(images).latent_dist
    assert posterior.mean.dtype == torch.float32 and posterior.mean.device.type == "cpu"
    assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 16, 16)
    assert torch.allclose(posterior.mean, reference.mean, atol=1e-6)
    assert torch.allclose(posterior.logvar, reference.logvar, atol=1e-6)
    assert adapter.latent_shape(32) == tuple(posterior.mean.shape[1:])
    assert adapter.latent_shape(256) == (4, 128, 128)
    with pytest.raises(LatentPriorError, match="multiple of 2"):
        adapter.latent_shape(33)

    decoded = adapter.decode(posterior.sample(torch.Generator().manual_seed(0)))
    assert decoded.shape == images.shape and decoded.dtype == torch.float32
    assert decoded.min() >= -1 and decoded.max() <= 1
    assert adapter.normalization.matches(LatentNormalization(scaling_factor=0.18215))
    prov = adapter.provenance
    assert prov.class_name == "AutoencoderKL" and prov.source == str((tmp_path / "vae").resolve())


def test_sd_vae_ft_mse_architecture_on_a_real_photo():
    # The exact hub config (random weights): 8x downsampling and diffusers' default scaling factor.
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(SD_VAE_FT_MSE)
    adapter = DiffusersKLAdapter(vae, source="stabilityai/sd-vae-ft-mse")
    posterior = adapter.encode(_photos(64, n=1))
    assert posterior.mean.shape == (1, 4, 8, 8)
    assert torch.isfinite(posterior.mean).all() and torch.isfinite(posterior.logvar).all()
    assert adapter.latent_shape(256) == (4, 32, 32)
    assert adapter.normalization.scaling_factor == pytest.approx(0.18215)
    assert adapter.normalization.shift_factor == 0.0
    assert adapter.normalization.latents_mean is None


def test_missing_scaling_factor_key_gets_diffusers_default(tmp_path):
    _tiny_kl().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["scaling_factor"], config["shift_factor"]  # as in sd-vae-ft-mse's hub config
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_vae(tmp_path).normalization.matches(LatentNormalization(scaling_factor=0.18215, shift_factor=0.0))


def test_normalization_from_config_and_round_trip(tmp_path):
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]
    _tiny_kl(scaling_factor=1.5305, shift_factor=0.0609, latents_mean=mean, latents_std=std).save_pretrained(tmp_path)
    adapter = load_vae(tmp_path)
    norm = adapter.normalization
    assert norm.scaling_factor == pytest.approx(1.5305) and norm.shift_factor == pytest.approx(0.0609)
    assert norm.latents_mean == pytest.approx(tuple(mean)) and norm.latents_std == pytest.approx(tuple(std))

    raw = adapter.encode(_photos(32)).mean
    normalized = norm.normalize(raw)
    expected = (raw - 0.0609 - torch.tensor(mean).view(1, 4, 1, 1)) * 1.5305 / torch.tensor(std).view(1, 4, 1, 1)
    assert torch.allclose(normalized, expected, atol=1e-6)
    assert torch.allclose(norm.denormalize(normalized), raw, atol=1e-5)


def test_pipeline_folder_finds_vae_subfolder(tmp_path):
    pipe = tmp_path / "pipe"
    _tiny_kl().save_pretrained(pipe / "vae")
    index = {"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"]}
    (pipe / "model_index.json").write_text(json.dumps(index))
    found = load_vae(pipe)
    explicit = load_vae(pipe, subfolder="vae")
    assert found.provenance.subfolder == explicit.provenance.subfolder == "vae"
    assert found.provenance.fingerprint == explicit.provenance.fingerprint
    with pytest.raises(LatentPriorError, match="no subfolder 'unet'"):
        load_vae(pipe, subfolder="unet")


def test_folder_with_only_a_weights_variant(tmp_path):
    vae = _tiny_kl(seed=2)
    vae.save_pretrained(tmp_path, variant="fp16")  # diffusion_pytorch_model.fp16.safetensors (fp32 values here)
    assert not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    assert load_vae(tmp_path).provenance.fingerprint == DiffusersKLAdapter(vae).provenance.fingerprint


def _to_ldm_layout(state: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> the original LDM / SD checkpoint layout (`first_stage_model.*`).

    The inverse of diffusers' `convert_ldm_vae_checkpoint`, written here so that the test checks a
    real conversion offline: LDM numbers decoder blocks from the top, calls the shortcut `nin_shortcut`
    and stores attention projections as 1x1 convs."""
    attention_names = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
    out = {}
    for key, value in state.items():
        new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        up = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)", new)
        if up:
            block, part, rest = int(up[1]), up[2], up[3]
            new = f"decoder.up.{num_blocks - 1 - block}.{'block' if part == 'resnets' else 'upsample'}.{rest}"
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        if ".mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for diffusers_name, ldm_name in attention_names.items():
                new = new.replace(diffusers_name, ldm_name)
            if value.dim() == 2:
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value.contiguous()
    return out


def test_single_file_ldm_checkpoint_converts_offline(tmp_path):
    vae = _tiny_kl(seed=3)
    config_dir = tmp_path / "config"
    vae.save_config(config_dir)
    checkpoint = _to_ldm_layout(vae.state_dict(), num_blocks=len(TINY_KL["block_out_channels"]))
    checkpoint["model.diffusion_model.out.0.weight"] = torch.zeros(2)  # a full SD checkpoint holds a UNet too
    file = tmp_path / "weights" / "sd-vae.safetensors"
    file.parent.mkdir()
    save_file(checkpoint, file)

    adapter = load_vae(file, config=config_dir)
    loaded = adapter.module.state_dict()
    assert loaded.keys() == vae.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in vae.state_dict().items())
    assert adapter.provenance.source == str(file.resolve())
    assert adapter.provenance.fingerprint == DiffusersKLAdapter(vae).provenance.fingerprint

    # A config.json beside the file is picked up without config=.
    vae.save_config(file.parent)
    assert load_vae(file).provenance.fingerprint == adapter.provenance.fingerprint


def test_single_file_without_config_offline_is_a_clear_error(tmp_path):
    # Without a local config diffusers would fetch SD 1.5's VAE config from the Hub: not possible here.
    file = tmp_path / "vae.safetensors"
    save_file(_to_ldm_layout(_tiny_kl().state_dict(), 2), file)
    start = time.perf_counter()
    with pytest.raises(LatentPriorError, match=r"config\.json beside the file"):
        load_vae(file)
    assert time.perf_counter() - start < 5


# ---- AutoencoderTiny --------------------------------------------------------------------------------
def test_tiny_is_deterministic_and_measures_its_downsampling(tmp_path):
    vae = _tiny_taesd()
    vae.save_pretrained(tmp_path)
    adapter = load_vae(tmp_path)
    assert isinstance(adapter, DiffusersTinyAdapter) and adapter.deterministic

    images = _photos(32)
    posterior = adapter.encode(images)
    with torch.no_grad():
        reference = vae.encode(images).latents
    assert posterior.logvar is None
    assert torch.allclose(posterior.mean, reference, atol=1e-6)
    assert posterior.mean.shape == (2, 4, 8, 8) == (2, *adapter.latent_shape(32))
    assert adapter.latent_shape(512) == (4, 128, 128)
    with pytest.raises(LatentPriorError, match="multiple of 4"):
        adapter.latent_shape(30)
    assert adapter.normalization.matches(LatentNormalization(scaling_factor=1.0, shift_factor=0.0))

    decoded = adapter.decode(posterior.mean)
    assert decoded.shape == images.shape and decoded.min() >= -1 and decoded.max() <= 1


def test_tiny_single_file_with_config(tmp_path):
    vae = _tiny_taesd(seed=1)
    vae.save_config(tmp_path)
    save_file(vae.state_dict(), tmp_path / "taesd.safetensors")
    adapter = load_vae(tmp_path / "taesd.safetensors")
    assert isinstance(adapter, DiffusersTinyAdapter)
    assert adapter.provenance.fingerprint == DiffusersTinyAdapter(vae).provenance.fingerprint


# ---- precision --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, torch_dtype, atol", [("bf16", torch.bfloat16, 0.05), ("fp16", torch.float16, 0.01)])
def test_half_precision_close_to_fp32(tmp_path, dtype, torch_dtype, atol):
    _tiny_kl().save_pretrained(tmp_path)
    images = _photos(32)
    full = load_vae(tmp_path).encode(images)
    # force_upcast=False so that fp16 really runs in fp16 (our tiny config sets force_upcast=True).
    half_adapter = load_vae(tmp_path, dtype=dtype, force_upcast=False)
    assert half_adapter.dtype == torch_dtype
    half = half_adapter.encode(images)
    for a, b in [(half.mean, full.mean), (half.logvar, full.logvar)]:
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        assert torch.allclose(a, b, atol=atol), (a - b).abs().max()
    assert not torch.equal(half.mean, full.mean)  # it really ran in lower precision
    assert half_adapter.provenance.fingerprint == load_vae(tmp_path).provenance.fingerprint
    assert half_adapter.decode(half.mean).dtype == torch.float32


def test_fp16_with_force_upcast_runs_in_fp32(tmp_path):
    _tiny_kl().save_pretrained(tmp_path)
    images = _photos(32)
    adapter = load_vae(tmp_path, dtype="fp16")  # config.force_upcast is True, as for SD VAEs
    assert adapter.upcast and adapter.dtype == torch.float32 and adapter.requested_dtype == torch.float16
    assert torch.equal(adapter.encode(images).mean, load_vae(tmp_path).encode(images).mean)
    assert adapter.describe()["upcast"] is True


def test_slicing_and_tiling_options(tmp_path):
    _tiny_kl().save_pretrained(tmp_path)
    images = _photos(32)
    plain = load_vae(tmp_path).encode(images)
    sliced = load_vae(tmp_path, enable_slicing=True)
    assert sliced.module.use_slicing
    assert torch.allclose(sliced.encode(images).mean, plain.mean, atol=1e-5)
    tiled = load_vae(tmp_path, enable_tiling=True)
    assert tiled.module.use_tiling and tiled.encode(images).mean.shape == plain.mean.shape


# ---- provenance -------------------------------------------------------------------------------------
def test_fingerprints_tell_weights_apart(tmp_path):
    _tiny_kl(seed=0).save_pretrained(tmp_path / "a")
    _tiny_kl(seed=1).save_pretrained(tmp_path / "b")
    a, b, a_again = load_vae(tmp_path / "a"), load_vae(tmp_path / "b"), load_vae(tmp_path / "a")
    assert a.provenance.config_hash == b.provenance.config_hash
    assert a.provenance.fingerprint != b.provenance.fingerprint
    assert a.provenance.fingerprint == a_again.provenance.fingerprint
    assert json.loads(json.dumps(a.describe()))["provenance"]["fingerprint"] == a.provenance.fingerprint


# ---- a user's own torch VAE -------------------------------------------------------------------------
class MLPVAE(torch.nn.Module):
    """A small MLP VAE on 8x8 grey digits with flat 8-dim latents."""

    def __init__(self, latent_dim: int = 8) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2 * latent_dim))
        self.decoder = torch.nn.Sequential(torch.nn.Linear(latent_dim, 32), torch.nn.SiLU(), torch.nn.Linear(32, 64), torch.nn.Tanh())

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(images.flatten(1)).chunk(2, dim=1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents).view(-1, 1, 8, 8)


def test_wrap_flat_latents_on_digits():
    torch.manual_seed(0)
    model = MLPVAE()
    adapter = wrap(model, latent_shape=(8,), image_channels=1, source="digits-mlp")
    images = _digits(16)
    posterior = adapter.encode(images)
    mean, logvar = model.encode(images)
    assert posterior.mean.shape == posterior.logvar.shape == (16, 8)
    assert torch.allclose(posterior.mean, mean) and torch.allclose(posterior.logvar, logvar)
    decoded = adapter.decode(posterior.sample())
    assert decoded.shape == images.shape and decoded.min() >= -1 and decoded.max() <= 1
    assert adapter.latent_shape(8) == (8,)
    assert adapter.provenance.class_name == "MLPVAE" and adapter.provenance.source == "digits-mlp"

    # Identity-free normalization on flat latents round-trips too.
    norm = LatentNormalization(scaling_factor=0.5, shift_factor=0.1, latents_mean=tuple(range(8)), latents_std=(2.0,) * 8)
    assert torch.allclose(norm.denormalize(norm.normalize(posterior.mean)), posterior.mean, atol=1e-5)


def test_wrap_accepts_a_normal_and_finds_the_shape_by_dry_run():
    torch.manual_seed(0)
    model = MLPVAE()

    def encode(m, x):
        mean, logvar = m.encode(x)
        return torch.distributions.Independent(torch.distributions.Normal(mean, torch.exp(0.5 * logvar)), 1)

    adapter = wrap(model, encode=encode, decode=lambda m, z: m.decode(z), image_channels=1)
    images = _digits(4)
    posterior = adapter.encode(images)
    assert torch.allclose(posterior.logvar, model.encode(images)[1], atol=1e-5)
    assert adapter.latent_shape(8) == (8,)  # found by encoding one blank image


def test_wrap_deterministic_encoder_and_mismatch():
    torch.manual_seed(0)
    model = MLPVAE()
    latents_only = lambda m, x: m.encode(x)[0]  # noqa: E731
    adapter = wrap(model, encode=latents_only, deterministic=True, image_channels=1, latent_shape=(8,))
    assert adapter.encode(_digits(4)).logvar is None
    with pytest.raises(LatentPriorError, match="deterministic=True"):
        wrap(model, encode=latents_only, image_channels=1).encode(_digits(4))


def test_subclass_and_weight_fingerprint():
    class MyAdapter(TorchVAEAdapter):
        def run_encoder(self, images):
            mean, logvar = self.module.encode(images)
            return Posterior(mean=mean, logvar=logvar)

        def run_decoder(self, latents):
            return self.module.decode(latents)

        def latent_shape(self, resolution):
            return (8,)

    torch.manual_seed(0)
    a = MyAdapter(MLPVAE(), image_channels=1)
    torch.manual_seed(1)
    b = MyAdapter(MLPVAE(), image_channels=1)
    assert a.encode(_digits(3)).mean.shape == (3, 8)
    assert a.provenance.config_hash == b.provenance.config_hash
    assert a.provenance.fingerprint != b.provenance.fingerprint


def test_as_posterior_forms_and_bad_inputs():
    mean, logvar = torch.zeros(2, 3), torch.full((2, 3), -2.0)
    assert torch.equal(as_posterior((mean, logvar)).logvar, logvar)
    normal = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    assert torch.allclose(as_posterior(normal).logvar, logvar)
    with torch.no_grad():  # a diffusers AutoencoderKLOutput, as a default `module.encode` returns it
        output = _tiny_kl().encode(_photos(16))
    assert torch.equal(as_posterior(output).mean, output.latent_dist.mean)
    with pytest.raises(LatentPriorError, match="returned a dict"):
        as_posterior({"mean": mean})
    adapter = wrap(MLPVAE(), latent_shape=(8,), image_channels=1)
    with pytest.raises(LatentPriorError, match=r"\[-1, 1\]"):
        adapter.encode((_digits(2) + 1) * 127.5)  # uint8-range images
    with pytest.raises(LatentPriorError, match=r"\(N, 1, H, W\)"):
        adapter.encode(torch.zeros(2, 3, 8, 8))


# ---- hub ids: the local cache, offline, unreachable -------------------------------------------------
def _fake_hub_cache(cache, repo_id: str, files_from, subfolder: str | None = None):
    """A real Hugging Face cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(files_from, snapshot / subfolder if subfolder else snapshot)


def test_hub_pipeline_repo_from_the_local_cache(tmp_path):
    _tiny_kl(seed=5).save_pretrained(tmp_path / "src")
    _fake_hub_cache(tmp_path / "cache", "someone/tiny-pipeline", tmp_path / "src", subfolder="vae")
    adapter = load_vae("someone/tiny-pipeline", cache_dir=tmp_path / "cache")
    assert adapter.provenance.source == "someone/tiny-pipeline" and adapter.provenance.subfolder == "vae"
    assert adapter.provenance.fingerprint == load_vae(tmp_path / "src").provenance.fingerprint


def test_hub_id_offline_fails_fast_with_advice(tmp_path):
    start = time.perf_counter()
    with pytest.raises(LatentPriorError) as info:
        load_vae("stabilityai/sd-vae-ft-mse", cache_dir=tmp_path)
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "'stabilityai/sd-vae-ft-mse'" in message and "hf download stabilityai/sd-vae-ft-mse" in message
    assert "local folder" in message


def test_unreachable_hub_without_offline_mode_fails_fast(tmp_path, monkeypatch):
    # Offline mode off, and the Hub endpoint a local port nobody listens on: a real refused connection.
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(LatentPriorError, match="cannot be reached"):
        load_vae("someone/not-downloaded-vae", cache_dir=tmp_path)
    assert time.perf_counter() - start < 5


def test_default_means_the_embedded_vae(tmp_path, monkeypatch):
    from latent_prior import defaults

    _tiny_kl(seed=7).save_pretrained(tmp_path / "default_vae")
    monkeypatch.setattr(defaults, "DEFAULT_VAE_DIR", tmp_path / "default_vae")
    assert load_vae(None).provenance.fingerprint == load_vae("default").provenance.fingerprint
    assert load_vae("default").provenance.source == str((tmp_path / "default_vae").resolve())
    monkeypatch.setattr(defaults, "DEFAULT_VAE_DIR", tmp_path / "missing")
    with pytest.raises(LatentPriorError, match="embedded default VAE is missing"):
        load_vae("default")


# ---- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["./no/such/vae", "/no/such/folder", "~/no-such-vae-here", "weights/vae.safetensors", "a/b/c"])
def test_missing_local_path_names_it(spec):
    with pytest.raises(LatentPriorError, match="does not exist; check the path") as info:
        load_vae(spec)
    assert spec in str(info.value)


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LatentPriorError, match="has no config.json; expected a diffusers save_pretrained folder"):
        load_vae(tmp_path / "empty")


def test_unsupported_class_and_kind_mismatch(tmp_path):
    _tiny_kl().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(LatentPriorError, match="contradicts kind='tiny'"):
        load_vae(tmp_path, kind="tiny")
    (tmp_path / "config.json").write_text(json.dumps({**config, "_class_name": "VQModel"}))
    with pytest.raises(LatentPriorError, match="_class_name VQModel"):
        load_vae(tmp_path)
    with pytest.raises(LatentPriorError, match="--dtype 'fp8'"):
        load_vae(tmp_path, dtype="fp8")


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "vae.ckpt").write_bytes(b"not read")
    with pytest.raises(LatentPriorError, match="pickle"):
        load_vae(tmp_path / "vae.ckpt")
    _tiny_kl().save_pretrained(tmp_path / "bin", safe_serialization=False)
    with pytest.raises(LatentPriorError, match="pickled .bin"):
        load_vae(tmp_path / "bin")
