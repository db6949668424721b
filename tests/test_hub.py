"""push_to_hub goes through PEFT and uploads the adapter with a tucker-peft model card (upload intercepted)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import transformers.utils.hub as hub
from huggingface_hub import ModelCard, ModelCardData
from peft import get_peft_model
from safetensors.torch import load

import tucker_peft
from tucker_peft import TuckerLoraConfig

from .conftest import randomize_adapter, tiny_bert


class FakeHub:
    """Stands in for ``HfApi``: records the repo and the uploaded files (read at commit time)."""

    def __init__(self):
        self.repos, self.files = [], {}

    def create_repo(self, repo_id, **kwargs):
        self.repos.append(repo_id)
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            with open(op.path_or_fileobj, "rb") as f:
                self.files[op.path_in_repo] = f.read()
        return SimpleNamespace(commit_url=f"https://example.invalid/{repo_id}")


def test_push_to_hub_uploads_adapter_and_tucker_card(monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(hub, "hf_api", lambda: fake)
    # a new repo: transformers builds its generic template card (what it does when the Hub has no README yet)
    monkeypatch.setattr(
        hub,
        "create_and_tag_model_card",
        lambda repo_id, tags=None, token=None: ModelCard.from_template(ModelCardData(library_name="transformers")),
    )
    base = tiny_bert()
    base.name_or_path = "org/tiny-bert"
    model = get_peft_model(base, TuckerLoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    ranks = randomize_adapter(model, seed=2)

    model.push_to_hub("me/tiny-tucker")

    assert fake.repos == ["me/tiny-tucker"]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(fake.files)
    config = json.loads(fake.files["adapter_config.json"])
    assert config["peft_type"] == "TUCKER" and config["base_model_name_or_path"] == "org/tiny-bert"
    assert {k: tuple(v) for k, v in config["module_ranks"].items()} == ranks
    weights = load(fake.files["adapter_model.safetensors"])
    assert sum(v.numel() for k, v in weights.items() if "tucker_" in k) == tucker_peft.adapter_parameter_count(model)

    card = fake.files["README.md"].decode()
    assert "library_name: peft" in card
    assert "tucker-peft" in card and "TDLRT" in card
    assert "Base model: `org/tiny-bert`" in card
    assert "Target modules: `['query', 'value']`" in card
    all_ranks = [r for v in ranks.values() for r in v]
    assert f"min {min(all_ranks)}, mean {sum(all_ranks) / len(all_ranks):.2f}, max {max(all_ranks)}" in card
    n = tucker_peft.adapter_parameter_count(model)
    dense = 4 * 32 * 32
    assert f"Trainable adapter parameters: {n:,}" in card
    assert f"compression {dense / n:.1f}x" in card
    for name, rank in ranks.items():  # the full per-layer table
        assert f"| `{name}` |" in card and f"| {', '.join(map(str, rank))} |" in card


def test_saved_card_is_updated_not_duplicated(tmp_path):
    model = get_peft_model(tiny_bert(), TuckerLoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
    model.save_pretrained(tmp_path)
    assert "min 4, mean 4.00, max 4" in (tmp_path / "README.md").read_text()
    ranks = randomize_adapter(model, seed=1)
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.count("<!-- tucker-peft:begin -->") == 1 and card.count("## tucker-peft adapter") == 1
    assert "min 4, mean 4.00, max 4" not in card
    assert f"min {min(min(r) for r in ranks.values())}," in card
