"""Helpers for parity tests against PyTorch reference models (test-only dependency)."""
from __future__ import annotations

import os

import numpy as np
import torch
from safetensors.torch import save_file


def save_state_dict(module: torch.nn.Module, directory: str, name: str = "model.safetensors") -> str:
    """Writes a module's state dict as safetensors (shared tensors cloned) and returns the dir."""
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    save_file(state, os.path.join(directory, name))
    return directory


def additive_mask(allowed: np.ndarray) -> torch.Tensor:
    """bool[B, T, S] -> float32[B, 1, T, S] additive mask (0 allowed, finfo.min masked)."""
    allowed = torch.from_numpy(np.array(allowed))  # a writable copy
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None].to(torch.float32)


def max_rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))
