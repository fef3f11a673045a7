"""The single-device LinearMoEForCausalLM: overfitting, save/load, generation, packing, sizes."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from linear_moe.kernels.testing import assert_rel_close
from linear_moe.model import preset
from linear_moe.model.mixers import MIXERS
from linear_moe.model.modeling import LinearMoEConfig, LinearMoEForCausalLM
from linear_moe.model.params import count_parameters

LSM_MIXERS = sorted(name for name in MIXERS if name != "attention")


def tiny_model(mixer="gla", pattern="LL", **overrides) -> LinearMoEForCausalLM:
    config = preset("tiny", lsm_mixer=mixer, layer_pattern=pattern, num_layers=len(pattern), **overrides)
    return LinearMoEForCausalLM(LinearMoEConfig.from_model_config(config)).eval()


@pytest.mark.parametrize("pattern", ["Ll", "LA"], ids=["pure", "hybrid"])
@pytest.mark.parametrize("mixer", LSM_MIXERS)
def test_tiny_model_overfits_a_small_batch(mixer, pattern):
    model = tiny_model(mixer, pattern).train()
    batch = torch.randint(0, 512, (2, 24))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        out = model(batch, labels=batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.lm_loss.item())
    assert losses[0] > 5.0  # ~ln(512) at init
    assert losses[-1] < 0.25 * losses[0], f"{mixer}/{pattern} did not overfit: {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize("mixer", LSM_MIXERS)
def test_save_and_reload_gives_identical_logits(tmp_path, mixer):
    model = tiny_model(mixer, "LA")
    batch = torch.randint(0, 512, (2, 20))
    expected = model(batch).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "linear_moe"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, LinearMoEForCausalLM)
    torch.testing.assert_close(reloaded(batch).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("mixer, pattern", [("gla", "LA"), ("gated_deltanet", "LA"), ("rwkv6", "LA"), ("rwkv7", "LL")])
def test_generate_with_recurrent_state_matches_full_recompute(mixer, pattern):
    model = tiny_model(mixer, pattern)  # rwkv7 "LL": layer 1 mixes toward layer 0's value at every decoded token
    prompt = torch.randint(0, 512, (2, 7))
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    tokens = prompt
    with torch.no_grad():
        for _ in range(6):  # reference: greedy decoding by recomputing the whole prefix each step
            next_token = model(tokens).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    torch.testing.assert_close(generated, tokens)


@pytest.mark.parametrize("mixer, pattern", [("gla", "LA"), ("deltanet", "LA"), ("rwkv7", "LL")])
def test_packed_documents_equal_separate_runs(mixer, pattern):
    model = tiny_model(mixer, pattern)
    docs = [torch.randint(0, 512, (1, n)) for n in (5, 17, 9)]
    packed = torch.cat(docs, dim=1)
    cu_seqlens = torch.tensor([0, 5, 22, 31])
    with torch.no_grad():
        packed_logits = model(packed, cu_seqlens=cu_seqlens).logits
        separate = torch.cat([model(doc).logits for doc in docs], dim=1)
    assert_rel_close("packed logits", separate, packed_logits, 1e-5)


def test_parameter_count_matches_the_module_and_a_hand_count():
    config = preset("tiny")
    counted = count_parameters(config)
    model = LinearMoEForCausalLM(LinearMoEConfig.from_model_config(config))
    assert counted.total == sum(p.numel() for p in model.parameters())
    per_expert = 3 * config.hidden_size * config.moe_ffn_hidden_size  # SwiGLU gate, up, down
    moe_layers = sum(kind.is_moe for kind in config.layer_kinds)
    inactive = moe_layers * (config.num_experts - config.moe_top_k) * per_expert
    assert counted.activated == counted.total - inactive


@pytest.mark.parametrize(
    "name, total_range, activated_range",
    [("A0.3B-2B", (1.6e9, 2.5e9), (0.2e9, 0.45e9)), ("A1B-7B", (6.0e9, 8.0e9), (0.8e9, 1.4e9))],
)
def test_named_presets_land_near_their_names(name, total_range, activated_range):
    counted = count_parameters(preset(name))
    assert total_range[0] <= counted.total <= total_range[1], str(counted)
    assert activated_range[0] <= counted.activated <= activated_range[1], str(counted)
