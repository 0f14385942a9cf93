"""Peak memory of a short fit against the number of latents (memory must not grow with N).

    python bench/fit_memory.py 2000 100000 200000

For each N: writes N random 4×8×8 latents (mean + logvar, one .safetensors file) in a child process,
then fits 60 steps in another child process while a thread polls /proc/self/status every 50 ms, and
prints the peak anonymous and file-backed resident memory (MB). Linux only.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

WRITE = """
import sys, torch
from safetensors.torch import save_file
n, path = int(sys.argv[1]), sys.argv[2]
g = torch.Generator().manual_seed(0)
save_file({"mean": torch.randn(n, 4, 8, 8, generator=g), "logvar": torch.full((n, 4, 8, 8), -4.0)}, path)
"""

FIT = """
import sys, threading, time
from latent_prior.train import fit

def rss():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile")}

peak, done = {"RssAnon": 0.0, "RssFile": 0.0}, threading.Event()
def watch():
    while not done.is_set():
        for k, v in rss().items():
            peak[k] = max(peak[k], v)
        time.sleep(0.05)
threading.Thread(target=watch, daemon=True).start()
start = rss()
fit(sys.argv[1], out=sys.argv[2], steps=60, warmup_steps=30, checkpoint_every=30, quiet=True,
    eval_latents=1024, eval_samples=1024, log_z_samples=2048)
done.set()
print(f"anonymous RSS MB: start {start['RssAnon']:.0f}, peak {peak['RssAnon']:.0f} | "
      f"file-backed RSS MB: start {start['RssFile']:.0f}, peak {peak['RssFile']:.0f}")
"""


def main(sizes: list[int]) -> None:
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            path = Path(tmp) / f"latents-{n}.safetensors"
            subprocess.run([sys.executable, "-c", WRITE, str(n), str(path)], check=True)
            result = subprocess.run(
                [sys.executable, "-c", FIT, str(path), str(Path(tmp) / f"fit-{n}")], check=True, capture_output=True, text=True, cwd=root
            )
            size_mb = path.stat().st_size / 2**20
            print(f"{n:>9,} latents ({size_mb:.0f} MB file): {result.stdout.strip().splitlines()[-1]}", flush=True)
            path.unlink()


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [2000, 100000, 200000])
