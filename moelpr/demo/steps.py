"""The demo's steps on models: train one run, evaluate it, probe its routers, LayerMoE's allocation.

Each step writes its output where a rerun finds it (`models/<run>/`, `eval/<split>/<run>.json`, `layermoe/`)
and returns it without work when it is there already.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from moelpr.demo.plans import training_args
from moelpr.demo.settings import DemoSizes


def train_run(
    name: str,
    plan: dict[str, Any],
    out: Path,
    sizes: DemoSizes,
    *,
    seed: int,
    precision: str,
    progress: bool,
    callbacks: list | None = None,
) -> Path:
    """`moelpr.train.train` on one plan (`moelpr.demo.plans`) into models/<name>/, unless it is there."""
    from moelpr.train import load_recipe, train

    path = out / "models" / name
    if (path / "config.json").is_file():
        return path
    keys = {k: v for k, v in plan.items() if k not in ("steps", "lr", "freeze")}
    if "freeze" in plan:
        callbacks = [*(callbacks or []), Freeze(plan["freeze"])]
    recipe = load_recipe(
        {
            "cutoff_len": sizes.cutoff_len,
            "cache_dir": str(out / "cache"),
            "output_dir": str(path),
            "overwrite": True,
            **training_args(
                sizes, lr=plan["lr"], steps=plan["steps"], seed=seed, precision=precision, progress=progress
            ),
            **keys,  # a plan's own schedule or block length wins
        }
    )
    return train(recipe, callbacks=callbacks)


class Freeze(TrainerCallback):
    """Freezes a part of full fine-tuning when the training starts: "embeddings" (the token embeddings and the LM
    head) or "rest" (everything else). Frozen weights get no gradient, so the optimizer leaves them as they are:
    what part of full fine-tuning's gain each part carries (reading (c) of docs/demo.md)."""

    def __init__(self, part: str) -> None:
        if part not in ("embeddings", "rest"):
            raise ValueError(f"unknown frozen part {part!r}")
        self.part = part

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
        for p in model.parameters():
            if (id(p) in embeddings) == (self.part == "embeddings"):
                p.requires_grad_(False)
        return control


def copy_model(source: Path, target: Path) -> None:
    """A trained model directory copied whole (atomically), unless `target` holds one already."""
    import shutil

    from moelpr.utils.atomic import atomic_output_dir

    if (target / "config.json").is_file():
        return
    with atomic_output_dir(target, overwrite=True) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)


def layermoe_allocation(out: Path, base: Path, sizes: DemoSizes) -> Path:
    """`moe-lpr similarity` on the base, then `moe-lpr allocate` (the real commands).

    The similarity reads the first `similarity_tokens` tokens per language of the training pool (the replay's
    and stage 1's text come first there): the review mix is too small for it since the review is ~1 % of stage 1.
    """
    from moelpr.cli import run_verb
    from moelpr.evaluate import resolve_device

    folder = out / "layermoe"
    if (folder / "allocation.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    similarity = ["--model", str(base), "--corpora", str(out / "pretrain" / "pool.yaml")]
    similarity += ["--tokens", str(sizes.similarity_tokens), "--max-length", str(sizes.cutoff_len)]
    similarity += ["--device", resolve_device(None), "--output", str(folder / "similarity.json")]
    run_verb("similarity", similarity)
    allocate = ["--similarity", str(folder / "similarity.json"), "--budget", str(sizes.layermoe_budget)]
    allocate += ["--nonpositive", "least-similar"]  # a tiny base can score a layer ≤ 0 (allocation.py)
    run_verb("allocate", [*allocate, "--output", str(folder / "allocation.json")])
    return folder


def expert_budget(model_dir: Path) -> dict[str, Any]:
    """Experts per layer of a saved MoE model and its new experts' count and parameters (every group)."""
    import moelpr
    from moelpr.model.capture import moe_blocks

    model = moelpr.load_model(model_dir)
    blocks = moe_blocks(model)
    return {
        "experts_per_layer": list(model.config.experts_per_layer),
        "new_experts": sum(block.num_experts - 1 for block in blocks),
        "new_expert_params": sum(p.numel() for block in blocks for p in block.experts.parameters()),
    }


def _load(model_dir: Path):
    """A model and its tokenizer for evaluation: float32 weights (bf16 runs are scored under autocast), on the
    GPU where there is one."""
    from moelpr.evaluate import load_model_and_tokenizer, resolve_device

    return load_model_and_tokenizer(model_dir, dtype="float32", device=resolve_device(None))


def evaluate_at_demo_sizes(
    model, tokenizer, corpora: list, sizes: DemoSizes, precision: str, *, progress: bool = False
) -> dict:
    """`evaluate_corpora` as every demo evaluation runs it: the sizes' batch, tokens per language and context."""
    from moelpr.evaluate.perplexity import evaluate_corpora

    return evaluate_corpora(
        model,
        tokenizer,
        corpora,
        batch_size=sizes.eval_batch_size,
        max_tokens=sizes.eval_tokens_per_language,
        context_len=sizes.cutoff_len,
        progress=progress,
        precision=precision,
    )


def evaluate_run(
    name: str,
    model_dir: Path,
    split: str,
    split_yaml: Path,
    out: Path,
    sizes: DemoSizes,
    *,
    precision: str,
    progress: bool,
) -> dict:
    """Perplexity, bits per byte and routing of one run on one split, written to eval/<split>/<name>.json."""
    from moelpr.data.corpus import load_corpora
    from moelpr.utils.atomic import atomic_write_json

    path = out / "eval" / split / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    model, tokenizer = _load(model_dir)
    results = evaluate_at_demo_sizes(model, tokenizer, load_corpora(split_yaml), sizes, precision, progress=progress)
    results = {"method": name, "split": split, "model": str(model_dir), **results}
    atomic_write_json(path, results)
    return results


def probes(name: str, out: Path, split_yaml: Path, sizes: DemoSizes) -> list[dict]:
    """`moelpr.demo.probes.router_probes` of one MoE row on the validation pages (reused by reruns)."""
    from moelpr.data.corpus import iter_documents, load_corpora
    from moelpr.demo.probes import router_probes
    from moelpr.utils.atomic import atomic_write_json

    path = out / "eval" / "validation" / f"probes_{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    model, tokenizer = _load(out / "models" / name)
    corpora = load_corpora(split_yaml)
    texts = {c.language: list(iter_documents(c)) for c in corpora}
    results = router_probes(
        model,
        tokenizer,
        texts,
        {c.language: c.role for c in corpora},
        max_tokens=sizes.eval_tokens_per_language,
        context_len=sizes.cutoff_len,
        num_experts=sizes.num_experts,
    )
    atomic_write_json(path, results)
    return results


def dense_layer_effects(name: str, out: Path, split_yaml: Path, sizes: DemoSizes, precision: str) -> list[dict]:
    """Where the remaining forgetting sits: the row re-evaluated on validation with one MoE layer at a time
    replaced by its expert 0 (the original FFN, as if every token were routed there alone)."""
    from moelpr.data.corpus import load_corpora
    from moelpr.model.arch import decoder_layers
    from moelpr.utils.atomic import atomic_write_json

    path = out / "eval" / "validation" / f"dense_layer_{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    model, tokenizer = _load(out / "models" / name)
    corpora = load_corpora(split_yaml)
    effects = []
    for layer in list(model.config.moe_layers):
        mlp = decoder_layers(model.lm)[layer].mlp
        decoder_layers(model.lm)[layer].mlp = mlp.original
        res = evaluate_at_demo_sizes(model, tokenizer, corpora, sizes, precision)
        decoder_layers(model.lm)[layer].mlp = mlp
        effects.append({"layer": layer, "avg": res["avg"], "ppl": res["ppl"], "bpb": res["bpb"]})
    atomic_write_json(path, effects)
    return effects
