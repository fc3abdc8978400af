"""The default CPU path of both losses holds O(N * D) memory: at N = 16384, D = 256 the forward and backward raise the
peak resident memory of a fresh process by far less than the 1 GiB of one fp32 logit matrix.

Each measurement runs in its own subprocess (ru_maxrss is a high-water mark of the whole process), after a small
warm-up call so that libraries, thread pools and allocator arenas already exist. A positive control runs the
full-logit reference at N = 8192 through the same probe, so the probe is shown to see an N x N matrix.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import json, resource, sys
import torch
import torch.nn.functional as F
from fineviti.ops import clip_loss, siglip_loss

n, d, backend = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
img = F.normalize(torch.randn(n, d), dim=-1).requires_grad_()
txt = F.normalize(img.detach() + torch.randn(n, d), dim=-1).requires_grad_()
scale = torch.tensor(10.0, requires_grad=True)
bias = torch.tensor(-10.0, requires_grad=True)

def step(k):
    siglip_loss(img[:k], txt[:k], scale, bias, backend=backend).backward()
    clip_loss(img[:k], txt[:k], scale, backend=backend).backward()

step(64)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
step(n)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert torch.isfinite(img.grad).all() and torch.isfinite(scale.grad).all()
print(json.dumps({"increase_mib": (after - before) / 1024}))
"""


def _peak_increase_mib(n: int, d: int, backend: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("FINEVITI_LOSS_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", PROBE, str(n), str(d), backend], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["increase_mib"]


def test_default_cpu_path_is_linear_in_n():
    increase = _peak_increase_mib(16384, 256, "auto")
    assert increase < 256, f"forward + backward raised peak RSS by {increase:.0f} MiB (one fp32 logit matrix: 1024)"


def test_probe_sees_the_full_logits_of_the_reference():
    increase = _peak_increase_mib(8192, 256, "reference")
    assert increase > 256, f"the reference at N = 8192 (256 MiB of fp32 logits) raised peak RSS by {increase:.0f} MiB"
