#!/usr/bin/env python
"""Fine-tune a model on a GLUE task with tucker-peft's rank-adaptive Tucker adapters, or a baseline.

In the style of transformers' ``examples/pytorch/text-classification/run_glue.py``: dataclass arguments parsed by
``HfArgumentParser`` (all ``TrainingArguments`` are accepted), ``--task_name`` (data from the Hub when online) and/or
``--train_file/--validation_file`` (csv/tsv/json/parquet), and ``--method tucker|lora|adalora|full`` so that the
baselines run through the same code, data, seeds and schedule.

    python examples/glue/run_glue.py --model_name_or_path MODEL --task_name sst2 \\
        --train_file examples/glue/data/sst2/train.tsv --validation_file examples/glue/data/sst2/dev.tsv \\
        --method tucker --output_dir out/sst2 --num_train_epochs 2 --learning_rate 2e-3

At the end it prints one table (task metric, trainable parameters at start and end, final ranks) and saves the
adapter, ``results.json`` and, for tucker, ``tucker_ranks.json`` / ``tucker_ranks.png`` into ``--output_dir``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field

import datasets
import numpy as np
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

import tucker_peft
from tucker_peft.model import TRANSFORMERS_MODELS_TO_TUCKER_TARGET_MODULES_MAPPING

logger = logging.getLogger("run_glue")

TASK_TO_KEYS = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
#: column names of the original GLUE files (GLUE's own download: MRPC, STS-B, QQP, MNLI) mapped to the names of the
#: Hub dataset; per task where the name means something else elsewhere
RAW_COLUMN_ALIASES = {
    "#1 String": "sentence1",
    "#2 String": "sentence2",
    "Quality": "label",
    "score": "label",
    "is_duplicate": "label",
}
TASK_COLUMN_ALIASES = {"mnli": {"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"}}
#: GLUE's CoLA files have no header row: source, label, the author's mark, sentence
HEADERLESS_COLUMNS = {"cola": ["source", "label", "author_mark", "sentence"]}
#: class names of the tasks whose original files write labels as words, in the Hub dataset's label order
LABEL_NAMES = {
    "mnli": ["entailment", "neutral", "contradiction"],
    "qnli": ["entailment", "not_entailment"],
    "rte": ["entailment", "not_entailment"],
}
MAIN_METRIC = {"cola": "matthews_correlation", "stsb": "pearson", "mrpc": "f1", "qqp": "f1"}


@dataclass
class DataTrainingArguments:
    task_name: str | None = field(default=None, metadata={"help": f"GLUE task: {', '.join(TASK_TO_KEYS)}."})
    train_file: str | None = field(default=None, metadata={"help": "Training data: csv, tsv, json or parquet."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation data, same formats."})
    test_file: str | None = field(
        default=None, metadata={"help": "Data to predict with --do_predict (no labels needed), same formats."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use the first N validation rows."})
    sentence1_key: str | None = field(default=None, metadata={"help": "Text column (default: from the task)."})
    sentence2_key: str | None = field(default=None, metadata={"help": "Second text column, if any."})
    label_key: str = field(default="label", metadata={"help": "Label column of custom files."})

    def __post_init__(self):
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            if self.task_name not in TASK_TO_KEYS:
                raise ValueError(f"Unknown task {self.task_name!r}; choose one of {list(TASK_TO_KEYS)}.")
        elif self.train_file is None or self.validation_file is None:
            raise ValueError("Pass --task_name, or --train_file and --validation_file (or both).")
        for path in (self.train_file, self.validation_file, self.test_file):
            if path is not None and path.rsplit(".", 1)[-1] not in ("csv", "tsv", "json", "jsonl", "parquet"):
                raise ValueError(f"{path}: data files must be csv, tsv, json(l) or parquet.")


METHODS = ("tucker", "lora", "adalora", "full")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Pretrained model name on the Hub or local folder."})
    method: str = field(default="tucker", metadata={"help": "The adapter method.", "choices": list(METHODS)})
    r: int = field(default=8, metadata={"help": "Initial rank (tucker), rank (lora), initial rank (adalora)."})
    max_rank: int = field(default=32, metadata={"help": "tucker: largest rank per mode."})
    min_rank: int = field(default=1, metadata={"help": "tucker: smallest rank per mode."})
    tau: float = field(default=0.1, metadata={"help": "tucker: relative truncation tolerance."})
    budget: int | None = field(
        default=None, metadata={"help": "tucker: largest number of adapter parameters (global rank decisions)."}
    )
    budget_schedule: str | None = field(
        default=None,
        metadata={
            "help": "tucker: 'start,end' fractions of training over which the budget shrinks from the initial size "
            "to --budget (e.g. 0.2,0.8)."
        },
    )
    alpha: float = field(default=8.0, metadata={"help": "Adapter scale numerator (tucker alpha, lora_alpha)."})
    adapter_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    direction: str = field(default="adam", metadata={"help": "tucker: 'adam' or 'sgd' step direction."})
    adaptive_scale: str = field(
        default="auto", metadata={"help": "tucker: factor of the core's Adam step, 'auto' or a number."}
    )
    rank_warmup: int = field(default=0, metadata={"help": "tucker: steps at the initial ranks before deciding."})
    rank_interval: int = field(default=1, metadata={"help": "tucker: a rank decision every N steps."})
    rank_headroom: int = field(default=1, metadata={"help": "tucker: ranks held between decisions (x decided)."})
    basis_interval: int = field(
        default=1, metadata={"help": "tucker: the bases move every N steps, the core every step."}
    )
    adalora_target_r: int = field(default=4, metadata={"help": "adalora: average final rank."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Re-initialise a classifier head whose size differs from num_labels."}
    )
    target_modules: str | None = field(
        default=None, metadata={"help": "Comma-separated module names; default: attention + FFN of the model family."}
    )


def glue_metrics(task: str | None, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE's metric of ``task`` (accuracy by default), with scikit-learn/scipy: the same formulas as ``evaluate``'s
    ``glue`` metric, which needs the Hub.  ``predictions`` are class ids (or scores for stsb)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    if task == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(labels, predictions))}
    if task == "stsb":
        return {
            "pearson": float(pearsonr(predictions, labels)[0]),
            "spearmanr": float(spearmanr(predictions, labels)[0]),
        }
    accuracy = float((predictions == labels).mean())
    if task in ("mrpc", "qqp"):
        return {"accuracy": accuracy, "f1": float(f1_score(y_true=labels, y_pred=predictions))}
    return {"accuracy": accuracy}


def metric_function(task: str | None):
    """``evaluate``'s GLUE metric when it loads (online), else :func:`glue_metrics`."""
    try:
        import evaluate

        metric = evaluate.load("glue", task if task else "sst2")
        return lambda preds, refs: {k: float(v) for k, v in metric.compute(predictions=preds, references=refs).items()}
    except Exception as err:  # offline: evaluate fetches its metric scripts from the Hub
        logger.info("evaluate's glue metric is not available (%s); computing it with scikit-learn/scipy", err)
        return lambda preds, refs: glue_metrics(task, preds, refs)


def load_data(data_args: DataTrainingArguments, cache_dir: str | None = None):
    """The train and validation splits with the Hub dataset's column names and integer labels: the Hub's
    ``nyu-mll/glue`` without files, else the files (csv/tsv/json/parquet; GLUE's own TSVs included: CoLA's files
    without a header row, word labels of RTE/QNLI/MNLI, the original column names of MRPC, STS-B, QQP and MNLI)."""
    from datasets import load_dataset

    task = data_args.task_name
    if data_args.train_file is None:
        return load_dataset("nyu-mll/glue", task, cache_dir=cache_dir)

    def read(files: dict[str, str]):
        path = next(iter(files.values()))
        extension = path.rsplit(".", 1)[-1]
        if extension in ("csv", "tsv"):
            kwargs = {"delimiter": "\t" if extension == "tsv" else ",", "quoting": 3, "encoding": "utf-8-sig"}
            if task in HEADERLESS_COLUMNS and not _has_header(path, kwargs["delimiter"], task):
                kwargs["column_names"] = HEADERLESS_COLUMNS[task]
            raw = load_dataset("csv", data_files=files, cache_dir=cache_dir, **kwargs)
        else:
            raw = load_dataset(
                "json" if extension.startswith("json") else extension, data_files=files, cache_dir=cache_dir
            )
        columns = next(iter(raw.values())).column_names
        aliases = RAW_COLUMN_ALIASES | TASK_COLUMN_ALIASES.get(task, {})
        renames = {k: v for k, v in aliases.items() if k in columns and v not in columns}
        if data_args.label_key != "label" and data_args.label_key in columns:
            renames[data_args.label_key] = "label"
        return raw.rename_columns(renames) if renames else raw

    raw = read({"train": data_args.train_file, "validation": data_args.validation_file})
    columns = raw["train"].column_names
    if "label" not in raw["train"].column_names:
        raise ValueError(f"{data_args.train_file} has no label column (columns: {columns}); name it with --label_key.")
    if raw["train"].features["label"].dtype in ("string", "large_string"):
        raw = _encode_labels(raw, LABEL_NAMES.get(task), data_args.train_file)
    if data_args.test_file:  # (its labels, if any, are not used)
        raw["test"] = read({"test": data_args.test_file})["test"]
    return raw


def _has_header(path: str, delimiter: str, task: str) -> bool:
    """Whether the first row of ``path`` names columns: it does unless its fields look like a row of ``task``'s
    headerless layout (CoLA: ``source, 0|1, mark, sentence``)."""
    with open(path, encoding="utf-8-sig") as f:
        fields = f.readline().rstrip("\r\n").split(delimiter)
    return not (len(fields) == len(HEADERLESS_COLUMNS[task]) and fields[1].strip() in ("0", "1"))


def _encode_labels(raw, names: list[str] | None, train_file: str):
    """Word labels to class ids: in the Hub dataset's order for a GLUE task (``names``), else sorted (a custom
    task); a label outside ``names`` or one that only the validation file has is an error."""
    seen = sorted({x for split in raw.values() for x in split["label"]})
    known = names or sorted(set(raw["train"]["label"]))
    unknown = [x for x in seen if x not in known]
    if unknown:
        raise ValueError(
            f"labels {unknown} of the data ({train_file} and the validation file) are not among {known}"
            + (" (this GLUE task's classes)." if names else " (the training file's labels).")
        )
    index = {name: i for i, name in enumerate(known)}
    features = raw["train"].features.copy()
    features["label"] = datasets.ClassLabel(names=known)
    return raw.map(lambda row: {"label": index[row["label"]]}, features=features, desc="Label names to ids")


class AdaLoraCallback(TrainerCallback):
    """AdaLoRA's documented loop: ``update_and_allocate(step)`` after each optimizer step, before zero_grad."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.base_model.update_and_allocate(state.global_step)  # 0-based, as in PEFT's example loop


def adapter_summary(model, method: str) -> dict:
    """Trainable parameters and rank figures of the adapter as it stands."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if method == "tucker":
        ranks = [r for v in tucker_peft.current_ranks(model).values() for r in v]
        head = trainable - sum(p.numel() for p in tucker_peft.tucker_parameters(model) if p.requires_grad)
        return {"trainable": head + tucker_peft.adapter_parameter_count(model), "ranks": ranks}
    if method == "adalora":  # effective ranks: the singular values AdaLoRA kept
        ranks, effective = [], trainable
        for module in model.modules():
            if hasattr(module, "lora_E") and "default" in module.lora_E:
                e = module.lora_E["default"]
                # at creation E is all zero but every rank is trainable; later, pruned ranks are the zeroed ones
                kept = int((e != 0).sum()) if bool((e != 0).any()) else e.shape[0]
                full, a, b = e.shape[0], module.lora_A["default"], module.lora_B["default"]
                effective -= (full - kept) * (a.shape[1] + b.shape[0] + 1)
                ranks.append(kept)
        return {"trainable": effective, "ranks": ranks}
    if method == "lora":
        ranks = [m.r["default"] for m in model.modules() if hasattr(m, "lora_A") and "default" in getattr(m, "r", {})]
        return {"trainable": trainable, "ranks": ranks}
    return {"trainable": trainable, "ranks": []}


def tucker_config(model_args: ModelArguments, targets: list[str] | None) -> tucker_peft.TuckerLoraConfig:
    """``--method tucker``'s adapter config (its values are checked when it is built)."""
    return tucker_peft.TuckerLoraConfig(
        task_type="SEQ_CLS",
        r=model_args.r,
        max_rank=max(model_args.max_rank, model_args.r),
        min_rank=model_args.min_rank,
        tau=model_args.tau,
        budget=model_args.budget,
        budget_schedule=[float(f) for f in model_args.budget_schedule.split(",")]
        if model_args.budget_schedule
        else None,
        alpha=model_args.alpha,
        dropout=model_args.adapter_dropout,
        target_modules=targets,
    )


def tucker_callback(model_args: ModelArguments) -> tucker_peft.TuckerLoraCallback:
    """``--method tucker``'s Trainer callback with the update's options (checked when it is built)."""
    scale = model_args.adaptive_scale
    try:
        scale = scale if scale == "auto" else float(scale)
    except ValueError:
        raise ValueError(f"--adaptive_scale must be 'auto' or a number > 0; got {scale!r}.") from None
    return tucker_peft.TuckerLoraCallback(
        direction=model_args.direction,
        adaptive_scale=scale,
        rank_warmup=model_args.rank_warmup,
        rank_interval=model_args.rank_interval,
        rank_headroom=model_args.rank_headroom,
        basis_interval=model_args.basis_interval,
    )


def build_model(model_args: ModelArguments, num_labels: int, total_steps: int):
    """The pretrained model with the adapter of ``--method`` (``total_steps``: AdaLoRA's schedule needs it).

    Every method adapts the same modules: ``--target_modules`` or the package's default for the model family
    (attention and feed-forward projections)."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path,
        num_labels=num_labels,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
    )
    if model_args.method == "full":
        return model
    targets = model_args.target_modules.split(",") if model_args.target_modules else None
    targets = targets or TRANSFORMERS_MODELS_TO_TUCKER_TARGET_MODULES_MAPPING.get(model.config.model_type)
    if model_args.method == "tucker":
        config = tucker_config(model_args, targets)
    elif model_args.method == "lora":
        config = LoraConfig(
            task_type="SEQ_CLS",
            r=model_args.r,
            lora_alpha=model_args.alpha,
            lora_dropout=model_args.adapter_dropout,
            target_modules=targets,
        )
    elif model_args.method == "adalora":
        if not model_args.adalora_target_r < model_args.r:
            raise ValueError(f"--adalora_target_r ({model_args.adalora_target_r}) must be below --r ({model_args.r}).")
        config = AdaLoraConfig(
            task_type="SEQ_CLS",
            init_r=model_args.r,
            target_r=model_args.adalora_target_r,
            lora_alpha=model_args.alpha,
            target_modules=targets,
            total_step=total_steps,
            tinit=max(1, total_steps // 10),
            tfinal=max(1, total_steps // 5),
            deltaT=max(1, total_steps // 50),
        )
    else:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}; got {model_args.method!r}.")
    return get_peft_model(model, config)


def predict(trainer: Trainer, raw, task: str | None, label, is_regression: bool, tokenize) -> str:
    """``--do_predict``: the test split's predictions in ``output_dir/predict_results_<task>.txt`` (``index`` and
    ``prediction``: class names, or scores for a regression), as transformers' run_glue.py writes them."""
    test = raw["test_matched" if "test_matched" in raw else "test"]  # MNLI from the Hub: the matched test set
    test = test.map(tokenize, batched=True, remove_columns=test.column_names, desc="Tokenizing the test set")
    output = trainer.predict(test).predictions
    predictions = np.squeeze(output, axis=-1) if is_regression else np.argmax(output, axis=1)
    names = label.names if isinstance(label, datasets.ClassLabel) else None
    path = os.path.join(trainer.args.output_dir, f"predict_results_{task or 'test'}.txt")
    if trainer.is_world_process_zero():
        with open(path, "w") as f:
            f.write("index\tprediction\n")
            for i, p in enumerate(predictions):
                f.write(f"{i}\t{p:3.3f}\n" if is_regression else f"{i}\t{names[p] if names else p}\n")
        logger.info("Wrote the test predictions to %s", path)
    return path


def main(argv: list[str] | None = None, extra_callbacks: list[TrainerCallback] | None = None) -> dict:
    """Train and evaluate; ``extra_callbacks`` go to the ``Trainer`` after the method's own (benchmarks measure with
    them)."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    # it always trains, then evaluates on the validation set (transformers' --do_train / --do_eval are accepted),
    # and with --do_predict predicts the test set
    if training_args.do_predict and data_args.train_file and not data_args.test_file:
        raise ValueError(
            "--do_predict predicts --test_file: pass it (the Hub's GLUE test sets come with --task_name)."
        )
    callbacks = []
    if model_args.method == "tucker":  # the adapter's settings are checked before any data or model is loaded
        tucker_config(model_args, None)
        callbacks.append(tucker_callback(model_args))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=[logging.StreamHandler()])
    log_level = training_args.get_process_log_level()  # info on the main process, warnings on the others
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info("Training/evaluation parameters %s", training_args)
    set_seed(training_args.seed)

    raw = load_data(data_args)
    task = data_args.task_name
    label = raw["train"].features["label"]
    is_regression = task == "stsb" or label.dtype in ("float32", "float64")
    if is_regression:
        num_labels = 1
    elif isinstance(label, datasets.ClassLabel):  # the Hub's datasets and word labels: every class, seen or not
        num_labels = label.num_classes
    else:
        num_labels = len(set(raw["train"]["label"]))
    key1, key2 = TASK_TO_KEYS.get(task, (None, None))
    key1 = data_args.sentence1_key or key1 or "sentence"
    key2 = data_args.sentence2_key or key2
    for split in ("train", "test") if training_args.do_predict and "test" in raw else ("train",):
        missing = [k for k in (key1, key2) if k is not None and k not in raw[split].column_names]
        if missing:
            raise ValueError(
                f"text column(s) {missing} not in the data (the {split} split's columns: {raw[split].column_names}); "
                "name them with --sentence1_key / --sentence2_key."
            )
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)

    def tokenize(batch, labels: bool = True):
        texts = (batch[key1],) if key2 is None else (batch[key1], batch[key2])
        out = tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length)
        if labels:
            out["labels"] = [float(x) for x in batch["label"]] if is_regression else batch["label"]
        return out

    train = raw["train"]
    evaluation = raw["validation_matched" if "validation_matched" in raw else "validation"]  # MNLI from the Hub
    if data_args.max_train_samples:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    with training_args.main_process_first(desc="dataset map tokenization"):
        train = train.map(tokenize, batched=True, remove_columns=train.column_names, desc="Tokenizing the train set")
        evaluation = evaluation.map(
            tokenize, batched=True, remove_columns=evaluation.column_names, desc="Tokenizing the validation set"
        )

    steps_per_epoch = math.ceil(
        len(train) / (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps)
    )
    total_steps = (
        training_args.max_steps
        if training_args.max_steps > 0
        else math.ceil(training_args.num_train_epochs * steps_per_epoch)
    )
    model = build_model(model_args, num_labels, total_steps)
    if model_args.method == "adalora":
        callbacks.append(AdaLoraCallback())
    callbacks.extend(extra_callbacks or [])
    start = adapter_summary(model, model_args.method)

    compute = metric_function(task)

    def compute_metrics(eval_pred):
        logits, labels = eval_pred
        predictions = np.squeeze(logits) if is_regression else np.argmax(logits, axis=1)
        return compute(predictions, labels)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    if training_args.do_predict:
        predict(trainer, raw, task, label, is_regression, functools.partial(tokenize, labels=False))
    end = adapter_summary(model, model_args.method)

    main_metric = MAIN_METRIC.get(task, "accuracy")
    ranks = end["ranks"]
    result = {
        "task": task or os.path.basename(data_args.train_file),
        "method": model_args.method,
        "metric": main_metric,
        "value": metrics[f"eval_{main_metric}"],
        "eval_metrics": metrics,
        "trainable_params_start": start["trainable"],
        "trainable_params_end": end["trainable"],
        "ranks": {"min": min(ranks), "mean": sum(ranks) / len(ranks), "max": max(ranks)} if ranks else None,
        "train_seconds": train_result.metrics.get("train_runtime"),
        "seconds_per_step": train_result.metrics.get("train_runtime", 0.0) / max(trainer.state.global_step, 1),
        "steps": trainer.state.global_step,
    }
    if trainer.is_world_process_zero():
        with open(os.path.join(training_args.output_dir, "results.json"), "w") as f:
            json.dump(result, f, indent=2)
        rank_text = "-" if not ranks else f"{min(ranks)} / {sum(ranks) / len(ranks):.2f} / {max(ranks)}"
        print(
            "\n| task | method | metric | value | trainable params (start) | trainable params (end) | ranks min / mean / max |"
        )
        print("|---|---|---|---|---|---|---|")
        print(
            f"| {result['task']} | {result['method']} | {main_metric} | {result['value']:.4f} | "
            f"{start['trainable']:,} | {end['trainable']:,} | {rank_text} |"
        )
    return result


if __name__ == "__main__":
    main()
