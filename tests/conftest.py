"""Test-wide environment: no network and one torch thread (the test machine's cores are shared)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import torch  # noqa: E402  (imported after the environment is set)

torch.set_num_threads(1)
