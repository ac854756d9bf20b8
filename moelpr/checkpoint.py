"""Saving and loading MoE-LPR models, safetensors only.

Two formats, both with the model definition (`moelpr/model/*.py`) beside config.json and its `auto_map`:
- full: `save_pretrained` of the whole `MoELPRForCausalLM` (config.json with `model_type: moelpr` and the
  base config embedded, plus safetensors weights). Loads with `AutoModelForCausalLM.from_pretrained(DIR,
  trust_remote_code=True)` where moelpr is not installed, and without `trust_remote_code` after `import moelpr`.
- delta (small): config.json, `delta.safetensors` with only the MoE parameters (new experts, routers,
  classifiers) and `moelpr_delta.json` naming the dense base and a fingerprint of its weights. Loading
  rebuilds the model on that base and refuses a base whose fingerprint differs; it needs moelpr (the
  shipped code says so instead of guessing where the base is).
Directories written before the code travelled with them (no `*.py`, no `auto_map`) load after `import moelpr`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file

from moelpr.errors import UserError
from moelpr.model import DELTA_META, MoELPRConfig, MoELPRForCausalLM, register
from moelpr.model.modeling_moelpr import convert_from_config
from moelpr.utils.atomic import atomic_output_dir

DELTA_WEIGHTS = "delta.safetensors"
_MOE_PARAM_MARKERS = (".mlp.experts.", ".mlp.routers.", ".mlp.classifier.")


def base_fingerprint(state: Mapping[str, torch.Tensor], samples: int = 1024) -> str:
    """A hash of a dense model's weights: names, shapes and a strided sample of values per tensor.

    Values are rounded to bfloat16 first, so the same base loaded in float32 or bfloat16 matches.
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        flat = tensor.reshape(-1)
        step = max(1, flat.numel() // samples)
        sample = flat[::step][:samples].to(torch.bfloat16).to(torch.float32).cpu().numpy()
        digest.update(sample.tobytes())
    return digest.hexdigest()[:32]


def is_moe_param(name: str) -> bool:
    return any(marker in name for marker in _MOE_PARAM_MARKERS)


def is_delta_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / DELTA_META).is_file()


def save_model(
    model,
    path: str | os.PathLike,
    *,
    format: str = "full",
    tokenizer=None,
    overwrite: bool = False,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` to `path` atomically in the `full` or `delta` format (see the module docstring).

    `state_dict`: the weights to write instead of the model's own, when its parameters are shards
    (ZeRO-3 or FSDP: gathered with `accelerator.get_state_dict`).
    """
    if format not in ("full", "delta"):
        raise UserError(f"unknown checkpoint format {format!r}; use 'full' or 'delta'")
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
        if format == "full":
            model.save_pretrained(tmp, state_dict=state_dict)
        else:
            base = model.config.base_model_path
            if not base or not Path(base).is_dir():
                raise UserError(
                    "the delta format needs the dense base model's directory (config.base_model_path); "
                    "load the base from a local directory or save with format='full'"
                )
            changed = [n for n, p in model.named_parameters() if p.requires_grad and not is_moe_param(n)]
            if changed:
                raise UserError(
                    f"parameters outside the MoE layers are trainable (e.g. {changed[0]}); "
                    "the delta format would lose them, save with format='full'"
                )
            from transformers.dynamic_module_utils import custom_object_save

            custom_object_save(model, tmp, config=model.config)  # the code, so a moelpr-less load says what it needs
            model.config.save_pretrained(tmp)
            weights = dict(model.named_parameters()) if state_dict is None else state_dict
            tensors = {n: weights[n].detach().contiguous() for n, _ in model.named_parameters() if is_moe_param(n)}
            save_file(tensors, str(tmp / DELTA_WEIGHTS), metadata={"format": "pt"})
            meta = {"base_model_path": str(Path(base).resolve()), "base_fingerprint": model.config.base_fingerprint}
            (tmp / DELTA_META).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise UserError(f"model directory {path} does not exist; pass a directory written by save_pretrained")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(
            f"{path} is not a model directory (no config.json); pass a directory written by save_pretrained"
        )
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config_file} is not valid JSON ({err.msg} at line {err.lineno})") from None


def load_model(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    base_model: str | None = None,
    device: torch.device | str | None = None,
):
    """Load a dense model, a full MoE-LPR checkpoint or a delta checkpoint from `path`.

    Args:
        dtype: load in this dtype (default: the checkpoint's).
        base_model: for a delta checkpoint, the dense base directory if it moved since saving.
        device: move the model there after loading.
    """
    from transformers import AutoModelForCausalLM

    register()
    path = Path(path)
    raw = _read_config(path)
    kwargs = {} if dtype is None else {"dtype": dtype}
    if raw.get("model_type") != "moelpr":
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    elif not is_delta_dir(path):
        model = MoELPRForCausalLM.from_pretrained(path, **kwargs)
    else:
        meta = json.loads((path / DELTA_META).read_text())
        base_dir = Path(base_model or meta["base_model_path"])
        if not (base_dir / "config.json").is_file():
            raise UserError(f"the base model of {path} is not at {base_dir}; pass base_model=DIR (--base-model DIR)")
        lm = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
        found = base_fingerprint(lm.state_dict())
        if found != meta["base_fingerprint"]:
            raise UserError(
                f"{base_dir} is not the base {path} was trained on (weights fingerprint {found} != "
                f"{meta['base_fingerprint']}); pass the original base with base_model=DIR"
            )
        config = MoELPRConfig.from_pretrained(path)
        config.text_config = lm.config
        config.base_model_path = str(base_dir)
        convert_from_config(lm, config)
        model = MoELPRForCausalLM(config, lm=lm)
        delta = load_file(str(path / DELTA_WEIGHTS))
        expected = {n for n, _ in model.named_parameters() if is_moe_param(n)}
        if set(delta) != expected:
            missing = sorted(expected - set(delta))[:1] or sorted(set(delta) - expected)[:1]
            raise UserError(
                f"{path / DELTA_WEIGHTS} does not match the model described by its config.json (e.g. {missing[0]})"
            )
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in delta.items():
                params[name].copy_(tensor)
    return model.to(device) if device is not None else model
