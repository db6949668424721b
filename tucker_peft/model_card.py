"""The tucker-peft section of a saved adapter's ``README.md`` model card (what ``push_to_hub`` uploads).

PEFT writes the card in ``PeftModel.create_or_update_model_card`` (called by ``save_pretrained``, and so by
``push_to_hub``).  :func:`install` wraps that method once: after PEFT has written its card, a model that holds
Tucker adapters gets a section with the base model, the method, the target modules, the rank of every layer, the
trainable parameters and the compression against the dense deltas.  Other PEFT methods are left untouched.
"""

from __future__ import annotations

import functools
import math
import os

from torch import nn

from .config import TuckerLoraConfig
from .model import iter_tucker_layers

BEGIN = "<!-- tucker-peft:begin -->"
END = "<!-- tucker-peft:end -->"


def tucker_card_section(model: nn.Module, adapter_name: str, config: TuckerLoraConfig) -> str:
    """Markdown describing the Tucker adapter ``adapter_name`` of ``model`` (a ``PeftModel`` or adapted model)."""
    layers = list(iter_tucker_layers(model, adapter_name))
    rows, n_adapter, n_dense = [], 0, 0
    for name, layer in layers:
        n = layer.core(adapter_name).numel() + sum(u.numel() for u in layer.factors(adapter_name))
        dense = math.prod(layer.get_base_layer().weight.shape)
        n_adapter, n_dense = n_adapter + n, n_dense + dense
        ranks = layer.ranks(adapter_name)
        rows.append(f"| `{name}` | {tuple(layer.core(adapter_name).shape)} | {', '.join(map(str, ranks))} | {n:,} |")
    all_ranks = [r for _, layer in layers for r in layer.ranks(adapter_name)]
    base = config.base_model_name_or_path or "(a model built without a name)"
    targets = config.target_modules
    targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
    title = f"## tucker-peft adapter `{adapter_name}`" if adapter_name != "default" else "## tucker-peft adapter"
    lines = [
        title,
        "",
        "This is a **tucker-peft** adapter: rank-adaptive Tucker-factorized deltas `W = W0 + s * C x_0 U_0 ... x_{d-1} U_{d-1}`"
        " trained with the geometry-aware TDLRT update (Zangrando et al., NeurIPS 2024).",
        "Load it with `pip install tucker-peft`, then `PeftModel.from_pretrained(base_model, repo_or_dir)` (the installed"
        " package registers itself with PEFT when PEFT reads this adapter; `import tucker_peft` does it explicitly).",
        "Without tucker-peft, use its exact LoRA form: `tucker-peft export DIR OUT --format peft` (or `diffusers`,"
        " `kohya`, `lycoris`) writes a LoRA adapter with the same outputs that plain PEFT loads with"
        " `PeftModel.from_pretrained(base_model, OUT)` (diffusers: `pipe.load_lora_weights(OUT)`).",
        "",
        f"- Base model: `{base}`",
        f"- Target modules: `{targets}`",
        f"- Adapted layers: {len(layers)}; conv mode: `{config.conv_mode}`; alpha: {config.alpha}"
        + (f" (per module: `{config.alpha_pattern}`)" if config.alpha_pattern else "")
        + f"; tau: {config.tau}",
    ]
    if all_ranks:
        lines.append(
            f"- Ranks per mode: min {min(all_ranks)}, mean {sum(all_ranks) / len(all_ranks):.2f}, max {max(all_ranks)}"
            f" (bounds [{config.min_rank}, {config.max_rank}], initial r = {config.r})"
        )
    lines += [
        f"- Trainable adapter parameters: {n_adapter:,}",
        f"- Dense delta parameters of the same layers: {n_dense:,} (compression {n_dense / max(n_adapter, 1):.1f}x)",
        "",
        "<details><summary>Rank of every layer</summary>",
        "",
        "| layer | core shape | ranks (out, in, ...) | parameters |",
        "|---|---|---|---|",
        *rows,
        "",
        "</details>",
    ]
    return "\n".join(lines)


def _write_section(path: str, section: str) -> None:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def install() -> None:
    """Wrap ``PeftModel.create_or_update_model_card`` (once) to add the tucker-peft section."""
    from peft import PeftModel

    original = PeftModel.create_or_update_model_card
    if getattr(original, "_tucker_peft", False):
        return

    @functools.wraps(original)
    def create_or_update_model_card(self, output_dir: str):
        original(self, output_dir)
        sections = [
            tucker_card_section(self, name, config)
            for name, config in self.peft_config.items()
            if isinstance(config, TuckerLoraConfig)
        ]
        if sections:
            _write_section(os.path.join(output_dir, "README.md"), "\n\n".join(sections))

    create_or_update_model_card._tucker_peft = True
    PeftModel.create_or_update_model_card = create_or_update_model_card

    # ``push_to_hub`` (transformers' PushToHubMixin) saves into a temporary folder and then overwrites README.md with
    # a generic card before uploading; write PEFT's card and our section into that folder again just before upload.
    upload = getattr(PeftModel, "_upload_modified_files", None)
    if upload is None or getattr(upload, "_tucker_peft", False):
        return

    @functools.wraps(upload)
    def _upload_modified_files(self, working_dir, *args, **kwargs):
        if any(isinstance(c, TuckerLoraConfig) for c in self.peft_config.values()):
            self.create_or_update_model_card(working_dir)
        return upload(self, working_dir, *args, **kwargs)

    _upload_modified_files._tucker_peft = True
    PeftModel._upload_modified_files = _upload_modified_files
