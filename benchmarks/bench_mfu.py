"""How close does peftbench get to this machine's own limit? MFU (model FLOPs utilisation) against the CPU's measured
matmul peak, where a step's time goes (torch.profiler), and what each fast-path switch buys. One process, ratios
measured side by side.

Sections:

  peak      this machine's matmul throughput in bf16 and fp32 (torch.matmul, the threads peftbench uses): at a large
            square-ish shape (4096×1024 · 1024×1024) and at each model's own GEMM shapes (a training batch's tokens ×
            hidden → hidden, → FFN, FFN → hidden); the model-shape peak is their FLOP-weighted time average
  runs      peftbench runs (``runner.execute_run``, as ``peftbench run`` does) of MiniLM on the demo's data and
            lengths, and of the distilroberta-base-sized random model, ``today`` (the switches off) and ``fast``
            (``bf16_weights`` + ``fast_dropout``) in ABBA order over seeds: training and prediction FLOP/s from each
            run's result.json (``peftbench.flops``) and MFU against the bf16 model-shape peak
  verdict   the MiniLM LoRA runs of both paths (3 seeds each) through the report's own verdict machinery
            (``verdict.judge`` at the demo's margin of 2 points, both directions: equivalent when each is
            non-inferior to the other)
  ablation  MiniLM LoRA runs with no switch, each switch alone and both (2 seeds; A B C D, then D C B A)
  profile   torch.profiler of LoRA training steps on MiniLM (demo lengths, batch 32): self CPU time by operator,
            today and with each switch
  pack      MiniLM LoRA (fast switches) trained one run at a time vs 3 runs packed into one forward/backward
            (``train.pack_runs``): ex/s and MFU of 2 × 3 seeds each (solo, packed, packed, solo), the two paths'
            accuracy through the verdict machinery, and a profile of a packed step vs the same 3 solo steps

Usage::

    python benchmarks/bench_mfu.py --json docs/benchmark-results/DATE-mfu.json     # ~15 min on 2 idle cores
    python benchmarks/bench_mfu.py --quick                                          # every section, small sizes
    python benchmarks/bench_mfu.py --device cuda --sections peak,runs               # the same on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_speed as bs  # noqa: E402  (sets OMP_WAIT_POLICY before torch loads)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from peftbench import dropout, methods, packing  # noqa: E402
from peftbench.config import expand_runs, validate_study  # noqa: E402
from peftbench.data import collate, make_batches, tokenize  # noqa: E402
from peftbench.engine import bf16_supported  # noqa: E402
from peftbench.environment import set_threads  # noqa: E402
from peftbench.models import build_classifier, load_tokenizer  # noqa: E402
from peftbench.report import verdict  # noqa: E402
from peftbench.runner import execute_run, execute_runs, get_splits  # noqa: E402
from peftbench.store import Store  # noqa: E402

SECTIONS = ("peak", "runs", "verdict", "ablation", "profile", "pack")
MARGIN = 2.0  # points: the demo study's non-inferiority margin
FAST = {"bf16_weights": True, "fast_dropout": True}
SWITCHES = {"today": {}, "bf16_weights": {"bf16_weights": True}, "fast_dropout": {"fast_dropout": True},
            "fast": FAST}
DEMO_DATA = {"source": "builtin:rotten_tomatoes", "test_fraction": 0.4, "max_validation": 500}
DEMO_TRAIN = {"epochs": 2, "batch_size": 32, "warmup_ratio": 0.1, "weight_decay": 0.01, "max_length": 64}
ARMS = {"lora": {"method": "lora", "r": 4, "lora_alpha": "2r", "lora_dropout": 0.1, "lr": 2e-3},
        "full": {"method": "full", "lr": 5e-5}, "frozen": {"method": "frozen", "lr": 2e-3, "epochs": 10}}
SIZES = {"minilm_train": 2000, "big_train": 384, "big_test": 128, "seeds": 3, "profile_steps": 12, "reps": 20}
QUICK = {"minilm_train": 128, "big_train": 32, "big_test": 32, "seeds": 3, "profile_steps": 3, "reps": 3}


# --------------------------------------------------------------------------------------------------------------------
# peak
# --------------------------------------------------------------------------------------------------------------------


def matmul_flops(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, reps: int) -> float:
    """Best-of-rounds FLOP/s of an (m×k)·(k×n) matmul."""
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * m * k * n / best


def model_shapes(hidden: int, ffn: int, tokens: int) -> list[tuple[int, int, int, int]]:
    """(m, k, n, count per layer) of one encoder layer's GEMMs on a batch of ``tokens`` tokens."""
    return [(tokens, hidden, hidden, 4), (tokens, hidden, ffn, 1), (tokens, ffn, hidden, 1)]


def batch_tokens(data: dict, max_length: int, batch_size: int = 32) -> int:
    """Real tokens of a mean training batch of ``data`` (MiniLM's tokenizer, which both models use here)."""
    splits = get_splits(bs.dataset_defaults(name="data", **data))
    ids = tokenize(splits.train["text"].tolist(), load_tokenizer(bs.MINILM), max_length)
    return int(round(batch_size * np.mean([len(x) for x in ids])))


def section_peak(device: torch.device, reps: int, tokens: dict[str, int]) -> dict:
    out = {"large": {}, "models": {}}
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        out["large"][name] = matmul_flops(4096, 1024, 1024, dtype, device, reps)
        bs.log(f"peak {name} 4096x1024x1024: {out['large'][name] / 1e12:.2f} TFLOP/s")
        for model, (hidden, ffn) in {"MiniLM": (384, 1536), "82M": (768, 3072)}.items():
            shapes = model_shapes(hidden, ffn, tokens[model])
            per = {f"{m}x{k}x{n}": matmul_flops(m, k, n, dtype, device, reps) for m, k, n, _ in shapes}
            flops = [2 * m * k * n * c for m, k, n, c in shapes]
            seconds = [f / per[f"{m}x{k}x{n}"] for f, (m, k, n, _) in zip(flops, shapes)]
            out["models"].setdefault(model, {})[name] = {"shapes": per, "model_shape_peak": sum(flops) / sum(seconds),
                                                         "tokens": tokens[model]}
            bs.log(f"peak {name} {model} shapes ({tokens[model]} tokens): "
                   f"{sum(flops) / sum(seconds) / 1e12:.2f} TFLOP/s")
    return out


# --------------------------------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------------------------------


def study(model: str, data: dict, train: dict, arms: dict[str, dict], seeds: list[int]) -> dict[tuple, object]:
    """The runs of a one-model one-dataset study: {(arm, seed): RunConfig}, arms named ``<method> <switches>``."""
    raw = {"name": "mfu", "models": [model], "datasets": {"data": data}, "seeds": seeds, "train": train,
           "arms": [{**spec, "name": name} for name, spec in arms.items()]}
    named = lambda label: next(n for n in arms if label == n or label.startswith(n + " "))  # noqa: E731 ("lora today r=4")
    return {(named(r.arm), r.seed): r for r in expand_runs(validate_study(raw))}


def abba(pairs: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """A, B, B, A, A, B... over seeds: each adjacent pair has both paths, so a drift in load cancels."""
    order = []
    for i, seed in enumerate(seeds):
        first, second = pairs if i % 2 == 0 else pairs[::-1]
        order += [(first, seed), (second, seed)]
    return order


def execute(runs: dict, order: list[tuple[str, int]], store: Store, device: torch.device) -> dict:
    rows = {}
    for arm, seed in order:
        bs.log(f"run {arm} seed {seed}")
        rows[(arm, seed)] = row(arm, seed, execute_run(runs[(arm, seed)], store, device))
    return rows


def row(arm: str, seed: int, result: dict) -> dict:
    """The numbers of one finished run."""
    if result["status"] != "success":
        raise RuntimeError(f"{arm}: {result['error']}")
    c = result["costs"]
    return {"arm": arm, "seed": seed, "train_examples_per_s": c["train_examples_per_s"],
            "train_time_s": c["train_time_s"], "train_flops": c["train_flops"],
            "train_flops_per_s": c["train_flops_per_s"], "eval_flops_per_s": c["eval_flops_per_s"],
            "eval_examples_per_s": c["eval_examples_per_s"],
            "test_accuracy": result["metrics"]["test"]["accuracy"], "load": os.getloadavg()[0],
            "padding_pct": result["speed"]["padding_pct"], "run_id": result["run_id"], "speed": result["speed"]}


def section_runs(sizes: dict, store: Store, device: torch.device, big_model: str) -> dict:
    seeds = list(range(sizes["seeds"]))
    minilm = {"train": {**DEMO_TRAIN}, "data": {**DEMO_DATA, "max_train": sizes["minilm_train"]}}
    if sizes is QUICK:
        minilm["data"]["max_test"] = 64
    big = {"train": {**DEMO_TRAIN, "epochs": 1, "max_length": 128},
           "data": {"source": str(bs.SHARED / "twitter_financial_news"), "max_train": sizes["big_train"],
                    "max_validation": 64, "max_test": sizes["big_test"]}}
    out = {}
    for model_name, model, setup, arms, n_seeds in (("MiniLM", bs.MINILM, minilm, ("lora", "full", "frozen"), None),
                                                    ("82M", big_model, big, ("lora", "full"), 2)):
        arm_specs = {f"{a} {path}": {**ARMS[a], **(FAST if path == "fast" else {})} for a in arms
                     for path in ("today", "fast")}
        runs = study(model, setup["data"], setup["train"], arm_specs, seeds)
        for a in arms:
            s = seeds[:n_seeds] if n_seeds else (seeds if a == "lora" else seeds[:2])
            rows = execute(runs, abba([f"{a} today", f"{a} fast"], s), store, device)
            out.setdefault(model_name, {}).update({f"{arm} seed {seed}": r for (arm, seed), r in rows.items()})
    return out


def summarise(runs: dict, peak: dict | None) -> dict:
    """Mean per arm and path; MFU against the bf16 (or fp32, without bf16) model-shape peak."""
    out = {}
    for model, rows in runs.items():
        frame = pd.DataFrame(rows.values())
        for arm, g in frame.groupby("arm", sort=False):
            bf16 = bool(g["speed"].iloc[0]["bf16"])
            key = "bfloat16" if bf16 else "float32"
            p = peak["models"][model.split()[0]][key]["model_shape_peak"] if peak else None
            mean = g[["train_examples_per_s", "train_flops_per_s", "eval_flops_per_s", "test_accuracy",
                      "padding_pct", "load"]].mean()
            out.setdefault(model, {})[arm] = {**mean.to_dict(), "runs": len(g), "peak_dtype": key,
                                              "train_mfu": mean["train_flops_per_s"] / p if p else None,
                                              "eval_mfu": mean["eval_flops_per_s"] / p if p else None}
        for method in {a.split()[0] for a in out[model]}:
            today, fast = out[model].get(f"{method} today"), out[model].get(f"{method} fast")
            if today and fast:
                out[model][f"{method}: fast / today, train ex/s"] = (fast["train_examples_per_s"]
                                                                     / today["train_examples_per_s"])
    return out


def section_ablation(sizes: dict, store: Store, device: torch.device) -> dict:
    """MiniLM LoRA on the demo's data with each switch of :data:`SWITCHES` (none, each alone, both), two seeds, in
    the order A B C D for the first seed and D C B A for the second, so a drift in load cancels in every pair."""
    minilm = {**DEMO_DATA, "max_train": sizes["minilm_train"], **({"max_test": 64} if sizes is QUICK else {})}
    arm_specs = {f"lora {name}": {**ARMS["lora"], **switch} for name, switch in SWITCHES.items()}
    runs = study(bs.MINILM, minilm, {**DEMO_TRAIN}, arm_specs, [0, 1])
    names = list(arm_specs)
    order = [(arm, 0) for arm in names] + [(arm, 1) for arm in reversed(names)]
    return {f"{arm} seed {seed}": r for (arm, seed), r in execute(runs, order, store, device).items()}


# --------------------------------------------------------------------------------------------------------------------
# verdict: the two paths' LoRA runs, through the report's machinery
# --------------------------------------------------------------------------------------------------------------------


def section_verdict(rows: dict, store: Store, reference: str = "lora today", candidate: str = "lora fast") -> dict:
    """``candidate``'s runs against ``reference``'s, paired on seeds and test examples, both directions."""
    preds = {}
    for r in rows.values():
        if r["arm"] in (reference, candidate):
            preds.setdefault(r["arm"], {})[r["seed"]] = pd.read_parquet(store.root / r["run_id"] / "predictions.parquet")
    ref, cand = preds[reference], preds[candidate]
    keep = ("verdict", "diff_points", "ci_low", "ci_high", "seeds", "n_examples")
    a = verdict.judge(ref, cand, margin=MARGIN, num_labels=2)
    b = verdict.judge(cand, ref, margin=MARGIN, num_labels=2)
    short = lambda arm: arm.split()[-1]  # noqa: E731
    return {f"{short(candidate)} vs {short(reference)}": {k: a.get(k) for k in keep},
            f"{short(reference)} vs {short(candidate)}": {k: b.get(k) for k in keep},
            "margin": MARGIN, "no detectable difference": bool(a["ci_low"] <= 0 <= a["ci_high"]),
            "equivalent within the margin": a["verdict"] in ("non-inferior", "superior")
            and b["verdict"] in ("non-inferior", "superior")}


# --------------------------------------------------------------------------------------------------------------------
# pack: LoRA runs trained alone vs packed (train.pack_runs), runs, accuracy and profile
# --------------------------------------------------------------------------------------------------------------------


def section_pack(sizes: dict, store: Store, device: torch.device) -> dict:
    """MiniLM LoRA on the demo's data with the fast switches, ``solo`` (one run at a time) and ``packed`` (3 runs
    per forward/backward, ``train.pack_runs = 3``), in the order solo, packed, packed, solo over two sets of seeds;
    the two paths' accuracy through the verdict machinery; a profile of one packed step vs the same 3 solo steps."""
    n = sizes["seeds"]
    seeds = list(range(2 * n))
    data = {**DEMO_DATA, "max_train": sizes["minilm_train"], **({"max_test": 64} if sizes is QUICK else {})}
    lora = {**ARMS["lora"], **FAST}
    runs = study(bs.MINILM, data, {**DEMO_TRAIN}, {"lora solo": lora, "lora packed": {**lora, "pack_runs": n}},
                 seeds)
    rows = {}
    for arm, chunk in (("lora solo", seeds[:n]), ("lora packed", seeds[:n]), ("lora packed", seeds[n:]),
                       ("lora solo", seeds[n:])):
        bs.log(f"{arm}: seeds {chunk}")
        if arm == "lora solo":
            rows.update(execute(runs, [(arm, seed) for seed in chunk], store, device))
        else:
            results = execute_runs([runs[(arm, seed)] for seed in chunk], store, device)
            rows.update({(arm, seed): row(arm, seed, r) for seed, r in zip(chunk, results)})
    assert all(r["speed"]["packing"]["runs"] == n for r in rows.values() if r["arm"] == "lora packed")
    out = {"rows": {f"{r['arm']} seed {r['seed']}": {k: v for k, v in r.items() if k != "speed"}
                    for r in rows.values()},
           "verdict": section_verdict(rows, store, "lora solo", "lora packed"), "raw": {"MiniLM packing": rows}}
    out["profile"] = profile_pack(sizes, device, n)
    return out


def profile_pack(sizes: dict, device: torch.device, n: int) -> dict:
    """torch.profiler of ``profile_steps`` packed steps of ``n`` LoRA runs vs the same steps run one run at a time."""
    ids, y, pad_id = profile_data()
    bf16 = bf16_supported(device)
    models = [profile_model(k, FAST, device) for k in range(n)]
    orders = [make_batches([len(x) for x in ids], 32, True, k)[: sizes["profile_steps"] + 2] for k in range(n)]
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, fused=True) for m in models]
    pack = packing.Pack(models, "lora")

    def inputs(k, t):
        return {key: v.to(device) for key, v in collate(ids, orders[k][t], pad_id).items()}

    def update():
        for m, opt in zip(models, opts):
            torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    def solo(t):
        for k, m in enumerate(models):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = m(**inputs(k, t)).logits
            torch.nn.functional.cross_entropy(logits.float(), y[orders[k][t]].to(device)).backward()
        update()

    def packed(t):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = pack.forward(list(range(n)), [inputs(k, t) for k in range(n)])
        sum(torch.nn.functional.cross_entropy(lg.float(), y[orders[k][t]].to(device))
            for k, lg in enumerate(logits)).backward()
        update()

    return {name: profiled(step, sizes["profile_steps"], device, f"pack profile {name} ({n} runs)")
            for name, step in (("solo", solo), ("packed", packed))}


# --------------------------------------------------------------------------------------------------------------------
# profile
# --------------------------------------------------------------------------------------------------------------------


def profile_data() -> tuple[list[list[int]], torch.Tensor, int]:
    """The profiles' data: the demo's 2,000 training texts as MiniLM token ids (64 at most), labels, padding id."""
    splits = get_splits({**bs.dataset_defaults(name="rt", **DEMO_DATA), "max_train": 2000})
    tokenizer = load_tokenizer(bs.MINILM)
    ids = tokenize(splits.train["text"].tolist(), tokenizer, 64)
    return ids, torch.tensor(splits.train["label"].to_numpy()), tokenizer.pad_token_id


def profile_model(seed: int, switch: dict, device: torch.device) -> torch.nn.Module:
    """The demo's LoRA r=4 on MiniLM, in training mode, with the fast-path ``switch`` applied as the runner does."""
    torch.manual_seed(seed)
    model = methods.prepare("lora", build_classifier(bs.MINILM, 2),
                            {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": "auto",
                             "bias": "none"}).to(device).train()
    if switch.get("bf16_weights") and bf16_supported(device):
        methods.hold_frozen_in_bf16(model)
    if switch.get("fast_dropout"):
        dropout.use_fast_dropout(model, device)
    return model


def section_profile(sizes: dict, device: torch.device) -> dict:
    ids, y, pad_id = profile_data()
    batches = make_batches([len(x) for x in ids], 32, True, 0)[: sizes["profile_steps"] + 2]
    bf16 = bf16_supported(device)
    out = {}
    for name, switch in SWITCHES.items():
        model = profile_model(0, switch, device)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)

        def step(b):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(**{k: v.to(device) for k, v in collate(ids, b, pad_id).items()}).logits
            torch.nn.functional.cross_entropy(logits.float(), y[b].to(device)).backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        out[name] = profiled(lambda t: step(batches[t]), len(batches) - 2, device, f"profile {name}")
    return out


def profiled(step, steps: int, device: torch.device, label: str) -> dict:
    """``step(t)`` for t = 0, 1 (warm-up) then ``steps`` more under torch.profiler: self CPU time by operator."""
    from torch.profiler import ProfilerActivity, profile

    step(0)
    step(1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        for i in range(2, 2 + steps):
            step(i)
    wall = (time.perf_counter() - t) / steps
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    out = {"ms_per_step_profiled": 1000 * wall,
           "top_ops_pct": {e.key: 100 * e.self_cpu_time_total / total for e in top},
           "matmul_pct": 100 * sum(e.self_cpu_time_total for e in events
                                   if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                                                "aten::_scaled_dot_product_flash_attention_for_cpu")) / total}
    bs.log(f"{label}: {1000 * wall:.0f} ms/step; " + ", ".join(
        f"{k} {v:.0f}%" for k, v in list(out["top_ops_pct"].items())[:4]))
    return out


# --------------------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------------------


def report(results: dict) -> str:
    out = []
    peak = results.get("peak")
    if peak:
        out += ["### matmul peak of this machine (TFLOP/s)", "", "| shape | bf16 | fp32 |", "|---|---|---|",
                f"| 4096×1024 · 1024×1024 | {peak['large']['bfloat16'] / 1e12:.2f} | "
                f"{peak['large']['float32'] / 1e12:.2f} |"]
        for model, d in peak["models"].items():
            out.append(f"| {model} GEMMs ({d['bfloat16']['tokens']} tokens), FLOP-weighted | "
                       f"{d['bfloat16']['model_shape_peak'] / 1e12:.2f} | {d['float32']['model_shape_peak'] / 1e12:.2f} |")
        out.append("")
    for model, arms in results.get("summary", {}).items():
        out += [f"### {model}: achieved FLOP/s and MFU (mean over runs; MFU vs the bf16 model-shape peak)", "",
                "| arm | runs | train ex/s | train TFLOP/s | train MFU | predict TFLOP/s | predict MFU | test acc | "
                "load |", "|---|---|---|---|---|---|---|---|---|"]
        ratios = []
        for arm, r in arms.items():
            if not isinstance(r, dict):
                ratios.append(f"- {arm}: **{r:.2f}**")
                continue
            pct = (lambda v: f"{100 * v:.1f}%" if v is not None else "—")
            out.append(f"| {arm} | {r['runs']} | {r['train_examples_per_s']:.1f} | {r['train_flops_per_s'] / 1e12:.3f} "
                       f"| {pct(r['train_mfu'])} | {r['eval_flops_per_s'] / 1e12:.3f} | {pct(r['eval_mfu'])} | "
                       f"{r['test_accuracy']:.4f} | {r['load']:.1f} |")
        out += [""] + ratios + [""]
    if "verdict" in results:
        v = results["verdict"]
        for k in ("fast vs today", "today vs fast"):
            d = v[k]
            out.append(f"- LoRA {k}: Δ {d['diff_points']:+.2f} points, CI [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}] over "
                       f"{d['seeds']} seeds × {d['n_examples']} test examples: {d['verdict']}")
        out += [f"- no detectable difference (the interval covers 0): **{v['no detectable difference']}**; "
                f"equivalent within ±{v['margin']:g} points (each non-inferior to the other): "
                f"**{v['equivalent within the margin']}**", ""]
    if "ablation_summary" in results:
        out += ["### ablation: MiniLM LoRA with each switch (2 seeds, A B C D then D C B A)", "",
                "| switches | runs | train ex/s | vs today | train MFU | predict MFU | test acc | load |",
                "|---|---|---|---|---|---|---|---|"]
        arms = results["ablation_summary"]["MiniLM ablation"]
        base = arms["lora today"]["train_examples_per_s"]
        for arm, r in arms.items():
            if isinstance(r, dict):
                pct = (lambda v: f"{100 * v:.1f}%" if v is not None else "—")
                out.append(f"| {arm.removeprefix('lora ')} | {r['runs']} | {r['train_examples_per_s']:.1f} | "
                           f"{r['train_examples_per_s'] / base:.2f}× | {pct(r['train_mfu'])} | {pct(r['eval_mfu'])} | "
                           f"{r['test_accuracy']:.4f} | {r['load']:.1f} |")
        out.append("")
    if "profile" in results:
        out += ["### where a LoRA training step's time goes (MiniLM, batch 32, demo lengths; % of self CPU time)", ""]
        for name, d in results["profile"].items():
            ops = ", ".join(f"`{k}` {v:.0f}%" for k, v in d["top_ops_pct"].items())
            out.append(f"- **{name}** ({d['ms_per_step_profiled']:.0f} ms/step under the profiler; all matmuls "
                       f"{d['matmul_pct']:.0f}%): {ops}")
        out.append("")
    if "pack" in results:
        pk = results["pack"]
        out += ["### packing: MiniLM LoRA alone vs 3 runs per forward/backward (train.pack_runs)", "",
                "| arm | runs | train ex/s | train MFU | test acc | load |", "|---|---|---|---|---|---|"]
        for arm, r in pk["summary"]["MiniLM packing"].items():
            if isinstance(r, dict):
                mfu = f"{100 * r['train_mfu']:.1f}%" if r["train_mfu"] is not None else "—"
                out.append(f"| {arm} | {r['runs']} | {r['train_examples_per_s']:.1f} | {mfu} | "
                           f"{r['test_accuracy']:.4f} | {r['load']:.1f} |")
        s = pk["summary"]["MiniLM packing"]
        out += ["", f"- packed / solo, train ex/s: **{s['lora packed']['train_examples_per_s'] / s['lora solo']['train_examples_per_s']:.2f}**"]
        for k in ("packed vs solo", "solo vs packed"):
            d = pk["verdict"][k]
            out.append(f"- LoRA {k}: Δ {d['diff_points']:+.2f} points, CI [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}] "
                       f"over {d['seeds']} seeds × {d['n_examples']} test examples: {d['verdict']}")
        for name, d in pk["profile"].items():
            ops = ", ".join(f"`{k}` {v:.0f}%" for k, v in d["top_ops_pct"].items())
            out.append(f"- profile **{name}** ({d['ms_per_step_profiled']:.0f} ms per 3 runs' step under the "
                       f"profiler; all matmuls {d['matmul_pct']:.0f}%): {ops}")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: checks every section runs")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--json", type=Path, help="also write every number to this JSON file")
    args = ap.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    sizes, device = (QUICK if args.quick else SIZES), torch.device(args.device)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    if set(wanted) - set(SECTIONS):
        ap.error(f"unknown section(s): {', '.join(sorted(set(wanted) - set(SECTIONS)))}")
    set_threads()
    results: dict = {"machine": bs.machine(), "command": " ".join([Path(sys.executable).name] + sys.argv),
                     "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "sizes": sizes}
    bs.log(f"machine: {json.dumps({k: v for k, v in results['machine'].items() if k != 'packages'})}")
    started = time.perf_counter()

    def save():
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1, default=str))

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store")
        big = str(bs.make_distilroberta_sized(Path(tmp) / "distilroberta-sized"))
        if "runs" in wanted or "verdict" in wanted:
            raw = section_runs(sizes, store, device, big)
            results["runs"] = {m: {k: {kk: vv for kk, vv in r.items() if kk != "speed"} for k, r in rows.items()}
                               for m, rows in raw.items()}
            save()
        if "peak" in wanted:
            tokens = {"MiniLM": batch_tokens({**DEMO_DATA, "max_train": 2000}, 64),
                      "82M": batch_tokens({"source": str(bs.SHARED / "twitter_financial_news"), "max_train": 2000}, 128)}
            results["peak"] = section_peak(device, sizes["reps"], tokens)
            save()
        if "runs" in results:
            results["summary"] = summarise(raw, results.get("peak"))
        if "verdict" in wanted:
            results["verdict"] = section_verdict(raw["MiniLM"], store)
        if "ablation" in wanted:
            raw_ablation = {"MiniLM ablation": section_ablation(sizes, Store(Path(tmp) / "ablation"), device)}
            results["ablation"] = {k: {kk: vv for kk, vv in r.items() if kk != "speed"}
                                   for k, r in raw_ablation["MiniLM ablation"].items()}
            results["ablation_summary"] = summarise(raw_ablation, results.get("peak"))
            save()
        if "profile" in wanted:
            results["profile"] = section_profile(sizes, device)
        if "pack" in wanted:
            pack = section_pack(sizes, store, device)
            results["pack"] = {**{k: v for k, v in pack.items() if k != "raw"},
                               "summary": summarise(pack["raw"], results.get("peak"))}
            save()
        results["total_s"] = time.perf_counter() - started
        save()
    print("\n" + report(results) + f"\ntotal {results['total_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
