"""Compute-device resolution: the one place that turns ``"auto"``/``"cpu"``/``"cuda"`` into a
:class:`torch.device`.
"""

from __future__ import annotations

import logging

import torch

from apex_rank.errors import ConfigError, DeviceError

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Return the torch device for a user's choice.

    ``"auto"`` picks CUDA when available and otherwise falls back to the CPU with a log line.
    An explicit ``"cuda"`` (or ``"cuda:N"``) without a usable GPU is a :class:`DeviceError`,
    never a silent fallback.
    """
    if isinstance(device, torch.device):
        device = str(device)
    name = device.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.info("device 'auto': CUDA is not available, using the CPU")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} was requested but CUDA is not available here")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {device!r} was requested but only {torch.cuda.device_count()} GPU(s) exist"
            )
        return dev
    raise ConfigError(f"unknown device {device!r}; valid: 'auto', 'cpu', 'cuda', 'cuda:N'")
