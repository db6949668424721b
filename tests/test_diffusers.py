"""diffusers: unet.add_adapter, peft state-dict round trip, scale hooks (set_adapters weights, fuse_lora)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

import tucker_peft
from tucker_peft import Conv, Linear, TuckerLoraConfig

from .conftest import UNET_TARGETS, randomize_adapter, tiny_unet, unet_inputs


def _unet_with_adapter(seed=3, **config):
    unet = tiny_unet()
    unet.add_adapter(TuckerLoraConfig(r=4, target_modules=UNET_TARGETS, init_weights=False, **config))
    randomize_adapter(unet, seed=seed)
    return unet


def test_add_adapter_wraps_attention_linears_and_resnet_convs():
    unet = tiny_unet()
    x = unet_inputs()
    with torch.no_grad():
        ref = unet(*x).sample
    unet.add_adapter(TuckerLoraConfig(r=4, target_modules=UNET_TARGETS))
    layers = dict(tucker_peft.iter_tucker_layers(unet))
    assert isinstance(layers["down_blocks.0.resnets.0.conv1"], Conv)
    assert isinstance(layers["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"], Linear)
    assert layers["down_blocks.0.resnets.0.conv1"].core("default").shape == (4, 4, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(unet(*x).sample, ref, rtol=0, atol=0)  # zero core: unchanged
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("tucker_" in n for n in trainable)


def test_peft_state_dict_round_trip():
    unet = _unet_with_adapter()
    x = unet_inputs()
    with torch.no_grad():
        expected = unet(*x).sample
    state = get_peft_model_state_dict(unet)
    assert state and all("tucker_" in k for k in state)
    config = unet.peft_config["default"]
    assert set(config.module_ranks) == {n for n, _ in tucker_peft.iter_tucker_layers(unet)}

    fresh = tiny_unet()
    fresh.add_adapter(TuckerLoraConfig(**{**config.to_dict(), "peft_type": None, "init_weights": True}))
    result = set_peft_model_state_dict(fresh, state)
    assert not result.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(fresh(*x).sample, expected, rtol=0, atol=0)


def test_set_adapters_weights_and_fuse_lora_scale():
    unet = _unet_with_adapter()
    x = unet_inputs()
    with torch.no_grad():
        base = tiny_unet()(*x).sample
        full = unet(*x).sample
        unet.set_adapters(["default"], weights=[0.0])
        torch.testing.assert_close(unet(*x).sample, base, atol=1e-6, rtol=0)
        unet.set_adapters(["default"], weights=[1.0])
        torch.testing.assert_close(unet(*x).sample, full, atol=1e-6, rtol=0)
        # fuse with a scale: the merged UNet equals the unmerged one at that scale
        unet.set_adapters(["default"], weights=[0.5])
        half = unet(*x).sample
        unet.set_adapters(["default"], weights=[1.0])
        unet.fuse_lora(lora_scale=0.5)
        assert all(layer.merged for _, layer in tucker_peft.iter_tucker_layers(unet))
        torch.testing.assert_close(unet(*x).sample, half, atol=1e-5, rtol=1e-4)
        unet.unfuse_lora()
        for _, layer in tucker_peft.iter_tucker_layers(unet):
            layer.unscale_layer()
        torch.testing.assert_close(unet(*x).sample, full, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(half, full)


def test_disable_and_delete_adapters_on_unet():
    unet = _unet_with_adapter()
    x = unet_inputs()
    with torch.no_grad():
        base = tiny_unet()(*x).sample
        unet.disable_adapters()
        torch.testing.assert_close(unet(*x).sample, base, atol=0, rtol=0)
        unet.enable_adapters()
        assert not torch.allclose(unet(*x).sample, base)
        unet.delete_adapters("default")
        torch.testing.assert_close(unet(*x).sample, base, atol=0, rtol=0)


@pytest.mark.parametrize("conv_mode", ["channels", "full"])
def test_unet_merge_equals_unmerged(conv_mode):
    unet = _unet_with_adapter(conv_mode=conv_mode)
    x = unet_inputs()
    with torch.no_grad():
        unmerged = unet(*x).sample
        unet.fuse_lora()
        torch.testing.assert_close(unet(*x).sample, unmerged, atol=1e-5, rtol=1e-4)
