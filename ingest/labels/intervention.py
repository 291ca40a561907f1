"""The intervention score (delphi's intervention scoring, without an LLM judge): does a label say what
its feature *does* to the model's output, not only what it reads?

Neutral prompts are continued with the feature clamped at ``value`` times its corpus maximum, and
with each of a few control features (a seeded sample of live ones, the same for every feature; a
scored feature that is one of them is compared with the others) clamped at the same value.
Score: the AUROC of cos(label, continuation) between the feature's continuations and the controls'
(0.5 is chance: the label predicts what steering with it writes no better than with any feature).
Only the continuations are embedded; the prompts are the same on both sides.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
from tqdm import tqdm

from ..config import AtlasConfig
from ..embed import embed
from ..model import SubjectModel
from ..sae import SAE
from ..steer import Edit, steer
from .scorers import auroc

log = logging.getLogger(__name__)
SCORER = "intervention"
# Everyday openings with no topic of their own, so a topic in the continuation comes from the steering.
PROMPTS = (
    "The weather today is", "My favourite food is", "Scientists have discovered that", "The best way to learn is",
    "Yesterday I went to", "The city council announced", "In my free time I like to", "The history of the region",
    "Our team decided to", "The most important thing in life is",
)
CONTROLS = 8
# Rows of one generation: many features steered together, each on its own rows of the prompts. A
# step then reads the model's weights once for all of them: the quick profile's 40 features (32
# scored, 8 controls) took 36 s in batches of 8 features, 31 s of 20 and 29 s of 40 (one batch),
# against ~100 s one feature at a time. 400 rows of SmolLM2-135M hold ~0.6 GB of KV cache.
STEER_ROWS = 400


def sample(live: list[int], n: int, seed: int) -> list[int]:
    """A seeded sample of ``n`` live features (all when ``n`` is at least their number), in id order."""
    if n >= len(live):
        return sorted(live)
    return sorted(int(f) for f in np.random.default_rng([seed, 14]).choice(live, n, replace=False))


def score_labels(model: SubjectModel, sae: SAE, layer: int, label_vectors: dict[int, np.ndarray],
                 maxima: dict[int, float], cfg: AtlasConfig) -> dict[int, float]:
    """``intervention_scores`` with the atlas config's settings, for the features of ``label_vectors``
    that ever fired (the others have no scale to steer with). The dictionary runs on the model's
    device for the duration and is put back where it was."""
    vectors = {f: v for f, v in label_vectors.items() if maxima.get(f, 0) > 0}
    where = sae.W_dec.device
    sae.to(model.device)
    try:
        return intervention_scores(model, sae, layer, vectors, maxima, lambda t: embed(t, name=cfg.labels.embedder),
                                   value=cfg.intervention.intervention_value,
                                   tokens=cfg.intervention.intervention_tokens, seed=cfg.run.seed)
    finally:
        sae.to(where)


def intervention_scores(model: SubjectModel, sae: SAE, layer: int, label_vectors: dict[int, np.ndarray],
                        maxima: dict[int, float], embed_fn: Callable[[list[str]], np.ndarray], *, value: float,
                        tokens: int, seed: int) -> dict[int, float]:
    """The score of each feature in ``label_vectors`` (unit label embeddings); ``maxima``: every live
    feature's corpus maximum (the controls are drawn from them)."""
    live = sorted(f for f, m in maxima.items() if m > 0)
    if len(live) < 2 or not label_vectors:
        return {}
    prompts = [[model.bos_id, *model.tokenizer(p, add_special_tokens=False)["input_ids"]] for p in PROMPTS]

    def continuations(features: list[int]) -> dict[int, list[str]]:
        out = {}
        together = max(1, STEER_ROWS // len(prompts))
        for at in tqdm(range(0, len(features), together), desc="intervention", unit="batch"):
            group = features[at:at + together]
            run = steer(model, sae, layer, [p for _ in group for p in prompts], [], maxima, max_new_tokens=tokens,
                        seed=seed, default=False, row_edits=[Edit(f, value) for f in group for _ in prompts])
            for i, f in enumerate(group):
                out[f] = [c.text for c in run.steered[i * len(prompts):(i + 1) * len(prompts)]]
        return out

    controls = sample(live, CONTROLS, seed + 1)
    log.info("intervention: steering %d control features and %d scored ones", len(controls), len(label_vectors))
    texts = continuations(sorted(set(controls) | set(label_vectors)))
    embedded = dict(zip(texts, np.split(embed_fn([t for f in texts for t in texts[f]]), len(texts))))
    scores = {}
    for f, vec in label_vectors.items():
        others = np.concatenate([embedded[g] for g in controls if g != f])
        scores[f] = auroc(embedded[f] @ vec, others @ vec)
    return scores


def merge_scores(features: list[int], label_score: list[float | None], label_scores: list[list[dict]],
                 scores: dict[int, float], *, primary: bool) -> None:
    """Adds each scored feature's intervention score to its ``label_scores`` (in place), and makes it
    the ``label_score`` when intervention is the first label scorer."""
    for i, f in enumerate(features):
        if f in scores:
            label_scores[i] = [s for s in label_scores[i] if s["scorer"] != SCORER] + [{"scorer": SCORER, "score": scores[f]}]
            if primary:
                label_score[i] = scores[f]
        elif primary:
            label_score[i] = None
