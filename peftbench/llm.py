"""Classify texts with a chat-completions endpoint (OpenAI, vLLM, llama.cpp server, Ollama, ...): the ``llm`` arm.

The pieces, top to bottom: prompts (pure), reply parsing (pure), one HTTP call with retries and an on-disk response
cache, and :func:`classify` that ties them together over a thread pool. Only the standard library speaks HTTP.

The API key is read from ``os.environ[api_key_env]`` at request time and only ever placed in the ``Authorization``
header: it is not part of the cache key, the cache files, the returned usage, log lines or exception messages.

Example (against a local server, e.g. ``vllm serve Qwen/Qwen2.5-1.5B-Instruct``)::

    >>> from peftbench.llm import LLMSettings, classify
    >>> out = classify(["a good film", "a dull film"], ["negative", "positive"],
    ...                LLMSettings(base_url="http://localhost:8000/v1", model="Qwen/Qwen2.5-1.5B-Instruct"),
    ...                cache_dir=None)                                          # doctest: +SKIP
    >>> out.preds                                                               # doctest: +SKIP
    array([1, 0])
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import logging
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from peftbench.fields import ConfigError, Field, by_name, check_value

log = logging.getLogger(__name__)

INVALID = -1  # prediction of a text whose reply could not be parsed into one of the labels
RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_BACKOFF_S = 60.0


def _parse_model(where: str, value: Any) -> str:
    value = check_value(where, str, value)
    if not value:
        raise ConfigError(f"{where}: expected the model name the endpoint serves (e.g. gpt-4o-mini or llama3.1:8b)")
    return value


# The ``llm`` arm's parameters (``peftbench.methods``' ``llm`` method takes them as they are).
LLM_FIELDS: dict[str, Field] = by_name(
    Field("base_url", str, "http://localhost:8000/v1",
          "OpenAI-compatible endpoint; requests go to {base_url}/chat/completions"),
    Field("model", str, "", "model name the endpoint serves (gpt-4o-mini, llama3.1:8b, Qwen/Qwen2.5-7B-Instruct, ...)",
          parse=_parse_model),
    Field("api_key_env", str, "OPENAI_API_KEY", "environment variable holding the API key (unset: no Authorization "
          "header)"),
    Field("shots", int, 0, "examples per class shown before the texts, drawn from train with the seed (0 = "
          "zero-shot)", minimum=0),
    Field("batch_size", int, 10, "texts per request, numbered; the reply must give one numbered label per text",
          minimum=1),
    Field("truncate", int, 500, "characters of each text kept (0 = whole text; a sentence pair: of each of its texts)",
          minimum=0),
    Field("truncate_side", str, "last", "which characters truncate keeps: first or last (reviews end with the "
          "verdict)", choices=("first", "last")),
    Field("max_concurrency", int, 4, "requests in flight at once", minimum=1),
    Field("timeout_s", float, 60.0, "seconds to wait for one reply before retrying", minimum=0,
          exclusive_minimum=True),
    Field("max_retries", int, 4, "retries of a request after a 429, 5xx, timeout or connection error", minimum=0),
    Field("retry_delay_s", float, 1.0, "first backoff delay; doubles on every retry (a longer Retry-After wins)",
          minimum=0),
    Field("price_per_1k_input", float, 0.0, "USD per 1000 prompt tokens, for the estimated cost", minimum=0),
    Field("price_per_1k_output", float, 0.0, "USD per 1000 completion tokens, for the estimated cost", minimum=0),
    Field("max_test", "int?", None, "classify a stratified subsample of this many test texts (fixed across seeds)",
          minimum=1),
)

# What classify needs of them: all but the test subsample, which the baseline draws (peftbench.baselines.run_llm).
SETTINGS = tuple(name for name in LLM_FIELDS if name != "max_test")


def _from_params(cls, params: dict[str, Any]) -> "LLMSettings":
    """The settings among an ``llm`` arm's parameters (others ignored)."""
    return cls(**{k: v for k, v in params.items() if k in SETTINGS})


# The ``llm`` arm's settings as a dataclass, generated from LLM_FIELDS (their defaults; docs there).
LLMSettings = dataclasses.make_dataclass(
    "LLMSettings", [(name, Any, dataclasses.field(default=LLM_FIELDS[name].default)) for name in SETTINGS],
    namespace={"from_params": classmethod(_from_params),
               "__doc__": "The ``llm`` arm's settings: the fields of ``LLM_FIELDS`` but ``max_test``.",
               "__module__": __name__})


@dataclass
class Usage:
    """Counters of one :func:`classify` call (thread-safe through ``add``)."""

    requests: int = 0          # HTTP requests sent (retried attempts included)
    cached_requests: int = 0   # replies served from the on-disk cache (no request sent)
    retries: int = 0           # HTTP attempts repeated after a 429 / 5xx / timeout / connection error
    reasked: int = 0           # texts asked again on their own after an unparseable batch reply
    prompt_tokens: int = 0     # over every reply used, cached ones included (what a fresh run would pay)
    completion_tokens: int = 0
    new_prompt_tokens: int = 0      # only replies fetched over the network in this call
    new_completion_tokens: int = 0
    replies_without_usage: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if not k.startswith("_")}


@dataclass
class LLMOutput:
    preds: np.ndarray                       # class id per text, INVALID (-1) when no label could be parsed
    usage: Usage
    replies: list[str]                      # the raw reply text that decided each prediction
    system_prompt: str
    shot_examples: list[tuple[Item, str]]   # (text as shown, label) of the few-shot examples


class LLMError(RuntimeError):
    """The endpoint could not be reached or refused the request (after retries). The message never holds the key."""


# --------------------------------------------------------------------------------------------------------------------
# Prompts (pure)
# --------------------------------------------------------------------------------------------------------------------


# What is classified: a text, or a sentence pair's two texts (shown labelled with ``part_names``).
Item = str | tuple[str, str]


def clip_text(text: str, n: int, side: str = "last") -> str:
    """Whitespace collapsed to single spaces (one text = one line), then the first or last ``n`` characters
    (``n <= 0``: the whole text)."""
    text = " ".join(str(text).split())
    if n <= 0 or len(text) <= n:
        return text
    return text[:n] if side == "first" else text[-n:]


def clip_item(item: Item, n: int, side: str = "last") -> Item:
    """:func:`clip_text` of a text, or of each text of a pair."""
    return clip_text(item, n, side) if isinstance(item, str) else tuple(clip_text(t, n, side) for t in item)


def part_label(name: str) -> str:
    """A pair part's label in the prompt: its column name, ``_`` as a space, first letter upper case."""
    name = name.replace("_", " ").strip()
    return name[:1].upper() + name[1:]


def system_prompt(labels: list[str], part_names: tuple[str, str] | None = None) -> str:
    names = ", ".join(labels)
    pairs = "" if part_names is None else (
        f" Each text is a pair of two parts, {part_label(part_names[0])} and {part_label(part_names[1])}: "
        "classify the pair as a whole.")
    return (f"You are a text classifier. Classify each text into exactly one of these labels: {names}.{pairs}\n"
            "Answer with one line per text, numbered like the texts, in the form '<number>. <label>', "
            "using only the label names above and nothing else.")


def user_message(texts: list[Item], part_names: tuple[str, str] | None = None) -> str:
    """The numbered texts; a pair's two parts each on a line of their own, labelled (``Premise: …``)."""
    head = "Classify this text." if len(texts) == 1 else f"Classify each of these {len(texts)} texts."

    def shown(i: int, item: Item) -> str:
        if isinstance(item, str):
            return f"Text {i}: {item}"
        names = part_names or ("text", "text pair")
        return f"Text {i}:\n" + "\n".join(f"{part_label(name)}: {t}" for name, t in zip(names, item))

    return head + "\n\n" + "\n".join(shown(i, t) for i, t in enumerate(texts, 1))


def answer_message(labels: list[str]) -> str:
    return "\n".join(f"{i}. {label}" for i, label in enumerate(labels, 1))


def build_messages(texts: list[Item], labels: list[str], shots: list[tuple[Item, str]],
                   single_retry: bool = False, part_names: tuple[str, str] | None = None) -> list[dict[str, str]]:
    """System message, the few-shot examples as one user/assistant exchange in the answer format, then the texts
    (``part_names``: a sentence pair's two part labels).

    ``single_retry`` asks again about one text with a reminder, so the request (and its cache key) differs from the
    one whose reply could not be parsed."""
    messages = [{"role": "system", "content": system_prompt(labels, part_names)}]
    if shots:
        messages.append({"role": "user", "content": user_message([t for t, _ in shots], part_names)})
        messages.append({"role": "assistant", "content": answer_message([lab for _, lab in shots])})
    content = user_message(texts, part_names)
    if single_retry:
        content += f"\n\nAnswer with exactly one line: '1. <label>' where <label> is one of: {', '.join(labels)}."
    messages.append({"role": "user", "content": content})
    return messages


def pick_shots(texts: list[Item], label_ids: list[int], labels: list[str], k: int, seed: int,
               truncate: int, side: str) -> tuple[list[tuple[Item, str]], list[int]]:
    """``k`` examples per class drawn from train with ``seed``, interleaved in a seeded order.
    Returns (shown text, label name) pairs and their row positions in train."""
    if k <= 0:
        return [], []
    rng = np.random.default_rng(seed)
    ids = np.asarray(label_ids)
    chosen: list[int] = []
    for c in range(len(labels)):
        rows = np.flatnonzero(ids == c)
        chosen.extend(rng.choice(rows, size=min(k, len(rows)), replace=False).tolist())
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    return [(clip_item(texts[i], truncate, side), labels[int(ids[i])]) for i in chosen], chosen


# --------------------------------------------------------------------------------------------------------------------
# Parsing replies (pure)
# --------------------------------------------------------------------------------------------------------------------

_NUMBERED = re.compile(r"^\s*(?:text\s*)?[\(\[#]?(\d+)\s*[\.\):\]\-]?\s*(.*)$", re.IGNORECASE)


def _norm(s: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", s.lower()).split())


def match_label(answer: str, labels: list[str]) -> int:
    """The label an answer names: exact after normalising case, punctuation and whitespace (``**Positive.**``),
    else the longest label the answer starts with (``positive - praises the cast``); INVALID otherwise."""
    norm = _norm(answer)
    names = [_norm(lab) for lab in labels]
    for prefix in ("label ", "answer ", "sentiment "):
        if norm.startswith(prefix) and norm[len(prefix):] in names:
            norm = norm[len(prefix):]
    if norm in names:
        return names.index(norm)
    starts = [i for i, name in enumerate(names) if name and norm.startswith(name + " ")]
    if starts:
        return max(starts, key=lambda i: len(names[i]))
    return INVALID


def parse_reply(reply: str, n: int, labels: list[str]) -> list[int] | None:
    """Class ids of a reply to ``n`` numbered texts, INVALID for an unknown label; None when the reply does not have
    exactly one answer per text (a wrong count, a missing or repeated number)."""
    reply = re.sub(r"<think>.*?</think>", "", reply or "", flags=re.DOTALL)
    lines = [ln.strip() for ln in reply.splitlines() if ln.strip().strip("`").strip()]
    numbered = {}
    for ln in lines:
        m = _NUMBERED.match(ln.lstrip("*-• "))
        if m and m.group(2).strip():
            k = int(m.group(1))
            if k in numbered:
                return None
            numbered[k] = m.group(2)
    if numbered:
        if sorted(numbered) != list(range(1, n + 1)):
            return None
        return [match_label(numbered[k], labels) for k in range(1, n + 1)]
    if len(lines) == n:  # unnumbered, one line per text
        return [match_label(ln, labels) for ln in lines]
    return None


# --------------------------------------------------------------------------------------------------------------------
# HTTP with retries and a response cache
# --------------------------------------------------------------------------------------------------------------------


def _redact(text: str, key: str | None) -> str:
    return text.replace(key, "***") if key else text


def cache_path(cache_dir: Path, base_url: str, body: dict[str, Any]) -> Path:
    """``cache_dir/<sha256 of the endpoint and request body>.json``; the key is never part of either."""
    blob = json.dumps({"url": base_url.rstrip("/"), "body": body}, sort_keys=True, separators=(",", ":"))
    return cache_dir / f"{hashlib.sha256(blob.encode()).hexdigest()}.json"


def _read_cache(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())["response"]
    except (OSError, ValueError, KeyError, TypeError):  # missing or torn file: a cache miss
        return None


def _write_cache(path: Path, body: dict[str, Any], response: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps({"request": body, "response": response}, indent=1))
    os.replace(tmp, path)


def post_chat(settings: LLMSettings, body: dict[str, Any], usage: Usage) -> dict[str, Any]:
    """POST ``body`` to ``{base_url}/chat/completions``; retry 429 / 5xx / timeouts / connection errors with
    exponential backoff (``retry_delay_s`` · 2^attempt, or the server's Retry-After when longer)."""
    key = (os.environ.get(settings.api_key_env) or None) if settings.api_key_env else None  # none: local server
    url = settings.base_url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode()
    for attempt in range(settings.max_retries + 1):
        usage.add(requests=1)
        wait = settings.retry_delay_s * 2 ** attempt
        try:
            req = urllib.request.Request(url, data=data, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=settings.timeout_s) as resp:
                raw = resp.read()
            response = json.loads(raw)
            response["choices"][0]["message"]  # noqa: B018 - a reply without a message is a server fault
            return response
        except urllib.error.HTTPError as e:
            try:
                detail = _redact(e.read()[:300].decode("utf-8", "replace").replace("\n", " "), key)
            except (OSError, http.client.HTTPException):
                detail = "(no body)"
            if e.code not in RETRYABLE_STATUS:
                hint = f" (is ${settings.api_key_env} set?)" if e.code in (401, 403) else ""
                raise LLMError(f"{url}: HTTP {e.code}{hint}: {detail}") from None
            retry_after = (e.headers or {}).get("Retry-After")
            if retry_after and retry_after.replace(".", "", 1).isdigit():
                wait = max(wait, float(retry_after))
            problem = f"HTTP {e.code}: {detail}"
        except (urllib.error.URLError, http.client.HTTPException, socket.timeout, TimeoutError,
                ConnectionError) as e:
            problem = _redact(f"{type(e).__name__}: {getattr(e, 'reason', e)}", key)
        except (ValueError, KeyError, IndexError, TypeError) as e:
            problem = f"malformed response ({type(e).__name__})"
        if attempt == settings.max_retries:
            raise LLMError(f"{url}: gave up after {attempt + 1} attempts: {problem}") from None
        usage.add(retries=1)
        wait = min(wait, MAX_BACKOFF_S)
        log.info("%s: %s; retrying in %.2fs", url, problem, wait)
        time.sleep(wait)
    raise AssertionError("unreachable")


def complete(settings: LLMSettings, messages: list[dict[str, str]], usage: Usage,
             cache_dir: Path | None) -> str:
    """The reply text to ``messages``, from the cache when this exact request was answered before."""
    body = {"model": settings.model, "messages": messages, "temperature": 0}
    path = cache_path(cache_dir, settings.base_url, body) if cache_dir is not None else None
    response = _read_cache(path) if path is not None else None
    if response is not None:
        usage.add(cached_requests=1)
    else:
        response = post_chat(settings, body, usage)
        u = response.get("usage") or {}
        usage.add(new_prompt_tokens=int(u.get("prompt_tokens") or 0),
                  new_completion_tokens=int(u.get("completion_tokens") or 0))
        if path is not None:
            _write_cache(path, body, response)
    u = response.get("usage") or {}
    usage.add(prompt_tokens=int(u.get("prompt_tokens") or 0), completion_tokens=int(u.get("completion_tokens") or 0),
              replies_without_usage=0 if u else 1)
    return response["choices"][0]["message"].get("content") or ""


# --------------------------------------------------------------------------------------------------------------------
# Classifying a list of texts
# --------------------------------------------------------------------------------------------------------------------


def _classify_batch(texts: list[Item], labels: list[str], shots: list[tuple[Item, str]], settings: LLMSettings,
                    usage: Usage, cache_dir: Path | None,
                    part_names: tuple[str, str] | None = None) -> tuple[list[int], list[str]]:
    reply = complete(settings, build_messages(texts, labels, shots, part_names=part_names), usage, cache_dir)
    parsed = parse_reply(reply, len(texts), labels)
    if parsed is None:
        parsed = [INVALID] * len(texts)
    replies = [reply] * len(texts)
    for i, pred in enumerate(parsed):
        if pred != INVALID:
            continue
        # Asked again, alone and with a reminder of the format, exactly once; then it stays invalid.
        usage.add(reasked=1)
        single = complete(settings, build_messages([texts[i]], labels, shots, single_retry=True,
                                                   part_names=part_names), usage, cache_dir)
        again = parse_reply(single, 1, labels)
        parsed[i] = again[0] if again else INVALID
        replies[i] = single
    return parsed, replies


def classify(texts: list[Item], labels: list[str], settings: LLMSettings, cache_dir: Path | None,
             shots: list[tuple[Item, str]] = (), part_names: tuple[str, str] | None = None) -> LLMOutput:
    """Class id per text (INVALID where the model's answer could not be parsed), batched ``batch_size`` texts per
    request, at most ``max_concurrency`` requests in flight. A text may be a sentence pair (two texts, each clipped
    to ``truncate`` and shown labelled with ``part_names``)."""
    if not settings.model:
        raise LLMError("llm: no model set (the model name the endpoint serves, e.g. gpt-4o-mini or llama3.1:8b)")
    shown = [clip_item(t, settings.truncate, settings.truncate_side) for t in texts]
    shots = list(shots)
    usage = Usage()
    starts = list(range(0, len(shown), max(1, settings.batch_size)))
    try:
        with ThreadPoolExecutor(max_workers=max(1, settings.max_concurrency)) as pool:
            results = list(pool.map(
                lambda s: _classify_batch(shown[s:s + settings.batch_size], labels, shots, settings, usage,
                                          cache_dir, part_names), starts))
    except LLMError as e:
        e.usage = usage  # what was spent before the failure (the run records it)
        raise
    preds = [p for batch, _ in results for p in batch]
    replies = [r for _, batch in results for r in batch]
    return LLMOutput(preds=np.asarray(preds, dtype=np.int64), usage=usage, replies=replies,
                     system_prompt=system_prompt(labels, part_names), shot_examples=shots)
