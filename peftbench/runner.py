"""One run end to end (data → model → method → train → evaluate → store), and evaluating a stored run again.

Studies (loops over runs) are executed by :mod:`peftbench.executors`; the process set-up (device, threads, seeding,
environment, peak memory) is :mod:`peftbench.environment`.

Example::

    >>> from peftbench.config import load_study, expand_runs
    >>> from peftbench.runner import execute_run
    >>> from peftbench.store import Store
    >>> result = execute_run(expand_runs(load_study("studies/demo.toml"))[0], Store("runs"), "cpu")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from peftbench import dropout, flops, methods, packing, progress
from peftbench.config import ConfigError, RunConfig, Study, expand_runs
from peftbench.data import Splits, collate, encode_frame, load_splits, make_batches, split_batch
from peftbench.engine import Job, TrainSettings, autocast, bf16_supported, predict, train, train_packed
from peftbench.environment import PeakMemory, environment_base, pick_device, seed_everything
from peftbench.evaluate import compute_metrics, compute_metrics_from_preds
from peftbench.models import (build_classifier, enable_gradient_checkpointing, load_model_config, load_tokenizer,
                              model_fingerprint, portable_model_id, resolve_model)
from peftbench.store import RunWriter, Store, save_torch

# OSErrors that mean the store itself cannot be written (not the run's fault): they stop the study.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}



@functools.lru_cache(maxsize=8)
def _cached_splits(spec_json: str) -> Splits:
    return load_splits(json.loads(spec_json))


def get_splits(spec: dict[str, Any]) -> Splits:
    """Load a dataset once per process (a study reuses it across arms and seeds)."""
    return _cached_splits(json.dumps(spec, sort_keys=True))


@dataclass
class Prepared:
    """A model ready to train, with the data it sees as index batches and a forward that maps a batch to logits."""

    model: torch.nn.Module
    splits: Splits
    ids: dict[str, list[list[int]]]
    labels: dict[str, torch.Tensor]
    device: torch.device
    pad_id: int
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # cached frozen-encoder outputs per split
    type_ids: dict[str, list[list[int]]] = field(default_factory=dict)  # sentence pairs: segment ids per split
    length_buckets: bool = True  # False: batches in random order, padded to their longest text (the plain path)

    def batches(self, split: str, batch_size: int, shuffle: bool, seed: int = 0, max_tokens: int | None = None):
        lengths = [len(x) for x in self.ids[split]]
        return [(split, b) for b in make_batches(lengths, batch_size, shuffle, seed, max_tokens,
                                                 sort=self.length_buckets)]

    def steps(self, split: str, batch_size: int, seed: int, max_tokens: int | None = None) -> list:
        """Shuffled training steps: a batch, or, when its padded size exceeds ``max_tokens``, the list of its pieces
        (the engine accumulates their gradients, so bounding memory does not change the batch size)."""
        lengths = np.array([len(x) for x in self.ids[split]])
        out = []
        for b in make_batches(lengths, batch_size, True, seed, sort=self.length_buckets):
            pieces = split_batch(b, lengths, max_tokens)
            out.append((split, b) if len(pieces) == 1 else [(split, piece) for piece in pieces])
        return out

    def padding_pct(self, steps: list) -> float:
        """Share of the tokens fed to the model that are padding, over ``steps``."""
        real = padded = 0
        for step in steps:
            for split, idx in (step if isinstance(step, list) else [step]):
                lengths = [len(self.ids[split][i]) for i in idx]
                real, padded = real + sum(lengths), padded + len(lengths) * max(lengths)
        return 100.0 * (1 - real / padded) if padded else 0.0

    def predict_split(self, split: str, batch_size: int, bf16: bool = False,
                      max_tokens: int | None = None) -> torch.Tensor:
        """Class probabilities of every example of ``split``, in the split's order."""
        self.model.eval()
        batches = self.batches(split, batch_size, shuffle=False, max_tokens=max_tokens)
        probs = predict(self.forward, batches, self.device, bf16)
        ordered = torch.empty_like(probs)
        ordered[torch.as_tensor(np.concatenate([b for _, b in batches]))] = probs
        return ordered

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        split, idx = batch
        labels = self.labels[split][idx].to(self.device, non_blocking=True)
        if split in self.features:
            return self.model.head(self.features[split][idx].to(self.device)), labels
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in self.collate(split, idx).items()}
        return self.model(**inputs).logits, labels

    def collate(self, split: str, idx: np.ndarray) -> dict[str, torch.Tensor]:
        return collate(self.ids[split], idx, self.pad_id, self.type_ids.get(split))

    def example_inputs(self, length: int) -> dict[str, torch.Tensor]:
        """Model inputs of one example of ``length`` tokens (the first training text's tokens, repeated), for
        counting FLOPs."""
        ids = (self.ids["train"][0] * length)[:length]
        types = [[0] * length] if self.type_ids else None
        return {k: v.to(self.device) for k, v in collate([ids], np.zeros(1, dtype=int), self.pad_id, types).items()}


def _cache_features(p: Prepared, run: RunConfig, bf16: bool) -> None:
    """Frozen encoder: compute its sentence vectors once; every epoch then only runs the head."""
    p.model.eval()
    with torch.no_grad():
        for split in p.ids:
            out = torch.empty((len(p.ids[split]), p.model.config.hidden_size))
            for _, idx in p.batches(split, run.train["eval_batch_size"], shuffle=False,
                                    max_tokens=run.train.get("max_tokens_per_batch")):
                inputs = {k: v.to(p.device) for k, v in p.collate(split, idx).items()}
                with torch.autocast(p.device.type, dtype=torch.bfloat16, enabled=bf16):
                    feats = p.model.features(**inputs)
                out[torch.as_tensor(idx)] = feats.float().cpu()
            p.features[split] = out


def _features_key(p: Prepared, run: RunConfig, bf16: bool) -> str:
    """What a frozen encoder's cached outputs depend on: every weight and buffer of the encoder ``features()`` runs
    (``base_model``: so a seed's random-init encoder is its own) and its config, the token ids (and segments) of every
    split, how they are batched, autocast, the attention implementation, the device and CPU kernel level, thread
    count and torch/transformers versions (bf16 GEMMs may round differently with other blocking or kernels)."""
    import transformers

    encoder = getattr(p.model, "base_model", p.model)
    config = getattr(p.model, "config", None)
    hardware = (torch.cuda.get_device_name(p.device) + f" cuda {torch.version.cuda}" if p.device.type == "cuda"
                else torch.backends.cpu.get_cpu_capability())
    key = hashlib.sha256(b"frozen-features-v1")
    key.update(json.dumps([type(p.model).__name__, type(encoder).__name__, torch.__version__,
                           transformers.__version__, p.device.type, hardware, bf16, torch.get_num_threads(),
                           run.train["eval_batch_size"], run.train.get("max_tokens_per_batch"), p.length_buckets,
                           getattr(config, "_attn_implementation", None),
                           config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else None,
                           ]).encode())
    for name, tensor in encoder.state_dict().items():
        key.update(name.encode())
        key.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    for ids in (p.ids, p.type_ids):
        key.update(json.dumps(ids, separators=(",", ":")).encode())
    return key.hexdigest()[:24]


def _shared_features(p: Prepared, run: RunConfig, bf16: bool, cache_dir: Path) -> tuple[float, bool]:
    """:func:`_cache_features`, shared by the runs of a store: the first run whose encoder, data and settings give
    a key (:func:`_features_key`) computes the outputs and leaves them in ``STORE/.cache/features/``; the others
    (other seeds or learning rates of the frozen arm) load them, bit for bit what they would compute. Returns (the
    seconds of the encoder pass, whether it was another run's). A lock makes a second process wait for the first
    rather than compute the same pass beside it. The cache is only a cache: when it cannot be read or written (a
    torn file, a full or read-only disk) the run computes its own outputs and goes on."""
    path = cache_dir / "features" / f"{_features_key(p, run, bf16)}.pt"
    with contextlib.ExitStack() as stack:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = stack.enter_context(open(path.with_suffix(".lock"), "a"))
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except (ImportError, OSError):  # no lock (or no cache folder): at worst two processes compute the same pass
            pass
        if path.is_file():
            try:
                cached = torch.load(path, weights_only=True)
                p.features.update(cached["features"])
                return float(cached["seconds"]), True
            except Exception:  # noqa: BLE001 - a torn cache file is only a cache miss
                p.features.clear()
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
        start = time.perf_counter()
        _cache_features(p, run, bf16)
        seconds = time.perf_counter() - start
        with contextlib.suppress(OSError, RuntimeError):  # torch.save's write errors (a full disk...): only a cache
            save_torch(path, {"features": dict(p.features), "seconds": seconds})
        return seconds, False


def execute_run(run: RunConfig, store: Store, device: torch.device, position: int = 1,
                epoch_hook: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train and evaluate one run into the store. Failures are recorded in the run's result, never raised
    (KeyboardInterrupt excepted: the half-built run is then simply discarded). ``epoch_hook`` gets each epoch's
    ``metrics.jsonl`` row once it is written (the experiment trackers)."""
    return execute_runs([run], store, device, position, [epoch_hook])[0]


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


class _Slot:
    """One run's result being assembled: its writer, result dict and environment; :meth:`guard` records a failure
    in it the way a solo run records one."""

    def __init__(self, run: RunConfig, store: Store, device: torch.device):
        self.run, self.writer = run, store.writer(run.run_id, run.to_dict())
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.env = {**environment_base(), "device": str(device)}
        self.result: dict[str, Any] = {"run_id": run.run_id, "status": "failed", "error": None,
                                       "config": run.to_dict(), "environment": self.env}
        self.body: dict[str, Any] | None = None

    @contextlib.contextmanager
    def guard(self):
        try:
            yield
        except OSError as e:
            if e.errno in STORAGE_ERRNOS:  # the store cannot be written: every later run would fail too
                self.writer.discard()
                raise
            self.result["error"] = _one_line(e)
        except (Exception, torch.cuda.OutOfMemoryError) as e:  # noqa: B014 - OOM named for the reader
            self.result["error"] = _one_line(e)
            if getattr(e, "costs", None):  # spent before failing (an llm arm's tokens)
                self.result["costs"] = e.costs

    def commit(self, mem: PeakMemory) -> dict[str, Any]:
        if self.body is not None and self.result["error"] is None:
            self.result.update(self.body)
            self.result["costs"]["peak_memory_mb"] = mem.peak / 2**20
            self.result["costs"]["peak_memory_kind"] = mem.kind
            self.result["status"] = "success"
        self.result["timing"] = {"started": self.started,
                                 "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.writer.commit(self.result)  # e.g. disk full: the half-built folder goes, the run stays to do
        return self.result


def execute_runs(runs: list[RunConfig], store: Store, device: torch.device, position: int = 1,
                 epoch_hooks: list[Callable[[dict[str, Any]], None] | None] | None = None) -> list[dict[str, Any]]:
    """Train and evaluate ``runs`` into the store, each stored and failing on its own as :func:`execute_run`'s run.
    Several runs are a pack (:func:`peftbench.packing.plan` makes them): built one after another, trained together in
    one forward/backward pass per step (:func:`peftbench.engine.train_packed`), then each evaluated and stored; runs
    that cannot share the pass (``speed.packing`` says why) train one after another. The peak memory is the pack's."""
    hooks = epoch_hooks or [None] * len(runs)
    slots = [_Slot(run, store, device) for run in runs]
    with PeakMemory(device) as mem:
        built: dict[int, _Built] = {}
        for i, slot in enumerate(slots):
            with slot.guard():
                if methods.is_baseline(slot.run.method):
                    slot.body = _run_baseline(slot.run, store, slot.writer, slot.env)
                else:
                    built[i] = _build(slot.run, store, device, slot.writer, slot.env, position, hooks[i])
        outcomes = _train_all(built, device)
        for i, b in built.items():
            with slots[i].guard():
                if isinstance(outcomes[i], BaseException):
                    raise outcomes[i]
                slots[i].body = _finish(b, *outcomes[i])
    return [slot.commit(mem) for slot in slots]


@dataclass
class _Built:
    """A run ready to train: its prepared model and data, and what :func:`_finish` needs afterwards."""

    run: RunConfig
    p: Prepared
    backbone: Any
    writer: RunWriter
    resolved: dict[str, Any]
    params: dict[str, Any]
    pretrained: dict | None
    bf16: bool
    speed: dict[str, Any]
    cache_time: float
    set_train_mode: Callable[[], None]
    evaluate: Callable[[str], tuple[dict[str, Any], torch.Tensor]]
    job: Job | None = None
    bar: Any = None
    rng: Any = None  # torch's generator state once built: a run of a group trained alone starts from it, as solo


def _build(run: RunConfig, store: Store, device: torch.device, writer: RunWriter, env: dict, position: int,
           epoch_hook: Callable[[dict[str, Any]], None] | None = None) -> _Built:
    splits = get_splits(run.dataset)
    tokenizer = load_tokenizer(run.model)
    cfg = run.train
    encoded = {role: encode_frame(getattr(splits, role), tokenizer, cfg["max_length"], store.cache_dir / "tokens")
               for role in ("train", "validation", "test")}
    ids = {role: e["input_ids"] for role, e in encoded.items()}
    labels = {role: torch.tensor(getattr(splits, role)["label"].to_numpy()) for role in ids}
    env["model_fingerprint"] = model_fingerprint(resolve_model(run.model))
    env["dataset_fingerprint"] = splits.fingerprint

    seed_everything(run.seed)
    backbone = build_classifier(run.model, len(splits.labels), cfg["pooling"], splits.labels)
    if cfg.get("gradient_checkpointing"):
        enable_gradient_checkpointing(backbone)
    pretrained = _snapshot_for_spectrum(run, backbone)
    total_steps = None
    if methods.METHODS[run.method].trains:  # AdaLoRA's budget schedule needs it before training
        total_steps = cfg["epochs"] * len(make_batches([len(x) for x in ids["train"]], cfg["batch_size"], True, 0))
    resolved = methods.resolved_names(run.method, backbone, run.method_params)  # stored in result.json
    model = methods.prepare(run.method, backbone, run.method_params, total_steps=total_steps)
    params = methods.count_parameters(model, resolved.get("head", []))
    model.to(device)
    p = Prepared(model=model, splits=splits, ids=ids, labels=labels, device=device,
                 pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                 length_buckets=cfg.get("length_buckets", True), type_ids=segment_ids(encoded, backbone.model))
    bf16 = cfg["bf16"] and bf16_supported(device)
    frozen_bf16 = methods.hold_frozen_in_bf16(model) if cfg.get("bf16_weights") and bf16 else 0
    fast_dropout = dropout.use_fast_dropout(model, device) if cfg.get("fast_dropout") else 0
    max_tokens = cfg.get("max_tokens_per_batch")
    frozen = methods.uses_frozen_encoder(run.method)
    cache_time, shared = 0.0, False
    if frozen and cfg.get("cache_frozen_features", True) and hasattr(model, "features"):
        # the encoder pass is part of training the head: counted in it, also when another run of the store made it
        cache_time, shared = _shared_features(p, run, bf16, store.cache_dir)

    def set_train_mode():
        model.train()
        if frozen:
            model.base_model.eval()  # a frozen encoder keeps dropout off, so cached and recomputed outputs agree

    def evaluate(split: str) -> tuple[dict[str, Any], torch.Tensor]:
        probs = p.predict_split(split, cfg["eval_batch_size"], bf16, max_tokens)
        return compute_metrics(labels[split].numpy(), probs.numpy(), len(splits.labels)), probs

    speed = {"bf16": bf16, "length_buckets": p.length_buckets, "padding_pct": None, "max_tokens_per_batch": max_tokens,
             "split_steps": 0, "fused_optimizer": False, "torch_threads": torch.get_num_threads(),
             "attention": getattr(getattr(backbone.model, "config", None), "_attn_implementation", None),
             "frozen_features_cached": bool(p.features), "frozen_features_shared": shared, "merged_for_eval": False,
             "gradient_checkpointing": bool(cfg.get("gradient_checkpointing")), "bf16_weights": frozen_bf16 > 0,
             "bf16_weight_params": frozen_bf16, "fast_dropout": fast_dropout > 0}
    b = _Built(run, p, backbone, writer, resolved, params, pretrained, bf16, speed, cache_time, set_train_mode,
               evaluate)
    if not methods.METHODS[run.method].trains:
        return b
    first = p.steps("train", cfg["batch_size"], run.seed * 1000 + 1, max_tokens)
    speed["padding_pct"] = p.padding_pct(first)
    speed["split_steps"] = sum(isinstance(step, list) for step in first)
    settings = TrainSettings.from_config(cfg, len(first))
    settings.bf16 = bf16
    optimizer = methods.make_optimizer(run.method, model, run.method_params, cfg, device, resolved["head"])
    speed["fused_optimizer"] = bool(optimizer.defaults.get("fused"))
    b.bar = bar = progress.bar(total=settings.epochs * len(first), desc=run.arm, position=position, leave=False,
                               unit="step")
    train_started = time.perf_counter()

    def train_batches(epoch: int):
        for step in p.steps("train", cfg["batch_size"], run.seed * 1000 + epoch, max_tokens):
            yield step
            bar.update(1)

    def on_epoch(row):
        bar.set_postfix(val_acc=f"{row['val_accuracy']:.3f}", ex_s=f"{row['examples_per_s']:.0f}")
        if bar.disable:  # a log: one line per epoch instead of the bar
            left = progress.eta(time.perf_counter() - train_started, row["epoch"], settings.epochs)
            progress.say(f"epoch  {run.label}: {row['epoch']}/{settings.epochs}, val acc "
                         f"{row['val_accuracy']:.4f}, {row['examples_per_s']:.0f} ex/s"
                         + (f"; run ETA {left}" if left else ""))
        writer.append_epoch(row)
        if epoch_hook:
            epoch_hook(row)

    b.job = Job(model, p.forward, train_batches, lambda: evaluate("validation")[0], settings, set_train_mode,
                on_epoch, optimizer, methods.step_hook(run.method, model, run.method_params))
    b.rng = torch.random.get_rng_state()
    return b


def _train_all(built: dict[int, "_Built"], device: torch.device) -> dict[int, Any]:
    """Train the built runs: (history, best epoch, seconds) or the exception that ended it, per run. One run trains
    alone (:func:`peftbench.engine.train`); several share a forward pass when they can (:class:`packing.Pack`)."""
    out: dict[int, Any] = {i: ([], 0, 0.0) for i, b in built.items() if b.job is None}
    trainees = [i for i, b in built.items() if b.job is not None]
    pack = None
    if len(trainees) > 1:
        try:
            pack = packing.Pack([built[i].p.model for i in trainees], built[trainees[0]].run.method)
            note = {"runs": len(trainees), "run_ids": [built[i].run.run_id for i in trainees]}
        except Exception as e:  # noqa: BLE001 - PackError, or anything else: the runs then train one at a time
            note = {"runs": 1, "not_packed": _one_line(e) if not isinstance(e, packing.PackError) else str(e)}
        for n, i in enumerate(trainees):
            built[i].speed["packing"] = {**note, "index": n} if pack else note
    if pack is None:
        for i in trainees:
            j = built[i].job
            if len(trainees) > 1:
                torch.random.set_rng_state(built[i].rng)  # as it was when this run was built: its dropout as solo
            try:
                out[i] = train(j.model, j.forward, j.train_batches, j.evaluate, j.settings, device, j.set_train_mode,
                               j.on_epoch, j.optimizer, j.after_step)
            except (Exception, torch.cuda.OutOfMemoryError) as e:  # noqa: B014 - recorded in that run's result
                out[i] = e.with_traceback(None)  # its frames (activations, an OOM's memory) freed for the next run
            built[i].bar.close()
        return out

    def forward(active: list[int], batches: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
        inputs, labels = [], []
        for k, (split, idx) in zip(active, batches):
            p = built[trainees[k]].p
            inputs.append({key: v.to(device, non_blocking=True) for key, v in p.collate(split, idx).items()})
            labels.append(p.labels[split][idx].to(device, non_blocking=True))
        return list(zip(pack.forward(active, inputs), labels))

    results = train_packed([built[i].job for i in trainees], forward, device)
    for i, r in zip(trainees, results):
        out[i] = r
        built[i].bar.close()
    return out


def _finish(b: _Built, history: list, best_epoch: int, train_time: float) -> dict[str, Any]:
    """Save, merge and evaluate a trained run: the body of its ``result.json``."""
    run, p, cfg, splits, writer = b.run, b.p, b.run.train, b.p.splits, b.writer
    model = p.model
    train_flops = _train_flops(p, history, b.bf16, b.set_train_mode)
    adapter_size = methods.save_weights(run.method, model, writer.weights_dir, base_model=portable_model_id(run.model))
    _write_spectrum(writer, model, b.pretrained)
    if cfg.get("merge_for_eval", True) and methods.METHODS[run.method].trains:
        p.model = methods.merge_for_inference(run.method, model)  # saved already: predict at the plain model's cost
        b.speed["merged_for_eval"] = p.model is not model

    eval_flops = _eval_flops(p, b.bf16)
    start = time.perf_counter()
    val_metrics, _ = b.evaluate("validation")
    test_metrics, test_probs = b.evaluate("test")
    eval_time = time.perf_counter() - start
    writer.write_predictions(predictions_frame(splits.test, np.arange(len(splits.test)),
                                               test_probs.argmax(1).numpy(), test_probs.numpy()))
    n_train = len(p.ids["train"])
    examples_trained = n_train * len(history)
    if history:
        train_time += b.cache_time
    n_eval = len(p.ids["validation"]) + len(p.ids["test"])
    return {
        "labels": splits.labels,
        "dataset_info": splits.info,
        "metrics": {"validation": val_metrics, "test": test_metrics, "best_epoch": best_epoch,
                    "epochs_run": len(history)},
        "params": b.params,
        "resolved": b.resolved,
        "costs": {"train_time_s": train_time, "train_examples": examples_trained,
                  "train_examples_per_s": examples_trained / train_time if train_time else None,
                  "eval_time_s": eval_time, "eval_examples_per_s": n_eval / eval_time if eval_time else None,
                  "adapter_size_bytes": adapter_size, "frozen_features_cached": bool(p.features),
                  "feature_cache_s": b.cache_time,
                  "train_flops": train_flops, "train_flops_per_s": flops.utilisation(train_flops, train_time),
                  "eval_flops": eval_flops, "eval_flops_per_s": flops.utilisation(eval_flops, eval_time)},
        "pooling": b.backbone.pooling,
        "speed": b.speed,
    }


def _polynomial(p: Prepared, backward: bool, bf16: bool) -> tuple[int, int, int]:
    """The FLOP polynomial of ``p.model`` in its current mode, under the run's autocast (:mod:`peftbench.flops`)."""
    return flops.model_polynomial(p.model, p.example_inputs, backward, lambda: autocast(p.device, bf16))


def _lengths(p: Prepared, splits) -> list[int]:
    return [len(x) for split in splits for x in p.ids[split]]


def _train_flops(p: Prepared, history: list, bf16: bool, set_train_mode) -> int | None:
    """Model FLOPs of the training (:mod:`peftbench.flops`): forward + backward per trained example and epoch, or
    the one cached forward pass of a frozen encoder over every split."""
    if not history:
        return None
    if p.features:  # the encoder ran once over every split, in eval mode
        p.model.eval()
        return flops.total(_polynomial(p, False, bf16), _lengths(p, p.ids))
    set_train_mode()
    return flops.total(_polynomial(p, True, bf16), _lengths(p, ["train"])) * len(history)


def _eval_flops(p: Prepared, bf16: bool) -> int:
    """Model FLOPs of predicting the validation and test splits once (the head only on cached features)."""
    p.model.eval()
    lengths = _lengths(p, ("validation", "test"))
    poly = _polynomial(p, False, bf16)
    return poly[0] * len(lengths) if p.features else flops.total(poly, lengths)


def _snapshot_for_spectrum(run: RunConfig, backbone) -> dict[str, Any] | None:
    """CPU copies of the pretrained target matrices (only those), for ``spectrum.json``; never fails the run."""
    from peftbench import spectrum

    try:
        targets = methods.spectrum_targets(run.method, backbone, run.method_params)
        return {"targets": targets, "weights": spectrum.snapshot(backbone.model, targets)} if targets else None
    except Exception:  # a bad target list fails in methods.prepare, with its message
        return None


def _write_spectrum(writer: RunWriter, model: torch.nn.Module, pretrained: dict | None) -> None:
    """``spectrum.json``: singular values of each target matrix's learned update. An analysis, not a result: a
    failure here is reported and the run goes on."""
    if not pretrained:
        return
    from peftbench import spectrum

    try:
        writer.write_spectrum(spectrum.record(spectrum.layer_spectra(model, pretrained["weights"],
                                                                     pretrained["targets"])))
    except Exception as e:  # noqa: BLE001
        progress.say(f"spectrum analysis skipped: {type(e).__name__}: {e}")


def segment_ids(encoded: dict[str, dict[str, list]], model: torch.nn.Module) -> dict[str, list[list[int]]]:
    """The sentence pairs' segment ids per split, for a model that has segment embeddings (BERT's
    ``type_vocab_size`` 2); none for single texts or a model without them (RoBERTa, DistilBERT)."""
    if getattr(getattr(model, "config", None), "type_vocab_size", 1) < 2:
        return {}
    return {split: e["token_type_ids"] for split, e in encoded.items() if "token_type_ids" in e}


def word_counts(texts: pd.Series) -> np.ndarray:
    return texts.str.split().str.len().to_numpy()


def predictions_frame(test: pd.DataFrame, ids: np.ndarray, preds: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    """What ``predictions.parquet`` holds: one row per test example (``length`` in words, the same for every
    method; a sentence pair's ``text_pair`` column beside ``text``, and ``length`` the words of both)."""
    pair = {"text_pair": test["text_pair"].to_numpy()} if "text_pair" in test.columns else {}
    length = word_counts(test["text"]) + (word_counts(test["text_pair"]) if pair else 0)
    return pd.DataFrame({"id": ids, "text": test["text"].to_numpy(), **pair, "label": test["label"].to_numpy(),
                         "pred": preds, "probs": list(np.asarray(probs, dtype=np.float32)), "length": length})


def _run_baseline(run: RunConfig, store: Store, writer: RunWriter, env: dict) -> dict[str, Any]:
    """TF-IDF or LLM: no encoder to fine-tune, same splits, metrics and files as every other run."""
    splits = get_splits(run.dataset)
    env["dataset_fingerprint"] = splits.fingerprint
    res = methods.run_baseline(run.method, run.method_params, splits, run.seed, store.cache_dir)
    n_labels = len(splits.labels)
    ids = np.arange(len(splits.test)) if res.test_ids is None else np.asarray(res.test_ids)
    test = splits.test.iloc[ids]
    val = None if res.val_preds is None else compute_metrics_from_preds(
        splits.validation["label"].to_numpy(), res.val_preds, n_labels, res.val_probs)
    probs = res.probs if res.probs is not None else np.full((len(ids), n_labels), np.nan)
    writer.write_predictions(predictions_frame(test, ids, res.preds, probs))
    test_metrics = compute_metrics_from_preds(test["label"].to_numpy(), res.preds, n_labels, res.probs)
    return {"labels": splits.labels, "dataset_info": splits.info,
            "metrics": {"validation": val, "test": test_metrics, "best_epoch": None, "epochs_run": 0},
            "params": res.params, "costs": res.costs, "baseline_info": res.info}


def check_study_inputs(study: Study) -> None:
    """Fail fast, before any training, on data or model problems that would make every run fail."""
    for spec in study.datasets.values():
        get_splits(spec)
    configs = {}
    for model in study.models:
        try:
            configs[model] = load_model_config(model)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    check_method_params(study, configs)


def check_method_params(study: Study, configs: dict[str, Any]) -> None:
    """Check every run's head policy and target names (presets resolved) against its model's transformers config
    (``configs``: model name → config; models missing from it are skipped), building each model on the meta device
    (``methods.check_model_params``): a name or preset that fits nothing is a one-line ConfigError naming the study
    file and the arm's field, before anything trains."""
    where = str(study.path) if study.path else "study"
    seen = set()
    for run in expand_runs(study, searched=True):  # searched arms too: their method params are fixed
        key = (run.model, run.method, json.dumps(run.method_params, sort_keys=True), run.train.get("pooling"))
        if run.model not in configs or key in seen:
            continue
        seen.add(key)
        methods.check_model_params(configs[run.model], run.method, run.method_params,
                                   run.train.get("pooling", "auto"), resolve_model(run.model),
                                   where=f"{where}: arm '{run.arm}'")


def evaluate_saved(run_dir: str | Path, dataset: dict[str, Any] | None = None, split: str = "test",
                   device: str = "auto") -> dict[str, Any]:
    """Evaluate a stored run's weights on ``split`` of ``dataset`` (default: the run's own dataset).

    ``run_dir`` may also be the run's ``adapter/`` folder."""
    from peftbench.export import read_run, rebuild_model

    run_dir = Path(run_dir)
    if (run_dir / "adapter_config.json").is_file() and (run_dir.parent / "config.json").is_file():
        run_dir = run_dir.parent
    run, result = read_run(run_dir)
    splits = get_splits(dataset or run.dataset)
    if splits.labels != result["labels"]:
        raise ConfigError(f"dataset labels {splits.labels} differ from the labels the run was trained on "
                          f"{result['labels']}")
    dev = pick_device(device)
    tokenizer = load_tokenizer(run.model)
    frame = getattr(splits, split)
    encoded = {split: encode_frame(frame, tokenizer, run.train["max_length"])}
    # merged as the run predicted (and as fast)
    model, _ = rebuild_model(run, result, run_dir, merge=run.train.get("merge_for_eval", True))
    model = model.to(dev)
    p = Prepared(model=model, splits=splits, ids={split: encoded[split]["input_ids"]},
                 labels={split: torch.as_tensor(frame["label"].to_numpy())}, device=dev,
                 pad_id=tokenizer.pad_token_id or 0, type_ids=segment_ids(encoded, model))
    probs = p.predict_split(split, run.train["eval_batch_size"], run.train["bf16"] and bf16_supported(dev),
                            run.train.get("max_tokens_per_batch"))
    return compute_metrics(frame["label"].to_numpy(), probs.numpy(), len(splits.labels))
