"""Grouped-GEMM experts on a GPU: ``torch._grouped_mm`` against the reference ``gmm``, and megatron's
``GroupedMLP`` against the per-expert ``SequentialMLP`` build (same ModelConfig and seed), in bf16.

Skipped without CUDA (the CPU equivalence in fp32 is tests/model/megatron/test_grouped_gemm.py). Run on
a GPU machine with ``python -m pytest -q tests/gpu/test_grouped_gemm_gpu.py`` (a few seconds plus
torch.compile of GroupedMLP's activation). Tolerances, relative RMS error, bf16 operands: gmm output and
gradients 1e-2 against the reference computed in fp32 from the same bf16 values. The two model builds
(identical initial weights) are each compared with an fp32 run of the same weights: the grouped
build's error on the per-token loss and every gradient may be at most twice the per-expert build's
(or 1e-2). The model has one MoE layer, the first, so the two bf16 builds route alike (asserted).
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


def test_grouped_mlp_in_bf16_is_as_accurate_as_sequential_mlp(monkeypatch):
    import linear_moe.model.mixers  # noqa: F401  (fills the mixer registry)
    from linear_moe.components.train.distributed import world_of_one
    from linear_moe.model import preset
    from linear_moe.model.megatron import grouped_gemm
    from linear_moe.model.megatron.config import transformer_config
    from linear_moe.model.megatron.gpt import build_gpt_model
    from linear_moe.model.megatron.state_dict import RankCoords, gather_full_state_dict, shard_layout
    from linear_moe.kernels.testing import rel_error
    from megatron.core.transformer.moe.router import TopKRouter

    fast_calls = []
    fast = grouped_gemm.torch_grouped_mm_gmm
    monkeypatch.setattr(grouped_gemm, "torch_grouped_mm_gmm", lambda *args: fast_calls.append(1) or fast(*args))
    # MoE in the first layer only: both bf16 builds then route from bit-identical inputs. With a second MoE
    # layer, the builds' rounding differences upstream flipped a near-tied token between two experts on an
    # H200, and those two experts' gradients, the router's and the norm's were 7e-2 to 0.13 off.
    mc = preset("tiny", **dict(MODEL, layer_pattern="La"))
    tokens = torch.randint(0, mc.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0)).cuda()
    device = torch.device("cuda", torch.cuda.current_device())
    runs, models, routing = {}, {}, {}
    with world_of_one():
        for name, dtype, grouped in (("sequential", torch.bfloat16, False), ("grouped", torch.bfloat16, True),
                                     ("fp32", torch.float32, False)):
            config = transformer_config(mc, params_dtype=dtype, moe_grouped_gemm=grouped)
            model = build_gpt_model(mc, config, seed=0).to(device, dtype=dtype)
            if name == "fp32":  # the bf16 sequential model's weights, exactly, in fp32
                with torch.no_grad():
                    for (n, p), (n_bf16, p_bf16) in zip(model.named_parameters(), models["sequential"].named_parameters()):
                        assert n == n_bf16
                        p.copy_(p_bf16)
            models[name] = model
            (router,) = [m for m in model.modules() if isinstance(m, TopKRouter)]
            router.register_forward_hook(lambda module, args, out, name=name: routing.update({name: out[1].clone()}))
            layout, coords = shard_layout(model), RankCoords.current(mc.num_layers, mc.num_experts)
            loss_BT = model(tokens[:, :-1], torch.arange(T, device="cuda").expand(B, T), None, labels=tokens[:, 1:])
            loss_BT.float().mean().backward()
            grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
            runs[name] = dict(loss=loss_BT.float(), grads=gather_full_state_dict(grads, layout, coords),
                              initial=gather_full_state_dict(
                                  {k: v.float() for k, v in model.state_dict().items() if k in layout},
                                  layout, coords))
    assert bool(fast_calls) == _hopper()  # torch._grouped_mm on Hopper and newer
    assert torch.equal(routing["grouped"], routing["sequential"]), "the two bf16 builds routed differently"
    print(f"tokens routed differently in fp32 than in bf16: "
          f"{int((routing['fp32'] != routing['sequential']).any(-1).sum())} of {B * T}")
    assert set(runs["grouped"]["initial"]) == set(runs["sequential"]["initial"])
    assert all(torch.equal(t, runs["grouped"]["initial"][n]) for n, t in runs["sequential"]["initial"].items())
    # each bf16 build's error against the fp32 run: grouped may not be worse than sequential by more than 2x
    # (floor 1e-2: two bf16 roundings of one sum); a wrong weight layout or routing is off by order 1
    errors = {n: (rel_error(runs["fp32"]["grads"][n], runs["sequential"]["grads"][n]),
                  rel_error(runs["fp32"]["grads"][n], runs["grouped"]["grads"][n])) for n in runs["fp32"]["grads"]}
    errors["per-token loss"] = (rel_error(runs["fp32"]["loss"], runs["sequential"]["loss"]),
                                rel_error(runs["fp32"]["loss"], runs["grouped"]["loss"]))
    for n, (sequential, grouped) in errors.items():
        print(f"{n}: sequential bf16 {sequential:.2e}, grouped bf16 {grouped:.2e} (vs fp32)")
    worse = {n: e for n, e in errors.items() if e[1] > max(2 * e[0], 1e-2)}
    assert not worse, f"grouped GEMM less accurate than the per-expert MLP (sequential, grouped): {worse}"
