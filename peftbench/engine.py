"""The training loop: plain PyTorch, readable in one screen.

AdamW (no decay on biases/LayerNorm; the fused kernel on CUDA and CPU), a transformers schedule with warmup, gradient
clipping, optional bf16 autocast, gradient accumulation over the pieces of a step too long for memory, early stopping on
a validation metric with patience, and the best epoch's weights restored at the end. The loop knows nothing about
methods: it trains whatever parameters require grad, and gets the batches as callables. It never waits for the device
inside an epoch: the loss is summed on the device and read once per epoch.

Example::

    >>> from peftbench.engine import TrainSettings  # doctest: +SKIP
    >>> history, best = train(model, train_batches, evaluate_val, TrainSettings(...), device)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from transformers import get_scheduler


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class TrainSettings:
    epochs: int
    lr: float
    weight_decay: float
    lr_scheduler: str
    warmup_ratio: float
    max_grad_norm: float
    early_stopping_patience: int | None
    metric_for_best: str
    bf16: bool
    steps_per_epoch: int
    fused_optimizer: bool = True

    @classmethod
    def from_config(cls, train: dict[str, Any], steps_per_epoch: int) -> "TrainSettings":
        fields = [f for f in dataclasses.fields(cls) if f.name != "steps_per_epoch"]
        values = {f.name: train[f.name] if f.default is dataclasses.MISSING else train.get(f.name, f.default)
                  for f in fields}
        return cls(**values, steps_per_epoch=steps_per_epoch)


def fused_adamw_available(device: torch.device) -> bool:
    """torch has a fused AdamW kernel for CUDA and CPU: one pass over the parameters instead of a dozen small ops per
    tensor (training steps 1.12x faster on MiniLM, 1.32x on an 82M-parameter model on CPU: docs/benchmarks.md)."""
    return device.type in ("cuda", "cpu")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: no weight decay on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device,
                   fused: bool = True) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, fused=fused and fused_adamw_available(device))


def set_group_lr(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], lr: float) -> None:
    """Give ``params`` the learning rate ``lr``: in every group holding some of them, they move to a copy of that
    group (same weight decay and other settings) at ``lr``; emptied groups are dropped. Call it before the first
    step and before the schedule is made (the schedule then scales every group alike)."""
    ids = {id(p) for p in params}
    for group in list(optimizer.param_groups):
        moved = [p for p in group["params"] if id(p) in ids]
        if not moved:
            continue
        group["params"] = [p for p in group["params"] if id(p) not in ids]
        if not group["params"]:
            optimizer.param_groups.remove(group)
        optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": moved, "lr": lr})


BF16_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "bf16")


@functools.lru_cache(maxsize=None)
def _cpu_words() -> set[str]:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return set(flags.split())


def _cpu_has_bf16() -> bool:
    words = _cpu_words()
    return bool(words & {"avx512_bf16", "amx_bf16"}) or (platform.machine() == "aarch64" and "bf16" in words)


def cpu_numerics() -> dict[str, Any]:
    """The CPU's instruction sets that decide bf16/fp32 numerics (and so bit-exact results): its model name, the
    relevant /proc/cpuinfo flags, and the kernel level torch dispatches to (``torch.backends.cpu``)."""
    model = None
    if Path("/proc/cpuinfo").is_file():
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), None)
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: None)()
    return {"model": model or platform.processor() or None, "machine": platform.machine(),
            "flags": sorted(_cpu_words() & set(BF16_FLAGS)), "torch_cpu_capability": capability,
            "native_bf16": _cpu_has_bf16()}


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast is native (fast) on ``device``: CUDA with bf16 units, or a CPU with AVX512-BF16 / AMX
    (Linux). Elsewhere it would be emulated and slower than fp32, so peftbench keeps fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_has_bf16()
    return False


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def better(metric: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new < old if metric == "loss" else new > old


@dataclass
class Job:
    """One run's side of training, as :func:`train` takes it (:func:`train_packed` trains several at once).

    ``forward(batch)`` returns ``(logits, labels)``; ``train_batches(epoch)`` yields one item per optimizer step: a
    batch, or a list of micro-batches whose gradients are accumulated (a step cut to bound memory: the update is the
    one of the whole batch); ``evaluate()`` returns validation metrics. ``set_train_mode`` puts the model in training
    mode (methods with a frozen encoder keep it in eval mode). A method may bring its own ``optimizer`` (e.g. LoRA+)
    and an ``after_step(step)`` hook called after each optimizer step (e.g. AdaLoRA's rank allocation)."""

    model: nn.Module
    forward: Callable[[Any], tuple[torch.Tensor, torch.Tensor]]
    train_batches: Callable[[int], Iterable]
    evaluate: Callable[[], dict[str, Any]]
    settings: TrainSettings
    set_train_mode: Callable[[], None] | None = None
    on_epoch: Callable[[dict[str, Any]], None] | None = None
    optimizer: torch.optim.Optimizer | None = None
    after_step: Callable[[int], None] | None = None


class _Run:
    """The training state of one job: its optimizer and schedule, the epoch's running sums, history, best epoch and
    early stopping. One update and one epoch end are the same code whether the job trains alone or packed."""

    def __init__(self, job: Job, device: torch.device):
        s = job.settings
        self.job, self.device = job, device
        self.params = [p for p in job.model.parameters() if p.requires_grad]
        self.optimizer = job.optimizer or make_optimizer(job.model, s.lr, s.weight_decay, device, s.fused_optimizer)
        total = s.epochs * s.steps_per_epoch
        self.scheduler = get_scheduler(s.lr_scheduler, self.optimizer,
                                       num_warmup_steps=int(s.warmup_ratio * total), num_training_steps=total)
        self.history: list[dict[str, Any]] = []
        self.best_epoch, self.best_score, self.best_state, self.bad_epochs, self.step = 0, None, None, 0, 0
        self.best_loss, self.train_time, self.stopped = float("inf"), 0.0, False

    def start_epoch(self) -> None:
        (self.job.set_train_mode or self.job.model.train)()
        self.loss_sum = torch.zeros((), device=self.device)  # accumulated on device: no host sync per step
        self.correct = torch.zeros((), device=self.device, dtype=torch.long)
        self.seen = 0

    def count(self, loss_sum: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += loss_sum.detach()
        self.correct += (logits.detach().argmax(-1) == labels).sum()
        self.seen += len(labels)

    def backward_micro(self, micro_batches: list) -> None:
        """A step cut into micro-batches: summed losses, then the gradient of the mean."""
        n = 0
        for micro in micro_batches:
            with autocast(self.device, self.job.settings.bf16):
                logits, labels = self.job.forward(micro)
            loss = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
            loss.backward()
            self.count(loss, logits, labels)
            n += len(labels)
        torch._foreach_div_([p.grad for p in self.params if p.grad is not None], n)

    def update(self) -> None:
        s = self.job.settings
        if s.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, s.max_grad_norm)
        self.optimizer.step()
        if self.job.after_step:
            self.job.after_step(self.step)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def end_epoch(self, epoch: int, epoch_time: float) -> None:
        """Validate, record the epoch, keep the best weights; ``stopped`` once early stopping ends the job."""
        s = self.job.settings
        self.train_time += epoch_time
        train_loss = self.loss_sum.item() / max(self.seen, 1)
        if not math.isfinite(train_loss):
            raise NonFiniteLoss(f"training loss is {train_loss} in epoch {epoch} (try a lower lr)")
        val = self.job.evaluate()
        row = {"epoch": epoch, "step": self.step, "train_loss": train_loss,
               "train_accuracy": self.correct.item() / max(self.seen, 1),
               "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_f1_macro": val["f1_macro"],
               "val_f1_weighted": val["f1_weighted"], "epoch_time_s": epoch_time,
               "examples_per_s": self.seen / epoch_time, "lr": self.scheduler.get_last_lr()[0]}
        self.history.append(row)
        if self.job.on_epoch:
            self.job.on_epoch(row)
        score = val[s.metric_for_best]
        # A tie on the selection metric keeps the epoch with the lower validation loss (the better-calibrated one).
        tie = self.best_score is not None and score == self.best_score and val["loss"] < self.best_loss
        if better(s.metric_for_best, score, self.best_score) or tie:
            self.best_score, self.best_loss, self.best_epoch, self.bad_epochs = score, val["loss"], epoch, 0
            self.best_state = {n: p.detach().clone() for n, p in self.job.model.named_parameters() if p.requires_grad}
        else:
            self.bad_epochs += 1
            self.stopped = bool(s.early_stopping_patience and self.bad_epochs >= s.early_stopping_patience)
        self.stopped = self.stopped or epoch == s.epochs

    def finish(self) -> tuple[list[dict], int, float]:
        """The best validation epoch's weights put back; (history, best epoch, training seconds)."""
        if self.best_state is not None and self.best_epoch != len(self.history):
            with torch.no_grad():
                for n, p in self.job.model.named_parameters():
                    if n in self.best_state:
                        p.copy_(self.best_state[n])
        return self.history, self.best_epoch, self.train_time


def train(model: nn.Module, forward: Callable[[Any], torch.Tensor], train_batches: Callable[[int], Iterable],
          evaluate: Callable[[], dict[str, Any]], s: TrainSettings, device: torch.device,
          set_train_mode: Callable[[], None] | None = None,
          on_epoch: Callable[[dict[str, Any]], None] | None = None,
          optimizer: torch.optim.Optimizer | None = None,
          after_step: Callable[[int], None] | None = None) -> tuple[list[dict], int, float]:
    """Train ``model``; returns (per-epoch history, best epoch, training seconds excluding evaluation). The
    arguments are those of :class:`Job`. The weights of the best validation epoch are restored before returning.
    """
    run = _Run(Job(model, forward, train_batches, evaluate, s, set_train_mode, on_epoch, optimizer, after_step), device)
    for epoch in range(1, s.epochs + 1):
        run.start_epoch()
        start = time.perf_counter()
        for batch in train_batches(epoch):
            if isinstance(batch, list):
                run.backward_micro(batch)
            else:
                with autocast(device, s.bf16):
                    logits, labels = forward(batch)
                loss = nn.functional.cross_entropy(logits.float(), labels)
                loss.backward()
                run.count(loss * len(labels), logits, labels)
            run.update()
        run.end_epoch(epoch, time.perf_counter() - start)
        if run.stopped:
            break
    return run.finish()


def train_packed(jobs: list[Job], forward: Callable[[list[int], list[Any]], list[tuple[torch.Tensor, torch.Tensor]]],
                 device: torch.device) -> list[tuple[list[dict], int, float] | Exception]:
    """Train several jobs in one forward/backward pass per step (:mod:`peftbench.packing`).

    ``forward(indices, batches)`` returns each listed job's ``(logits, labels)`` for its batch. The loss whose gradient
    is taken is the sum of the jobs' mean cross-entropies: a job's parameters touch only its own logits, so each gets
    exactly its own loss's gradient, then its own clipping, optimizer step and schedule. Every job yields the same
    number of steps per epoch, and all share ``bf16``. An epoch's wall time is shared equally by the jobs it trained.
    A job that stops early (patience) or fails at its epoch's end (a non-finite loss, an error in its evaluation or
    epoch hook: that job's result is the exception) leaves the pack; the others go on. A failure of the shared step
    itself (e.g. out of memory) ends the jobs still training, not those already finished. Returns, per job, what
    :func:`train` returns, or the exception that ended it (its traceback dropped, so its frames are freed)."""
    runs: list[_Run] = [_Run(job, device) for job in jobs]
    failed: dict[int, BaseException] = {}
    bf16 = jobs[0].settings.bf16
    for epoch in range(1, max(job.settings.epochs for job in jobs) + 1):
        active = [i for i, run in enumerate(runs) if not run.stopped and i not in failed]
        if not active:
            break
        for i in active:
            runs[i].start_epoch()
        start = time.perf_counter()
        try:
            for batches in zip(*(jobs[i].train_batches(epoch) for i in active), strict=True):
                with autocast(device, bf16):
                    outputs = forward(active, list(batches))
                losses = [nn.functional.cross_entropy(logits.float(), labels) for logits, labels in outputs]
                torch.stack(losses).sum().backward()
                for i, loss, (logits, labels) in zip(active, losses, outputs):
                    runs[i].count(loss * len(labels), logits, labels)
                    runs[i].update()
        except (Exception, torch.cuda.OutOfMemoryError) as e:  # noqa: B014 - the step of every active job
            failed.update({i: e.with_traceback(None) for i in active})
            continue
        share = (time.perf_counter() - start) / len(active)
        for i in active:
            try:
                runs[i].end_epoch(epoch, share)
            except (Exception, torch.cuda.OutOfMemoryError) as e:  # noqa: B014 - this job's alone
                failed[i] = e.with_traceback(None)
    return [failed[i] if i in failed else run.finish() for i, run in enumerate(runs)]


@torch.no_grad()
def predict(forward: Callable[[Any], torch.Tensor], batches: Iterable, device: torch.device,
            bf16: bool = False) -> torch.Tensor:
    """Class probabilities for every batch, concatenated in batch order. One autocast region for all batches: its
    cache casts each trainable fp32 weight (full fine-tuning, unmerged adapters) to bf16 once, not once a batch."""
    out = []
    with autocast(device, bf16):
        for batch in batches:
            logits, _ = forward(batch)
            out.append(torch.softmax(logits.float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros((0, 0))
