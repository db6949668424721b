#!/usr/bin/env python
"""DreamBooth fine-tuning of a Stable Diffusion UNet (and optionally its text encoder) with tucker-peft adapters.

Follows diffusers' ``examples/dreambooth/train_dreambooth_lora.py``: the same flag names, an accelerate loop with
mixed precision, gradient accumulation and checkpointing, epochs or steps, checkpoints (with a limit) and resume,
prior preservation, validation images and ``--push_to_hub`` (not: 8-bit Adam, xformers, precomputed text
embeddings).  Tucker adapters go on the attention projections, the feed-forward layers, ``proj_in/out``,
``time_emb_proj`` and the ResNet blocks' 3x3 convolutions and shortcuts (``channels`` mode: the 3x3 window stays
dense in the core).  ``--method lora`` trains PEFT's LoRA on the same modules, for a same-script baseline.

The geometric update is the one extra line, ``tucker_peft.attach(optimizer, model)``, before
``accelerator.prepare``.  The adapter is saved in PEFT's format (``output_dir/unet``, ``output_dir/text_encoder``)
and loads with ``tucker_peft.load_into_pipeline(pipe, output_dir)``.

Offline: ``python examples/dreambooth/make_tiny_pipeline.py --output_dir outputs/tiny-sd`` builds a tiny pipeline,
then::

    python examples/dreambooth/train_dreambooth_tucker.py --pretrained_model_name_or_path outputs/tiny-sd \\
        --instance_data_dir ../shared/data/dreambooth/dog --instance_prompt "a photo of sks dog" \\
        --resolution 32 --train_batch_size 2 --max_train_steps 20 --learning_rate 1e-3 \\
        --validation_prompt "a photo of sks dog in a bucket" --output_dir outputs/dreambooth-tucker
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from PIL import Image, ImageOps
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

import tucker_peft
from tucker_peft.adapters_io import load_adapter_weights, save_adapter

logger = logging.getLogger("train_dreambooth_tucker")

#: attention and feed-forward linears, ResNet convolutions and time projections of the UNet
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
UNET_TARGETS += ["time_emb_proj", "conv1", "conv2", "conv_shortcut"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--pretrained_model_name_or_path", required=True, help="Stable Diffusion model id on the Hub or local folder."
    )
    p.add_argument("--revision", default=None, help="Revision (branch, tag, commit) of the pretrained model.")
    p.add_argument("--instance_data_dir", required=True, help="Folder with the photos of the subject.")
    p.add_argument("--instance_prompt", required=True, help='Prompt naming the subject, e.g. "a photo of sks dog".')
    p.add_argument("--class_data_dir", default=None, help="Folder of class images (prior preservation).")
    p.add_argument("--class_prompt", default=None, help='Prompt of the class, e.g. "a photo of a dog".')
    p.add_argument(
        "--with_prior_preservation", action="store_true", help="Add the prior-preservation loss on class images."
    )
    p.add_argument("--prior_loss_weight", type=float, default=1.0, help="Weight of the prior-preservation loss.")
    p.add_argument(
        "--num_class_images", type=int, default=100, help="Class images to have; missing ones are generated."
    )
    p.add_argument("--train_text_encoder", action="store_true", help="Also adapt the text encoder.")
    p.add_argument("--resolution", type=int, default=512, help="Training resolution (images are resized).")
    p.add_argument("--center_crop", action="store_true", help="Center-crop instead of a random crop.")
    p.add_argument("--train_batch_size", type=int, default=4, help="Batch size per device.")
    p.add_argument("--sample_batch_size", type=int, default=4, help="Batch size when generating class images.")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    p.add_argument(
        "--gradient_checkpointing", action="store_true", help="Recompute activations in the backward (less memory)."
    )
    p.add_argument("--num_train_epochs", type=int, default=1, help="Epochs to train if --max_train_steps is unset.")
    p.add_argument(
        "--max_train_steps", type=int, default=None, help="Optimizer steps to train (overrides --num_train_epochs)."
    )
    p.add_argument("--learning_rate", type=float, default=1e-4, help="Peak learning rate (adapters and the update).")
    p.add_argument(
        "--scale_lr", action="store_true", help="Multiply the learning rate by the total batch size (as diffusers)."
    )
    p.add_argument("--lr_scheduler", default="constant", help="diffusers scheduler name: constant, linear, cosine...")
    p.add_argument("--lr_warmup_steps", type=int, default=0, help="Warmup steps of the scheduler.")
    p.add_argument("--lr_num_cycles", type=int, default=1, help="Restarts of the cosine_with_restarts scheduler.")
    p.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
    p.add_argument("--adam_beta1", type=float, default=0.9, help="Adam's beta1 (AdamW and the update).")
    p.add_argument("--adam_beta2", type=float, default=0.999, help="Adam's beta2 (AdamW and the update).")
    p.add_argument("--adam_epsilon", type=float, default=1e-8, help="Adam's epsilon (AdamW and the update).")
    p.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay (the core only).")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    p.add_argument(
        "--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="accelerate's mixed precision."
    )
    p.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere or newer GPUs.")
    p.add_argument("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N steps.")
    p.add_argument(
        "--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints (oldest go)."
    )
    p.add_argument("--resume_from_checkpoint", default=None, help='A checkpoint folder, or "latest".')
    p.add_argument("--validation_prompt", default=None, help="Prompt of the validation images.")
    p.add_argument("--num_validation_images", type=int, default=4, help="Validation images per validation.")
    p.add_argument("--validation_steps", type=int, default=None, help="Also validate every N steps.")
    p.add_argument("--validation_epochs", type=int, default=None, help="Also validate every N epochs.")
    p.add_argument("--num_inference_steps", type=int, default=25, help="Denoising steps of validation images.")
    p.add_argument("--output_dir", default="dreambooth-tucker", help="Where adapters, checkpoints and images go.")
    p.add_argument("--push_to_hub", action="store_true", help="Upload the output folder to the Hub at the end.")
    p.add_argument("--hub_model_id", default=None, help="Hub repository (default: the output folder's name).")
    p.add_argument("--seed", type=int, default=None, help="Seed of training and validation images.")
    p.add_argument("--report_to", default="tensorboard", help='accelerate tracker ("tensorboard", "wandb", "none").')
    p.add_argument("--logging_dir", default="logs", help="Tracker logs, inside --output_dir.")
    p.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")
    # adapters
    p.add_argument("--method", choices=["tucker", "lora"], default="tucker", help="Tucker adapters, or PEFT LoRA.")
    p.add_argument("--rank", type=int, default=8, help="Initial rank (tucker) or rank (lora).")
    p.add_argument("--max_rank", type=int, default=32, help="tucker: largest rank per mode.")
    p.add_argument("--tau", type=float, default=0.1, help="tucker: relative truncation tolerance.")
    p.add_argument("--alpha", type=float, default=None, help="Scale numerator; default: the rank.")
    p.add_argument(
        "--conv_mode", choices=["channels", "full"], default="channels", help="tucker: how convolutions factorize."
    )
    args = p.parse_args(argv)
    if args.with_prior_preservation and (args.class_data_dir is None or args.class_prompt is None):
        p.error("--with_prior_preservation needs --class_data_dir and --class_prompt")
    for name in ("num_train_epochs", "max_train_steps", "checkpoints_total_limit", "validation_epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    if args.alpha is None:
        args.alpha = float(args.rank)
    return args


class DreamBoothDataset(Dataset):
    """Instance (and class) images with their prompts' token ids, resized and cropped to ``size``, in [-1, 1]."""

    def __init__(
        self, instance_dir, instance_prompt, tokenizer, size, center_crop=False, class_dir=None, class_prompt=None
    ):
        def images(folder):
            paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
            if not paths:
                raise ValueError(f"{folder} holds no .jpg/.jpeg/.png images")
            return paths

        self.instance = images(instance_dir)
        self.klass = images(class_dir) if class_dir else []
        self.size, self.center_crop = size, center_crop
        self._cache: dict = {}
        tokens = lambda text: tokenizer(  # noqa: E731
            text, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids[0]
        self.instance_ids = tokens(instance_prompt)
        self.class_ids = tokens(class_prompt) if class_prompt else None

    def __len__(self):
        return max(len(self.instance), len(self.klass))

    def _resized(self, path):
        """The photo scaled so that its short side is ``size`` (decoded once: camera JPEGs are large)."""
        if path not in self._cache:
            image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
            scale = self.size / min(image.size)
            width, height = max(self.size, round(image.width * scale)), max(self.size, round(image.height * scale))
            self._cache[path] = image.resize((width, height), Image.BILINEAR)
        return self._cache[path]

    def _image(self, path):
        image = self._resized(path)
        spare_x, spare_y = image.width - self.size, image.height - self.size
        left = spare_x // 2 if self.center_crop else np.random.randint(0, spare_x + 1)
        top = spare_y // 2 if self.center_crop else np.random.randint(0, spare_y + 1)
        image = image.crop((left, top, left + self.size, top + self.size))
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
        return array.permute(2, 0, 1)

    def __getitem__(self, i):
        item = {"pixel_values": self._image(self.instance[i % len(self.instance)]), "input_ids": self.instance_ids}
        if self.klass:
            item["class_pixel_values"] = self._image(self.klass[i % len(self.klass)])
            item["class_input_ids"] = self.class_ids
        return item


def collate(items, with_prior):
    pixels = [it["pixel_values"] for it in items]
    ids = [it["input_ids"] for it in items]
    if with_prior:  # instance and class examples in one batch, as diffusers does
        pixels += [it["class_pixel_values"] for it in items]
        ids += [it["class_input_ids"] for it in items]
    return {"pixel_values": torch.stack(pixels), "input_ids": torch.stack(ids)}


def adapter_config(args, targets):
    if args.method == "tucker":
        return tucker_peft.TuckerLoraConfig(
            r=args.rank,
            max_rank=max(args.max_rank, args.rank),
            tau=args.tau,
            alpha=args.alpha,
            conv_mode=args.conv_mode,
            target_modules=targets,
        )
    from peft import LoraConfig

    return LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=targets, init_lora_weights="gaussian")


def checkpoints(folder: str) -> list[str]:
    """The ``checkpoint-<step>`` folders in ``folder``, oldest first."""
    names = [d for d in os.listdir(folder) if d.startswith("checkpoint-")] if os.path.isdir(folder) else []
    return sorted(names, key=lambda d: int(d.split("-")[1]))


def generate_class_images(args, accelerator):
    """Fill ``--class_data_dir`` up to ``--num_class_images`` with images of ``--class_prompt`` (prior preservation)."""
    from diffusers import StableDiffusionPipeline

    folder = Path(args.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    have = len([p for p in folder.iterdir() if p.suffix in (".jpg", ".png")])
    if have >= args.num_class_images:
        return
    pipe = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, safety_checker=None
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.to(accelerator.device)
    for start in range(have, args.num_class_images, args.sample_batch_size):
        n = min(args.sample_batch_size, args.num_class_images - start)
        images = pipe(
            [args.class_prompt] * n,
            height=args.resolution,
            width=args.resolution,
            num_inference_steps=args.num_inference_steps,
        ).images
        for j, image in enumerate(images):
            image.save(folder / f"class-{start + j:05d}.png")
    del pipe


def save_diffusers_lora(output_dir: str, unet, text_encoder=None) -> None:
    """``output_dir/pytorch_lora_weights.safetensors`` for PEFT LoRA adapters, with their configs as metadata (the
    alphas), so that ``pipe.load_lora_weights(output_dir)`` loads them with diffusers alone."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    parts = {"unet": unet, "text_encoder": text_encoder}
    kwargs = {}
    for part, model in parts.items():
        if model is not None:
            # PEFT's key names, which diffusers' loader reads as they are (its convert_state_dict_to_diffusers would
            # rename only the attention layers' keys, and the loader then drops those: tested)
            kwargs[f"{part}_lora_layers"] = get_peft_model_state_dict(model)
            kwargs[f"{part}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(output_dir, **kwargs)


def save_model_card(args, steps: int, ranks: dict | None) -> None:
    """``output_dir/README.md``, the model card of ``--push_to_hub``: base model, prompt, training and how to load."""
    base = args.pretrained_model_name_or_path
    parts = "the UNet" + (" and the text encoder" if args.train_text_encoder else "")
    if ranks:
        values = [r for v in ranks.values() for r in v]
        mean = sum(values) / len(values)
        size = (
            f"Tucker adapters on {parts}, ranks adapted from {args.rank} to {mean:.2f} on average (tau = {args.tau})"
        )
    else:
        size = f"LoRA (rank {args.rank}) on {parts}"
    text = f"""---
base_model: {json.dumps(base)}
library_name: diffusers
instance_prompt: {json.dumps(args.instance_prompt)}
tags:
- text-to-image
- diffusers
- dreambooth
- lora
- tucker-peft
---

# DreamBooth adapters for {base}

Trained on the prompt `{args.instance_prompt}` for {steps} steps with tucker-peft's
`examples/dreambooth/train_dreambooth_tucker.py`: {size}.
"""
    held = "the same deltas as exact LoRA factors" if ranks else "the LoRA adapters"
    text += f"""
`pytorch_lora_weights.safetensors` holds {held}, so diffusers loads them alone:

```python
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{base}")
pipe.load_lora_weights("<this folder or repository>")
image = pipe("{args.instance_prompt}").images[0]
```
"""
    if ranks:
        text += "\n`unet/` (and `text_encoder/`) hold the Tucker adapters themselves, to keep training them or to "
        text += "fuse them: `tucker_peft.load_into_pipeline(pipe, folder, fuse=False)`.\n"
    else:
        text += "\n`unet/` (and `text_encoder/`) hold the same adapters in PEFT's format: "
        text += "`tucker_peft.load_into_pipeline(pipe, folder)`.\n"
    with open(os.path.join(args.output_dir, "README.md"), "w") as f:
        f.write(text)


def log_validation(args, accelerator, unet, text_encoder, step):
    """Generate ``--num_validation_images`` for ``--validation_prompt`` with the current adapters; save a PNG grid."""
    from diffusers import StableDiffusionPipeline

    logger.info("Running validation: %d images of %r", args.num_validation_images, args.validation_prompt)
    pipe = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        unet=accelerator.unwrap_model(unet),
        text_encoder=accelerator.unwrap_model(text_encoder),
        revision=args.revision,
        safety_checker=None,
    )
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(args.seed or 0)
    size = {"height": args.resolution, "width": args.resolution, "num_inference_steps": args.num_inference_steps}
    images = [
        pipe(args.validation_prompt, generator=generator, **size).images[0] for _ in range(args.num_validation_images)
    ]
    cols = min(4, len(images))
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * images[0].width, rows * images[0].height))
    for k, image in enumerate(images):
        grid.paste(image, ((k % cols) * image.width, (k // cols) * image.height))
    path = os.path.join(args.output_dir, f"validation-{step:06d}.png")
    grid.save(path)
    return path


def main(argv=None):
    args = parse_args(argv)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.seed is not None:
        set_seed(args.seed)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.with_prior_preservation:
        generate_class_images(args, accelerator)
    os.makedirs(args.output_dir, exist_ok=True)

    path = args.pretrained_model_name_or_path
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=args.revision)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=args.revision)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", revision=args.revision)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=args.revision)
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    for module in (vae, text_encoder, unet):
        module.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae.to(accelerator.device, dtype=weight_dtype)

    unet.add_adapter(adapter_config(args, UNET_TARGETS))
    if args.train_text_encoder:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(adapter_config(args, TEXT_TARGETS), text_encoder)
        text_encoder.peft_config = getattr(text_encoder, "peft_config", None) or {}
    else:
        text_encoder.to(accelerator.device, dtype=weight_dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            # (transformers 5 renamed it activation_checkpointing_enable)
            getattr(text_encoder, "activation_checkpointing_enable", text_encoder.gradient_checkpointing_enable)()
    models = [unet] + ([text_encoder] if args.train_text_encoder else [])
    params = [p for m in models for p in m.parameters() if p.requires_grad]
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    betas = (args.adam_beta1, args.adam_beta2)
    optimizer = torch.optim.AdamW(
        params, lr=args.learning_rate, betas=betas, eps=args.adam_epsilon, weight_decay=args.adam_weight_decay
    )
    tucker = None
    if args.method == "tucker":  # the one extra line: the geometric, rank-adaptive update of the Tucker factors
        adapted = models[0] if len(models) == 1 else nn.ModuleList(models)  # layer names "0.…" (unet), "1.…"
        max_rank = max(args.max_rank, args.rank)
        tucker = tucker_peft.attach(
            optimizer, adapted, tau=args.tau, max_rank=max_rank, betas=betas, eps=args.adam_epsilon
        )

    # checkpoints hold the adapters in PEFT format (at their current ranks), not whole models
    def save_hook(saved_models, weights, output_dir):
        for model in saved_models:
            name = "unet" if isinstance(accelerator.unwrap_model(model), UNet2DConditionModel) else "text_encoder"
            save_adapter(accelerator.unwrap_model(model), os.path.join(output_dir, name))
        weights.clear()

    def load_hook(loaded_models, input_dir):
        while loaded_models:
            model = accelerator.unwrap_model(loaded_models.pop())
            name = "unet" if isinstance(model, UNet2DConditionModel) else "text_encoder"
            load_adapter_weights(model, os.path.join(input_dir, name))  # the adapter takes the checkpoint's ranks

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    prior = args.with_prior_preservation
    dataset = DreamBoothDataset(
        args.instance_data_dir,
        args.instance_prompt,
        tokenizer,
        args.resolution,
        args.center_crop,
        args.class_data_dir if prior else None,
        args.class_prompt if prior else None,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        num_workers=args.dataloader_num_workers,
        collate_fn=lambda items: collate(items, prior),
    )
    updates_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * updates_per_epoch
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    prepared = accelerator.prepare(*models, optimizer, loader, lr_scheduler)
    models, (optimizer, loader, lr_scheduler) = list(prepared[: len(models)]), prepared[len(models) :]
    unet = models[0]
    if args.train_text_encoder:
        text_encoder = models[1]
    if accelerator.is_main_process and accelerator.log_with:
        accelerator.init_trackers(
            "dreambooth-tucker", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        )

    global_step = 0
    if args.resume_from_checkpoint:
        folder = args.resume_from_checkpoint
        if folder == "latest":
            found = checkpoints(args.output_dir)
            folder = os.path.join(args.output_dir, found[-1]) if found else None
        if folder:
            accelerator.load_state(folder)
            global_step = int(os.path.basename(folder.rstrip("/")).split("-")[1])

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info("  Num examples = %d", len(dataset))
    logger.info("  Instantaneous batch size per device = %d", args.train_batch_size)
    logger.info("  Total train batch size (w. parallel, distributed & accumulation) = %d", total_batch)
    logger.info("  Gradient Accumulation steps = %d", args.gradient_accumulation_steps)
    logger.info("  Total optimization steps = %d", args.max_train_steps)
    logger.info("  Trainable adapter parameters = %d", sum(p.numel() for p in params))
    if global_step:
        logger.info("  Resuming from step %d", global_step)
    progress = tqdm(
        range(global_step, args.max_train_steps), disable=not accelerator.is_local_main_process, desc="Steps"
    )
    loss_history, rank_history = [], []
    updates_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)  # per process, once prepared
    epoch = global_step // updates_per_epoch
    while global_step < args.max_train_steps:
        for batch in loader:
            with accelerator.accumulate(*models):
                pixels = batch["pixel_values"].to(dtype=weight_dtype)
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
                )
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                hidden = text_encoder(batch["input_ids"])[0]
                prediction = unet(noisy, timesteps, hidden).sample
                target = (
                    noise
                    if noise_scheduler.config.prediction_type == "epsilon"
                    else noise_scheduler.get_velocity(latents, noise, timesteps)
                )
                if args.with_prior_preservation:
                    prediction, prior_prediction = prediction.chunk(2)
                    target, prior_target = target.chunk(2)
                    loss = F.mse_loss(prediction.float(), target.float()) + args.prior_loss_weight * F.mse_loss(
                        prior_prediction.float(), prior_target.float()
                    )
                else:
                    loss = F.mse_loss(prediction.float(), target.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
            if tucker is not None:
                summary = tucker_peft.rank_summary(tucker)
                logs.update(summary)
                rank_history.append({"step": global_step, **summary})
            loss_history.append(logs["loss"])
            progress.set_postfix(**{k: round(v, 4) for k, v in logs.items()})
            accelerator.log(logs, step=global_step)
            if accelerator.is_main_process and global_step % args.checkpointing_steps == 0:
                if args.checkpoints_total_limit is not None:  # room for the new one
                    old = checkpoints(args.output_dir)
                    for name in old[: max(0, len(old) - args.checkpoints_total_limit + 1)]:
                        shutil.rmtree(os.path.join(args.output_dir, name))
                accelerator.save_state(os.path.join(args.output_dir, f"checkpoint-{global_step}"))
            validate = args.validation_prompt and args.validation_steps and global_step % args.validation_steps == 0
            if validate and accelerator.is_main_process:  # images are written by the main process only
                log_validation(args, accelerator, unet, text_encoder, global_step)
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break  # (the final validation follows)
        epoch += 1
        validate = args.validation_prompt and args.validation_epochs and epoch % args.validation_epochs == 0
        if validate and accelerator.is_main_process:
            log_validation(args, accelerator, unet, text_encoder, global_step)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_adapter(accelerator.unwrap_model(unet), os.path.join(args.output_dir, "unet"))
        if args.train_text_encoder:
            save_adapter(accelerator.unwrap_model(text_encoder), os.path.join(args.output_dir, "text_encoder"))
        if tucker is not None:
            tucker_peft.save_rank_report(rank_history, tucker.ranks(), args.output_dir)
            # the same deltas as exact LoRA factors: pipe.load_lora_weights(output_dir) loads them without tucker-peft
            tucker_peft.export_lora(args.output_dir, args.output_dir, format="diffusers")
        else:  # the LoRA baseline: the same file, through diffusers' own saver
            save_diffusers_lora(
                args.output_dir,
                accelerator.unwrap_model(unet),
                accelerator.unwrap_model(text_encoder) if args.train_text_encoder else None,
            )
        save_model_card(args, global_step, tucker.ranks() if tucker else None)
        with open(os.path.join(args.output_dir, "loss_history.txt"), "w") as f:
            f.write("\n".join(f"{x:.6f}" for x in loss_history) + "\n")
        if args.validation_prompt:
            log_validation(args, accelerator, unet, text_encoder, global_step)
        if args.push_to_hub:
            from huggingface_hub import create_repo, upload_folder

            repo_id = create_repo(args.hub_model_id or Path(args.output_dir).name, exist_ok=True).repo_id
            upload_folder(repo_id=repo_id, folder_path=args.output_dir, ignore_patterns=["checkpoint-*", "logs/*"])
    accelerator.end_training()
    return {
        "steps": global_step,
        "loss_history": loss_history,
        "ranks": tucker.ranks() if tucker else None,
        # without accelerate's mixed-precision forward wrapper: the plain modules, as a fresh load gives them
        "unet": accelerator.unwrap_model(unet, keep_fp32_wrapper=False),
        "text_encoder": accelerator.unwrap_model(text_encoder, keep_fp32_wrapper=False),
    }


if __name__ == "__main__":
    main()
