"""Evaluation in bf16: autocast over the float32 weights (as bf16 training), fp32 by default, recorded."""

import json

import pytest
import torch

from moelpr.cli import main
from moelpr.errors import UserError
from moelpr.evaluate.perplexity import evaluate_texts


def _scored(model, tokenizer, texts, roles, **kw):
    """Results plus the dtypes every `nn.Linear` produced and the weights had while scoring."""
    outputs: set[torch.dtype] = set()
    handles = [
        m.register_forward_hook(lambda mod, i, o: outputs.add(o.dtype))
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    try:
        results = evaluate_texts(model, tokenizer, texts, roles, progress=False, **kw)
    finally:
        for handle in handles:
            handle.remove()
    return results, outputs


@pytest.mark.parametrize("name", ["dense_model", "moe_model"])
def test_bf16_scores_under_autocast_close_to_fp32(name, request, tokenizer, texts, roles):
    model = request.getfixturevalue(name)
    fp32, fp32_dtypes = _scored(model, tokenizer, texts, roles)
    bf16, bf16_dtypes = _scored(model, tokenizer, texts, roles, precision="bf16")
    assert fp32["precision"] == "fp32" and fp32_dtypes == {torch.float32}  # the default
    assert bf16["precision"] == "bf16" and bf16_dtypes == {torch.bfloat16}  # autocast was in effect
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # weights untouched
    for lang in texts:
        assert bf16["nll"][lang] != fp32["nll"][lang]  # bf16 matmuls really ran
        assert bf16["ppl"][lang] == pytest.approx(fp32["ppl"][lang], rel=0.05)
    if name == "moe_model":
        assert bf16["routing"]["el"]["layers"] == fp32["routing"]["el"]["layers"]


def test_unknown_precision_is_refused(dense_model, tokenizer, texts, roles):
    with pytest.raises(UserError, match="unknown precision 'fp16'"):
        evaluate_texts(dense_model, tokenizer, texts, roles, precision="fp16", progress=False)


def test_eval_cli_precision_is_recorded(tmp_path, capsys, dense_dir, corpora_file):
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.json"
        code = main(
            [
                "eval",
                "--model",
                str(dense_dir),
                "--corpora",
                str(corpora_file),
                "--output",
                str(out),
                "--max-docs",
                "1",
                "--precision",
                precision,
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        assert code == 0, capsys.readouterr().err
        assert json.loads(out.read_text())["precision"] == precision
    code = main(
        [
            "eval",
            "--model",
            str(dense_dir),
            "--corpora",
            str(corpora_file),
            "--output",
            str(tmp_path / "x.json"),
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert code == 0 and json.loads((tmp_path / "x.json").read_text())["precision"] == "fp32"  # the default
