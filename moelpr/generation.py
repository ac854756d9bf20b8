"""Text generation with transformers' `generate` (KV cache), optionally streamed."""

from __future__ import annotations

import torch

from moelpr.errors import UserError


def generation_kwargs(*, max_new_tokens: int, temperature: float, greedy: bool, top_p: float | None = None) -> dict:
    """`generate` keyword arguments: greedy when asked (or at temperature 0), else sampling at `temperature`."""
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"--temperature must be ≥ 0 (0 = greedy), got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")
    kwargs = {"max_new_tokens": max_new_tokens, "use_cache": True}
    if greedy or temperature == 0:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=None)
    return kwargs


@torch.no_grad()
def generate_ids(model, tokenizer, prompt: str, *, streamer=None, **kwargs) -> torch.Tensor:
    """Prompt + generated token ids `(1, S)` for `prompt` (see `generation_kwargs` for `kwargs`)."""
    if not prompt:
        raise UserError("--prompt is empty; give the text to continue")
    encoded = tokenizer(prompt, return_tensors="pt").to(model.device)
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    model.eval()
    return model.generate(**encoded, streamer=streamer, eos_token_id=eos, pad_token_id=pad, **kwargs)
