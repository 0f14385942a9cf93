"""Energy networks: shapes, near-zero init, gradients in z, batch independence, rebuild, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from latent_prior.energy import ConvEnergy, MLPEnergy, build_energy
from latent_prior.errors import LatentPriorError

CASES = [
    pytest.param((8,), {}, MLPEnergy, id="mlp-8"),
    pytest.param((4, 8, 8), {}, ConvEnergy, id="conv-4x8x8"),
    pytest.param((4, 32, 32), {}, ConvEnergy, id="conv-4x32x32"),
    pytest.param((4, 64, 64), {}, ConvEnergy, id="conv-4x64x64"),
    pytest.param((4, 8, 8), {"kind": "mlp"}, MLPEnergy, id="mlp-flattened-4x8x8"),
    pytest.param((8,), {"spectral_norm": True}, MLPEnergy, id="mlp-8-sn"),
    pytest.param((4, 8, 8), {"spectral_norm": True}, ConvEnergy, id="conv-4x8x8-sn"),
]


@pytest.mark.parametrize("shape, kw, cls", CASES)
def test_energy_shape_init_and_gradients(shape, kw, cls):
    torch.manual_seed(0)
    net = build_energy(shape, **kw)
    assert isinstance(net, cls)
    z = torch.randn(3, *shape, requires_grad=True)
    energy = net(z)
    assert energy.shape == (3,)
    # Near-zero at init: p_θ starts as N(0, I) up to a tiny tilt.
    assert energy.abs().max() < 1e-2
    (grad,) = torch.autograd.grad(energy.sum(), z)
    assert grad.shape == z.shape and torch.isfinite(grad).all()
    assert grad.abs().sum() > 0  # the head is small, not zero: Langevin sees a gradient


def test_conv_energy_runs_on_other_sizes_unchanged():
    net = build_energy((4, 32, 32), channels=16, depth=3)
    for hw in [(8, 8), (64, 64), (5, 7), (1, 1)]:
        assert net(torch.randn(2, 4, *hw)).shape == (2,)


def test_gradient_penalty_double_backward():
    # The trainer's data-side penalty ½‖∇_z E‖² needs second derivatives; SiLU keeps them non-zero.
    torch.manual_seed(1)
    for net in (build_energy((8,), depth=2), build_energy((4, 8, 8), channels=16, depth=2)):
        with torch.no_grad():
            net.head.weight.normal_(std=0.5)  # a trained-looking head, so the penalty is not ~0
        z = torch.randn(5, *net.latent_shape, requires_grad=True)
        (grad,) = torch.autograd.grad(net(z).sum(), z, create_graph=True)
        penalty = 0.5 * grad.flatten(1).pow(2).sum(1).mean()
        penalty.backward()
        first = next(net.parameters())
        assert first.grad is not None and torch.isfinite(first.grad).all() and first.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(8,), (4, 8, 8)])
def test_energy_does_not_depend_on_the_batch(shape):
    torch.manual_seed(2)
    net = build_energy(shape, channels=16, hidden=32)
    with torch.no_grad():
        net.head.weight.normal_()
    z = torch.randn(20, *shape)
    full = net(z)
    torch.testing.assert_close(net(z[:3]), full[:3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net(z[3:].flip(0)), full[3:].flip(0), atol=1e-5, rtol=1e-5)


def test_spectral_norm_bounds_hidden_layers():
    torch.manual_seed(3)
    net = build_energy((8,), hidden=64, depth=3, spectral_norm=True)
    net.train()
    for _ in range(20):  # power iteration converges over forward passes in train mode
        net(torch.randn(4, 8))
    hidden_layers = [m for m in net.body if isinstance(m, torch.nn.Linear)]
    assert len(hidden_layers) == 3
    for layer in hidden_layers:
        assert torch.linalg.matrix_norm(layer.weight.detach(), ord=2).item() == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize(
    "shape, kw", [((8,), {"hidden": 32, "depth": 2}), ((4, 8, 8), {"channels": 16, "spectral_norm": True})], ids=["mlp", "conv-sn"]
)
def test_rebuild_from_config_and_state(shape, kw, tmp_path):
    torch.manual_seed(4)
    net = build_energy(shape, **kw)
    with torch.no_grad():
        net.head.weight.normal_()
    net.eval()
    save_file(net.state_dict(), tmp_path / "energy.safetensors")
    (tmp_path / "energy.json").write_text(json.dumps(net.config))

    torch.manual_seed(5)
    clone = build_energy(**json.loads((tmp_path / "energy.json").read_text()))
    clone.load_state_dict(load_file(tmp_path / "energy.safetensors"))
    clone.eval()
    z = torch.randn(6, *shape)
    torch.testing.assert_close(clone(z), net(z))


def test_bad_input_raises_clear_errors():
    with pytest.raises(LatentPriorError, match="kind"):
        build_energy((8,), kind="transformer")
    with pytest.raises(LatentPriorError, match="dimensions"):
        build_energy((4, 8))
    with pytest.raises(LatentPriorError, match="C, H, W"):
        build_energy((8,), kind="conv")
    with pytest.raises(LatentPriorError, match="latent_shape"):
        build_energy((0, 8, 8))
    with pytest.raises(LatentPriorError, match="latent_shape"):
        build_energy("eight")
    with pytest.raises(LatentPriorError, match="hidden"):
        build_energy((8,), hidden=0)
    with pytest.raises(LatentPriorError, match="shape"):
        build_energy((8,))(torch.randn(2, 9))
    with pytest.raises(LatentPriorError, match="shape"):
        build_energy((4, 8, 8), channels=8)(torch.randn(2, 3, 8, 8))
