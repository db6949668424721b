"""Adapter layers: init, factored forward vs dense reconstruction, merging, dtypes, scale hooks, adapters."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from tucker_peft import Conv, Linear, TuckerLoraConfig, adapter_parameter_count, current_ranks
from tucker_peft.tensor_ops import tucker_to_tensor

from .conftest import Net, randomize_adapter, tiny_bert, tiny_gpt2


def _layer_cases():
    torch.manual_seed(0)
    return {
        "linear": (nn.Linear(12, 10), (3, 5, 12)),
        "conv1d_gpt2": (Conv1D(10, 12), (3, 5, 12)),
        "conv1d": (nn.Conv1d(6, 8, 3, stride=2, padding=1), (2, 6, 11)),
        "conv2d": (nn.Conv2d(6, 8, 3, padding=1), (2, 6, 7, 7)),
        "conv2d_stride_dil": (nn.Conv2d(6, 8, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 1)), (2, 6, 9, 8)),
        "conv2d_same_reflect": (nn.Conv2d(5, 7, 3, padding="same", padding_mode="reflect"), (2, 5, 6, 6)),
        "conv3d": (nn.Conv3d(4, 6, 3, padding=1, stride=(1, 2, 1)), (2, 4, 5, 6, 5)),
        "conv2d_1x1": (nn.Conv2d(6, 8, 1, stride=2), (2, 6, 7, 7)),  # the folded form
        "unet_conv": (nn.Conv2d(320, 320, 3, padding=1), (1, 320, 8, 8)),  # an SD-1.5 ResNet conv
    }


CASES = list(_layer_cases())
CONV_CASES = [c for c in CASES if c.startswith("conv") and c != "conv1d_gpt2"]


def _adapted(case: str, conv_mode: str = "channels", init_weights: bool = True, r: int = 3):
    layer, shape = _layer_cases()[case]
    base = Net(layer)
    model = get_peft_model(
        copy.deepcopy(base),
        TuckerLoraConfig(target_modules=["layer"], r=r, conv_mode=conv_mode, init_weights=init_weights, alpha=6.0),
    )
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    return base, model, x


def _dense_reference(base_layer: nn.Module, tucker, x: torch.Tensor) -> torch.Tensor:
    """``base(x) + F.linear/F.convNd(x, s * C x_i U_i)`` with the dense delta built independently in fp64."""
    core = tucker.core("default").double()
    factors = [u.double() for u in tucker.factors("default")]
    # independent dense reconstruction with einsum (not the library's mode products)
    letters = "abcde"
    if len(factors) == 2:
        spec = f"ij{'xyz'[: core.dim() - 2]},Ai,Bj->AB{'xyz'[: core.dim() - 2]}"
    else:
        spec = f"{letters[: core.dim()]}," + ",".join(f"{c.upper()}{c}" for c in letters[: core.dim()])
        spec += "->" + letters[: core.dim()].upper()
    delta = torch.einsum(spec, core, *factors) * tucker.scaling["default"]
    xd = x.double()
    if isinstance(base_layer, Conv1D):
        return base_layer(x).double() + F.linear(xd, delta)
    if isinstance(base_layer, nn.Linear):
        return base_layer(x).double() + F.linear(xd, delta)
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[x.dim()]
    padded = xd
    padding = base_layer.padding
    if base_layer.padding_mode != "zeros":
        padded = F.pad(xd, base_layer._reversed_padding_repeated_twice, mode=base_layer.padding_mode)
        padding = 0
    elif isinstance(padding, str):
        padded = F.pad(xd, base_layer._reversed_padding_repeated_twice)
        padding = 0
    return base_layer(x).double() + conv(padded, delta, None, base_layer.stride, padding, base_layer.dilation)


@pytest.mark.parametrize("case", CASES)
def test_output_at_init_equals_base(case):
    base, model, x = _adapted(case)
    tucker = model.base_model.model.layer
    assert isinstance(tucker, (Linear, Conv))
    assert torch.count_nonzero(tucker.core("default")) == 0
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_factors_orthonormal_at_init(case):
    _, model, _ = _adapted(case, conv_mode="full")
    for u in model.base_model.model.layer.factors("default"):
        torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("conv_mode", ["channels", "full"])
@pytest.mark.parametrize("case", CASES)
def test_forward_equals_dense_reconstruction(case, conv_mode):
    base, model, x = _adapted(case, conv_mode=conv_mode, init_weights=False)
    tucker = model.base_model.model.layer
    randomize_adapter(model, seed=1)  # unequal ranks per mode where the layer allows it
    out = model(x)
    assert (out - base(x)).abs().max() > 1e-2  # the adapter really contributes
    torch.testing.assert_close(
        out.double(), _dense_reference(tucker.get_base_layer(), tucker, x), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("case", ["conv2d", "conv2d_1x1", "conv3d"])
def test_conv_channels_last_and_unbatched_inputs_match_contiguous(case):
    """The 1x1 steps run as GEMMs on contiguous batched inputs and as convolutions otherwise: same numbers."""
    _, model, x = _adapted(case, init_weights=False)
    randomize_adapter(model, seed=1)
    expected = model(x)
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    torch.testing.assert_close(model(x.to(memory_format=fmt)), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x[0]), expected[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["linear", "conv1d_gpt2", "conv2d", "conv2d_1x1"])
def test_sum_of_adapters_and_gradients_match_dense_reference(case):
    """The adapter is added inside its last GEMM (addmm / baddbmm) with the scale folded into the core: batched,
    unbatched and non-contiguous inputs, two adapters active at once, and the core's and factors' gradients
    against the dense delta's."""
    base, model, x = _adapted(case, init_weights=False)
    model.add_adapter("other", TuckerLoraConfig(target_modules=["layer"], r=2, alpha=5.0, init_weights=False))
    randomize_adapter(model, seed=1)
    tucker = model.base_model.model.layer

    def dense(a):
        return tucker_to_tensor(tucker.core(a), tucker.factors(a)) * tucker.scaling[a]

    layer = tucker.get_base_layer()

    def apply(inp, delta):
        if case in ("linear", "conv1d_gpt2"):
            return F.linear(inp, delta)
        return F.conv2d(inp, delta, None, layer.stride, layer.padding, layer.dilation)

    # batched, unbatched, non-contiguous (transformers' Conv1D itself needs a contiguous input)
    if case.startswith("conv2d"):
        inputs = [x, x[0], x.to(memory_format=torch.channels_last)]
    else:
        inputs = [x, x[0, 0]] + ([x.transpose(0, 1)] if case == "linear" else [])
    for names in (["default", "other"], ["other"]):
        tucker.set_adapter(names)
        delta = sum(dense(a) for a in names)
        for inp in inputs:
            torch.testing.assert_close(model(inp), base(inp) + apply(inp, delta), atol=1e-5, rtol=1e-5)
    # gradients: through the library's forward and through the dense delta built from the same leaves
    params = [tucker.core("other"), *tucker.factors("other")]
    weight = torch.randn(base(x).shape, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad((model(x) * weight).sum(), params)
    ref = torch.autograd.grad(((base(x) + apply(x, dense("other"))) * weight).sum(), params)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_conv_adapter_keeps_no_copy_of_its_input_for_backward():
    """Autograd keeps the input once (shared with the base conv), plus rank-sized activations: no input-sized copy."""
    _, model, _ = _adapted("unet_conv", init_weights=False, r=8)
    x = torch.randn(2, 320, 48, 48, requires_grad=True)  # larger than the base weight, which is kept too
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    big = [n for n in storages.values() if n >= x.numel() * x.element_size()]
    assert big == [x.numel() * x.element_size()] * len(big) and len(big) == 1, storages


def test_conv_mode_shapes():
    _, model, _ = _adapted("conv2d", conv_mode="channels", r=3)
    t = model.base_model.model.layer
    assert t.ranks("default") == (3, 3) and tuple(t.core("default").shape) == (3, 3, 3, 3)
    _, model, _ = _adapted("conv2d", conv_mode="full", r=3)
    t = model.base_model.model.layer
    assert t.ranks("default") == (3, 3, 3, 3) and [tuple(u.shape) for u in t.factors("default")] == [
        (8, 3),
        (6, 3),
        (3, 3),
        (3, 3),
    ]
    # the (3, 2) window of conv2d_stride_dil clips the window rank to 2
    _, model, _ = _adapted("conv2d_stride_dil", conv_mode="full", r=3)
    assert model.base_model.model.layer.ranks("default") == (3, 3, 3, 2)


@pytest.mark.parametrize("case", CASES)
def test_merge_unmerge_and_merge_and_unload(case):
    base, model, x = _adapted(case, init_weights=False)
    tucker = model.base_model.model.layer
    w0 = tucker.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter()
        assert tucker.merged
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(tucker.get_base_layer().weight, w0, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=0)
        merged_model = model.merge_and_unload()
    assert type(merged_model.layer) is type(base.layer)  # a plain module again
    with torch.no_grad():
        torch.testing.assert_close(merged_model(x), unmerged, atol=1e-5, rtol=1e-5)
        delta = tucker_to_tensor(tucker.core("default"), tucker.factors("default")) * tucker.scaling["default"]
        if isinstance(base.layer, Conv1D):
            delta = delta.T
        torch.testing.assert_close(merged_model.layer.weight - w0, delta, atol=1e-6, rtol=1e-5)


def test_disable_adapter_gives_base_output():
    base, model, x = _adapted("conv2d", init_weights=False)
    with torch.no_grad():
        adapted = model(x)
        with model.disable_adapter():
            torch.testing.assert_close(model(x), base(x), atol=0, rtol=0)
        torch.testing.assert_close(model(x), adapted, atol=0, rtol=0)


def test_set_factors_resizes_in_place_and_keeps_parameter_identity():
    _, model, x = _adapted("linear", r=4)
    tucker = model.base_model.model.layer
    params = [tucker.core("default"), *tucker.factors("default")]
    ids = [id(p) for p in params]
    model(x).sum().backward()
    assert all(p.grad is not None for p in params)
    u0, u1 = tucker.factors("default")
    tucker.set_factors("default", torch.ones(2, 2), [u0[:, :2].detach(), u1[:, :2].detach()])
    assert [id(p) for p in [tucker.core("default"), *tucker.factors("default")]] == ids
    assert tucker.ranks("default") == (2, 2)
    assert all(p.grad is None for p in params)
    assert dict(model.named_parameters())["base_model.model.layer.tucker_core.default"].shape == (2, 2)
    with pytest.raises(ValueError, match="does not match"):
        tucker.set_factors("default", torch.ones(3, 2), [u0[:, :2].detach(), u1[:, :2].detach()])
    with pytest.raises(ValueError, match="does not fit mode size"):
        tucker.set_factors("default", torch.ones(2, 2), [u0[:5, :2].detach(), u1[:, :2].detach()])
    # a 2 x 1 core on a matrix: the loader would refuse its rank record, so it is refused here
    with pytest.raises(ValueError, match=r"ranks \[2, 1\] are not Tucker ranks"):
        tucker.set_factors("default", torch.ones(2, 1), [u0[:, :2].detach(), u1[:, :1].detach()])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_keeps_fp32_factors(dtype):
    torch.manual_seed(0)
    base = Net(nn.Linear(16, 12)).to(dtype)
    model = get_peft_model(copy.deepcopy(base), TuckerLoraConfig(target_modules=["layer"], r=4, init_weights=False))
    tucker = model.base_model.model.layer
    assert tucker.get_base_layer().weight.dtype == dtype
    assert all(p.dtype == torch.float32 for p in [tucker.core("default"), *tucker.factors("default")])
    for u in tucker.factors("default"):  # orthonormal to fp32 precision, not to half precision
        torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1]), atol=1e-6, rtol=0)
    x = torch.randn(4, 16).to(dtype)
    out = model(x)
    assert out.dtype == dtype
    ref = base(x).float() + x.float() @ tucker.get_delta_weight("default").T
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    out.float().sum().backward()
    assert tucker.core("default").grad.dtype == torch.float32 and torch.isfinite(tucker.core("default").grad).all()
    # autocast on an fp32 model
    model32 = get_peft_model(
        Net(nn.Linear(16, 12)), TuckerLoraConfig(target_modules=["layer"], r=4, init_weights=False)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model32(torch.randn(4, 16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert model32.base_model.model.layer.core("default").grad.dtype == torch.float32


def test_torch_compile_keeps_the_adapters_in_the_graph_unless_an_update_resizes_them():
    """Without the update (inference) the adapters compile with the model, in one graph; while a TuckerOptimizer
    trains them (their shapes change with the ranks) they run outside it, a graph break at each adapted layer; after
    ``release()`` they are compiled in again.  Outputs equal the eager ones throughout."""
    import torch._dynamo

    import tucker_peft

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    model = get_peft_model(mlp, TuckerLoraConfig(target_modules=["0", "2", "4"], r=4, init_weights=False))
    x = torch.randn(5, 16)
    compiled = torch.compile(model)
    graphs = []
    for stage in ("inference", "updated", "released"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        if stage == "updated":
            update = tucker_peft.TuckerOptimizer(model, lr=1e-3)
        elif stage == "released":
            update.release()
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x))
        counters = torch._dynamo.utils.counters
        breaks = sum(n for reason, n in counters["graph_break"].items() if "_adapter_delta" in reason)
        graphs.append((counters["stats"]["unique_graphs"], breaks))
    # (graphs, breaks at an adapter): one graph, then a break at each of the 3 adapted layers, then one graph again
    assert graphs[0] == graphs[2] == (1, 0) and graphs[1][1] >= 3, graphs


def test_merge_on_half_precision_base():
    torch.manual_seed(0)
    model = get_peft_model(
        Net(nn.Linear(16, 12)).to(torch.bfloat16), TuckerLoraConfig(target_modules=["layer"], init_weights=False)
    )
    x = torch.randn(4, 16).to(torch.bfloat16)
    with torch.no_grad():
        out = model(x)
        merged = model.merge_and_unload()
        assert merged.layer.weight.dtype == torch.bfloat16
        torch.testing.assert_close(merged(x).float(), out.float(), atol=5e-2, rtol=5e-2)


def test_scale_hooks_follow_lora_semantics():
    base, model, x = _adapted("linear", init_weights=False)
    tucker = model.base_model.model.layer
    s0 = tucker.scaling["default"]
    assert s0 == pytest.approx(6.0 / 3)
    with torch.no_grad():
        delta = model(x) - base(x)
        tucker.scale_layer(0.5)
        torch.testing.assert_close(model(x) - base(x), 0.5 * delta, atol=1e-5, rtol=1e-5)
        tucker.unscale_layer(0.5)
        assert tucker.scaling["default"] == pytest.approx(s0)
        tucker.set_scale("default", 0.0)
        torch.testing.assert_close(model(x), base(x))
        tucker.unscale_layer()
        assert tucker.scaling["default"] == pytest.approx(s0)
        # fuse with a weight: merge after scale_layer, like diffusers' fuse_lora(lora_scale=0.3)
        tucker.scale_layer(0.3)
        model.merge_adapter()
        tucker.unscale_layer(0.3)
        torch.testing.assert_close(tucker.get_base_layer()(x) - base(x), 0.3 * delta, atol=1e-5, rtol=1e-5)


def test_scale_fixed_by_initial_rank_not_current_rank():
    _, model, _ = _adapted("linear", r=4)
    tucker = model.base_model.model.layer
    u0, u1 = tucker.factors("default")
    tucker.set_factors("default", torch.zeros(2, 2), [u0[:, :2].detach(), u1[:, :2].detach()])
    assert tucker.scaling["default"] == pytest.approx(6.0 / 4)


def test_multiple_adapters_add_switch_delete():
    torch.manual_seed(0)
    base = Net(nn.Linear(12, 10))
    x = torch.randn(3, 12)
    model = get_peft_model(copy.deepcopy(base), TuckerLoraConfig(target_modules=["layer"], r=3, init_weights=False))
    model.add_adapter("other", TuckerLoraConfig(target_modules=["layer"], r=2, init_weights=False))
    tucker = model.base_model.model.layer
    with torch.no_grad():
        y_default = model(x)
        model.set_adapter("other")
        y_other = model(x)
        assert not torch.allclose(y_default, y_other)
        ref = base(x) + x @ tucker.get_delta_weight("other").T
        torch.testing.assert_close(y_other, ref, atol=1e-5, rtol=1e-5)
    assert tucker.ranks("other") == (2, 2)
    # only the active adapter trains
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".other" in n for n in trainable) and not any(".default" in n for n in trainable)
    # both active: the deltas add
    model.base_model.set_adapter(["default", "other"])
    with torch.no_grad():
        both = base(x) + x @ (tucker.get_delta_weight("default") + tucker.get_delta_weight("other")).T
        torch.testing.assert_close(model(x), both, atol=1e-5, rtol=1e-5)
    model.set_adapter("other")
    model.delete_adapter("default")
    assert "default" not in tucker.tucker_core and "default" not in tucker.scaling
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_other)


@pytest.mark.parametrize("case", ["linear", "conv2d", "conv2d_full"])
def test_add_weighted_adapter_is_the_weighted_sum_of_the_deltas(case, tmp_path):
    """PEFT's add_weighted_adapter: "cat" gives exactly w_1 dW_1 + w_2 dW_2 (adapters of other ranks and scales),
    "svd" that sum truncated to svd_rank (for a Linear: the best rank-k approximation); the new adapter is inactive,
    frozen, and saves and reloads with its ranks."""
    from peft import PeftModel

    torch.manual_seed(0)
    layer = nn.Linear(12, 10) if case == "linear" else nn.Conv2d(6, 8, 3, padding=1)
    base = Net(layer)
    mode = {"conv_mode": "full"} if case == "conv2d_full" else {}
    model = get_peft_model(
        copy.deepcopy(base), TuckerLoraConfig(target_modules=["layer"], r=3, init_weights=False, **mode)
    )
    model.add_adapter("other", TuckerLoraConfig(target_modules=["layer"], r=2, alpha=5.0, init_weights=False, **mode))
    tucker = model.base_model.model.layer
    expected = 0.7 * tucker.get_delta_weight("default") - 1.3 * tucker.get_delta_weight("other")
    model.add_weighted_adapter(["default", "other"], [0.7, -1.3], "mix", combination_type="cat")
    torch.testing.assert_close(tucker.get_delta_weight("mix"), expected, atol=1e-5, rtol=1e-5)
    assert model.active_adapters == ["default"] and not any(p.requires_grad for p in tucker.factors("mix"))
    if case == "linear":
        assert tucker.ranks("mix") == (5, 5)
        model.add_weighted_adapter(["default", "other"], [0.7, -1.3], "best2", svd_rank=2)
        u, s, vh = torch.linalg.svd(expected)
        torch.testing.assert_close(tucker.get_delta_weight("best2"), u[:, :2] * s[:2] @ vh[:2], atol=1e-5, rtol=1e-5)
        assert tucker.ranks("best2") == (2, 2)
    x = torch.randn(2, 12) if case == "linear" else torch.randn(2, 6, 5, 5)
    model.set_adapter("mix")
    with torch.no_grad():
        y = model(x)
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mix")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), y)
    for kwargs, error in (
        (dict(adapters=["default", "nope"], weights=[1.0, 1.0], adapter_name="z"), "not Tucker adapters"),
        (dict(adapters=["default"], weights=[1.0, 2.0], adapter_name="z"), "one weight each"),
        (dict(adapters=["default"], weights=[1.0], adapter_name="mix"), "exists already"),
        (dict(adapters=["default"], weights=[1.0], adapter_name="z", svd_rank=0), "svd_rank"),
    ):
        with pytest.raises(ValueError, match=error):
            model.add_weighted_adapter(**kwargs)
    with pytest.raises(NotImplementedError, match="'cat'.*'svd'"):
        model.add_weighted_adapter(["default"], [1.0], "z", combination_type="ties")
    assert "z" not in model.peft_config
    if case == "linear":  # a head in modules_to_save has no weighted sum (as for LoRA)
        classifier = get_peft_model(tiny_bert(), TuckerLoraConfig(task_type="SEQ_CLS", r=2))
        classifier.add_adapter("b", TuckerLoraConfig(task_type="SEQ_CLS", r=2))
        with pytest.raises(ValueError, match="without modules_to_save"):
            classifier.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix")


def test_print_trainable_parameters_matches_hand_count(capsys):
    model = get_peft_model(
        tiny_bert(),
        TuckerLoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value", "intermediate.dense"]),
    )
    trainable, total = model.get_nb_trainable_parameters()
    # hand count: per layer, r*n_out + r*n_in + r*r; hidden 32, intermediate 48, 2 layers; classifier 32*2+2
    per_layer = (4 * 32 + 4 * 32 + 16) * 2 + (4 * 48 + 4 * 32 + 16)
    assert trainable == 2 * per_layer + (32 * 2 + 2)
    assert adapter_parameter_count(model) == 2 * per_layer
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out
    assert set(current_ranks(model).values()) == {(4, 4)}


def _two_adapters(model, config: dict, seed: int = 0):
    """``model`` with adapter "default" (all its targets) and "small" (the first target only), both random."""
    targets = config.pop("target_modules")
    peft_model = get_peft_model(model, TuckerLoraConfig(target_modules=targets, **config))
    peft_model.add_adapter("small", TuckerLoraConfig(target_modules=targets[:1], **config))
    randomize_adapter(peft_model, "default", seed=seed)
    randomize_adapter(peft_model, "small", seed=seed + 1)
    return peft_model.eval()


def _per_adapter(model, run) -> dict:
    """``run()`` with each adapter alone and with none (``"__base__"``)."""
    outputs = {}
    for name in ("default", "small"):
        model.set_adapter(name)
        outputs[name] = run()
    model.set_adapter("default")
    with model.disable_adapter():
        outputs["__base__"] = run()
    return outputs


@torch.no_grad()
def test_mixed_adapter_batch_gives_each_row_its_own_adapter():
    """``model(..., adapter_names=[...])`` as with LoRA: every row equals the output of its adapter alone ("__base__":
    none), on a BERT classifier (its per-adapter classifier copies too, made to differ here), on a Conv2d model,
    and in GPT-2's beam search; misuse is refused with the fix."""
    model = _two_adapters(tiny_bert(), dict(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    model.classifier.modules_to_save["small"].weight.add_(0.5)  # the head of "small" differs from default's
    ids = torch.randint(5, 120, (5, 9), generator=torch.Generator().manual_seed(0))
    alone = _per_adapter(model, lambda: model(input_ids=ids).logits)
    names = ["small", "__base__", "default", "small", "default"]
    mixed = model(input_ids=ids, adapter_names=names).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], rtol=1e-5, atol=1e-6)
    assert (alone["small"] - alone["default"]).abs().min() > 1e-4  # the rows would tell a wrong routing

    torch.manual_seed(0)
    conv = _two_adapters(Net(nn.Conv2d(6, 8, 3, padding=1)), dict(r=3, target_modules=["layer", "layer"]))
    x = torch.randn(3, 6, 7, 7)
    alone = _per_adapter(conv, lambda: conv(x))
    mixed = conv(x, adapter_names=["__base__", "small", "default"])
    for row, name in enumerate(["__base__", "small", "default"]):
        torch.testing.assert_close(mixed[row], alone[name][row], rtol=1e-5, atol=1e-6)

    gpt = _two_adapters(tiny_gpt2(), dict(task_type="CAUSAL_LM", r=4, target_modules=["c_attn", "c_proj"]))
    prompt = torch.randint(5, 120, (3, 4), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=0)
    alone = _per_adapter(gpt, lambda: gpt.generate(input_ids=prompt, **kw))
    mixed = gpt.generate(input_ids=prompt, adapter_names=["default", "small", "__base__"], **kw)
    for row, name in enumerate(["default", "small", "__base__"]):
        assert mixed[row].tolist() == alone[name][row].tolist(), name

    with pytest.raises(ValueError, match="non-existing adapter.*nope"):
        model(input_ids=ids, adapter_names=["nope"] * 5)
    with pytest.raises(ValueError, match="one name per input row: got 2 names for 5 rows"):
        model(input_ids=ids, adapter_names=["default", "small"])
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(input_ids=ids, adapter_names=names)
    model.eval()
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model(input_ids=ids, adapter_names=names)
