"""Steering: generate with chosen features clamped or pushed, next to the same generation untouched.

Two interventions at the dictionary's own hook point (the residual stream after block ``layer``):

- ``clamp`` (Anthropic, Scaling Monosemanticity): the residual is split into the dictionary's
  reconstruction and the error; the chosen features' activations are set to ``value`` times their
  maximum over the corpus and the reconstruction decoded again, the error added back unchanged.
  Decoding is linear in the code, so this is ``x + sum_j (target_j - a_j(x)) * W_dec[j]``, computed
  that way: only the chosen features change, and a feature set to what it already was (0 on a
  silent one) leaves the residual bit for bit as it was.
- ``add`` (Neuronpedia): ``x + value * max_j * W_dec[j]``, the same push whatever the feature reads,
  in the same units as a clamp (1 means "as strong as it ever fires in the corpus").

Dictionaries that layer-norm their input decode in normalised units; the push is scaled back by the
token's own standard deviation, as their reconstruction is.

The default and steered continuations of a prompt are two rows of one batch sharing one KV cache
pass per step, and their sampling shares its random numbers (the same Gumbel noise per prompt and
step): where steering leaves the next-token distribution alone, both rows pick the same token, so
the two texts differ only where the intervention made them differ. A steered run costs about what
plain generation does. Position 0 of every text (BOS, or the chat template's first token) is never
touched: its residual is an outlier the dictionary never saw.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from featureatlas.store.errors import BadParameter
from torch import nn

from .model import SubjectModel
from .sae import LAYER_NORM_EPS, SAE

MODES = ("clamp", "add")

MAX_VALUE = 100.0  # in units of the feature's corpus maximum


@dataclass(frozen=True)
class Edit:
    feature: int
    value: float  # times the feature's maximum activation over the corpus
    mode: str = "clamp"


@dataclass
class Continuation:
    """One generated text: its tokens, each token's log-probability under the run that produced it
    (at temperature 1), and each edited feature's activation as the model read that token."""

    text: str
    tokens: list[str]
    token_ids: list[int]
    logprobs: list[float]
    activations: list[list[float]]  # [token][edit]


@dataclass
class Steered:
    default: list[Continuation]  # one per prompt
    steered: list[Continuation]


def check_edits(edits: list[Edit], maxima: dict[int, float], d_sae: int) -> None:
    """Every mistake a caller can make, as a ``BadParameter`` naming the field."""
    seen: set[int] = set()
    for i, e in enumerate(edits):
        where = f"features[{i}]"
        if not 0 <= e.feature < d_sae:
            raise BadParameter(f"{where}.id", f"no feature {e.feature}: this atlas has features 0..{d_sae - 1}")
        if e.feature in seen:
            raise BadParameter(f"{where}.id", f"feature {e.feature} is given twice")
        seen.add(e.feature)
        if e.mode not in MODES:
            raise BadParameter(f"{where}.mode", f"must be one of {', '.join(MODES)}, got {e.mode!r}")
        if not -MAX_VALUE <= e.value <= MAX_VALUE:  # also refuses nan
            raise BadParameter(f"{where}.value", f"must be between -{MAX_VALUE:g} and {MAX_VALUE:g} (times the "
                                                 f"feature's corpus maximum), got {e.value}")
        if not maxima.get(e.feature, 0.0) > 0:
            raise BadParameter(f"{where}.id", f"feature {e.feature} never fired on the corpus: it has no scale to "
                                              "steer with")


class Intervention:
    """The edits as one function of the residual: ``x`` [rows x seq, d_in] -> (edited x,
    [rows x seq, edits] the edited features' activations before the edit). ``edits`` apply to every
    row; ``per_row`` instead gives each row of the batch its own edit (many features steered in one
    generation: the intervention score)."""

    def __init__(self, sae: SAE, edits: list[Edit], maxima: dict[int, float], per_row: list[Edit] | None = None):
        self.sae = sae
        dev, dtype = sae.W_dec.device, sae.W_dec.dtype
        table = [[e] for e in per_row] if per_row is not None else [edits]  # [rows or 1][edits]
        self.ids = torch.tensor([[e.feature for e in row] for row in table], dtype=torch.long, device=dev)
        self.targets = torch.tensor([[e.value * maxima[e.feature] for e in row] for row in table], dtype=dtype, device=dev)
        self.clamped = torch.tensor([[e.mode == "clamp" for e in row] for row in table], dtype=torch.bool, device=dev)
        self.directions = sae.W_dec.detach()[self.ids]  # [rows or 1, edits, d_in]

    def _row(self, positions: torch.Tensor, seq: int | None) -> torch.Tensor:
        """The batch row of each flat position (row 0 of the table when the edits are shared)."""
        if len(self.ids) == 1:
            return torch.zeros_like(positions)
        if seq is None:
            raise ValueError("edits per row need the positions a row holds (seq)")
        return positions // seq

    def read(self, x: torch.Tensor, seq: int | None = None) -> torch.Tensor:
        """[n, edits] the edited features' activations on ``x`` (``seq`` positions a row)."""
        if not self.ids.shape[1]:
            return x.new_zeros(len(x), 0)
        code = self.sae.encode(x)
        rows, cols = code.row_ids(), code.indices
        out = x.new_zeros(len(x), self.ids.shape[1])
        hit = cols[:, None] == self.ids[self._row(rows, seq)]  # [nnz, edits]
        entry, edit = hit.nonzero(as_tuple=True)
        out[rows[entry], edit] = code.values[entry].to(x.dtype)
        return out

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, seq: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        acts = self.read(x, seq)
        if not self.ids.shape[1]:
            return x, acts
        if len(self.ids) == 1:
            coef = torch.where(self.clamped[0], self.targets[0] - acts, self.targets[0].expand_as(acts))
            delta = coef @ self.directions[0]
        else:
            row = self._row(torch.arange(len(x), device=x.device), seq)
            coef = torch.where(self.clamped[row], self.targets[row] - acts, self.targets[row])
            delta = torch.einsum("ne,ned->nd", coef, self.directions[row])
        if self.sae.layer_norm_input:
            delta = delta * (self.sae._layer_norm(x)[2] + LAYER_NORM_EPS)
        return x + delta, acts


class _Hook:
    """The forward hook on block ``layer``: edits the rows and positions in ``mask`` and records the
    edited features' activations at every position it sees (``history``, one tensor per pass)."""

    def __init__(self, intervention: Intervention):
        self.intervention = intervention
        self.mask: torch.Tensor | None = None  # [batch, seq] where to edit, set before each pass
        self.history: list[torch.Tensor] = []

    def __call__(self, _module: nn.Module, _inputs: object, output: object) -> object:
        hidden = output[0] if isinstance(output, tuple) else output
        b, s, d = hidden.shape
        flat = hidden.reshape(b * s, d).to(self.intervention.sae.W_dec.dtype)
        edited, acts = self.intervention(flat, s)
        self.history.append(acts.view(b, s, -1).float().cpu())
        assert self.mask is not None
        keep = self.mask.reshape(b * s, 1).to(flat.device)
        new = torch.where(keep, edited, flat).view(b, s, d).to(hidden.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new


@torch.no_grad()
def steer(model: SubjectModel, sae: SAE, layer: int, prompts: list[list[int]], edits: list[Edit],
          maxima: dict[int, float], *, max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
          generated_only: bool = False, default: bool = True, steered: bool = True,
          row_edits: list[Edit] | None = None) -> Steered:
    """Default and steered continuations of each prompt (token ids, position 0 included).

    ``temperature`` 0 is greedy. ``generated_only`` edits only the tokens the model writes, not the
    prompt's. ``default=False`` or ``steered=False`` leaves that side out (an empty list): plain
    generation with the same code is the steering bench's baseline, and the intervention score
    needs only steered text. ``row_edits`` (one per prompt, ``edits`` empty) steers each prompt with
    its own edit: many features in one batch."""
    if not (default or steered):
        raise ValueError("nothing to generate: default and steered are both off")
    if row_edits is not None and (edits or len(row_edits) != len(prompts)):
        raise ValueError("row_edits takes one edit per prompt, and no shared edits")
    n = len(prompts)
    n_default = n if default else 0
    rows = (list(prompts) if default else []) + (list(prompts) if steered else [])
    ids, attention = left_padded(rows, model.pad_id)
    edit_row = torch.zeros(len(rows), dtype=torch.bool)
    edit_row[n_default:] = True
    # the prompt pass edits the steered rows past each row's position 0 (and past its padding)
    prompt_mask = edit_row[:, None] & (attention.cumsum(1) > 1) & (not generated_only)

    per_row = None if row_edits is None else (list(row_edits) if default else []) + (list(row_edits) if steered else [])
    hook = _Hook(Intervention(sae, edits, maxima, per_row))
    out_ids, logprobs = _generate(model, layer, hook, ids, attention, prompt_mask, edit_row, n,
                                  max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    # history[0] is the prompt pass; history[t] (t >= 1) read generated token t - 1
    read = torch.cat(hook.history[1:], 1) if len(hook.history) > 1 else torch.zeros((len(rows), 0, len(edits)))
    runs = [_continuation(model, out_ids[i], logprobs[i], read[i], model.tokenizer.eos_token_id) for i in range(len(rows))]
    return Steered(runs[:n_default], runs[n_default:])


def _generate(model: SubjectModel, layer: int, hook: "_Hook", ids: torch.Tensor, attention: torch.Tensor,
              prompt_mask: torch.Tensor, edit_row: torch.Tensor, n: int, *, max_new_tokens: int, temperature: float,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(generated token ids, their log-probabilities) of every row, with ``hook`` on ``layer``: the
    prompt pass edits ``prompt_mask``'s positions, each later pass the rows of ``edit_row``. One
    pass past the last token reads its activations; finished rows are padded."""
    pad, eos = model.pad_id, model.tokenizer.eos_token_id
    gen = torch.Generator().manual_seed(seed)
    out_ids = torch.zeros((len(ids), 0), dtype=torch.long)
    logprobs = torch.zeros((len(ids), 0))
    done = torch.zeros(len(ids), dtype=torch.bool)
    handle = model.blocks[layer].register_forward_hook(hook)
    try:  # a hook left behind would edit every later forward pass of this model
        hook.mask = prompt_mask
        positions = (attention.cumsum(1) - 1).clamp_min(0)
        result = model.model(input_ids=ids.to(model.device), attention_mask=attention.to(model.device),
                             position_ids=positions.to(model.device), use_cache=True, logits_to_keep=1)
        # transformers 5 renamed the KV cache argument and output (``past_key_values`` -> ``cache``)
        name = "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"
        cache, last = getattr(result, name), positions[:, -1]
        for step in range(max_new_tokens + 1):
            logits = result.logits[:, -1].float().cpu()
            if step == max_new_tokens or bool(done.all()):
                break  # the last pass only read the final tokens (their activations)
            log_p = torch.log_softmax(logits, -1)
            choice = torch.where(done, torch.full_like(done, pad, dtype=torch.long), _sample(logits, n, temperature, gen))
            out_ids = torch.cat([out_ids, choice[:, None]], 1)
            logprobs = torch.cat([logprobs, log_p.gather(1, choice[:, None])], 1)
            done |= choice == eos if eos is not None else torch.zeros_like(done)
            attention = torch.cat([attention, torch.ones((len(ids), 1), dtype=torch.long)], 1)
            last = last + 1
            hook.mask = edit_row[:, None].clone()
            result = model.model(input_ids=choice[:, None].to(model.device), attention_mask=attention.to(model.device),
                                 position_ids=last[:, None].to(model.device), use_cache=True, **{name: cache})
            cache = getattr(result, name)
    finally:
        handle.remove()
    return out_ids, logprobs


def _sample(logits: torch.Tensor, n: int, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """The next token of each row: greedy at temperature 0, else the Gumbel-max trick with one draw
    of noise per prompt (``n`` of them), shared by that prompt's default and steered rows, so the
    two differ only where steering changed the distribution."""
    if temperature <= 0:
        return logits.argmax(-1)
    noise = -torch.log(-torch.log(torch.rand((n, logits.shape[1]), generator=gen).clamp_min(1e-20)))
    return (logits / temperature + noise.repeat(logits.shape[0] // n, 1)).argmax(-1)


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([rows, width] token ids, [rows, width] attention mask), padded on the left so that every
    row's next token is at the same column."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        attention[i, width - len(r):] = 1
    return ids, attention


def logits_of(model: SubjectModel, sae: SAE, layer: int, ids: list[int], edits: list[Edit],
              maxima: dict[int, float]) -> torch.Tensor:
    """[seq, vocab] next-token logits of one text with the edits applied at every position but the
    first: the single-pass form of ``steer`` (no edits: the plain model)."""
    hook = _Hook(Intervention(sae, edits, maxima))
    hook.mask = (torch.arange(len(ids)) > 0)[None, :]
    handle = model.blocks[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model.model(input_ids=torch.tensor([ids], device=model.device), use_cache=False).logits[0].float().cpu()
    finally:
        handle.remove()


def token_texts(tokenizer: object, ids: list[int]) -> list[str]:
    """Each token's share of the decoded text, so that the pieces join up to it: a token that ends
    inside a multi-byte character (an accent split over two byte tokens) shows nothing, and the
    next one the whole character, where decoding tokens one by one would show two "\ufffd"."""
    out, done = [], ""
    for i, t in enumerate(ids):
        text = tokenizer.decode(ids[: i + 1])
        if text.endswith("\ufffd") and i + 1 < len(ids):
            out.append("")
        elif text.startswith(done):
            out.append(text[len(done):])
            done = text
        else:  # a tokenizer whose decoding of a prefix is not a prefix of the whole
            out.append(tokenizer.decode([t]))
            done = text
    return out


def _continuation(model: SubjectModel, ids: torch.Tensor, logprobs: torch.Tensor, read: torch.Tensor,
                  eos: int | None) -> Continuation:
    """One row's generated tokens up to (not including) its end of text."""
    keep = ids.tolist()
    if eos is not None and eos in keep:
        keep = keep[: keep.index(eos)]
    m = len(keep)
    return Continuation(
        text=model.tokenizer.decode(keep), tokens=token_texts(model.tokenizer, keep), token_ids=keep,
        logprobs=[round(float(x), 4) for x in logprobs[:m]],
        activations=[[round(float(v), 4) for v in row] for row in read[:m]],
    )
