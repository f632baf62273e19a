"""Shared pytest setup: quiet, deterministic torch on a small machine."""

import os

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import torch

torch.set_num_threads(min(2, torch.get_num_threads()))
