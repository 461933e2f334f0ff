"""`cosod` is a pure library: importing it pulls in no web/queue stack, loads no weights, touches no CUDA."""

import subprocess
import sys

CHECK = r"""
import sys
import cosod, cosod.backbones, cosod.features, cosod.scosparc, cosod.refine, cosod.pipeline, cosod.train
import cosod.cli, cosod.data, cosod.metrics, cosod.imageio, cosod.discovery, cosod.pseudo_labels
import cosod.ums.net, cosod.ums.checkpoint
import cosod.propagate, cosod.absence
banned = [m for m in sys.modules if m.split('.')[0] in {'flask', 'rq', 'redis', 'label_studio_sdk', 'backend',
                                                         'gunicorn', 'werkzeug'}]
assert not banned, banned
import torch
assert not torch.cuda.is_initialized()
print('ok')
"""


def test_cosod_imports_nothing_from_the_backend_stack():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
