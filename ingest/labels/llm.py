"""An explainer and a detection scorer backed by a language model the user points at.

Either an OpenAI-compatible chat endpoint (a local llama.cpp / vLLM / Ollama server or a hosted
one; the API key comes from an environment variable, never the config) or a local instruct model
folder run through transformers. Measured here: SmolLM2-135M-Instruct cannot do this job (0 of 19
neuron puzzles named, chance as a judge), so an LLM is never the default.

Every call goes through ``Chat``: a budget of calls, retries with backoff, and a JSONL cache of
answered prompts under the atlas cache, so an interrupted run resumes without paying twice. A call
that still fails is returned as a failed candidate (``status="failed"``), never as a low score.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from ..config import LabelConfig
from .contrastive import Candidate
from .scorers import Fired, Trial
from .windows import WindowPool

EXPLAINER = "llm"
EXAMPLES_TOP = 10
EXAMPLES_PER_BAND = 2
DETECT_PER_SIDE = 5
SYSTEM = (
    "You are an interpretability researcher. You will see text excerpts where one feature of a language model "
    "fires; the tokens where it fires are marked <<like this>>. Say in one short phrase what the feature fires on "
    "and where: quote the tokens that fire in double quotes, then the context in at most 12 words, for example "
    "'\"def\" opening a Python function definition' or '\"un\", \"dos\" (articles and numbers) in Spanish prose'. "
    "Reply with the phrase only."
)


class ChatError(RuntimeError):
    pass


class Backend(Protocol):
    name: str
    """Which model answers (an endpoint's URL and model, or a folder): part of every cache key."""

    def __call__(self, messages: list[dict], max_tokens: int) -> str: ...


class OpenAIBackend:
    """POST {url}/chat/completions, the OpenAI wire format most local servers speak."""

    def __init__(self, url: str, model: str, api_key_env: str, timeout: float):
        self.url = url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions"
        self.model = model
        self.name = f"{self.url} {model}"
        self.key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.timeout = timeout

    def __call__(self, messages: list[dict], max_tokens: int) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                data = json.loads(response.read())
            return str(data["choices"][0]["message"]["content"])
        except (urllib.error.URLError, TimeoutError, OSError, json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            raise ChatError(f"{type(e).__name__}: {e}") from None


class LocalBackend:
    """A local transformers instruct model folder (greedy decoding, its own chat template)."""

    def __init__(self, folder: str, device: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = str(Path(folder).resolve())
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.lock = threading.Lock()  # one generate at a time on one model

    def __call__(self, messages: list[dict], max_tokens: int) -> str:
        import torch

        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = enc["input_ids"].to(self.model.device)
        try:
            with self.lock, torch.no_grad():
                out = self.model.generate(ids, attention_mask=enc["attention_mask"].to(ids.device), max_new_tokens=max_tokens,
                                          do_sample=False)
        except (RuntimeError, ValueError) as e:  # e.g. out of memory, a prompt past the context: this call fails
            raise ChatError(f"{type(e).__name__}: {e}") from None
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


class Chat:
    """Budgeted, retried, cached calls to one backend; thread-safe."""

    def __init__(self, backend: Backend, *, max_calls: int, retries: int = 2, cache: Path | None = None):
        self.backend = backend
        self.max_calls = max_calls
        self.retries = retries
        self.calls = 0
        self.cache_path = cache
        self.cache: dict[str, str] = {}
        self.lock = threading.Lock()
        if cache is not None and cache.is_file():
            for line in cache.read_text().splitlines():
                try:  # a line cut short (a killed run, two workers appending over NFS) is an answer lost, no more
                    entry = json.loads(line)
                    self.cache[entry["key"]] = entry["answer"]
                except (ValueError, KeyError, TypeError):
                    continue

    def __call__(self, messages: list[dict], max_tokens: int = 64) -> str:
        # Another model's answer to the same prompt is another answer: the backend is in the key.
        key = hashlib.sha256(json.dumps([self.backend.name, messages], sort_keys=True).encode()).hexdigest()
        with self.lock:
            if key in self.cache:
                return self.cache[key]
            if self.calls >= self.max_calls:
                raise ChatError(f"call budget of {self.max_calls} spent")
            self.calls += 1
        error: ChatError | None = None
        for attempt in range(self.retries + 1):
            try:
                answer = self.backend(messages, max_tokens)
                break
            except ChatError as e:
                error = e
                time.sleep(min(4.0, 0.25 * 2**attempt) * (0.5 + random.random()))
        else:
            raise error or ChatError("no answer")
        with self.lock:
            self.cache[key] = answer
            if self.cache_path is not None:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                with self.cache_path.open("a") as f:
                    f.write(json.dumps({"key": key, "answer": answer}) + "\n")
        return answer


def make_chat(cfg: LabelConfig, device: str, cache: Path | None) -> Chat:
    """The chat the config names: an endpoint when ``llm_url`` is set, else a local model folder."""
    if cfg.llm_url:
        backend: Backend = OpenAIBackend(cfg.llm_url, cfg.llm_model, cfg.llm_api_key_env, cfg.llm_timeout)
    else:
        backend = LocalBackend(str(Path(cfg.llm_model).expanduser()), device)
    return Chat(backend, max_calls=cfg.llm_max_calls, cache=cache)


def marked_window(pool: WindowPool, row: int, fired: Fired) -> str:
    """The window's text with the tokens where the feature fires wrapped in << >>."""
    keys = pool.doc_id[row] << 32 | pool.positions[row]
    on = np.isin(keys, fired.token_keys)
    return "".join(f"<<{w}>>" if hit and w.strip() else w for w, hit in zip(pool.token_texts[row], on)).strip()


def explain_prompt(pool: WindowPool, fired: Fired, logits: list[str], seed: int, evidence: str = "") -> list[dict]:
    """Delphi's shape: the strongest windows, then a few from each lower quantile band, then the
    tokens the feature's decoder direction promotes and the counted evidence (``wording.describe``)."""
    rng = np.random.default_rng(seed)
    order = np.argsort(-fired.values)
    rows = list(order[:EXAMPLES_TOP])
    for band in np.array_split(order[EXAMPLES_TOP:], 4):
        if len(band):
            rows += list(rng.choice(band, min(EXAMPLES_PER_BAND, len(band)), replace=False))
    lines = [f"Example {i + 1}: {marked_window(pool, fired.rows[r], fired)}" for i, r in enumerate(rows)]
    if logits:
        lines.append("Tokens the feature promotes: " + ", ".join(repr(t) for t in logits[:10]))
    if evidence:
        lines.append("Counted over all its activations: " + evidence)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def parse_label(answer: str) -> str:
    """The first non-empty line, without list markers, a leading 'Explanation:' or quotes around
    the whole line (a label's own quoted tokens stay)."""
    for line in answer.splitlines():
        line = re.sub(r"^\s*(\[?explanation\]?:|[-*•]|\d+[.)])\s*", "", line.strip(), flags=re.I).strip(" `")
        # A phrase wrapped in quotes loses them; a lone quoted token ("def") is a label as it stands.
        if len(line) > 1 and line[0] == line[-1] and line[0] in "\"'" and line[0] not in line[1:-1] and " " in line:
            line = line[1:-1].strip()
        if line:
            return line[:200]
    raise ChatError("empty answer")


def explain(chat: Chat, features: list[int], pool: WindowPool, fired: dict[int, Fired], logits: dict[int, list[str]],
            evidence: dict[int, str], *, workers: int = 4, seed: int = 0) -> dict[int, list[Candidate]]:
    """One candidate per feature: a label, or a failed candidate saying why. ``evidence``: each
    feature's description, the same numbers the offline explainer writes from."""

    def one(f: int) -> tuple[int, Candidate]:
        if f not in fired:
            return f, Candidate("", EXPLAINER, "llm", "failed", "no firing windows in the explain documents")
        try:
            prompt = explain_prompt(pool, fired[f], logits.get(f, []), seed + f, evidence.get(f, ""))
            return f, Candidate(parse_label(chat(prompt)), EXPLAINER, "llm")
        except ChatError as e:
            return f, Candidate("", EXPLAINER, "llm", "failed", f"llm explainer failed: {e}")

    with ThreadPoolExecutor(workers) as ex:
        results = list(tqdm(ex.map(one, features), total=len(features), desc="llm explain", unit="feature"))
    return {f: [c] for f, c in results}


def detect(chat: Chat, pool: WindowPool, trials: dict[int, Trial], labels: dict[int, str], *, workers: int = 4,
           seed: int = 0) -> dict[int, float]:
    """Balanced accuracy of the model's yes/no on held-out windows, per feature; features whose
    call failed are left out (unscored), not scored low."""

    def one(f: int) -> tuple[int, float | None]:
        t = trials[f]
        if not len(t.negatives):
            return f, None
        rng = np.random.default_rng([seed, f])
        pos = rng.permutation(t.positives)[:DETECT_PER_SIDE]
        neg = rng.permutation(t.negatives)[:DETECT_PER_SIDE]
        rows = np.concatenate([pos, neg])
        truth = np.array([True] * len(pos) + [False] * len(neg))
        order = rng.permutation(len(rows))
        text = "\n".join(f"{i + 1}. {pool.texts[rows[j]]}" for i, j in enumerate(order))
        messages = [
            {"role": "system", "content": "You judge whether text excerpts match a description. Reply with the numbers "
                                          "of the matching excerpts, comma separated, or 'none'."},
            {"role": "user", "content": f"Description: {labels[f]}\n\n{text}"},
        ]
        try:
            answer = chat(messages, max_tokens=48)
        except ChatError:
            return f, None
        said = {int(n) - 1 for n in re.findall(r"\d+", answer) if 0 < int(n) <= len(rows)}
        predicted = np.array([i in said for i in range(len(rows))])
        truth = truth[order]
        return f, float((predicted[truth].mean() + (~predicted[~truth]).mean()) / 2)

    todo = [f for f in labels if f in trials]
    with ThreadPoolExecutor(workers) as ex:
        results = list(tqdm(ex.map(one, todo), total=len(todo), desc="llm detect", unit="feature"))
    return {f: s for f, s in results if s is not None}
