"""Input validation shared by every backend of :func:`linear_moe.kernels.gla.gla`."""
from __future__ import annotations

import torch

#: decay kind by the rank of ``g`` (``None`` -> ``"none"``)
DECAY_KINDS = {3: "scalar", 4: "diagonal"}


def decay_kind(g: torch.Tensor | None) -> str:
    """``"none"``, ``"scalar"`` (g: B,T,H) or ``"diagonal"`` (g: B,T,H,K)."""
    return "none" if g is None else DECAY_KINDS[g.dim()]


def _expect(name: str, tensor: torch.Tensor, shape: tuple[int, ...], meaning: str) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"gla: {name} must have shape {meaning} = {shape}, got {tuple(tensor.shape)}")


def check_gla_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    u: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> int:
    """Validate shapes; return N, the number of sequences (rows of the state)."""
    if q.dim() != 4:
        raise ValueError(f"gla: q must have shape (B, T, H, K), got {tuple(q.shape)}")
    B, T, H, K = q.shape
    _expect("k", k, (B, T, H, K), "(B, T, H, K) like q")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"gla: v must have shape (B, T, H, V) = ({B}, {T}, {H}, V), got {tuple(v.shape)}")
    V = v.shape[-1]
    if g is not None and g.dim() not in DECAY_KINDS:
        raise ValueError(
            f"gla: g must have shape (B, T, H) = {(B, T, H)} (scalar decay) or (B, T, H, K) = {(B, T, H, K)} "
            f"(diagonal decay), got {tuple(g.shape)}"
        )
    if g is not None:
        _expect("g", g, (B, T, H, K)[: g.dim()], "(B, T, H, K)" if g.dim() == 4 else "(B, T, H)")
    if u is not None:
        _expect("u", u, (H, K), "(H, K)")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"gla: cu_seqlens packs sequences along T, so B must be 1, got B={B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"gla: cu_seqlens must be a 1-D integer tensor of N + 1 offsets, got shape "
                f"{tuple(cu_seqlens.shape)} dtype {cu_seqlens.dtype}"
            )
        if cu_seqlens.device.type == "cpu":  # reading values from an accelerator would synchronise it
            offsets = cu_seqlens.tolist()
            if offsets[0] != 0 or offsets[-1] != T or any(b < a for a, b in zip(offsets, offsets[1:])):
                raise ValueError(f"gla: cu_seqlens must rise from 0 to T={T}, got {offsets}")
        N = cu_seqlens.numel() - 1
    else:
        N = B
    if initial_state is not None:
        _expect("initial_state", initial_state, (N, H, K, V), "(N, H, K, V)")
    return N
