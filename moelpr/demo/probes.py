"""What a bias-free linear router can do at all, per layer: the measurements behind docs/demo.md's (a) and (b).

The MoE-LPR router of a layer is `softmax(W x)`, W of shape `(E, H)` without a bias, on the MLP input x
(docs/method.md §1). Two convex fits on the routers' real inputs (validation tokens, captured with forward
pre-hooks on the MLPs) bound what any amount of stage-2 training could reach:

- `lpr_only`: W minimising the LPR loss alone, −mean log G₀(x) over old-language tokens (no LM loss, no new
  tokens). If the old tokens do not lie in one open half-space through the origin, no W routes them all to
  expert 0; the mean G₀ reached is the ceiling for that layer.
- `separate`: W minimising −mean log G₀ on old tokens − mean log(1 − G₀) on new tokens (logistic regression,
  bias-free, balanced): how well the router can tell the old languages from the new ones, as the balanced
  accuracy of "G₀ > 1/2" and the mean G₀ reached on each role.

Both are fit on one half of the tokens (every other window) and measured on the other half.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

MAX_ITER = 200


def _windows(tokenizer, texts: Sequence[str], max_tokens: int, length: int) -> list[list[int]]:
    """The first `max_tokens` tokens of the documents (EOS-separated), cut into windows of `length`."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    return [ids[i : i + length] for i in range(0, len(ids), length)]


@torch.inference_mode()
def router_inputs(
    model, tokenizer, texts: dict[str, Sequence[str]], *, max_tokens: int, context_len: int, batch_size: int = 16
) -> dict[str, list[torch.Tensor]]:
    """Per language, the MLP inputs `(n, H)` of every decoder layer (float32, on the CPU), in window order.

    Works on a dense model and on an MoE-LPR model alike: the hooks sit on each decoder layer's `mlp`.
    """
    from moelpr.model.arch import decoder_layers

    layers = decoder_layers(getattr(model, "lm", model))  # an MoE-LPR model wraps the HF LM as `.lm`
    captured: list[torch.Tensor] = []
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach())) for layer in layers
    ]
    out: dict[str, list[list[torch.Tensor]]] = {}
    device = next(model.parameters()).device
    try:
        for lang, docs in texts.items():
            windows = _windows(tokenizer, docs, max_tokens, context_len)
            per_layer: list[list[torch.Tensor]] = [[] for _ in layers]
            for start in range(0, len(windows), batch_size):
                batch = windows[start : start + batch_size]
                width = max(map(len, batch))
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
                ids = torch.full((len(batch), width), pad, dtype=torch.long)  # (B, S); masked out
                mask = torch.zeros((len(batch), width), dtype=torch.bool)  # (B, S)
                for i, w in enumerate(batch):
                    ids[i, : len(w)] = torch.tensor(w)
                    mask[i, : len(w)] = True
                captured.clear()
                ids, mask = ids.to(device), mask.to(device)
                model(input_ids=ids, attention_mask=mask.long(), use_cache=False)
                for layer, x in enumerate(captured):
                    per_layer[layer].append(x.reshape(-1, x.shape[-1])[mask.reshape(-1)].float().cpu())  # (n, H)
            out[lang] = per_layer
    finally:
        for hook in hooks:
            hook.remove()
    return {lang: [torch.cat(chunks) for chunks in per_layer] for lang, per_layer in out.items()}


def _fit(x: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """W `(E, H)` minimising the weighted −log p(target) of softmax(W x), bias-free, by L-BFGS from zero."""
    w = torch.zeros(num_experts, x.shape[1], dtype=torch.float64, requires_grad=True)
    x, weights = x.double(), weights.double()
    opt = torch.optim.LBFGS([w], max_iter=MAX_ITER, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logp = torch.log_softmax(x @ w.T, dim=-1)  # (n, E)
        loss = -(weights * logp.gather(1, targets[:, None]).squeeze(1)).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach()


def _p0(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x.double() @ w.T, dim=-1)[:, 0]  # (n,)


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit and measurement halves: alternate blocks of 128 tokens, so neighbouring tokens stay together."""
    blocks = torch.arange(x.shape[0]) // 128
    return x[blocks % 2 == 0], x[blocks % 2 == 1]


def probe_layer(old: torch.Tensor, new: torch.Tensor, num_experts: int) -> dict[str, Any]:
    """The two fits of the module docstring on one layer's inputs, old `(n_o, H)` and new `(n_n, H)` tokens."""
    old_fit, old_test = _halves(old)
    new_fit, new_test = _halves(new)
    zeros = torch.zeros(old_fit.shape[0], dtype=torch.long)
    w_lpr = _fit(old_fit, zeros, torch.full((old_fit.shape[0],), 1.0 / old_fit.shape[0]), num_experts)
    # separate: old → expert 0, new → "not expert 0" (expert 1 stands for all new experts), each role weighted ½
    x = torch.cat([old_fit, new_fit])
    targets = torch.cat([zeros, torch.ones(new_fit.shape[0], dtype=torch.long)])
    weights = torch.cat(
        [
            torch.full((old_fit.shape[0],), 0.5 / old_fit.shape[0]),
            torch.full((new_fit.shape[0],), 0.5 / new_fit.shape[0]),
        ]
    )
    w_sep = _fit(x, targets, weights, 2)
    p_lpr = _p0(old_test, w_lpr)
    p_old, p_new = _p0(old_test, w_sep), _p0(new_test, w_sep)
    return {
        "lpr_only": {
            "mean_p0_old": float(p_lpr.mean()),
            "share_p0_old_above_0.9": float((p_lpr > 0.9).double().mean()),
        },
        "separate": {
            "balanced_accuracy": float(((p_old > 0.5).double().mean() + (p_new <= 0.5).double().mean()) / 2),
            "mean_p0_old": float(p_old.mean()),
            "mean_p0_new": float(p_new.mean()),
        },
    }


def router_probes(
    model,
    tokenizer,
    texts: dict[str, Sequence[str]],
    roles: dict[str, str],
    *,
    max_tokens: int,
    context_len: int,
    num_experts: int,
) -> list[dict[str, Any]]:
    """`probe_layer` for every decoder layer of `model`, pooling the languages of each role."""
    inputs = router_inputs(model, tokenizer, texts, max_tokens=max_tokens, context_len=context_len)
    n_layers = len(next(iter(inputs.values())))
    results = []
    for layer in range(n_layers):
        pooled = {
            role: torch.cat([inputs[lang][layer] for lang in inputs if roles[lang] == role]) for role in ("old", "new")
        }
        results.append({"layer": layer, **probe_layer(pooled["old"], pooled["new"], num_experts)})
    return results
