"""Shared test setup: never touch the network, and one CPU thread per process.

Our test models are tiny, so intra-op threading only adds overhead; with two processes per
distributed test on CI's 2 cores, more threads would oversubscribe the machine (measured: a tiny
flow step took 0.68 s with 2 threads under load vs 0.011 s with 1).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Inherited by subprocesses (kill-and-resume and `accelerate launch` tests).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def default_vae_prior(tmp_path_factory):
    """Real latents of 90 bundled digits from the embedded VAE, and a tiny spatial prior fitted on them."""
    import json

    from _tiny import DEFAULT_VAE_FIT
    from safetensors.torch import save_file

    from latent_prior.adapters import load_vae
    from latent_prior.data import ImageFolder
    from latent_prior.defaults import DEFAULT_DATA_DIR
    from latent_prior.train import fit

    root = tmp_path_factory.mktemp("vae")
    adapter = load_vae("default")
    files = [f"{d}/{p.name}" for d in (0, 1, 7) for p in sorted((DEFAULT_DATA_DIR / str(d)).glob("*.png"))[:30]]
    dataset = ImageFolder(DEFAULT_DATA_DIR, 32, files=files)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    posterior = adapter.encode(images)
    latents = root / "digits.safetensors"
    save_file(
        {"mean": posterior.mean.contiguous(), "logvar": posterior.logvar.contiguous()},
        str(latents),
        metadata={"normalization": json.dumps(adapter.normalization.to_dict()), "provenance": json.dumps(adapter.provenance.to_dict())},
    )
    fit(str(latents), out=str(root / "fit"), steps=10, **DEFAULT_VAE_FIT)
    data = root / "data"
    for name in files[::10]:  # 9 images, 3 per class, as a user's folder
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes((DEFAULT_DATA_DIR / name).read_bytes())
    return latents, root / "fit" / "prior", data
