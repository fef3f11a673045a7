"""Grouped-GEMM experts on a GPU: ``torch._grouped_mm`` against the reference ``gmm``, and megatron's
``GroupedMLP`` against the per-expert ``SequentialMLP`` build (same ModelConfig and seed), in bf16.

Skipped without CUDA (the CPU equivalence in fp32 is tests/model/megatron/test_grouped_gemm.py). Run on
a GPU machine with ``python -m pytest -q tests/gpu/test_grouped_gemm_gpu.py`` (a few seconds plus
torch.compile of GroupedMLP's activation). Tolerances, relative RMS error, bf16 operands: gmm output and
gradients 1e-2 against the reference computed in fp32 from the same bf16 values; the two model builds
(identical initial weights) 2e-2 on the per-token loss and 5e-2 on gradients (the two paths round
differently; a wrong weight layout gives errors of order 1).
"""
from __future__ import annotations

import pytest
import torch

from linear_moe.kernels.testing import assert_rel_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MODEL = dict(layer_pattern="LA", num_layers=2, lsm_mixer="gla", moe_aux_loss_coeff=1e-2)
B, T = 2, 64


def _hopper() -> bool:
    return torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.parametrize("trans_b", [False, True], ids=["b", "b_transposed"])
def test_cuda_gmm_matches_reference_in_bf16(trans_b):
    from linear_moe.model.megatron.grouped_gemm import gmm, naive_gmm, torch_grouped_mm_supported

    sizes, K, N = [37, 0, 91, 1], 64, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(sum(sizes), K, device="cuda", generator=gen).bfloat16()
    b = torch.randn((4, N, K) if trans_b else (4, K, N), device="cuda", generator=gen).bfloat16()
    grad = torch.randn(sum(sizes), N, device="cuda", generator=gen).bfloat16()
    batch_sizes = torch.tensor(sizes)  # on the CPU, as megatron's dispatcher may hand them over
    assert torch_grouped_mm_supported(a, b, trans_b) == _hopper()
    results = []
    for fn, dtype in ((naive_gmm, torch.float32), (gmm, torch.bfloat16)):
        a_, b_ = a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
        out = fn(a_, b_, batch_sizes, trans_b)
        out.backward(grad.to(dtype))
        results.append((out.float(), a_.grad.float(), b_.grad.float()))
    for name, ref, act in zip(("out", "grad a", "grad b"), *results):
        assert_rel_close(name, ref, act, 1e-2)


def test_grouped_mlp_matches_sequential_mlp_in_bf16(monkeypatch):
    import linear_moe.model.mixers  # noqa: F401  (fills the mixer registry)
    from linear_moe.components.train.distributed import world_of_one
    from linear_moe.model import preset
    from linear_moe.model.megatron import grouped_gemm
    from linear_moe.model.megatron.config import transformer_config
    from linear_moe.model.megatron.gpt import build_gpt_model
    from linear_moe.model.megatron.state_dict import RankCoords, gather_full_state_dict, shard_layout

    fast_calls = []
    fast = grouped_gemm.torch_grouped_mm_gmm
    monkeypatch.setattr(grouped_gemm, "torch_grouped_mm_gmm", lambda *args: fast_calls.append(1) or fast(*args))
    mc = preset("tiny", **MODEL)
    tokens = torch.randint(0, mc.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0)).cuda()
    runs = {}
    with world_of_one():
        for grouped in (False, True):
            config = transformer_config(mc, moe_grouped_gemm=grouped)
            assert config.bf16 and config.params_dtype == torch.bfloat16
            model = build_gpt_model(mc, config, seed=0).to(torch.device("cuda", torch.cuda.current_device()),
                                                           dtype=config.params_dtype)
            layout, coords = shard_layout(model), RankCoords.current(mc.num_layers, mc.num_experts)
            loss_BT = model(tokens[:, :-1], torch.arange(T, device="cuda").expand(B, T), None, labels=tokens[:, 1:])
            loss_BT.float().mean().backward()
            grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
            runs[grouped] = dict(loss=loss_BT.float(), grads=gather_full_state_dict(grads, layout, coords),
                                 initial=gather_full_state_dict(
                                     {k: v.float() for k, v in model.state_dict().items() if k in layout},
                                     layout, coords))
    assert bool(fast_calls) == _hopper()  # torch._grouped_mm on Hopper and newer
    assert set(runs[True]["initial"]) == set(runs[False]["initial"])
    assert all(torch.equal(t, runs[True]["initial"][n]) for n, t in runs[False]["initial"].items())
    assert_rel_close("per-token loss", runs[False]["loss"], runs[True]["loss"], 2e-2)
    for name, grad in runs[False]["grads"].items():
        assert_rel_close(f"grad {name}", grad, runs[True]["grads"][name], 5e-2)
