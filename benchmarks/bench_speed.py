"""How fast is peftbench against the notebook recipe? One process, one run, ratios measured back to back.

(a) the notebook recipe: ``transformers.Trainer``, every text padded to 128 tokens (``padding="max_length"``),
    batch 32, fp32, HF's own ``AutoModelForSequenceClassification`` with a fresh head, peft ``get_peft_model``
    for LoRA;
(b) peftbench: ``runner.execute_run`` on a one-run study in a temporary store, i.e. exactly what ``peftbench run``
    does, with its defaults (length-bucketed batches, bf16 autocast where the CPU has it, fused AdamW, LoRA merged for
    the final predictions).

Both train the same model on the same examples (peftbench's own splits, so the two see identical data) with the same
learning rate, epochs, batch size, weight decay, schedule and clipping. Sections:

  notebook   (a) vs (b), full fine-tuning and LoRA r=8, on twitter_financial_news and banking77 with the packaged
             MiniLM: training examples/s, evaluation examples/s, peak memory, validation accuracy, and ratios.
             peftbench mean-pools MiniLM (as it was trained); extra "cls pooling" rows give it the notebook's own
             [CLS]-pooler head, so their accuracy difference to the notebook is the fast paths' alone
  ablations  peftbench LoRA with one fast path switched off at a time (bf16, length buckets), full with the
             per-tensor AdamW instead of the fused one
  82m        a randomly initialised distilroberta-base-sized model (82M parameters): peftbench LoRA vs full step
             throughput (runs in ABBA order so drift cancels); accuracy is meaningless with random weights
  predict    prediction throughput of the plain model, LoRA with the adapters on the side, and LoRA merged
             (interleaved rounds, best round of each)
  frozen     the frozen arm with cached encoder outputs vs recomputing the encoder every epoch: time and predictions
  memory     IMDB at 512 tokens: peak memory with and without max_tokens_per_batch (each in a fresh process, so
             one measurement does not inherit the other's heap)
  compile    does torch.compile pay for itself? The LoRA training step (peftbench's batches, bf16 autocast, fused
             AdamW) eager vs ``torch.compile(dynamic=True)`` on MiniLM and the distilroberta-sized model: compile
             overhead, steady-state time per step, and the steps a run needs before compiling is a net gain

Usage::

    python benchmarks/bench_speed.py                      # everything, ~30 min on 2 idle CPU cores
    python benchmarks/bench_speed.py --quick              # a ~10 min check that every section runs
    python benchmarks/bench_speed.py --sections notebook,82m --json /tmp/bench.json
    python benchmarks/bench_speed.py --sections notebook --datasets twitter_financial_news --epochs 3

On a machine shared with other busy processes, the absolute numbers move with the load (recorded per measurement as
the 1-minute load average); the ratios, measured back to back, move less. ``OMP_WAIT_POLICY`` is set to PASSIVE
unless you set it: with the default policy, idle OpenMP threads spin, and on an oversubscribed machine every
parallel region then waits for a descheduled thread (on this project's busy 2-core machine, a demo LoRA run took
340 s instead of 40 s; see docs/benchmarks.md).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads OpenMP: before `import torch`
os.environ.setdefault("TQDM_DISABLE", "1")  # per-run progress bars would bury the log

import ctypes  # noqa: E402
import gc  # noqa: E402

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from peftbench import methods  # noqa: E402
from peftbench.config import expand_runs, single_run_study  # noqa: E402
from peftbench.data import dataset_defaults, tokenize  # noqa: E402
from peftbench.engine import bf16_supported  # noqa: E402
from peftbench.models import build_classifier, load_tokenizer, resolve_model  # noqa: E402
from peftbench.environment import PeakMemory, environment_base, set_threads  # noqa: E402
from peftbench.runner import Prepared, execute_run, get_splits  # noqa: E402
from peftbench.store import Store  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MINILM = "builtin:minilm"
CPU = torch.device("cpu")
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1}
SECTIONS = ("notebook", "ablations", "82m", "predict", "frozen", "memory", "compile")

# Default sizes (--quick divides them). One epoch each: the ratios do not depend on the number of epochs.
SIZES = {"twitter_train": 2000, "banking_train": 1500, "ablation_train": 2000, "val": 1000, "test": 300,
         "big_train": 384,
         "frozen_train": 1000, "frozen_epochs": 10, "memory_train": 32, "compile_train": 2000}
QUICK = {"twitter_train": 256, "banking_train": 192, "ablation_train": 256, "val": 128, "test": 64, "big_train": 64,
         "frozen_train": 128, "frozen_epochs": 5, "memory_train": 16, "compile_train": 320}


def log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", flush=True)


def dataset_spec(name: str, n_train: int, n_val: int, n_test: int, **extra) -> dict:
    return dataset_defaults(name=name, source=str(SHARED / name), max_train=n_train, max_validation=n_val,
                            max_test=n_test, **extra)


def release_memory() -> None:
    """Give freed heap back to the OS, so the RSS at the start of a measurement is what is still in use."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak above start then also counts reusable free heap
        pass


class Measure:
    """Wall time, peak RSS above the RSS at the start (one process runs many arms, so memory is measured as what an
    arm adds, its model included), and the load average."""

    def __enter__(self):
        release_memory()
        self.rss0 = psutil.Process().memory_info().rss
        self.load0 = os.getloadavg()[0]
        self.mem = PeakMemory(CPU).__enter__()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.mem.__exit__(*exc)
        self.peak_delta_mb = max(0.0, (self.mem.peak - self.rss0) / 2**20)
        self.load = (self.load0 + os.getloadavg()[0]) / 2
        return False


# --------------------------------------------------------------------------------------------------------------------
# (a) the notebook recipe
# --------------------------------------------------------------------------------------------------------------------


def notebook_run(model: str, spec: dict, method: str, lr: float, epochs: int, seed: int = 0) -> dict:
    """Trainer + padding="max_length" (128) + batch 32 + fp32, on peftbench's own splits of ``spec``."""
    import datasets
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    splits = get_splits(spec)
    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)

    def encode(frame):
        ds = datasets.Dataset.from_pandas(frame[["text", "label"]].rename(columns={"label": "labels"}),
                                          preserve_index=False)
        return ds.map(lambda b: tokenizer(b["text"], padding="max_length", truncation=True, max_length=128),
                      batched=True, remove_columns=["text"])

    train_ds, val_ds = encode(splits.train), encode(splits.validation)
    set_threads()
    torch.manual_seed(seed)
    net = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(splits.labels))
    if method == "lora":
        net = get_peft_model(net, LoraConfig(task_type=TaskType.SEQ_CLS, target_modules=["query", "value"], **LORA))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=32, per_device_eval_batch_size=32,
                                 learning_rate=lr, num_train_epochs=epochs, weight_decay=0.01, max_grad_norm=1.0,
                                 lr_scheduler_type="linear", eval_strategy="no", save_strategy="no",
                                 logging_strategy="no", report_to="none", seed=seed, use_cpu=True, disable_tqdm=True)
        trainer = Trainer(model=net, args=args, train_dataset=train_ds)
        with Measure() as m_train:
            trainer.train()
        with Measure() as m_eval:
            pred = trainer.predict(val_ds)
    acc = float((pred.predictions.argmax(-1) == pred.label_ids).mean())
    n = len(train_ds) * epochs
    return {"recipe": "notebook", "method": method, "train_examples_per_s": n / m_train.seconds,
            "train_time_s": m_train.seconds, "eval_examples_per_s": len(val_ds) / m_eval.seconds,
            "peak_memory_mb": max(m_train.peak_delta_mb, m_eval.peak_delta_mb), "val_accuracy": acc,
            "n_val": len(val_ds), "load": m_train.load, "padding_pct": padding_pct_at(tokenizer, splits.train, 128)}


def padding_pct_at(tokenizer, frame, length: int) -> float:
    real = sum(len(x) for x in tokenizer(frame["text"].tolist(), truncation=True, max_length=length)["input_ids"])
    return 100.0 * (1 - real / (length * len(frame)))


# --------------------------------------------------------------------------------------------------------------------
# (b) peftbench, exactly as `peftbench run` runs it
# --------------------------------------------------------------------------------------------------------------------


def peftbench_run(model: str, spec: dict, method: str, lr: float, epochs: int, store: Path, seed: int = 0,
                  method_params: dict | None = None, **train) -> dict:
    params = dict(LORA) if method == "lora" else {}
    params.update(method_params or {})
    study = single_run_study(model, dict(spec), method, params,
                             {"lr": lr, "epochs": epochs, "batch_size": 32, "weight_decay": 0.01, **train}, seed)
    (run,) = expand_runs(study)
    with Measure() as m:
        result = execute_run(run, Store(store), CPU)
    if result["status"] != "success":
        raise RuntimeError(f"peftbench {method} failed: {result['error']}")
    costs, speed = result["costs"], result["speed"]
    return {"recipe": "peftbench", "method": method, "train_examples_per_s": costs["train_examples_per_s"],
            "train_time_s": costs["train_time_s"], "eval_examples_per_s": costs["eval_examples_per_s"],
            "peak_memory_mb": m.peak_delta_mb, "peak_rss_mb": costs["peak_memory_mb"],
            "val_accuracy": result["metrics"]["validation"]["accuracy"], "n_val": result["metrics"]["validation"]["n"],
            "test_accuracy": result["metrics"]["test"]["accuracy"], "run_seconds": m.seconds, "load": m.load,
            "padding_pct": speed["padding_pct"], "speed": speed, "params": result["params"],
            "run_dir": str(Path(store) / run.run_id)}


def noise(a: dict, b: dict) -> float:
    """Two standard errors of the difference of two validation accuracies (binomial), in points."""
    var = sum(r["val_accuracy"] * (1 - r["val_accuracy"]) / max(r["n_val"], 1) for r in (a, b))
    return 200 * math.sqrt(var)


# --------------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------------


NOTEBOOK_DATASETS = ("twitter_financial_news", "banking77")


def section_notebook(sizes: dict, store: Path, epochs: int, lrs: dict, datasets: list[str]) -> dict:
    """(a) vs (b). peftbench mean-pools MiniLM (how it was trained); the notebook's AutoModelForSequenceClassification
    puts its head on the [CLS] pooler. The extra ``peftbench <method>, cls pooling`` rows use the notebook's own
    head, so that their accuracy difference to the notebook is the fast paths' alone."""
    out = {}
    for name in datasets:
        spec = dataset_spec(name, sizes["twitter_train" if name == "twitter_financial_news" else "banking_train"],
                            sizes["val"], sizes["test"])
        rows = {}
        for method in ("full", "lora"):
            log(f"{name}: notebook {method}")
            rows[f"notebook {method}"] = notebook_run(MINILM, spec, method, lrs[method], epochs)
            log(f"{name}: peftbench {method}")
            rows[f"peftbench {method}"] = peftbench_run(MINILM, spec, method, lrs[method], epochs, store)
            log(f"{name}: peftbench {method}, cls pooling")
            rows[f"peftbench {method}, cls pooling"] = peftbench_run(MINILM, spec, method, lrs[method], epochs, store,
                                                                     pooling="cls")
        nb_lora, pb_lora, nb_full, pb_full = (rows[k] for k in ("notebook lora", "peftbench lora", "notebook full",
                                                               "peftbench full"))
        out[name] = {
            "rows": rows,
            "ratios": {
                "lora train: peftbench / notebook": pb_lora["train_examples_per_s"] / nb_lora["train_examples_per_s"],
                "full train: peftbench / notebook": pb_full["train_examples_per_s"] / nb_full["train_examples_per_s"],
                "train: peftbench lora / peftbench full": pb_lora["train_examples_per_s"]
                / pb_full["train_examples_per_s"],
                "train: notebook lora / notebook full": nb_lora["train_examples_per_s"]
                / nb_full["train_examples_per_s"],
                "eval: peftbench lora (merged) / notebook lora": pb_lora["eval_examples_per_s"]
                / nb_lora["eval_examples_per_s"],
                "peak memory: peftbench lora / notebook lora": pb_lora["peak_memory_mb"] / nb_lora["peak_memory_mb"],
                "peak memory: peftbench full / notebook full": pb_full["peak_memory_mb"] / nb_full["peak_memory_mb"],
            },
            "accuracy": {f"{m}{head}": {
                "peftbench - notebook (points)": 100 * (rows[f"peftbench {m}{head}"]["val_accuracy"]
                                                        - rows[f"notebook {m}"]["val_accuracy"]),
                "noise, 2 SE (points)": noise(rows[f"peftbench {m}{head}"], rows[f"notebook {m}"])}
                for m in ("full", "lora") for head in ("", ", cls pooling")},
        }
    return out


ABLATIONS = (("lora", "bf16 off", {"bf16": False}), ("lora", "length buckets off", {"length_buckets": False}),
             ("full", "fused AdamW off", {"fused_optimizer": False}))


def section_ablations(sizes: dict, store: Path, epochs: int, lrs: dict) -> dict:
    """One fast path off at a time, each against the default in ABBA order (default, off, off, default; seeds 0 and
    1), so that a drift in the machine's load cancels. Validation accuracy: mean of the two seeds."""
    spec = dataset_spec("twitter_financial_news", sizes["ablation_train"], sizes["val"], sizes["test"])
    rows, ratios = {}, {}
    for method, label, change in ABLATIONS:
        runs = {"default": [], "off": []}
        for seed, arm in enumerate(("default", "off", "off", "default")):
            log(f"ablation {label}: peftbench {method} {'default' if arm == 'default' else label} (seed {seed // 2})")
            runs[arm].append(peftbench_run(MINILM, spec, method, lrs[method], epochs, store, seed=seed // 2,
                                           **(change if arm == "off" else {})))
        for arm, rs in runs.items():
            rows[f"{method}, {label}" if arm == "off" else f"{method} (next to: {label})"] = {
                **rs[0], **{k: float(np.mean([r[k] for r in rs])) for k in
                            ("train_examples_per_s", "eval_examples_per_s", "peak_memory_mb", "val_accuracy")}}
        mean = {arm: float(np.mean([r["train_examples_per_s"] for r in rs])) for arm, rs in runs.items()}
        ratios[f"{method}: default / {label}, train ex/s"] = mean["default"] / mean["off"]
        ratios[f"{method}: default - {label}, val acc (points, mean of 2 seeds)"] = 100 * (
            np.mean([r["val_accuracy"] for r in runs["default"]]) - np.mean([r["val_accuracy"] for r in runs["off"]]))
    return {"rows": rows, "ratios": ratios}


def make_distilroberta_sized(folder: Path) -> Path:
    """distilroberta-base's shapes (6 layers, hidden 768, 12 heads, FFN 3072, vocabulary 50265: 82M parameters),
    randomly initialised, with MiniLM's BERT tokenizer (its ids, < 30522, index the 50265-row embedding; pad id 0)."""
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=6, num_attention_heads=12,
                           intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_token_id=0,
                           bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    RobertaModel(config, add_pooling_layer=False).save_pretrained(folder)
    load_tokenizer(MINILM).save_pretrained(folder)
    return folder


def section_82m(sizes: dict, store: Path, lrs: dict) -> dict:
    spec = dataset_spec("twitter_financial_news", sizes["big_train"], 64, 64)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_distilroberta_sized(Path(tmp) / "distilroberta-sized")
        runs = {"full": [], "lora": [], "full, fused AdamW off": []}
        # ABBA (full, lora, lora, full): a linear drift in load cancels; then the per-tensor AdamW between two fused
        order = ("full", "lora", "lora", "full", "full, fused AdamW off", "full")
        for i, arm in enumerate(order):
            log(f"82M: peftbench {arm} ({i + 1}/{len(order)})")
            method, change = arm.split(",")[0], ({"fused_optimizer": False} if "off" in arm else {})
            runs[arm].append(peftbench_run(str(folder), spec, method, lrs[method], 1, store, seed=i, **change))
    speed = {arm: [r["train_examples_per_s"] for r in rs] for arm, rs in runs.items()}
    mean = {"full": float(np.mean(speed["full"][:2])), "lora": float(np.mean(speed["lora"]))}
    return {"runs": runs, "train_examples_per_s": mean, "parameters": runs["full"][0]["params"],
            "ratios": {"train: lora / full": mean["lora"] / mean["full"],
                       "per adjacent pair": [speed["lora"][i] / speed["full"][i] for i in range(2)],
                       "train: fused / per-tensor AdamW (full)": float(np.mean(speed["full"][1:]))
                       / speed["full, fused AdamW off"][0]}}


def section_predict(sizes: dict, rounds: int) -> dict:
    """Plain model vs LoRA with adapters on the side vs LoRA merged: the same forward code, interleaved rounds."""
    spec = dataset_spec("twitter_financial_news", 64, sizes["val"], 64)
    splits = get_splits(spec)
    tokenizer = load_tokenizer(MINILM)
    ids = {"validation": tokenize(splits.validation["text"].tolist(), tokenizer, 128)}
    labels = {"validation": torch.tensor(splits.validation["label"].to_numpy())}
    set_threads()
    torch.manual_seed(0)
    plain = build_classifier(MINILM, len(splits.labels)).model.eval()
    torch.manual_seed(0)
    backbone = build_classifier(MINILM, len(splits.labels))
    lora = methods.prepare("lora", backbone, {**LORA, "target_modules": "auto", "bias": "none"})
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)  # a trained-looking adapter (B starts at zero)
    merged = methods.merge_for_inference("lora", copy.deepcopy(lora))
    bf16 = bf16_supported(CPU)
    models = {"plain": plain, "lora unmerged": lora, "lora merged": merged}
    best = {k: math.inf for k in models}
    probs = {}
    for r in range(rounds):
        for name, model in models.items():
            p = Prepared(model=model, splits=splits, ids=ids, labels=labels, device=CPU,
                         pad_id=tokenizer.pad_token_id)
            t = time.perf_counter()
            probs[name] = p.predict_split("validation", 64, bf16)
            best[name] = min(best[name], time.perf_counter() - t)
        log(f"predict round {r + 1}/{rounds}: " + ", ".join(f"{k} {len(ids['validation']) / v:.0f} ex/s"
                                                            for k, v in best.items()))
    n = len(ids["validation"])
    return {"examples_per_s": {k: n / v for k, v in best.items()}, "bf16": bf16, "n": n,
            "ratios": {"merged / plain": best["plain"] / best["lora merged"],
                       "unmerged / plain": best["plain"] / best["lora unmerged"]},
            "merged vs unmerged max |prob diff|": float((probs["lora merged"] - probs["lora unmerged"]).abs().max()),
            "merged vs unmerged argmax agreement": float((probs["lora merged"].argmax(1)
                                                          == probs["lora unmerged"].argmax(1)).float().mean())}


def section_frozen(sizes: dict, store: Path) -> dict:
    import pandas as pd

    spec = dataset_spec("twitter_financial_news", sizes["frozen_train"], sizes["val"] // 2, sizes["test"])
    rows = {}
    for cache in (True, False):
        log(f"frozen, cache_frozen_features={cache}")
        rows[cache] = peftbench_run(MINILM, spec, "frozen", 1e-3, sizes["frozen_epochs"], store,
                                    cache_frozen_features=cache)
    a, b = (pd.DataFrame(pd.read_parquet(Path(rows[c]["run_dir"]) / "predictions.parquet")["probs"].tolist())
            for c in (True, False))
    return {"epochs": sizes["frozen_epochs"], "cached": rows[True], "recomputed": rows[False],
            "ratios": {"run wall time: recomputed / cached": rows[False]["run_seconds"] / rows[True]["run_seconds"],
                       "training loop: recomputed / cached": rows[False]["train_time_s"] / rows[True]["train_time_s"]},
            "max |test prob diff|": float((a - b).abs().max().max()),
            "same test accuracy": rows[True]["test_accuracy"] == rows[False]["test_accuracy"]}


def probe_memory(args_json: str) -> None:
    """(child process) one IMDB run at 512 tokens; prints its result as the last line."""
    a = json.loads(args_json)
    spec = dataset_defaults(name="imdb", source=str(SHARED / "imdb"), max_train=a["n"], max_validation=32,
                            max_test=32)
    with tempfile.TemporaryDirectory() as store:
        row = peftbench_run(MINILM, spec, "full", 5e-5, 1, Path(store), max_length=512,
                            max_tokens_per_batch=a["max_tokens"])
    print(json.dumps({"max_tokens_per_batch": a["max_tokens"], "peak_rss_mb": row["peak_rss_mb"],
                      "train_examples_per_s": row["train_examples_per_s"], "split_steps": row["speed"]["split_steps"],
                      "val_accuracy": row["val_accuracy"]}))


def section_memory(sizes: dict) -> dict:
    rows = []
    for max_tokens in (None, 8192, 4096):
        log(f"memory: IMDB, 512 tokens, batch 32, max_tokens_per_batch={max_tokens} (fresh process)")
        done = subprocess.run([sys.executable, __file__, "--probe-memory",
                               json.dumps({"n": sizes["memory_train"], "max_tokens": max_tokens})],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"memory probe failed: {done.stderr.strip().splitlines()[-1:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {"rows": rows, "ratios": {f"peak RSS, max_tokens {r['max_tokens_per_batch']} / unbounded":
                                     r["peak_rss_mb"] / rows[0]["peak_rss_mb"] for r in rows[1:]}}


def section_compile(sizes: dict) -> dict:
    """The same LoRA training steps eager and compiled, each from the same initial weights, on MiniLM and on the
    distilroberta-sized model (the shipped studies' size class)."""
    with tempfile.TemporaryDirectory() as tmp:
        big = make_distilroberta_sized(Path(tmp) / "distilroberta-sized")
        return {name: compile_loop(model, sizes) for name, model in (("MiniLM", MINILM), ("82M", str(big)))}


def compile_loop(model_name: str, sizes: dict) -> dict:
    from peftbench.data import collate, make_batches

    spec = dataset_spec("twitter_financial_news", sizes["compile_train"], 64, 64)
    splits = get_splits(spec)
    tokenizer = load_tokenizer(model_name)
    ids = tokenize(splits.train["text"].tolist(), tokenizer, 128)
    y = torch.tensor(splits.train["label"].to_numpy())
    batches = make_batches([len(x) for x in ids], 32, True, 0)
    bf16 = bf16_supported(CPU)
    set_threads()
    out = {}
    for mode in ("eager", "compiled"):
        log(f"compile: LoRA training loop, {mode}, {len(batches)} steps")
        torch.manual_seed(0)
        model = methods.prepare("lora", build_classifier(model_name, len(splits.labels)),
                                {**LORA, "target_modules": "auto", "bias": "none"}).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-3, fused=True)
        forward = torch.compile(model, dynamic=True) if mode == "compiled" else model
        marks, t0 = [], time.perf_counter()
        for b in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = forward(**collate(ids, b, tokenizer.pad_token_id)).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), y[b])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            marks.append(time.perf_counter() - t0)
        half = len(marks) // 2
        steady = (marks[-1] - marks[half - 1]) / (len(marks) - half)  # second half: compiled for most lengths
        out[mode] = {"first_step_s": marks[0], "total_s": marks[-1], "steady_ms_per_step": 1000 * steady,
                     "final_loss": loss.item()}
        torch._dynamo.reset()
    e, c = out["eager"], out["compiled"]
    saved = (e["steady_ms_per_step"] - c["steady_ms_per_step"]) / 1000
    overhead = c["total_s"] - len(batches) * c["steady_ms_per_step"] / 1000 \
        - (e["total_s"] - len(batches) * e["steady_ms_per_step"] / 1000)
    return {"steps": len(batches), "bf16": bf16, "rows": out,
            "ratios": {"steady-state step: eager / compiled": e["steady_ms_per_step"] / c["steady_ms_per_step"],
                       "whole loop: eager / compiled": e["total_s"] / c["total_s"]},
            "compile overhead s (beyond steady-state steps)": overhead,
            "break-even steps per run": overhead / saved if saved > 0 else math.inf}


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


def table(rows: dict) -> str:
    head = "| arm | train ex/s | eval ex/s | padding % | peak mem (MB, above start) | val acc |\n|---|---|---|---|---|---|"
    lines = [head]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['train_examples_per_s']:.1f} | {r['eval_examples_per_s']:.1f} | "
                     f"{r['padding_pct']:.0f} | {r['peak_memory_mb']:.0f} | {r['val_accuracy']:.3f} |")
    return "\n".join(lines)


def ratios(d: dict) -> str:
    def fmt(v):
        return ", ".join(f"{x:.2f}" for x in v) if isinstance(v, list) else f"{v:.2f}"

    return "\n".join(f"- {k}: **{fmt(v)}**" for k, v in d.items())


def report(results: dict) -> str:
    out = []
    for name, sec in results.get("notebook", {}).items():
        out += [f"### {name}: notebook recipe vs peftbench (MiniLM)", "", table(sec["rows"]), "", ratios(sec["ratios"])]
        for m, acc in sec["accuracy"].items():
            out.append(f"- {m}: validation accuracy peftbench - notebook = {acc['peftbench - notebook (points)']:+.1f} "
                       f"points (noise, 2 SE: ±{acc['noise, 2 SE (points)']:.1f})")
        out.append("")
    if "ablations" in results:
        sec = results["ablations"]
        out += ["### peftbench ablations (twitter_financial_news, MiniLM)", "", table(sec["rows"]), "",
                ratios(sec["ratios"]), ""]
    if "82m" in results:
        sec = results["82m"]
        n = sec["parameters"]
        out += [f"### distilroberta-base-sized ({n['base_model'] / 1e6:.1f}M parameters, random weights; LoRA trains "
                f"{sec['runs']['lora'][0]['params']['trainable'] / 1e6:.2f}M)", "",
                "| run | method | train ex/s | load |", "|---|---|---|---|"]
        for m, rs in sec["runs"].items():
            out += [f"| {i} | {m} | {r['train_examples_per_s']:.1f} | {r['load']:.1f} |" for i, r in enumerate(rs)]
        out += ["", ratios(sec["ratios"]), ""]
    if "predict" in results:
        sec = results["predict"]
        out += [f"### prediction throughput (MiniLM, {sec['n']} validation texts, bf16={sec['bf16']}, best round)",
                "", "| model | ex/s |", "|---|---|"]
        out += [f"| {k} | {v:.0f} |" for k, v in sec["examples_per_s"].items()]
        out += ["", ratios(sec["ratios"]),
                f"- merged vs unmerged: max |prob diff| {sec['merged vs unmerged max |prob diff|']:.2e}, "
                f"argmax agreement {sec['merged vs unmerged argmax agreement']:.3f}", ""]
    if "frozen" in results:
        sec = results["frozen"]
        out += [f"### frozen arm, {sec['epochs']} epochs: cached encoder outputs vs recomputed", "",
                "| | run wall s | training loop s | val acc | test acc |", "|---|---|---|---|---|"]
        for label in ("cached", "recomputed"):
            r = sec[label]
            out.append(f"| {label} | {r['run_seconds']:.1f} | {r['train_time_s']:.1f} | {r['val_accuracy']:.3f} | "
                       f"{r['test_accuracy']:.3f} |")
        out += ["", ratios(sec["ratios"]), f"- max |test prob diff|: {sec['max |test prob diff|']:.2e}, same test "
                f"accuracy: {sec['same test accuracy']}", ""]
    if "memory" in results:
        sec = results["memory"]
        out += ["### memory: IMDB, 512 tokens, batch 32, full fine-tuning (fresh process each)", "",
                "| max_tokens_per_batch | peak RSS MB | train ex/s | steps cut into pieces |", "|---|---|---|---|"]
        out += [f"| {r['max_tokens_per_batch']} | {r['peak_rss_mb']:.0f} | {r['train_examples_per_s']:.1f} | "
                f"{r['split_steps']} |" for r in sec["rows"]]
        out += ["", ratios(sec["ratios"]), ""]
    for model, sec in results.get("compile", {}).items():
        out += [f"### torch.compile: LoRA training loop on {model} ({sec['steps']} steps, bf16={sec['bf16']})", "",
                "| | first step s | whole loop s | steady ms/step |", "|---|---|---|---|"]
        out += [f"| {k} | {r['first_step_s']:.1f} | {r['total_s']:.1f} | {r['steady_ms_per_step']:.0f} |"
                for k, r in sec["rows"].items()]
        out += ["", ratios(sec["ratios"]),
                f"- compile overhead: {sec['compile overhead s (beyond steady-state steps)']:.1f} s; it pays for "
                f"itself after **{sec['break-even steps per run']:.0f}** steps of a run", ""]
    return "\n".join(out)


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else \
        platform.processor()
    env = environment_base()
    return {"cpu": model, "cores": psutil.cpu_count(logical=False), "logical_cpus": psutil.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "torch_threads": set_threads(),
            "bf16_native": bf16_supported(CPU), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "python": env["python"], "packages": env["packages"], "git_hash": env["git_hash"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: checks every section runs (~10 min)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    ap.add_argument("--datasets", default=",".join(NOTEBOOK_DATASETS),
                    help="datasets of the notebook section (comma-separated)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs of the notebook-vs-peftbench and ablation runs")
    ap.add_argument("--lr-full", type=float, default=1e-4, help="learning rate of full fine-tuning (both recipes)")
    ap.add_argument("--lr-lora", type=float, default=2e-3, help="learning rate of LoRA (both recipes; one epoch of "
                    "2,000 examples needs a high one to move off the majority class)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the prediction measurement")
    ap.add_argument("--json", type=Path, help="also write every number to this JSON file")
    ap.add_argument("--probe-memory", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe_memory:
        probe_memory(args.probe_memory)
        return 0
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    sizes = QUICK if args.quick else SIZES
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if set(datasets) - set(NOTEBOOK_DATASETS):
        ap.error(f"unknown dataset(s) for --datasets: {', '.join(sorted(set(datasets) - set(NOTEBOOK_DATASETS)))}")
    lrs = {"full": args.lr_full, "lora": args.lr_lora}
    started = time.perf_counter()
    results: dict = {"machine": machine(), "command": " ".join([Path(sys.executable).name] + sys.argv),
                     "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "sizes": sizes,
                     "epochs": args.epochs, "lr": lrs}
    log(f"machine: {json.dumps({k: v for k, v in results['machine'].items() if k != 'packages'})}")
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        for section in wanted:
            t = time.perf_counter()
            if section == "notebook":
                results["notebook"] = section_notebook(sizes, store, args.epochs, lrs, datasets)
            elif section == "ablations":
                results["ablations"] = section_ablations(sizes, store, args.epochs, lrs)
            elif section == "82m":
                results["82m"] = section_82m(sizes, store, lrs)
            elif section == "predict":
                results["predict"] = section_predict(sizes, args.rounds)
            elif section == "frozen":
                results["frozen"] = section_frozen(sizes, store)
            elif section == "memory":
                results["memory"] = section_memory(sizes)
            elif section == "compile":
                results["compile"] = section_compile(sizes)
            log(f"section {section} done in {time.perf_counter() - t:.0f}s")
            print("\n" + report({section: results[section]}) + "\n", flush=True)  # nothing is lost if killed later
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(results, indent=1, default=str))
    results["total_s"] = time.perf_counter() - started
    text = report(results)
    print("\n" + text)
    print(f"\ntotal {results['total_s'] / 60:.1f} min")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
