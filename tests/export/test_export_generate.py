"""`moe-lpr generate`: streamed greedy text equals `model.generate`, which equals a cache-free greedy loop."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

import moelpr
from moelpr.cli import main
from moelpr.generation import generate_ids, generation_kwargs

PROMPT = "w5 w17 w9 w42"


def greedy_without_cache(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=-1)
    return ids


def test_generate_cli_streams_greedy_text(moe_dir, capsys):
    model = moelpr.load_model(moe_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(moe_dir)
    ids = generate_ids(model, tokenizer, PROMPT, **generation_kwargs(max_new_tokens=8, temperature=1.0, greedy=True))
    prompt_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    direct = model.generate(
        input_ids=prompt_ids,
        attention_mask=torch.ones_like(prompt_ids),
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=model.generation_config.eos_token_id,
    )
    assert torch.equal(ids, direct)
    manual = greedy_without_cache(model, prompt_ids, 8)
    assert torch.equal(ids, manual[:, : ids.shape[1]])  # KV-cache decoding = full recomputation

    assert main(["generate", "--model", str(moe_dir), "--prompt", PROMPT, "--max-new-tokens", "8", "--greedy"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == tokenizer.decode(ids[0], skip_special_tokens=True)


def test_sampling_is_seeded(moe_dir, capsys):
    args = ["generate", "--model", str(moe_dir), "--prompt", PROMPT, "--max-new-tokens", "6", "--temperature", "1.5"]
    assert main([*args, "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main([*args, "--seed", "3"]) == 0
    assert capsys.readouterr().out == first


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--temperature", "-1"], "--temperature must be"),
        (["--prompt", ""], "--prompt is empty"),
    ],
)
def test_generate_bad_input_exit_2(moe_dir, capsys, args, message):
    base = ["generate", "--model", str(moe_dir), "--prompt", PROMPT]
    assert main([*base, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
