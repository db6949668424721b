"""examples/dreambooth: tiny offline pipeline, a few DreamBooth steps on the real dog photos, loading, resume."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

import tucker_peft
from tucker_peft.layer import TuckerLayer

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "..", "examples", "dreambooth"))
import make_tiny_pipeline  # noqa: E402
import train_dreambooth_tucker  # noqa: E402

DOG = os.path.join(HERE, "..", "..", "shared", "data", "dreambooth", "dog")


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """The script builds an ``Accelerator`` (a process-wide singleton): each test starts from a clean one, so that
    its ``--mixed_precision`` is not refused because an earlier test (or Trainer test) set another."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    if not os.path.isdir(DOG):  # the real photos are part of the shared data; CI has them
        pytest.fail(f"missing {DOG}: the DreamBooth test needs shared/data/dreambooth/dog")
    path = tmp_path_factory.mktemp("tiny-sd")
    make_tiny_pipeline.build_tiny_pipeline(seed=0, sample_size=32).save_pretrained(path)
    return str(path)


def _train(pipeline, out, method="tucker", steps=4, extra=""):
    args = (
        f"--pretrained_model_name_or_path {pipeline} --instance_data_dir {DOG} --instance_prompt a_photo_of_sks_dog "
        f"--resolution 32 --train_batch_size 2 --max_train_steps {steps} --learning_rate 1e-2 --method {method} "
        f"--rank 4 --validation_prompt a_sks_dog --num_validation_images 2 --num_inference_steps 2 "
        f"--output_dir {out} --report_to none --checkpointing_steps 2 --seed 0 {extra}"
    )
    return train_dreambooth_tucker.main(args.split())


def _generate(pipe):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe("a sks dog", height=32, width=32, num_inference_steps=2, generator=generator, output_type="np").images


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tucker", "lora"])
def test_dreambooth_trains_saves_and_reloads(tiny_pipeline, tmp_path, method):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / method
    # LoRA with alpha != rank (its scale must travel with diffusers' file, in the file's metadata), and on the text
    # encoder too (the bf16 test below covers tucker's)
    result = _train(tiny_pipeline, out, method, extra="--alpha 8 --train_text_encoder" if method == "lora" else "")
    assert result["steps"] == 4 and all(np.isfinite(result["loss_history"]))
    assert (out / "unet" / "adapter_model.safetensors").exists() and (out / "unet" / "adapter_config.json").exists()
    assert (out / "validation-000004.png").exists()
    if method == "tucker":
        assert (out / "tucker_ranks.json").exists() and (out / "tucker_ranks.png").exists()
        ranks = json.loads((out / "unet" / "adapter_config.json").read_text())["module_ranks"]
        assert any("resnets.0.conv1" in k for k in ranks)  # 3x3 convolutions are adapted
    trained = StableDiffusionPipeline.from_pretrained(
        tiny_pipeline, unet=result["unet"], text_encoder=result["text_encoder"], safety_checker=None
    )
    expected = _generate(trained)
    fresh = tucker_peft.load_into_pipeline(
        StableDiffusionPipeline.from_pretrained(tiny_pipeline, safety_checker=None), str(out)
    )
    np.testing.assert_allclose(_generate(fresh), expected, atol=1e-6)
    base = _generate(StableDiffusionPipeline.from_pretrained(tiny_pipeline, safety_checker=None))
    assert np.abs(base - expected).max() > 1e-4  # the adapter changes the images
    card = (out / "README.md").read_text()
    assert "base_model:" in card and '"a_photo_of_sks_dog"' in card
    # the LoRA form beside the PEFT adapters (for tucker: exact LoRA factors of its deltas), as diffusers' script
    # writes it: diffusers alone loads it and gives the same image
    assert "load_lora_weights" in card
    plain = StableDiffusionPipeline.from_pretrained(tiny_pipeline, safety_checker=None)
    plain.load_lora_weights(str(out))
    np.testing.assert_allclose(_generate(plain), expected, atol=1e-4)
    if method == "lora":  # and the text encoder's part of it mattered
        unet_only = StableDiffusionPipeline.from_pretrained(tiny_pipeline, unet=result["unet"], safety_checker=None)
        assert np.abs(_generate(unet_only) - expected).max() > 1e-3
        return
    fused = tucker_peft.load_into_pipeline(
        StableDiffusionPipeline.from_pretrained(tiny_pipeline, safety_checker=None), str(out), fuse=True
    )
    np.testing.assert_allclose(_generate(fused), expected, atol=1e-4)


@pytest.mark.slow
def test_dreambooth_resume_continues_with_the_checkpoint_ranks(tiny_pipeline, tmp_path):
    out = tmp_path / "run"
    _train(tiny_pipeline, out, steps=4)
    checkpoint = out / "checkpoint-2"
    saved = json.loads((checkpoint / "unet" / "adapter_config.json").read_text())["module_ranks"]
    # resuming at step 2 with nothing left to do keeps exactly the checkpoint's adapter
    resumed = _train(tiny_pipeline, tmp_path / "resumed", steps=2, extra=f"--resume_from_checkpoint {checkpoint}")
    assert resumed["steps"] == 2
    assert {k: list(v) for k, v in resumed["ranks"].items()} == saved
    # and training on from it works (the update's state was restored with the matching shapes)
    more = _train(tiny_pipeline, tmp_path / "more", steps=4, extra=f"--resume_from_checkpoint {checkpoint}")
    assert more["steps"] == 4 and all(np.isfinite(more["loss_history"]))


@pytest.mark.slow
def test_dreambooth_bf16_with_text_encoder(tiny_pipeline, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "bf16-te"
    result = _train(tiny_pipeline, out, steps=4, extra="--mixed_precision bf16 --train_text_encoder")
    assert result["steps"] == 4 and all(np.isfinite(result["loss_history"]))
    assert (out / "text_encoder" / "adapter_model.safetensors").exists()
    assert (out / "validation-000004.png").exists()
    # the update adapts the text encoder's layers too (one attach over both models: names "0.…" unet, "1.…" text)
    assert any(k.startswith("1.") for k in result["ranks"]) and any(k.startswith("0.") for k in result["ranks"])
    text_ranks = json.loads((out / "text_encoder" / "adapter_config.json").read_text())["module_ranks"]
    assert any("self_attn.q_proj" in k for k in text_ranks)
    # the factors stay fp32 under bf16 autocast
    factors = [p for n, p in result["text_encoder"].named_parameters() if "tucker_" in n]
    assert factors and all(p.dtype == torch.float32 for p in factors)

    trained = StableDiffusionPipeline.from_pretrained(
        tiny_pipeline, unet=result["unet"], text_encoder=result["text_encoder"], safety_checker=None
    )
    expected = _generate(trained)
    fresh = tucker_peft.load_into_pipeline(
        StableDiffusionPipeline.from_pretrained(tiny_pipeline, safety_checker=None), str(out)
    )
    assert any(isinstance(m, TuckerLayer) for m in fresh.text_encoder.modules())
    np.testing.assert_allclose(_generate(fresh), expected, atol=1e-6)
    # the text encoder's adapter matters: without it the images differ
    unet_only = StableDiffusionPipeline.from_pretrained(tiny_pipeline, unet=result["unet"], safety_checker=None)
    assert np.abs(_generate(unet_only) - expected).max() > 1e-5
    # and diffusers alone loads both parts from the exact LoRA file
    plain = StableDiffusionPipeline.from_pretrained(tiny_pipeline, safety_checker=None)
    plain.load_lora_weights(str(out))
    np.testing.assert_allclose(_generate(plain), expected, atol=1e-4)  # (3.8e-6; without the text encoder 0.26)


@pytest.mark.slow
def test_dreambooth_gradient_checkpointing_trains_the_same_adapters(tiny_pipeline, tmp_path):
    """``--gradient_checkpointing`` (unet and text encoder) recomputes activations in the backward: the same
    losses, ranks and adapters as without it."""
    extra = "--train_text_encoder --checkpointing_steps 100"
    plain = _train(tiny_pipeline, tmp_path / "plain", steps=3, extra=extra)
    recomputed = _train(tiny_pipeline, tmp_path / "ckpt", steps=3, extra=extra + " --gradient_checkpointing")
    text_encoder = recomputed["text_encoder"]
    assert recomputed["unet"].is_gradient_checkpointing
    assert getattr(text_encoder, "is_activation_checkpointing", None) or text_encoder.is_gradient_checkpointing
    np.testing.assert_allclose(recomputed["loss_history"], plain["loss_history"], rtol=1e-5)
    assert recomputed["ranks"] == plain["ranks"]
    for name in ("unet", "text_encoder"):
        expected = {n: p for n, p in plain[name].named_parameters() if "tucker_" in n}
        got = {n: p for n, p in recomputed[name].named_parameters() if "tucker_" in n}
        assert expected.keys() == got.keys() and expected
        for n, p in expected.items():
            torch.testing.assert_close(got[n], p, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_dreambooth_takes_diffusers_epoch_checkpoint_and_optimizer_flags(tiny_pipeline, tmp_path):
    """The flags of diffusers' script that a copied command carries: epochs instead of steps (5 photos, batch 2: 3
    steps an epoch), a limit on the checkpoints kept, validation every epoch, Adam's constants (for AdamW and the
    update alike), --scale_lr and the scheduler's power."""
    out = tmp_path / "run"
    args = (
        f"--pretrained_model_name_or_path {tiny_pipeline} --instance_data_dir {DOG} "
        f"--instance_prompt a_photo_of_sks_dog --resolution 32 --train_batch_size 2 --num_train_epochs 2 --learning_rate 1e-2 --scale_lr --rank 4 "
        "--lr_scheduler polynomial --lr_power 2 --adam_beta1 0.8 --adam_beta2 0.99 --adam_epsilon 1e-6 "
        "--checkpointing_steps 2 --checkpoints_total_limit 2 --validation_prompt a_sks_dog --validation_epochs 1 "
        f"--num_validation_images 1 --num_inference_steps 2 --output_dir {out} --report_to none --seed 0 --allow_tf32"
    )
    result = train_dreambooth_tucker.main(args.split())
    assert result["steps"] == 6 and len(result["loss_history"]) == 6
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert sorted(p.name for p in out.glob("validation-*.png")) == ["validation-000003.png", "validation-000006.png"]
    state = torch.load(out / "checkpoint-4" / "optimizer.bin", weights_only=False)
    group = state["param_groups"][0]
    assert group["betas"] == (0.8, 0.99) and group["eps"] == 1e-6
    assert group["initial_lr"] == pytest.approx(2e-2)  # scaled by the batch size 2
    assert group["lr"] == pytest.approx(1e-7 + (2e-2 - 1e-7) * (1 - 4 / 6) ** 2)  # polynomial, power 2, at step 4
    update = state["tucker_peft"]["param_groups"]  # the geometric update's state, saved with the optimizer
    assert update and all(g["betas"] == (0.8, 0.99) and g["eps"] == 1e-6 for g in update)


@pytest.mark.slow
def test_dreambooth_prior_preservation_adds_the_weighted_class_loss(tiny_pipeline, tmp_path):
    """--with_prior_preservation: the missing class images are generated with the pipeline (once), every batch
    carries instance and class images, and the loss is the instance loss + prior_loss_weight x the class loss: with
    the class images in place, the first step's loss (same batch, same noise) is affine in the weight."""
    classes = tmp_path / "class"
    prior = f"--with_prior_preservation --class_data_dir {classes} --class_prompt a_dog --num_class_images 3 "
    prior += "--sample_batch_size 2 --validation_prompt a_sks_dog"
    _train(tiny_pipeline, tmp_path / "generate", steps=1, extra=prior)
    assert sorted(p.name for p in classes.iterdir()) == ["class-00000.png", "class-00001.png", "class-00002.png"]
    first = {}
    for weight in (0.0, 1.0, 2.0):
        result = _train(tiny_pipeline, tmp_path / f"w{weight}", steps=1, extra=f"{prior} --prior_loss_weight {weight}")
        first[weight] = result["loss_history"][0]
    assert len(list(classes.iterdir())) == 3  # not generated again
    assert first[1.0] - first[0.0] > 0.1  # the class images' loss
    assert first[2.0] - first[1.0] == pytest.approx(first[1.0] - first[0.0], rel=1e-5)
