"""LayerMoE per-layer cross-lingual similarity of MLP inputs (docs/method.md §4).

For every decoder layer l the MLP input (the `post_attention_layernorm` output, "HSA") of the first
`tokens` tokens of each language is captured. The pair score sim_l(a, b) is the mean cosine over *all*
token pairs (a_i, b_j), as the official `cal-similarity-tokens_dense.py` computes with an N×N normalised
matmul. Because the mean of a bilinear form factorises,

    mean_{i,j} cos(a_i, b_j) = mean_i(a_i/|a_i|) · mean_j(b_j/|b_j|),

only the running sum of unit vectors (float64) and the token count per (layer, language) are kept: O(L·H)
memory instead of O(N²). The layer score is S_l = (mean(new–new pairs) + mean(new–old pairs)) / 2; with a
single new language there are no new–new pairs and S_l = mean(new–old pairs).
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moelpr.errors import UserError
from moelpr.model import arch

DEFAULT_TOKENS = 100_000
MAX_DOC_TOKENS = 10_000  # each document is truncated to this many tokens (official script)
SKIP_LONGER_THAN = 32_000  # documents longer than this (in tokens) are skipped (official script)


def mean_pairwise_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean of cos(x_i, y_j) over all pairs, in O(N + M) memory via the mean-of-unit-vectors identity.

    Args:
        x: `(N, H)` vectors.
        y: `(M, H)` vectors.
    """
    mean_x = F.normalize(x.double(), dim=-1).mean(dim=0)  # (H,)
    mean_y = F.normalize(y.double(), dim=-1).mean(dim=0)  # (H,)
    return float(mean_x @ mean_y)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a HF causal LM or of a `MoELPRForCausalLM`, each with an `mlp` to hook."""
    layers = arch.decoder_layers(model)
    if any(not isinstance(getattr(layer, "mlp", None), nn.Module) for layer in layers):
        raise UserError(f"every decoder layer of {type(model).__name__} must have an `mlp`")
    return layers


def collect_token_ids(
    tokenizer: Any,
    texts: Iterable[str],
    *,
    tokens: int = DEFAULT_TOKENS,
    max_length: int = MAX_DOC_TOKENS,
    skip_longer_than: int = SKIP_LONGER_THAN,
) -> list[list[int]]:
    """Token ids of documents in order until `tokens` tokens are gathered (the last one is cut to fit).

    Each document is tokenised with the tokenizer's defaults (special tokens included, e.g. BOS), skipped
    when longer than `skip_longer_than` tokens or empty, and truncated to `max_length` tokens. Because the
    model is causal, the cut last document gives exactly the states of the first tokens of the full one.
    """
    docs: list[list[int]] = []
    remaining = tokens
    for text in texts:
        if remaining <= 0:
            break
        if not text:
            continue
        ids = list(tokenizer(text)["input_ids"])
        if not ids or len(ids) > skip_longer_than:
            continue
        ids = ids[: min(max_length, remaining)]
        docs.append(ids)
        remaining -= len(ids)
    return docs


class _UnitSumHooks:
    """Forward pre-hooks on every `layer.mlp` adding the unit MLP inputs of unmasked tokens to `sums`."""

    def __init__(self, layers: nn.ModuleList):
        self.sums: torch.Tensor | None = None  # (L, H) float64, allocated at the first call (H from the input)
        self.count = 0
        self.mask: torch.Tensor | None = None  # (B, S) bool: real tokens of the current batch
        self.calls = [0] * len(layers)
        self._handles = [
            layer.mlp.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, layer in enumerate(layers)
        ]

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            h = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))  # (B, S, H)
            flat = h.reshape(-1, h.shape[-1])  # (B*S, H)
            units = F.normalize(flat[self.mask.reshape(-1)].float(), dim=-1)  # (N, H)
            if self.sums is None:
                self.sums = torch.zeros(len(self.calls), h.shape[-1], dtype=torch.float64, device=h.device)
            self.sums[index] += units.sum(dim=0, dtype=torch.float64)  # (H,)
            self.calls[index] += 1

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def unit_vector_sums(
    model: nn.Module, docs: Sequence[Sequence[int]], *, batch_size: int = 8
) -> tuple[torch.Tensor, int]:
    """Per-layer sum of unit MLP-input vectors over every position of `docs`, and the token count.

    Documents are right-padded into batches (sorted by length to waste little compute); padding is
    masked out both in attention and in the sums, so each document's states equal an unpadded forward.

    Returns:
        `(L, H)` float64 sums and the number of tokens summed.
    """
    decoder = arch.decoder(model)
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    hooks = _UnitSumHooks(layers)
    was_training = model.training
    model.eval()
    try:
        order = sorted(range(len(docs)), key=lambda i: len(docs[i]))
        for start in range(0, len(order), batch_size):
            batch = [docs[i] for i in order[start : start + batch_size]]
            width = max(len(ids) for ids in batch)
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)  # (B, S); pad id is irrelevant
            mask = torch.zeros(len(batch), width, dtype=torch.bool)  # (B, S)
            for row, ids in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[row, : len(ids)] = True
            hooks.mask = mask.to(device)
            decoder(input_ids=input_ids.to(device), attention_mask=mask.long().to(device), use_cache=False)
            hooks.count += int(mask.sum())
        expected = -(-len(docs) // batch_size)
        if any(calls != expected for calls in hooks.calls):
            raise RuntimeError(f"MLP hooks fired {hooks.calls} times, expected {expected} per layer")
    finally:
        hooks.remove()
        model.train(was_training)
    if hooks.sums is None:
        raise UserError("no documents to run through the model")
    return hooks.sums.cpu(), hooks.count


def layer_scores(means: Mapping[str, torch.Tensor], roles: Mapping[str, str]) -> list[dict[str, Any]]:
    """Per-layer pair similarities and S_l from per-language mean unit vectors.

    Args:
        means: language -> `(L, H)` mean of unit MLP inputs.
        roles: language -> "old" | "new".

    Returns:
        `[{"layer": l, "pairs": {"new-other": cos}, "score": S_l}, ...]`; new–new pairs are unordered (in
        the order the new languages are given), new–old pairs are every new × old.
    """
    new = [lang for lang in means if roles[lang] == "new"]
    old = [lang for lang in means if roles[lang] == "old"]
    new_new = list(itertools.combinations(new, 2))
    new_old = [(a, b) for a in new for b in old]
    num_layers = next(iter(means.values())).shape[0]
    per_layer = []
    for layer in range(num_layers):
        pairs = {f"{a}-{b}": float(means[a][layer] @ means[b][layer]) for a, b in new_new + new_old}
        mean_new_old = sum(pairs[f"{a}-{b}"] for a, b in new_old) / len(new_old)
        if new_new:
            mean_new_new = sum(pairs[f"{a}-{b}"] for a, b in new_new) / len(new_new)
            score = (mean_new_new + mean_new_old) / 2
        else:  # a single new language: no new–new pair, the score is the new–old mean alone
            score = mean_new_old
        per_layer.append({"layer": layer, "pairs": pairs, "score": score})
    return per_layer


def compute_similarity(
    model: nn.Module,
    tokenizer: Any,
    texts_by_language: Mapping[str, Iterable[str]],
    roles: Mapping[str, str],
    *,
    tokens: int = DEFAULT_TOKENS,
    batch_size: int = 8,
    max_length: int = MAX_DOC_TOKENS,
    skip_longer_than: int = SKIP_LONGER_THAN,
    model_name: str | None = None,
) -> dict[str, Any]:
    """LayerMoE similarity of every decoder layer (the content of `similarity.json`).

    Args:
        model: a HF causal LM or `MoELPRForCausalLM`, in the dtype and on the device to run in.
        tokenizer: its tokenizer (called as `tokenizer(text)["input_ids"]`).
        texts_by_language: language -> documents, read in order.
        roles: language -> "old" | "new"; needs at least one of each.
        tokens: tokens per language (the first ones, every position kept).
        batch_size: documents per forward.
        max_length: each document is truncated to this many tokens.
        skip_longer_than: documents longer than this many tokens are skipped.
        model_name: recorded as "model"; defaults to the model's `name_or_path`.

    Returns:
        `{"model", "num_layers", "languages": {"old", "new"}, "tokens": {lang: n}, "per_layer": [...]}`.
    """
    if tokens < 1 or batch_size < 1 or max_length < 1:
        raise UserError("tokens, batch_size and max_length must be positive integers")
    bad_roles = {lang: role for lang, role in roles.items() if role not in ("old", "new")}
    if bad_roles:
        raise UserError(f"roles must be 'old' or 'new', got {bad_roles}")
    missing = [lang for lang in texts_by_language if lang not in roles]
    if missing:
        raise UserError(f"no role (old/new) given for language(s) {missing}")
    langs = list(texts_by_language)
    if not any(roles[lang] == "new" for lang in langs):
        raise UserError("no language with role 'new'; the similarity needs at least one new language")
    if not any(roles[lang] == "old" for lang in langs):
        raise UserError("no language with role 'old'; the similarity needs at least one original language")

    means: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for lang in langs:
        docs = collect_token_ids(
            tokenizer, texts_by_language[lang], tokens=tokens, max_length=max_length, skip_longer_than=skip_longer_than
        )
        if not docs:
            raise UserError(
                f"language {lang!r} has no usable text (empty, or every document > {skip_longer_than} tokens)"
            )
        sums, count = unit_vector_sums(model, docs, batch_size=batch_size)  # (L, H)
        means[lang] = sums / count  # (L, H)
        counts[lang] = count

    lm = getattr(model, "lm", model)  # a MoELPRForCausalLM holds the HF causal LM as `.lm`
    name = model_name or getattr(lm, "name_or_path", "") or getattr(model, "name_or_path", "") or type(lm).__name__
    return {
        "model": str(name),
        "num_layers": len(decoder_layers(model)),
        "languages": {"old": [l for l in langs if roles[l] == "old"], "new": [l for l in langs if roles[l] == "new"]},
        "tokens": counts,
        "per_layer": layer_scores(means, roles),
    }
