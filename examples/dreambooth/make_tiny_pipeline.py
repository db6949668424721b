"""Build and save a tiny Stable Diffusion pipeline from configs (random weights), for offline runs and tests.

No weights are downloaded: UNet, VAE and CLIP text encoder are built from small configs, and the CLIP tokenizer
from a character-level vocabulary (every byte of the byte-level BPE alphabet, with and without the end-of-word
mark), so any prompt tokenizes offline.  The pipeline has the structure of Stable Diffusion 1.x (cross-attention
UNet with ResNet 3x3 convolutions), which is what the DreamBooth example adapts.

    python examples/dreambooth/make_tiny_pipeline.py --output_dir outputs/tiny-sd [--seed 0]
"""

from __future__ import annotations

import argparse

import torch


def byte_alphabet() -> list[str]:
    """The 256 characters byte-level BPE (GPT-2, CLIP) uses for the bytes 0-255: printable bytes stand for
    themselves, the others are shifted above 255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_level_vocab() -> dict[str, int]:
    """CLIP's byte-level alphabet as a vocabulary: each character alone and with the end-of-word mark ``</w>``."""
    chars = byte_alphabet()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def build_tiny_pipeline(seed: int = 0, sample_size: int = 32):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
    )
    vocab = byte_level_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=32, help="image size the tiny VAE/UNet are built for")
    args = parser.parse_args()
    build_tiny_pipeline(args.seed, args.resolution).save_pretrained(args.output_dir)
    print(f"saved a tiny StableDiffusionPipeline to {args.output_dir}")


if __name__ == "__main__":
    main()
