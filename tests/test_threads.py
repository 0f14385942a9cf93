"""The CPU-thread policy of latent_prior.threads: one thread unless the user chose."""

import torch

from latent_prior.threads import cpu_threads, policy_threads


def test_one_thread_unless_the_user_chose(monkeypatch):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    assert policy_threads(None) == policy_threads(0) == 1
    assert policy_threads(3) == 3  # an explicit --cpu-threads wins
    with cpu_threads(None) as threads:
        assert threads == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before  # restored
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's environment: keep torch's count
    assert policy_threads(None) == torch.get_num_threads()
    with cpu_threads(2) as threads:
        assert threads == 2 and torch.get_num_threads() == 2
    assert torch.get_num_threads() == before


def test_sample_refuses_a_negative_thread_count(capsys):
    from latent_prior.cli import main

    assert main(["sample", "--prior", "nowhere", "-n", "2", "--out", "x.safetensors", "--cpu-threads", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--cpu-threads -1" in err and err.count("error:") == 1  # one sentence naming the argument
