"""The exported LatentPrior: save/load round trip, raw-space sampling and densities, errors, `sample` CLI.

These priors are built directly from fresh (untrained) energy and flow networks: what is tested
here is the container, not the training (tests/test_train.py trains real ones).
"""

import json
import math
from pathlib import Path

import pytest
import torch
from _cli import argv
from _encode_helpers import TINY_KL_CONFIG
from safetensors import safe_open
from safetensors.torch import load_file

from latent_prior.cli import main
from latent_prior.energy import build_energy
from latent_prior.errors import LatentPriorError
from latent_prior.flows import build_flow
from latent_prior.prior import CARD_FILE, CONFIG_FILE, FORMAT_VERSION, MODEL_FILE, LatentPrior
from latent_prior.vae import LatentNormalization

NORM = LatentNormalization(scaling_factor=0.5, shift_factor=0.25, latents_mean=(1.0, -1.0, 0.0), latents_std=(2.0, 0.5, 1.0))


def make_prior(shape=(3,), normalization=NORM, seed=0, zero_energy=False, log_z=0.3) -> LatentPrior:
    torch.manual_seed(seed)
    energy = build_energy(shape, hidden=16, depth=2, channels=8)
    flow = build_flow(shape, **({"num_blocks": 2, "hidden": 16} if len(shape) == 1 else {"blocks_per_scale": 1, "hidden_channels": 8}))
    flow.initialize(torch.randn(64, *shape) * 0.7 + 0.2)
    with torch.no_grad():
        energy.head.weight.mul_(0 if zero_energy else 300.0)  # a visibly non-zero energy, or exactly zero
    return LatentPrior(
        energy,
        flow,
        latent_shape=shape,
        normalization=normalization,
        log_z=0.0 if zero_energy else log_z,
        log_z_info={"ess": 10.0},
        provenance={"source": "test", "config_hash": "abc"},
        training={"note": "test"},
    )


def test_round_trip_gives_identical_samples_and_densities(tmp_path):
    prior = make_prior()
    prior.save_pretrained(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == sorted([CARD_FILE, CONFIG_FILE, MODEL_FILE])
    loaded = LatentPrior.from_pretrained(tmp_path / "p")
    options = {"sampler": {}, "sir": {"proposals": 8}, "langevin": {"steps": 5}}
    for method, opts in options.items():
        a = prior.sample(50, method=method, generator=torch.Generator().manual_seed(3), **opts)
        b = loaded.sample(50, method=method, generator=torch.Generator().manual_seed(3), **opts)
        assert a.shape == (50, 3)
        assert torch.equal(a, b), method
    x = torch.randn(20, 3)
    assert torch.equal(prior.log_prob(x), loaded.log_prob(x))
    assert loaded.log_z == prior.log_z and loaded.provenance == prior.provenance
    assert loaded.normalization == NORM and loaded.training_info == {"note": "test"}
    config = json.loads((tmp_path / "p" / CONFIG_FILE).read_text())
    assert config["format_version"] == FORMAT_VERSION and "latent_prior_version" in config
    # Only tensors in the weights file, no pickle anywhere.
    with safe_open(str(tmp_path / "p" / MODEL_FILE), framework="pt") as f:
        assert any(k.startswith("energy_net.") for k in f.keys()) and any(k.startswith("flow.") for k in f.keys())


def _hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], subfolder: str = "") -> None:
    """The layout huggingface_hub keeps on disk: models--NS--NAME/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        path = repo / "snapshots" / commit / subfolder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_a_prior_is_built_from_its_config_alone(tmp_path):
    prior = make_prior(shape=(4, 4, 4), normalization=LatentNormalization(scaling_factor=0.18215))
    built = LatentPrior.from_config(prior.config)  # fresh networks: other weights, the same tensors
    assert built.latent_shape == (4, 4, 4) and built.log_z == prior.log_z and built.normalization == prior.normalization
    assert built.provenance == prior.provenance and built.training_info == prior.training_info
    fresh, trained = built.state_dict(), prior.state_dict()
    assert fresh.keys() == trained.keys() and any(not torch.equal(fresh[k], trained[k]) for k in fresh)
    built.load_state_dict(prior.state_dict())
    x = torch.randn(5, 4, 4, 4)
    assert torch.equal(built.log_prob(x), prior.log_prob(x))
    with pytest.raises(LatentPriorError, match="my.json.*`log_z`"):
        LatentPrior.from_config(dict(prior.config, log_z="high"), where="my.json")


def test_a_prior_is_a_hub_mixin_model_whose_card_is_rewritten_on_every_save(tmp_path, monkeypatch):
    from huggingface_hub import ModelHubMixin

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prior = make_prior()
    assert isinstance(prior, ModelHubMixin)
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / CARD_FILE).write_text("a stale card")
    assert prior.save_pretrained(tmp_path / "p") is None  # the mixin's convention: a commit URL only when pushing
    card = (tmp_path / "p" / CARD_FILE).read_text()
    assert "stale" not in card and "license: apache-2.0" in card and "- latent-prior" in card
    assert 'LatentPrior.from_pretrained("PATH_OR_REPO_ID")' in card
    with pytest.raises(LatentPriorError, match="HF_HUB_OFFLINE is set.*hf upload me/p"):
        prior.push_to_hub("me/p")


def test_force_download_with_an_unreachable_hub_says_so(tmp_path, monkeypatch):
    # Offline mode off, and the Hub endpoint a local port nobody listens on: a real refused connection.
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(LatentPriorError, match="'someone/p': force_download=True, but the Hub cannot be reached"):
        LatentPrior.from_pretrained("someone/p", force_download=True, cache_dir=tmp_path)


def test_a_prior_loads_by_hub_id_from_the_local_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prior = make_prior()
    folder = tmp_path / "p"
    prior.save_pretrained(folder, repo_id="someone/digits-prior")
    files = {name: (folder / name).read_bytes() for name in (CONFIG_FILE, MODEL_FILE, CARD_FILE)}
    cache = tmp_path / "hub"
    _hub_cache(cache, "someone/digits-prior", files)
    _hub_cache(cache, "someone/many-priors", files, subfolder="d8")
    x = torch.randn(20, 3)
    for repo_id, subfolder in (("someone/digits-prior", None), ("someone/many-priors", "d8")):
        loaded = LatentPrior.from_pretrained(repo_id, subfolder=subfolder, cache_dir=cache, torch_dtype=torch.float64)
        assert loaded.log_prob(x.double()).dtype == torch.float64
        assert torch.allclose(loaded.log_prob(x.double()).float(), prior.log_prob(x), atol=1e-5)
        assert loaded.provenance == prior.provenance and loaded.log_z == prior.log_z
    # not cached, offline: one sentence that says what to do, at once (no retries)
    with pytest.raises(
        LatentPriorError,
        match=r"'someone/other' is neither a local folder nor in the local Hugging "
        r"Face cache.*hf download someone/other",
    ):
        LatentPrior.from_pretrained("someone/other", cache_dir=cache)
    with pytest.raises(LatentPriorError, match="has no d8/config.json|neither a local folder"):
        LatentPrior.from_pretrained("someone/digits-prior", subfolder="d8", cache_dir=cache)
    # a path that is not there and is not an id stays a path error
    with pytest.raises(LatentPriorError, match="does not exist"):
        LatentPrior.from_pretrained("./not/here/either")
    with pytest.raises(LatentPriorError, match="disagree"):
        LatentPrior.from_pretrained(folder, torch_dtype="bf16", dtype="fp32")


def test_the_model_card_and_push_to_hub_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prior = make_prior()
    prior.training_info = {
        "latents": "cache/ (1500 latents)",
        "summary": {
            "num_train": 1350,
            "num_validation": 150,
            "steps": 2000,
            "seconds": 98.0,
            "selected_step": 1750,
            "heldout_gain_nats": 1.25,
            "heldout_fd": 0.0123,
            "heldout_precision": 0.88,
            "log_z_ess_fraction": 0.97,
        },
    }
    prior.provenance = {"source": "stabilityai/sd-vae-ft-mse", "class_name": "AutoencoderKL", "fingerprint": "f00d", "config_hash": "abc"}
    prior.save_pretrained(tmp_path / "p", repo_id="me/sd-prior")
    card = (tmp_path / "p" / CARD_FILE).read_text()
    assert card.startswith("---\nlibrary_name: latent-prior\n")
    for text in (
        "# A latent prior for stabilityai/sd-vae-ft-mse",
        'LatentPrior.from_pretrained("me/sd-prior")',
        "fingerprint `f00d`",
        "cache/ (1500 latents)",
        "1350 training latents, 150 held out",
        "selected step 1750",
        "+1.250 nats",
        "0.0123",
        "precision 0.880",
        "ESS 97.0 %",
    ):
        assert text in card, text
    with pytest.raises(LatentPriorError, match="needs repo_id"):
        prior.save_pretrained(tmp_path / "q", push_to_hub=True)
    with pytest.raises(LatentPriorError, match="HF_HUB_OFFLINE is set.*hf upload me/sd-prior"):
        prior.save_pretrained(tmp_path / "q", push_to_hub=True, repo_id="me/sd-prior")
    assert (tmp_path / "q" / MODEL_FILE).is_file()  # the folder is written before the upload is tried


def test_spatial_prior_round_trip(tmp_path):
    prior = make_prior(shape=(4, 4, 4), normalization=LatentNormalization(scaling_factor=0.18215))
    prior.save_pretrained(tmp_path / "p")
    loaded = LatentPrior.from_pretrained(tmp_path / "p")
    a = prior.sample(6, generator=torch.Generator().manual_seed(1))
    b = loaded.sample(6, generator=torch.Generator().manual_seed(1))
    assert a.shape == (6, 4, 4, 4) and torch.equal(a, b)


def test_zero_energy_prior_is_the_gaussian_in_raw_space():
    """E = 0, log Z = 0: p is N(0, I) in normalized space, so in raw space each coordinate is
    N(shift + mean_c, (std_c / scaling)^2): log_prob must include the normalization's Jacobian."""
    prior = make_prior(zero_energy=True)
    raw = torch.randn(100, 3) * 3
    loc = torch.tensor([0.25 + 1.0, 0.25 - 1.0, 0.25])
    scale = torch.tensor([2.0, 0.5, 1.0]) / 0.5
    expected = torch.distributions.Normal(loc, scale).log_prob(raw).sum(1)
    torch.testing.assert_close(prior.log_prob(raw).detach(), expected, rtol=1e-5, atol=1e-4)
    # normalized=True gives the density of the normalized latents (no Jacobian)
    z = NORM.normalize(raw)
    torch.testing.assert_close(
        prior.log_prob(z, normalized=True).detach(), torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1), rtol=1e-5, atol=1e-4
    )
    assert prior.log_abs_det_normalize() == pytest.approx(math.log(0.5 / 2.0) + math.log(0.5 / 0.5) + math.log(0.5 / 1.0), abs=1e-12)
    # samples come back in raw space: denormalized draws of the flow
    flow_z = prior.flow.sample(4000, generator=torch.Generator().manual_seed(0))
    raw_samples = prior.sample(4000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(raw_samples, NORM.denormalize(flow_z))
    assert not torch.allclose(raw_samples, flow_z)


def test_energy_and_log_prob_follow_dtype_and_device():
    prior = make_prior()
    raw = torch.randn(5, 3)
    e32 = prior.energy(raw)
    assert e32.shape == (5,) and e32.dtype == torch.float32
    torch.testing.assert_close(prior.log_prob(raw), prior.log_prob(NORM.normalize(raw), normalized=True) + prior.log_abs_det_normalize())
    prior64 = make_prior().to(torch.float64)
    assert prior64.log_prob(raw).dtype == torch.float64
    torch.testing.assert_close(prior64.log_prob(raw).float(), prior.log_prob(raw), rtol=1e-4, atol=1e-4)
    if torch.cuda.is_available():
        cuda = make_prior().to("cuda")
        assert cuda.log_prob(raw).device.type == "cuda"
        assert cuda.sample(4, generator=torch.Generator(device="cuda").manual_seed(0)).device.type == "cuda"


def test_bf16_from_pretrained(tmp_path):
    make_prior().save_pretrained(tmp_path / "p")
    prior = LatentPrior.from_pretrained(tmp_path / "p", dtype="bf16")
    assert prior.dtype == torch.bfloat16
    assert prior.energy(torch.randn(4, 3)).dtype == torch.bfloat16


def test_sample_errors():
    prior = make_prior()
    for n in (0, -3):
        with pytest.raises(LatentPriorError, match="positive integer"):
            prior.sample(n)
    with pytest.raises(LatentPriorError, match="method"):
        prior.sample(3, method="gibbs")
    with pytest.raises(LatentPriorError, match="shape"):
        prior.log_prob(torch.randn(4, 5))


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(LatentPriorError, match="does not exist"):
        LatentPrior.from_pretrained(tmp_path / "nowhere")
    make_prior().save_pretrained(tmp_path / "p")
    (tmp_path / "p" / MODEL_FILE).unlink()
    with pytest.raises(LatentPriorError, match=MODEL_FILE):
        LatentPrior.from_pretrained(tmp_path / "p")
    make_prior().save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / CONFIG_FILE).read_text())
    config["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "q" / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(LatentPriorError, match="newer"):
        LatentPrior.from_pretrained(tmp_path / "q")
    # weights that do not match the config
    make_prior().save_pretrained(tmp_path / "r")
    config = json.loads((tmp_path / "r" / CONFIG_FILE).read_text())
    config["energy"]["hidden"] = 32
    (tmp_path / "r" / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(LatentPriorError, match="does not match"):
        LatentPrior.from_pretrained(tmp_path / "r")


def test_check_compatible_with_shapes_and_a_real_vae():
    from diffusers import AutoencoderKL

    from latent_prior.adapters import DiffusersKLAdapter

    prior = make_prior(shape=(4, 4, 4), normalization=LatentNormalization(scaling_factor=0.18215))
    prior.check_compatible((4, 4, 4), LatentNormalization(scaling_factor=0.18215))
    with pytest.raises(LatentPriorError, match=r"shape differs.*\(4, 4, 4\).*\(4, 8, 8\)"):
        prior.check_compatible((4, 8, 8))
    with pytest.raises(LatentPriorError, match="normalization differs"):
        prior.check_compatible((4, 4, 4), LatentNormalization(scaling_factor=0.13025))

    torch.manual_seed(0)
    tiny = dict(TINY_KL_CONFIG, layers_per_block=1, scaling_factor=0.18215)
    adapter = DiffusersKLAdapter(AutoencoderKL(**tiny).eval())
    prior.provenance = None
    prior.check_compatible(adapter, resolution=8)  # 2x downsampling: 8 px -> 4x4
    with pytest.raises(LatentPriorError, match="shape differs"):
        prior.check_compatible(adapter, resolution=16)
    other = DiffusersKLAdapter(AutoencoderKL(**{**tiny, "latent_channels": 8}).eval())
    with pytest.raises(LatentPriorError, match="shape differs"):
        prior.check_compatible(other)
    rescaled = DiffusersKLAdapter(AutoencoderKL(**{**tiny, "scaling_factor": 0.5}).eval())
    with pytest.raises(LatentPriorError, match="normalization differs"):
        prior.check_compatible(rescaled)


def test_sample_cli_writes_raw_latents_with_metadata(tmp_path, capsys):
    prior = make_prior()
    prior.save_pretrained(tmp_path / "p")
    out = tmp_path / "z.safetensors"
    assert (
        main(
            argv("sample --prior", tmp_path / "p", "-n 37 --out", out, "--method sir --seed 5 --proposals 4 --temperature 0.9 --device cpu")
        )
        == 0
    )
    latents = load_file(str(out))["latents"]
    assert latents.shape == (37, 3) and torch.isfinite(latents).all()
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["method"] == "sir" and meta["seed"] == "5" and float(meta["temperature"]) == 0.9
    assert meta["space"] == "raw" and meta["prior"].endswith("p")
    expected = prior.sample(37, method="sir", temperature=0.9, generator=torch.Generator().manual_seed(5), proposals=4)
    torch.testing.assert_close(latents, expected)

    assert main(["sample", "--prior", str(tmp_path / "p"), "-n", "0", "--out", str(out)]) == 2
    assert "positive integer" in capsys.readouterr().err
    assert main(["sample", "--prior", str(tmp_path / "p"), "-n", "3", "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    torch.testing.assert_close(load_file(str(out))["latents"], expected)  # the refused command left the file alone
    assert main(["sample", "--prior", str(tmp_path / "missing"), "-n", "3", "--out", str(tmp_path / "new.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["sample", "--prior", str(tmp_path / "p"), "-n", "3", "--out", str(tmp_path / "z.pt")]) == 2
    assert ".safetensors" in capsys.readouterr().err
