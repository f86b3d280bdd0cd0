"""The baseline arms: TF-IDF on a tiny synthetic dataset, and the LLM arm against a local chat-completions server
started here (deterministic answers plus scripted faults: a wrong-count reply, a 429, a reply slower than the client
timeout, an unknown label)."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest

from peftbench import llm
from peftbench.config import ConfigError
from peftbench.methods import METHODS, run_baseline
from peftbench.data import Splits
from peftbench.evaluate import compute_metrics, compute_metrics_from_preds
from peftbench.store import write_json

KEY = "sk-test-7f3a9c-DO-NOT-STORE"
LABELS = ["negative", "positive"]


# --------------------------------------------------------------------------------------------------------------------
# A fake chat-completions server
# --------------------------------------------------------------------------------------------------------------------


class FakeChat:
    """Answers 'Positive.' for texts containing 'good', 'unsure' for '???', else 'negative'. Each fault marker fires
    once: RATELIMIT → 429, SLOW → sleeps past the client timeout, MALFORMED → a reply one line short."""

    def __init__(self, slow_s: float = 1.5, status: int | None = None):
        self.lock = threading.Lock()
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.fired: set[str] = set()
        self.slow_s, self.status = slow_s, status

    def fire_once(self, marker: str, texts: list[str]) -> bool:
        with self.lock:
            if marker in self.fired or not any(marker in t for t in texts):
                return False
            self.fired.add(marker)
            return True

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        with self.lock:
            self.bodies.append(body)
            self.auth.append(handler.headers.get("Authorization"))
        if handler.path != "/v1/chat/completions":
            return self.reply(handler, 404, {"error": "not found"})
        if self.status is not None:  # an error that echoes the Authorization header, as careless proxies do
            return self.reply(handler, self.status, {"error": f"denied for {handler.headers.get('Authorization')}"})
        texts = re.findall(r"^Text \d+: (.*)$", body["messages"][-1]["content"], flags=re.MULTILINE)
        if self.fire_once("RATELIMIT", texts):
            return self.reply(handler, 429, {"error": "slow down"}, {"Retry-After": "0"})
        if self.fire_once("SLOW", texts):
            time.sleep(self.slow_s)
        answers = ["unsure" if "???" in t else "Positive." if "good" in t else "negative" for t in texts]
        lines = [f"{i}. {a}" for i, a in enumerate(answers, 1)]
        if len(texts) > 1 and self.fire_once("MALFORMED", texts):
            lines = lines[:-1]
        self.reply(handler, 200, {
            "id": "x", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "\n".join(lines)},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10 * len(texts), "completion_tokens": 3 * len(texts)}})

    @staticmethod
    def reply(handler, status: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                handler.send_header(k, v)
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (the timeout fault)
            pass


@contextlib.contextmanager
def serving(fake: "FakeChat"):
    """``fake`` answering chat completions on a loopback port; yields its base URL, shuts the server down after."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            fake.handle(self)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server():
    fake = FakeChat()
    with serving(fake) as url:
        fake.base_url = url
        yield fake


def make_splits(test_texts: list[str], test_labels: list[int]) -> Splits:
    train = pd.DataFrame({"text": ["a good movie", "a good cast", "bad acting", "dull and bad"], "label": [1, 1, 0, 0]})
    return Splits(train=train, validation=train.copy(), test=pd.DataFrame({"text": test_texts, "label": test_labels}),
                  labels=LABELS)


# Three batches of four; the faults sit in different batches, the unknown-label text in the last one.
TEST = [("good film RATELIMIT", 1), ("bad film", 0), ("bad\nlong\n\nfilm", 0), ("good story", 1),
        ("good plot MALFORMED", 1), ("bad SLOW", 0), ("good ending", 1), ("bad ending", 0),
        ("good music", 1), ("??? no idea", 0), ("bad music", 0), ("good fun", 1)]


def llm_params(base_url: str, **over) -> dict:
    return {"base_url": base_url, "model": "fake-model", "api_key_env": "PEFTBENCH_TEST_KEY", "batch_size": 4,
            "max_concurrency": 2, "timeout_s": 1.0, "max_retries": 3, "retry_delay_s": 0.01,
            "price_per_1k_input": 1.0, "price_per_1k_output": 2.0, **over}


# --------------------------------------------------------------------------------------------------------------------
# LLM arm
# --------------------------------------------------------------------------------------------------------------------


def test_llm_faults_retries_invalid_and_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_TEST_KEY", KEY)
    splits = make_splits([t for t, _ in TEST], [y for _, y in TEST])
    params = llm_params(server.base_url)
    out = run_baseline("llm", params, splits, seed=0, cache_dir=tmp_path / "cache")

    gold = np.array([y for _, y in TEST])
    expected = gold.copy()
    expected[9] = -1  # "??? no idea": unknown label, asked again alone, still unknown → invalid, never class 0
    assert out.preds.tolist() == expected.tolist()
    assert out.probs is None and out.val_preds is None and out.params["trainable"] is None
    assert server.fired == {"RATELIMIT", "SLOW", "MALFORMED"}
    c = out.costs
    # 3 batches + the 429 and the timed-out attempt + 4 texts of the short reply and 1 unknown label asked alone
    assert (c["requests"], c["retries"], c["reasked"], c["cached_requests"]) == (10, 2, 5, 0)
    assert len(server.bodies) == 10 and c["invalid"] == 1
    assert out.info["invalid_test_ids"] == [9] and "unsure" in out.info["invalid_replies"][0]
    # usage of the 8 answered requests: 3 batches of 4 texts + 5 single texts
    assert (c["prompt_tokens"], c["completion_tokens"]) == (170, 51)
    assert c["estimated_cost_usd"] == pytest.approx(0.170 * 1.0 + 0.051 * 2.0)
    assert server.auth[0] == f"Bearer {KEY}"
    assert all(b["temperature"] == 0 and b["model"] == "fake-model" for b in server.bodies)
    assert any("Text 3: bad long film\n" in b["messages"][-1]["content"] for b in server.bodies)  # one line per text

    m = compute_metrics_from_preds(gold, out.preds, 2)
    assert m["invalid"] == 1 and m["accuracy"] == pytest.approx(11 / 12)
    assert m["confusion_matrix"] == [[5, 0, 1], [0, 6, 0]]

    # A re-run is served from the cache: nothing reaches the server, same predictions and usage.
    before = len(server.bodies)
    again = run_baseline("llm", params, splits, seed=0, cache_dir=tmp_path / "cache")
    assert len(server.bodies) == before
    assert again.costs["requests"] == 0 and again.costs["cached_requests"] == 8
    assert again.preds.tolist() == out.preds.tolist()
    assert again.costs["estimated_cost_usd"] == pytest.approx(c["estimated_cost_usd"])
    assert again.costs["spent_cost_usd"] == 0 and c["spent_cost_usd"] == pytest.approx(c["estimated_cost_usd"])

    # The key never reaches disk: not in the cache, nor in a result written the way the runner writes one.
    write_json(tmp_path / "result.json", {"costs": out.costs, "info": out.info, "params": out.params,
                                          "preds": out.preds.tolist()})
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 9
    assert not [p for p in files if KEY.encode() in p.read_bytes()]


def test_llm_few_shot_and_max_test(server, tmp_path, monkeypatch):
    monkeypatch.delenv("PEFTBENCH_TEST_KEY", raising=False)
    texts = [f"good text {i}" if i % 2 else f"bad text {i}" for i in range(20)]
    splits = make_splits(texts, [i % 2 for i in range(20)])
    params = llm_params(server.base_url, shots=1, max_test=6, batch_size=10, truncate=6, truncate_side="first")
    out = run_baseline("llm", params, splits, seed=3, cache_dir=tmp_path)
    assert len(out.preds) == 6 and sorted(np.bincount(splits.test["label"].to_numpy()[out.test_ids])) == [3, 3]
    assert out.preds.tolist() == splits.test["label"].to_numpy()[out.test_ids].tolist()
    messages = server.bodies[0]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "negative, positive" in messages[0]["content"]
    assert sorted(messages[2]["content"].splitlines()) == ["1. negative", "2. positive"] or sorted(
        messages[2]["content"].splitlines()) == ["1. positive", "2. negative"]
    assert all(len(line) <= len("Text 1: ") + 6 for line in messages[-1]["content"].splitlines()[2:])
    assert server.auth == [None]  # no key in the environment: no Authorization header (local servers)
    assert len(out.info["shot_train_ids"]) == 2
    same = run_baseline("llm", params, splits, seed=3, cache_dir=tmp_path)
    assert same.info["shot_train_ids"] == out.info["shot_train_ids"] and same.costs["requests"] == 0


def test_llm_errors_never_show_the_key(server, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_TEST_KEY", KEY)
    splits = make_splits(["good", "bad"], [1, 0])
    server.status = 401
    with pytest.raises(llm.LLMError) as err:
        run_baseline("llm", llm_params(server.base_url), splits, seed=0, cache_dir=tmp_path)
    assert "401" in str(err.value) and "PEFTBENCH_TEST_KEY" in str(err.value) and KEY not in str(err.value)
    assert len(server.bodies) == 1  # not retried

    server.status, server.bodies = 503, []
    with pytest.raises(llm.LLMError) as err:
        run_baseline("llm", llm_params(server.base_url, max_retries=2), splits, seed=0, cache_dir=tmp_path)
    assert "gave up after 3 attempts" in str(err.value) and KEY not in str(err.value)
    assert len(server.bodies) == 3
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing cached from failures


def test_parse_reply_is_tolerant_but_strict_about_counts():
    parse = llm.parse_reply
    assert parse("1. Positive\n2.negative", 2, LABELS) == [1, 0]
    assert parse("Here you go:\n\n1) **NEGATIVE**.\n2 - positive (praises the cast)\n", 2, LABELS) == [0, 1]
    assert parse("Text 2: positive\nText 1: negative", 2, LABELS) == [0, 1]
    assert parse("<think>1. negative?</think>\n1. positive", 1, LABELS) == [1]
    assert parse("positive", 1, LABELS) == [1]
    assert parse("1. positive", 2, LABELS) is None                     # wrong count
    assert parse("1. positive\n1. negative", 2, LABELS) is None        # repeated number
    assert parse("1. positive\n2. neutral", 2, LABELS) == [1, -1]       # unknown label
    assert llm.match_label("Very Positive!", ["positive", "very positive"]) == 1
    assert llm.clip_text("ab  c\nd", 3, "last") == "c d" and llm.clip_text("abcdef", 0) == "abcdef"


# --------------------------------------------------------------------------------------------------------------------
# TF-IDF arm and metrics from hard predictions
# --------------------------------------------------------------------------------------------------------------------


def synthetic(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    words = {0: ["awful", "boring", "dull", "weak"], 1: ["great", "superb", "moving", "fine"]}
    noise = ["the", "film", "plot", "actor", "scene", "story", "music"]
    rows = []
    for i in range(n):
        y = i % 2
        toks = list(rng.choice(noise, 6)) + list(rng.choice(words[y], 2)) + list(rng.choice(words[1 - y], 1))
        rows.append((" ".join(rng.permutation(toks)), y))
    return pd.DataFrame(rows, columns=["text", "label"])


def test_tfidf_learns_fast_and_is_deterministic(tmp_path):
    splits = Splits(train=synthetic(300, 0), validation=synthetic(60, 1), test=synthetic(100, 2), labels=LABELS)
    start = time.perf_counter()
    out = run_baseline("tfidf", {"C": 10.0}, splits, seed=0, cache_dir=tmp_path)
    assert time.perf_counter() - start < 1.0
    m = compute_metrics_from_preds(splits.test["label"].to_numpy(), out.preds, 2, out.probs)
    assert m["accuracy"] > 0.85 and m["invalid"] == 0 and m["roc_auc"] > 0.9
    assert out.val_probs.shape == (60, 2) and out.test_ids is None
    assert out.params["trainable"] == out.params["total"] == out.info["vocabulary_size"] + 1
    assert out.costs["train_time_s"] < 1.0 and out.costs["model_size_bytes"] > 0
    again = run_baseline("tfidf", {"C": 10.0}, splits, seed=0, cache_dir=tmp_path)
    np.testing.assert_array_equal(out.probs, again.probs)


def test_metrics_from_preds_match_and_count_invalid():
    labels = np.array([0, 1, 1, 0, 1])
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8], [0.1, 0.9]])
    assert compute_metrics_from_preds(labels, probs.argmax(1), 2, probs) == {**compute_metrics(labels, probs, 2),
                                                                             "invalid": 0}
    m = compute_metrics_from_preds(labels, np.array([0, 1, -1, -1, 1]), 2)
    assert m["accuracy"] == pytest.approx(0.6) and m["invalid"] == 2 and m["roc_auc"] is None and m["loss"] is None
    assert m["confusion_matrix"] == [[1, 0, 1], [0, 2, 1]]
    assert m["recall_macro"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert compute_metrics_from_preds(labels, np.array([0, 1, 0, 0, 1]), 2)["confusion_matrix"] == [[2, 0], [1, 2]]


def test_check_param():
    llm = METHODS["llm"]
    assert llm.check("arm", "truncate_side", "first") == "first"
    for key, value in [("truncate_side", "middle"), ("batch_size", 0), ("timeout_s", 0.0), ("model", "")]:
        with pytest.raises(ConfigError, match=f"^arm.{key}: expected "):
            llm.check("arm", key, value)
