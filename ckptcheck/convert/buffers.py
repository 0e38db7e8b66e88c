"""A rotary buffer is dropped only when it is what loaders recompute from the config.

Loaders rebuild rope.freqs / inv_freq ([head_dim / 2] frequencies 1 / theta^(2i / head_dim)) and
freqs_cis ([seq, head_dim / 2] unit rotations) from head_dim and rope_theta.  A stored buffer of
another shape or other values is not that buffer: dropping it could lose what the model was trained
with (another theta, a scaled rotary), so the conversion refuses, naming it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InputError

if TYPE_CHECKING:
    import torch

    from ..configs import ModelConfig
    from ..formats import Checkpoint


def refuse_unrecomputable(ckpt: Checkpoint, keys: list[str], cfg: ModelConfig | None) -> None:
    """InputError for the first buffer in ``keys`` the config does not give, bit for bit at its precision."""
    for key in keys:
        if cfg is None:
            raise InputError(ckpt.manifest.path, key, "a rotary buffer is dropped only when its values are those "
                             "the config's head_dim and rope_theta give: pass --model-config")
        shape = ckpt.manifest.tensors[key].shape
        # read_rows, not load: it refuses a view with more elements than its storage before any copy
        why = _differs(ckpt.read_rows(key, 0, shape[0]) if shape else ckpt.load(key), cfg)
        if why:
            raise InputError(ckpt.manifest.path, key, f"not the rotary buffer loaders recompute ({why}); it may "
                             "hold what the model was trained with, so it is not dropped: fix head_dim/rope_theta "
                             "in the config, or name it with repair --drop to discard it")


def _differs(stored: torch.Tensor, cfg: ModelConfig) -> str:
    """Why ``stored`` is not the buffer ``cfg`` gives ("" when it is)."""
    import torch

    from ..llama import rotary_angles

    half = cfg.head_dim // 2
    if stored.is_complex() or (stored.dim() == 3 and stored.shape[-1] == 2):  # freqs_cis, complex or as pairs
        cis = stored if stored.is_complex() else torch.view_as_complex(stored.float().contiguous())
        if cis.dim() != 2 or cis.shape[1] != half:
            return f"shape {list(stored.shape)}, not [seq, {half}] for head_dim {cfg.head_dim}"
        want = torch.polar(torch.ones(cis.shape, dtype=torch.float64), rotary_angles(cis.shape[0], cfg.head_dim,
                                                                                     cfg.rope_theta).double())
        close = torch.allclose(cis.to(torch.complex128), want, rtol=0.0, atol=1e-3)
    else:
        if list(stored.shape) != [half]:
            return f"shape {list(stored.shape)}, not [{half}] for head_dim {cfg.head_dim}"
        want = rotary_angles(2, cfg.head_dim, cfg.rope_theta).double()[1]
        rtol = 2.0 ** -7 if stored.element_size() <= 2 else 1e-5  # the stored precision
        close = torch.allclose(stored.double(), want, rtol=rtol, atol=0.0)
    return "" if close else f"its values are not those of rope_theta {cfg.rope_theta} and head_dim {cfg.head_dim}"
