"""examples/glue/run_glue.py end to end on a tiny BERT built from a config, and the offline GLUE metrics."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "glue"))
import run_glue  # noqa: E402

WORDS = ["good", "great", "fine", "lovely", "bad", "awful", "poor", "dull", "movie", "plot", "the", "a", "was", "is"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=5 + len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    BertForSequenceClassification(cfg).save_pretrained(path)
    return path


def _write_data(folder, regression=False):
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(64):
        positive = rng.random() < 0.5
        adjective = rng.choice(WORDS[:4] if positive else WORDS[4:8])
        sentence = f"the movie was {adjective}"
        label = f"{rng.uniform(3, 5) if positive else rng.uniform(0, 2):.2f}" if regression else str(int(positive))
        rows.append((sentence, "the plot is " + adjective, label))
    for name, part in (("train.tsv", rows[:48]), ("dev.tsv", rows[48:])):
        header = "sentence1\tsentence2\tscore" if regression else "sentence\tsentence2\tlabel"
        (folder / name).write_text(header + "\n" + "\n".join("\t".join(r) for r in part) + "\n")


@pytest.mark.parametrize("method", ["tucker", "lora", "adalora", "full"])
def test_run_glue_end_to_end(tmp_path, tiny_model_dir, method, capsys):
    _write_data(tmp_path)
    out = tmp_path / "out"
    args = (
        f"--model_name_or_path {tiny_model_dir} --task_name sst2 --train_file {tmp_path / 'train.tsv'} "
        f"--validation_file {tmp_path / 'dev.tsv'} --method {method} --r 4 --adalora_target_r 2 --output_dir {out} "
        "--max_steps 12 --per_device_train_batch_size 8 --learning_rate 1e-2 --report_to none --save_strategy no "
        "--use_cpu --seed 0 --disable_tqdm true --logging_steps 4"
    )
    result = run_glue.main(args.split())
    printed = capsys.readouterr().out
    assert f"| sst2 | {method} | accuracy | {result['value']:.4f} |" in printed
    saved = json.loads((out / "results.json").read_text())
    assert saved["method"] == method and 0.0 <= saved["value"] <= 1.0 and saved["steps"] == 12
    assert saved["trainable_params_start"] > 0 and saved["trainable_params_end"] > 0
    if method == "full":  # every weight trains; the whole model is saved
        assert (out / "model.safetensors").exists() and saved["ranks"] is None
        trained = AutoModelForSequenceClassification.from_pretrained(out)
        assert saved["trainable_params_start"] == sum(p.numel() for p in trained.parameters())
        return
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    if method == "tucker":
        assert (out / "tucker_ranks.json").exists() and (out / "tucker_ranks.png").exists()
        assert saved["trainable_params_end"] < saved["trainable_params_start"]  # ranks shrank from 4
        assert 1 <= saved["ranks"]["min"] <= saved["ranks"]["mean"] <= saved["ranks"]["max"] <= 32
    if method == "adalora":
        assert saved["ranks"]["mean"] < 4 and saved["trainable_params_end"] < saved["trainable_params_start"]
    if method == "lora":
        assert saved["ranks"] == {"min": 4, "mean": 4.0, "max": 4}
        assert saved["trainable_params_end"] == saved["trainable_params_start"]


def test_run_glue_regression_task(tmp_path, tiny_model_dir):
    _write_data(tmp_path, regression=True)
    args = (
        f"--model_name_or_path {tiny_model_dir} --task_name stsb --train_file {tmp_path / 'train.tsv'} "
        f"--validation_file {tmp_path / 'dev.tsv'} --output_dir {tmp_path / 'out'} --max_steps 24 --learning_rate 1e-2 "
        "--per_device_train_batch_size 8 --report_to none --save_strategy no --use_cpu --disable_tqdm true "
        "--ignore_mismatched_sizes true"
    )
    result = run_glue.main(args.split())
    assert result["metric"] == "pearson" and -1.0 <= result["value"] <= 1.0
    assert "eval_spearmanr" in result["eval_metrics"]


def _unlabelled(folder, name):
    """``name``'s rows without their label column, as GLUE's test files are (an ``index`` column first); the
    labels, to check the predictions against."""
    header, *rows = [line.split("\t") for line in (folder / name).read_text().splitlines()]
    (folder / "test.tsv").write_text(
        "\n".join(
            "\t".join(["index", *header[:-1]] if i < 0 else [str(i), *r[:-1]])
            for i, r in enumerate([header, *rows], -1)
        )
        + "\n"
    )
    return [r[-1] for r in rows]


@pytest.mark.parametrize("task", ["sst2", "stsb"])
def test_do_predict_writes_the_test_predictions(tmp_path, tiny_model_dir, task):
    """--do_predict --test_file (transformers' flags): the dev set without labels as the test file gives
    predict_results_<task>.txt, whose class predictions score exactly what the evaluation reported."""
    _write_data(tmp_path, regression=task == "stsb")
    labels = _unlabelled(tmp_path, "dev.tsv")
    args = (
        f"--model_name_or_path {tiny_model_dir} --task_name {task} --train_file {tmp_path / 'train.tsv'} "
        f"--validation_file {tmp_path / 'dev.tsv'} --test_file {tmp_path / 'test.tsv'} --do_train --do_eval "
        f"--do_predict --output_dir {tmp_path / 'out'} --max_steps 12 --per_device_train_batch_size 8 "
        "--learning_rate 1e-2 --report_to none --save_strategy no --use_cpu --seed 0 --disable_tqdm true "
        "--ignore_mismatched_sizes true"
    )
    result = run_glue.main(args.split())
    lines = (tmp_path / "out" / f"predict_results_{task}.txt").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 1 + len(labels)
    rows = [line.split("\t") for line in lines[1:]]
    assert [int(i) for i, _ in rows] == list(range(len(labels)))
    if task == "sst2":
        assert {p for _, p in rows} <= {"0", "1"}
        accuracy = np.mean([p == y for (_, p), y in zip(rows, labels)])
        assert accuracy == pytest.approx(result["value"])
    else:  # scores with 3 decimals, as transformers writes them (too coarse to recompute this tiny model's Pearson)
        assert all(len(p.split(".")[1]) == 3 and math.isfinite(float(p)) for _, p in rows)


def _glue_layout_files(folder, task):
    """A few rows in the layout of GLUE's own download of ``task`` (invented sentences, the real column layout)."""
    rows = {
        # CoLA: no header row; source, label, the author's mark, sentence
        "cola": (None, [["gj04", "1", "", "the movie was good"], ["gj04", "0", "*", "movie the was good"]]),
        "rte": (
            ["index", "sentence1", "sentence2", "label"],
            [
                ["0", "the movie was good", "the movie is good", "entailment"],
                ["1", "a plot", "the movie", "not_entailment"],
            ],
        ),
        "qqp": (
            ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            [
                ["0", "1", "2", "was the movie good", "is the movie good", "1"],
                ["1", "3", "4", "a plot", "a movie", "0"],
            ],
        ),
        "mnli": (
            ["index", "promptID", "pairID", "genre", "sentence1", "sentence2", "label1", "gold_label"],
            [
                ["0", "1", "1e", "fiction", "the movie was good", "the movie is good", "entailment", "entailment"],
                [
                    "1",
                    "2",
                    "2c",
                    "fiction",
                    "the movie was good",
                    "the movie was bad",
                    "contradiction",
                    "contradiction",
                ],
                ["2", "3", "3n", "fiction", "the movie was good", "the plot was dull", "neutral", "neutral"],
            ],
        ),
    }[task]
    header, data = rows
    lines = ([header] if header else []) + data
    for name in ("train.tsv", "dev.tsv"):
        (folder / name).write_text("\n".join("\t".join(line) for line in lines) + "\n")
    return run_glue.DataTrainingArguments(
        task_name=task, train_file=str(folder / "train.tsv"), validation_file=str(folder / "dev.tsv")
    )


@pytest.mark.parametrize(
    "task, labels, texts",
    [
        ("cola", [1, 0], {"sentence": ["the movie was good", "movie the was good"]}),
        (
            "rte",
            [0, 1],
            {"sentence1": ["the movie was good", "a plot"], "sentence2": ["the movie is good", "the movie"]},
        ),
        (
            "qqp",
            [1, 0],
            {"question1": ["was the movie good", "a plot"], "question2": ["is the movie good", "a movie"]},
        ),
        ("mnli", [0, 2, 1], {"premise": ["the movie was good"] * 3}),
    ],
)
def test_glue_download_layouts_load_with_hub_names(tmp_path, task, labels, texts):
    """GLUE's own TSVs (CoLA without a header, word labels, original column names) load as the Hub dataset does:
    its column names and its label ids (``nyu-mll/glue``: RTE entailment = 0, MNLI entailment / neutral /
    contradiction = 0 / 1 / 2)."""
    raw = run_glue.load_data(_glue_layout_files(tmp_path, task), cache_dir=str(tmp_path / "cache"))
    for split in ("train", "validation"):
        assert raw[split]["label"] == labels
        for column, values in texts.items():
            assert raw[split][column] == values
    if task in ("rte", "mnli"):
        assert raw["train"].features["label"].names == run_glue.LABEL_NAMES[task]


def test_glue_download_layout_trains(tmp_path, tiny_model_dir):
    """A GLUE task outside shared/ (MNLI: three classes, word labels, the original columns) through the whole
    script: a 3-way head, the task's metric."""
    _glue_layout_files(tmp_path, "mnli")
    args = (
        f"--model_name_or_path {tiny_model_dir} --task_name mnli --train_file {tmp_path / 'train.tsv'} "
        f"--validation_file {tmp_path / 'dev.tsv'} --output_dir {tmp_path / 'out'} --max_steps 2 --r 2 "
        "--per_device_train_batch_size 3 --report_to none --save_strategy no --use_cpu --disable_tqdm true "
        "--ignore_mismatched_sizes true"
    )
    result = run_glue.main(args.split())
    assert result["metric"] == "accuracy" and round(3 * result["value"], 6) in (0, 1, 2, 3)  # 3 dev rows
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    heads = [v.shape[0] for k, v in saved.items() if "classifier" in k and k.endswith("weight")]
    assert heads == [3]  # one 3-way head


def test_bad_data_is_refused(tmp_path):
    args = _glue_layout_files(tmp_path, "rte")
    (tmp_path / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tneutral\n")
    with pytest.raises(ValueError, match=r"\['neutral'\].*this GLUE task's classes"):
        run_glue.load_data(args, cache_dir=str(tmp_path / "cache"))
    (tmp_path / "train.tsv").write_text("text\tverdict\nthe movie was good\t1\n")
    (tmp_path / "dev.tsv").write_text("text\tverdict\nthe movie was bad\t0\n")
    with pytest.raises(ValueError, match="no label column.*--label_key"):
        run_glue.load_data(args, cache_dir=str(tmp_path / "cache2"))
    custom = run_glue.DataTrainingArguments(
        train_file=str(tmp_path / "train.tsv"), validation_file=str(tmp_path / "dev.tsv"), label_key="verdict"
    )
    assert run_glue.load_data(custom, cache_dir=str(tmp_path / "cache3"))["train"]["label"] == [1]
    argv = f"--model_name_or_path {tmp_path / 'no-model'} --train_file {custom.train_file} --validation_file "
    argv += f"{custom.validation_file} --label_key verdict --output_dir {tmp_path / 'out'} --use_cpu"
    with pytest.raises(ValueError, match=r"\['sentence'\] not in the data.*--sentence1_key"):
        run_glue.main(argv.split())  # before the model is looked for


def test_benchmark_runs_a_glue_task_outside_shared(tmp_path, tiny_model_dir, monkeypatch):
    """benchmarks/glue/run.py finds a task's files in GLUE's layout (TSVs, or the Hub's parquet files; shared/'s
    RTE is parquet, the others TSV) and runs a task that shared/ lacks (CoLA, headerless) through the same code, at
    the method's SST-2 learning rate."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "glue"))
    import run as bench

    data = tmp_path / "glue"
    for folder, names in (("SST-2", ["train.tsv", "dev.tsv"]), ("RTE", ["train.parquet", "validation.parquet"])):
        (data / folder).mkdir(parents=True)
        for name in names:
            (data / folder / name).write_text("")
    (data / "MNLI").mkdir()
    for name in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        (data / "MNLI" / name).write_text("")
    assert bench.task_files("sst2", str(data)) == (str(data / "SST-2" / "train.tsv"), str(data / "SST-2" / "dev.tsv"))
    assert bench.task_files("rte", str(data))[1] == str(data / "RTE" / "validation.parquet")
    assert bench.task_files("mnli", str(data))[1] == str(data / "MNLI" / "dev_matched.tsv")
    with pytest.raises(FileNotFoundError, match=r"QNLI.*train.tsv \+ dev.tsv or train.parquet.*TUCKER_GLUE_DATA"):
        bench.task_files("qnli", str(data))
    assert bench.learning_rate("lora", "cola") == bench.LEARNING_RATES["lora"]["sst2"]
    assert bench.learning_rate("lora", "stsb") == bench.LEARNING_RATES["lora"]["stsb"]

    rng = np.random.default_rng(0)
    (data / "CoLA").mkdir()
    for name, n in (("train.tsv", 32), ("dev.tsv", 16)):
        rows = []
        for _ in range(n):
            good = rng.random() < 0.5
            words = f"the movie was {rng.choice(WORDS[:4])}" if good else f"movie the {rng.choice(WORDS[4:8])} was"
            rows.append(f"src1\t{int(good)}\t{'' if good else '*'}\t{words}")
        (data / "CoLA" / name).write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(bench, "DATA", str(data))
    result = bench.run_one("cola", "tucker", 0, None, 1, 16, str(tiny_model_dir), str(tmp_path / "out"))
    assert result["metric"] == "matthews_correlation" and -1.0 <= result["value"] <= 1.0
    assert result["steps"] == 1  # 32 rows, batch 32, one epoch
    config = json.loads((tmp_path / "out" / "cola-tucker-0" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["tau"] == 0.1  # run.py's tucker settings


def test_offline_metrics_known_values():
    predictions = np.array([1, 0, 1, 1, 0, 1, 0, 0])
    labels = np.array([1, 0, 0, 1, 0, 1, 1, 0])
    # tp = 3, tn = 3, fp = 1, fn = 1
    assert run_glue.glue_metrics("sst2", predictions, labels) == {"accuracy": 0.75}
    mrpc = run_glue.glue_metrics("mrpc", predictions, labels)
    assert mrpc["accuracy"] == 0.75 and mrpc["f1"] == pytest.approx(0.75)  # 2 tp / (2 tp + fp + fn)
    # MCC = (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (9 - 1) / 16
    assert run_glue.glue_metrics("cola", predictions, labels)["matthews_correlation"] == pytest.approx(0.5)
    scores, gold = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0.0, 0.5, 0.2, 1.0])
    stsb = run_glue.glue_metrics("stsb", scores, gold)
    assert stsb["pearson"] == pytest.approx(np.corrcoef(scores, gold)[0, 1])
    assert stsb["spearmanr"] == pytest.approx(1.0)  # same order
    # when evaluate's metric can be loaded (online), both paths must agree on the same predictions
    try:
        import evaluate

        metric = evaluate.load("glue", "mrpc")
    except Exception:
        return
    online = metric.compute(predictions=predictions, references=labels)
    assert online["f1"] == pytest.approx(mrpc["f1"]) and online["accuracy"] == pytest.approx(mrpc["accuracy"])


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="Unknown task"):
        run_glue.DataTrainingArguments(task_name="sst3")
    with pytest.raises(ValueError, match="--train_file and --validation_file"):
        run_glue.DataTrainingArguments()
    with pytest.raises(ValueError, match="csv, tsv"):
        run_glue.DataTrainingArguments(train_file="a.txt", validation_file="b.txt")
    # the adapter's settings fail before any data, tokenizer or model is loaded (none of these paths exists)
    common = f"--model_name_or_path {tmp_path}/no-model --train_file {tmp_path}/no.tsv --validation_file "
    common += f"{tmp_path}/no-dev.tsv --output_dir {tmp_path}/out --use_cpu --report_to none"
    for flag, message in (
        ("--tau 2", "`tau` must be a float in"),
        ("--r 0", "`r` must be an integer >= 1"),
        ("--budget_schedule 0.2,0.8", "set budget=<adapter parameters> as well"),
        ("--direction adamw", "`direction` must be 'adam' or 'sgd'"),
        ("--adaptive_scale big", "--adaptive_scale must be 'auto' or a number"),
        ("--rank_interval 0", "`rank_interval` must be an integer >= 1"),
        ("--do_predict", "--do_predict predicts --test_file"),
    ):
        with pytest.raises(ValueError, match=message):
            run_glue.main(f"{common} {flag}".split())
    with pytest.raises(SystemExit):  # argparse: "invalid choice: 'tuker'"
        run_glue.main(f"{common} --method tuker".split())


@pytest.mark.parametrize("method", ["tucker", "lora"])
def test_step_dynamics_callback_measures_the_trained_deltas(tmp_path, tiny_model_dir, method):
    """benchmarks/glue/dynamics.py's callback, through run_glue's extra callbacks: one row per optimizer step, and the
    delta norm it records after the last step is the norm of the deltas in the saved adapter (computed here from the
    safetensors file, not by the callback's code)."""
    from safetensors.torch import load_file

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "glue"))
    from dynamics import DeltaDynamics, summarize

    _write_data(tmp_path)
    out = tmp_path / "out"
    args = (
        f"--model_name_or_path {tiny_model_dir} --task_name sst2 --train_file {tmp_path / 'train.tsv'} "
        f"--validation_file {tmp_path / 'dev.tsv'} --method {method} --r 4 --tau 0.05 --output_dir {out} "
        "--max_steps 8 --per_device_train_batch_size 8 --learning_rate 1e-2 --report_to none --save_strategy no "
        "--use_cpu --seed 0 --disable_tqdm true --logging_steps 4"
    )
    dynamics = DeltaDynamics()
    result = run_glue.main(args.split(), [dynamics])
    assert [r["step"] for r in dynamics.rows] == list(range(1, 9))
    assert dynamics.rows[0]["step_norm"] == 0.0  # no step before the first to compare with
    assert all(r["step_norm"] > 0 and 0 <= r["in_span_fraction"] <= 1 + 1e-6 for r in dynamics.rows[1:])
    state = load_file(out / "adapter_model.safetensors")
    total = 0.0
    for key in state:
        if method == "lora" and key.endswith("lora_A.weight"):
            delta = state[key.replace("lora_A", "lora_B")] @ state[key] * 2.0  # lora_alpha 8 / r 4
        elif method == "tucker" and key.endswith("tucker_core"):
            prefix = key[: -len("tucker_core")]
            delta = state[prefix + "tucker_U0"] @ state[key] @ state[prefix + "tucker_U1"].T * 2.0  # alpha 8 / r 4
        else:
            continue
        total += delta.pow(2).sum().item()
    assert total > 0
    assert dynamics.rows[-1]["delta_norm"] == pytest.approx(total**0.5, rel=1e-5)
    summary = summarize(dynamics.rows, dynamics.losses, result, dynamics.spectra)
    assert summary["final_delta_norm"] == dynamics.rows[-1]["delta_norm"]
    assert summary["final_spectrum"][0] == pytest.approx(1.0) and 1.0 <= summary["final_effective_rank"] <= 8.0


def _result_file(path, task, method, values):
    runs = [
        {
            "task": task,
            "method": method,
            "metric": "accuracy",
            "seed": seed,
            "value": value,
            "eval_metrics": {"eval_loss": 1.0 - value},
            "trainable_params_end": 100 if method == "tucker_sched" else 250,
        }
        for seed, value in values.items()
    ]
    path.write_text(json.dumps({"runs": runs}))


def test_paired_comparison_pairs_by_seed_and_refuses_a_doubled_seed(tmp_path, monkeypatch):
    """benchmarks/glue/paired.py, on result files with known numbers: only the seeds both methods have are paired,
    the paired statistics are the textbook ones, and a seed found in two files is an error, not a silent double."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "glue"))
    import paired

    _result_file(tmp_path / "a.json", "sst2", "tucker_sched", {0: 0.80, 1: 0.84, 2: 0.83, 5: 0.99})
    _result_file(tmp_path / "b.json", "sst2", "lora", {0: 0.81, 1: 0.82, 2: 0.83})
    _result_file(tmp_path / "c.json", "sst2", "lora", {3: 0.5})
    monkeypatch.setattr(paired, "RESULTS", str(tmp_path))
    sources = {"tucker_sched": {"sst2": [("a.json", "tucker_sched", None)]}}
    monkeypatch.setattr(
        paired, "SOURCES", sources | {"lora": {"sst2": [("b.json", "lora", None), ("c.json", "lora", None)]}}
    )
    row = paired.compare("sst2", "tucker_sched", "lora")
    assert row["seeds"] == [0, 1, 2]  # seed 5 has no partner, seed 3 no tucker run
    diffs = np.array([-0.01, 0.02, 0.0])
    assert row["paired"]["diff_mean"] == pytest.approx(diffs.mean())
    assert row["paired"]["diff_se"] == pytest.approx(diffs.std(ddof=1) / np.sqrt(3))
    assert (row["paired"]["ahead"], row["paired"]["level"]) == (1, 1)
    assert row["paired"]["dev_loss_diff_mean"] == pytest.approx(-diffs.mean())
    assert row["paired"]["params_ratio"] == pytest.approx(0.4)
    assert row["tucker"]["mean"] == pytest.approx(np.mean([0.80, 0.84, 0.83]))
    monkeypatch.setattr(
        paired, "SOURCES", sources | {"lora": {"sst2": [("b.json", "lora", None), ("b.json", "lora", None)]}}
    )
    with pytest.raises(ValueError, match="seed 0 is in b.json and in an earlier file"):
        paired.compare("sst2", "tucker_sched", "lora")
    monkeypatch.setattr(paired, "SOURCES", sources | {"lora": {"sst2": [("gone.json", "lora", None)]}})
    with pytest.raises(FileNotFoundError, match="gone.json"):
        paired.compare("sst2", "tucker_sched", "lora")


def test_paired_comparisons_of_the_committed_results_cover_their_seeds():
    """The README's paired figures come from paired.py's COMPARISONS over the committed result files: every
    comparison finds its files and pairs every seed it has (tucker_sched on SST-2 and MRPC and full fine-tuning on
    SST-2 seeds 0-11, the rest 0-2)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "glue"))
    import paired

    for task, method, baseline in paired.COMPARISONS:
        row = paired.compare(task, method, baseline)
        full = "full" in (method, baseline)  # full fine-tuning: twelve seeds on SST-2, three on MRPC, STS-B
        twelve = task == "sst2" if full else method == "tucker_sched" and task in ("sst2", "mrpc")
        assert row["seeds"] == list(range(12 if twelve else 3)), (task, method, baseline)
        if method == "tucker_sched":  # the budget: 0.45x LoRA r = 8's parameters, 0.9x LoRA r = 4's
            assert row["paired"]["params_ratio"] <= (0.5 if baseline == "lora" else 0.95), (task, baseline)
