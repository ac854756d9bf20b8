"""Per-language perplexity, bits per byte and routing statistics on held-out documents.

Every document is scored on its own, exactly as lm-eval's `loglikelihood_rolling` scores it for our harness
model (`moelpr.evaluate.harness`), so both report the same numbers on the same text:

- tokenise without special tokens and condition on one prefix token, BOS (else EOS, as lm-eval's
  `prefix_token_id`), so the first token is predicted and BOS is never scored;
- a document longer than the context is split into disjoint rolling windows (lm-eval's
  `get_rolling_token_windows(context_len=1)` + `make_disjoint_window`): every token is predicted once, a
  later window sees the `max_len` tokens before its predictions.

ppl = exp(nll / tokens) and bits per byte = nll / (ln 2 · UTF-8 bytes), with nll in nats summed over the
language's documents (lm-eval's `bits_per_byte` aggregate is the same ratio).

Precision: "fp32", or "bf16" = the forward pass under bf16 autocast with the weights as loaded, the numerics
of bf16 mixed-precision training (`bf16: true` in a recipe), so a model is scored the way it was trained.
(bf16 *weights*, `load_model(dtype=torch.bfloat16)`, would round the saved float32 weights: another model.)
The log-probabilities are always taken in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, islice

import torch
import torch.nn.functional as F

from moelpr.errors import UserError
from moelpr.evaluate.routing import RoutingSums

DEFAULT_MAX_LENGTH = 2048  # lm-eval's HFLM._DEFAULT_MAX_LENGTH
_TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "no limit" model_max_length
_ROLES = ("old", "new")
PRECISIONS = ("fp32", "bf16")


def prefix_token_id(tokenizer) -> int | None:
    """The token each document is conditioned on: BOS, else EOS (lm-eval's `HFLM.prefix_token_id`)."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return None


def context_length(model, tokenizer=None, default: int = DEFAULT_MAX_LENGTH) -> int:
    """The context used for the rolling windows, resolved as lm-eval's `resolve_max_length` does.

    The config's `text_config` (an MoE-LPR model keeps the base config there) or the config itself:
    `n_positions`, `max_position_embeddings`, `n_ctx`; then `tokenizer.model_max_length`; then 2048.
    """
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit != _TOKENIZER_INFINITY:
        return int(limit)
    return default


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int) -> list[tuple[list[int], int]]:
    """Split one document into lm-eval's disjoint rolling windows.

    Args:
        tokens: the document's token ids, no special tokens.
        prefix: the token the first window is conditioned on (BOS).
        max_len: the model's context.

    Returns:
        `(seq, n_pred)` per window: feed `seq[:-1]` (≤ max_len tokens) and score the last `n_pred`
        predictions of `seq[1:]`. Over all windows every token of `tokens` is predicted exactly once.
    """
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    windows = [([prefix] + tokens[:first], first)]
    done = first
    while done < len(tokens):
        n_pred = min(len(tokens) - done, max_len)
        end = done + n_pred
        windows.append((tokens[end - max_len - 1 : end], n_pred))  # max_len inputs + the last target
        done = end
    return windows


@dataclass
class _Window:
    seq: list[int]
    n_pred: int
    first: bool  # position 0 holds the prefix token, not a document token


@dataclass
class _LanguageTotals:
    nll: float = 0.0  # nats
    tokens: int = 0
    bytes: int = 0
    docs: int = 0
    routing: RoutingSums = field(default_factory=RoutingSums)


def _moe_info(model) -> tuple[list[int], int] | None:
    """`(moe_layers, top_k)` for an MoE-LPR model, None for a dense one."""
    config = getattr(model, "config", None)
    layers = getattr(config, "moe_layers", None)
    if not layers:
        return None
    top_k = getattr(config, "num_experts_per_tok", None) or getattr(config, "top_k", None) or 2
    return list(layers), int(top_k)


@torch.inference_mode()
def _score_batch(
    model, windows: Sequence[_Window], pad_id: int, top_k: int | None, precision: str
) -> tuple[float, RoutingSums]:
    """Summed nll (nats) of the scored predictions of `windows`, and routing sums when `top_k` is given."""
    device = next(model.parameters()).device
    width = max(len(w.seq) - 1 for w in windows)
    input_ids = torch.full((len(windows), width), pad_id, dtype=torch.long)  # (B, S)
    targets = torch.zeros((len(windows), width), dtype=torch.long)  # (B, S)
    attention_mask = torch.zeros((len(windows), width), dtype=torch.long)  # (B, S), right padding
    scored = torch.zeros((len(windows), width), dtype=torch.bool)  # (B, S)
    for i, w in enumerate(windows):
        n = len(w.seq) - 1
        input_ids[i, :n] = torch.tensor(w.seq[:-1])
        targets[i, :n] = torch.tensor(w.seq[1:])
        attention_mask[i, :n] = 1
        scored[i, n - w.n_pred : n] = True
    # Routing counts each document token once, as an input: the inputs at the scored positions,
    # minus the prefix token in front of a document.
    routed = scored.clone()
    routed[[i for i, w in enumerate(windows) if w.first], 0] = False

    extra = {"output_router_logits": True} if top_k is not None else {}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False, **extra)
    nll = 0.0
    for i in range(len(windows)):  # row by row: one float32 (S, V) copy of the logits at a time
        row_nll = F.cross_entropy(out.logits[i].float(), targets[i].to(device), reduction="none")  # (S,)
        nll += float(row_nll[scored[i].to(device)].double().sum())
    sums = RoutingSums()
    if top_k is not None and out.routing:
        sums = RoutingSums.of(out.routing, routed)
    return nll, sums


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _truncate(tokenizer, text: str, ids: list[int], keep: int) -> tuple[list[int], int]:
    """The first `keep` tokens of a document and the UTF-8 bytes of the text they cover."""
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)[
            "offset_mapping"
        ]
        return ids[:keep], len(text[: offsets[keep - 1][1]].encode("utf-8"))
    return ids[:keep], len(tokenizer.decode(ids[:keep]).encode("utf-8"))


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


class _Scorer:
    """Turns one language's documents into windows and scores them in length-sorted batches."""

    def __init__(
        self, model, tokenizer, *, prefix: int | None, max_len: int, batch_size: int, top_k: int | None, precision: str
    ):
        self.model, self.tokenizer = model, tokenizer
        self.prefix, self.max_len, self.batch_size, self.top_k = prefix, max_len, batch_size, top_k
        self.precision = precision
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (prefix or 0)

    def language(
        self, docs: Iterable[str], *, max_docs: int | None, max_tokens: int | None, on_scored: Callable[[int], object]
    ) -> _LanguageTotals:
        acc, buffer = _LanguageTotals(), []

        def full() -> bool:
            return (max_docs is not None and acc.docs >= max_docs) or (
                max_tokens is not None and acc.tokens >= max_tokens
            )

        for chunk in _chunks((d for d in docs if d.strip()), 64):  # whitespace-only documents are no text
            chunk = chunk[: max_docs - acc.docs] if max_docs is not None else chunk
            for text, ids in zip(chunk, _encode(self.tokenizer, chunk)):
                if not ids:
                    continue
                n_bytes = len(text.encode("utf-8"))
                if max_tokens is not None and acc.tokens + len(ids) > max_tokens:
                    ids, n_bytes = _truncate(self.tokenizer, text, ids, max_tokens - acc.tokens)
                # without BOS and EOS the first token can only be context, as in lm-eval
                prefix, doc_ids = (self.prefix, ids) if self.prefix is not None else (ids[0], ids[1:])
                windows = rolling_windows(doc_ids, prefix, self.max_len)
                buffer.extend(_Window(seq, n, first=(j == 0)) for j, (seq, n) in enumerate(windows))
                acc.tokens, acc.bytes, acc.docs = acc.tokens + len(doc_ids), acc.bytes + n_bytes, acc.docs + 1
                if full():
                    break
            if len(buffer) >= 8 * self.batch_size:
                self._flush(buffer, acc, on_scored)
            if full():
                break
        self._flush(buffer, acc, on_scored)
        return acc

    def _flush(self, buffer: list[_Window], acc: _LanguageTotals, on_scored: Callable[[int], object]) -> None:
        buffer.sort(key=lambda w: len(w.seq), reverse=True)  # less padding per batch
        for start in range(0, len(buffer), self.batch_size):
            batch = buffer[start : start + self.batch_size]
            nll, sums = _score_batch(self.model, batch, self.pad_id, self.top_k, self.precision)
            acc.nll += nll
            acc.routing = acc.routing + sums
            on_scored(sum(w.n_pred for w in batch))
        buffer.clear()


def evaluate_texts(
    model,
    tokenizer,
    texts: Mapping[str, Iterable[str]],
    roles: Mapping[str, str],
    *,
    batch_size: int = 8,
    max_docs: int | None = None,
    max_tokens: int | None = None,
    context_len: int | None = None,
    progress: bool = True,
    precision: str = "fp32",
) -> dict:
    """Score documents per language; the engine of `evaluate_corpora` (which documents `texts` and the output).

    Args:
        texts: language → its documents (any iterable of strings, read lazily).
        roles: language → "old" | "new".
    """
    from tqdm.auto import tqdm

    unknown = sorted(set(texts) - set(roles))
    if unknown:
        raise UserError(f"no role (old/new) given for language(s) {', '.join(unknown)}")
    bad = {lang: role for lang, role in roles.items() if role not in _ROLES}
    if bad:
        raise UserError(f"role must be 'old' or 'new', got {bad}")
    for name, value in (
        ("batch_size", batch_size),
        ("max_docs", max_docs),
        ("max_tokens", max_tokens),
        ("context_len", context_len),
    ):
        if value is not None and value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose {' or '.join(PRECISIONS)}")
    prefix = prefix_token_id(tokenizer)
    max_len = context_len or context_length(model, tokenizer)
    moe = _moe_info(model)
    top_k = moe[1] if moe else None
    was_training = model.training
    model.eval()

    scorer = _Scorer(
        model, tokenizer, prefix=prefix, max_len=max_len, batch_size=batch_size, top_k=top_k, precision=precision
    )
    totals: dict[str, _LanguageTotals] = {}
    try:
        for lang, docs in texts.items():
            with tqdm(total=max_tokens, unit="tok", desc=f"ppl {lang}", disable=not progress, leave=False) as bar:
                totals[lang] = scorer.language(docs, max_docs=max_docs, max_tokens=max_tokens, on_scored=bar.update)
            if totals[lang].tokens == 0:
                raise UserError(f"no held-out text for language {lang!r}: its corpora yielded no non-empty document")
    finally:
        model.train(was_training)
    return {**_results(totals, roles, max_len, moe), "precision": precision}


def _results(
    totals: Mapping[str, _LanguageTotals], roles: Mapping[str, str], max_len: int, moe: tuple[list[int], int] | None
) -> dict:
    ppl = {lang: math.exp(t.nll / t.tokens) for lang, t in totals.items()}
    bpb = {lang: t.nll / (math.log(2) * t.bytes) for lang, t in totals.items()}
    languages = {role: [lang for lang in totals if roles[lang] == role] for role in _ROLES}
    avg = {
        role: {
            "ppl": sum(ppl[lang] for lang in langs) / len(langs) if langs else None,
            "bpb": sum(bpb[lang] for lang in langs) / len(langs) if langs else None,
        }
        for role, langs in languages.items()
    }
    results = {
        "ppl": ppl,
        "bpb": bpb,
        "tokens": {lang: t.tokens for lang, t in totals.items()},
        "bytes": {lang: t.bytes for lang, t in totals.items()},
        "docs": {lang: t.docs for lang, t in totals.items()},
        "nll": {lang: t.nll for lang, t in totals.items()},
        "avg": avg,
        "languages": languages,
        "context_len": max_len,
    }
    if moe is not None:
        results["routing"] = {lang: t.routing.summary(moe[0]) for lang, t in totals.items()}
    return results


def evaluate_corpora(
    model,
    tokenizer,
    corpora: Sequence,
    *,
    batch_size: int = 8,
    max_docs: int | None = None,
    max_tokens: int | None = None,
    context_len: int | None = None,
    progress: bool = True,
    precision: str = "fp32",
) -> dict:
    """Per-language perplexity, bits per byte and (MoE models) routing statistics on `corpora`.

    Args:
        model: a causal LM (dense HF model or `MoELPRForCausalLM`), on its device.
        tokenizer: its tokenizer.
        corpora: `Corpus` objects (`moelpr.data.corpus.load_corpora`); corpora of one language are pooled.
        batch_size: windows per forward pass.
        max_docs / max_tokens: caps per language (the document crossing `max_tokens` is truncated).
        context_len: window length (default: the model's context, as lm-eval resolves it).
        progress: show a tqdm bar per language.
        precision: "fp32", or "bf16" (bf16 autocast over the loaded weights, as bf16 mixed-precision training).

    Returns:
        `{"ppl": {lang: float}, "bpb": {lang: float}, "tokens": {lang: int}, "bytes", "docs", "nll",
        "avg": {"old": {"ppl", "bpb"}, "new": {...}}, "languages": {"old": [...], "new": [...]},
        "context_len": int, "precision": str}` plus, for an MoE model, `"routing": {lang: {"mean_prob": [[per
        expert] per MoE layer], "top_k_has_expert0": [per MoE layer], "layers": [layer indices], "tokens": int}}`.
    """
    from moelpr.data.corpus import iter_documents

    by_language: dict[str, list] = {}
    roles: dict[str, str] = {}
    for corpus in corpora:
        lang = corpus.language
        if roles.setdefault(lang, corpus.role) != corpus.role:
            raise UserError(f"language {lang!r} is both 'old' and 'new' in the corpora (see corpus {corpus.name!r})")
        by_language.setdefault(lang, []).append(corpus)
    if not by_language:
        raise UserError("the corpora list is empty; give at least one corpus with held-out text")
    texts = {lang: chain.from_iterable(iter_documents(c) for c in group) for lang, group in by_language.items()}
    return evaluate_texts(
        model,
        tokenizer,
        texts,
        roles,
        batch_size=batch_size,
        max_docs=max_docs,
        max_tokens=max_tokens,
        context_len=context_len,
        progress=progress,
        precision=precision,
    )
