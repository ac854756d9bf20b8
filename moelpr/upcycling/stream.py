"""Streamed upcycling: a dense safetensors checkpoint → an MoE-LPR checkpoint, one output shard in memory.

`moelpr.upcycle` loads the whole dense model and holds the whole MoE model (peak ≈ the output's size). Here
the MoE model is built on the meta device instead, so the model code still decides every tensor's name,
shape, dtype and tie; only its routers are real. Each output shard is then filled tensor by tensor: dense
tensors are read from the checkpoint with `safe_open` (reopened per read, so no file mapping accumulates in
memory) and new experts are copied from their layer's MLP with `StackedExperts.copies_of`, one layer at a time.
Peak memory ≈ one output shard plus one layer's experts.

Both upcycles build their blocks with the one construction, `moelpr.model.convert.build_block` (here on the
meta device with real CPU routers, the new experts filled in later by the same `new_experts`), so after
`torch.manual_seed(s)` both draw the same routers and the two outputs hold identical tensors. The file layout is what `save_pretrained(DIR,
max_shard_size=...)` writes: `model.safetensors`, or shards plus `model.safetensors.index.json`.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from moelpr.errors import UserError

DEFAULT_MAX_SHARD_SIZE = "2GB"
"""Output shard size: the peak memory is about one shard plus one layer's experts."""

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class DenseCheckpoint:
    """The tensors of a dense checkpoint directory (`model.safetensors` or a sharded index), read lazily."""

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open
        from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

        self.path = path
        index = path / SAFE_WEIGHTS_INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(
                    f"{index} is not a safetensors index (no weight_map); re-save the model with save_pretrained"
                ) from None
            files = sorted(set(weight_map.values()))
        elif (path / SAFE_WEIGHTS_NAME).is_file():
            files = [SAFE_WEIGHTS_NAME]
        else:
            found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            extra = f" (found {found[0]}: pickle checkpoints are not read)" if found else ""
            raise UserError(
                f"{path} has no safetensors weights ({SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME})"
                f"{extra}; save the dense model with save_pretrained"
            )
        self.file_of: dict[str, Path] = {}
        self.shape_of: dict[str, tuple[int, ...]] = {}
        self.dtype_of: dict[str, str] = {}
        for name in files:
            file = path / name
            if not file.is_file():
                raise UserError(f"{path} lists the weights file {name}, which is missing; copy the whole checkpoint")
            try:
                with safe_open(file, framework="pt") as handle:
                    for key in handle.keys():
                        piece = handle.get_slice(key)
                        self.file_of[key], self.shape_of[key] = file, tuple(piece.get_shape())
                        self.dtype_of[key] = piece.get_dtype()
            except (SafetensorError, OSError) as err:
                raise UserError(f"{file} is not a readable safetensors file ({err}); re-save the dense model") from None

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Tensor `name` in `dtype`, from a freshly opened file (a kept-open mapping would stay resident)."""
        from safetensors import safe_open

        with safe_open(self.file_of[name], framework="pt") as handle:
            return handle.get_tensor(name).to(dtype)

    def float_dtype(self) -> torch.dtype | None:
        """The dtype of the first floating-point tensor (what `from_pretrained` loads when config.json has none)."""
        floats = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
        return next((floats[d] for d in self.dtype_of.values() if d in floats), None)


class _DenseState(Mapping):
    """The dense model's `state_dict()`, each tensor read from the checkpoint on access (for `base_fingerprint`).

    Built from the meta skeleton `lm` before its conversion: it maps every state-dict key to the checkpoint
    tensor holding it (a tied weight to its stored twin) and checks names and shapes.
    """

    def __init__(self, checkpoint: DenseCheckpoint, lm: nn.Module):
        self._checkpoint = checkpoint
        tensors = lm.state_dict(keep_vars=True)
        stored: dict[int, str] = {}
        for name, tensor in tensors.items():
            if name in checkpoint.file_of:
                stored.setdefault(id(tensor), name)
        self.source_of: dict[str, str] = {}
        for name, tensor in tensors.items():
            found = stored.get(id(tensor))
            if found is None:
                raise UserError(
                    f"{checkpoint.path} has no tensor {name!r}, which {type(lm).__name__} needs; pass a "
                    "complete checkpoint of its config.json (load and re-save it with transformers' "
                    "save_pretrained)"
                )
            if checkpoint.shape_of[found] != tuple(tensor.shape):
                raise UserError(
                    f"tensor {found!r} in {checkpoint.path} has shape {checkpoint.shape_of[found]}, but "
                    f"config.json implies {tuple(tensor.shape)}; the weights do not belong to this config"
                )
            self.source_of[name] = found
        self._dtype_of = {name: tensor.dtype for name, tensor in tensors.items()}
        self._name_of = {id(tensor): name for name, tensor in tensors.items()}

    def moe_sources(self, moe: nn.Module) -> dict[str, str]:
        """Every key of `moe` (which wraps the converted skeleton) that is a dense tensor → its checkpoint name."""
        return {
            name: self.source_of[self._name_of[id(t)]]
            for name, t in moe.state_dict(keep_vars=True).items()
            if id(t) in self._name_of
        }

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._checkpoint.read(self.source_of[name], self._dtype_of[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.source_of)

    def __len__(self) -> int:
        return len(self.source_of)


def _read_text_config(path: Path):
    from transformers import AutoConfig

    if not path.is_dir():
        raise UserError(f"model directory {path} does not exist; pass a directory written by save_pretrained")
    if not (path / "config.json").is_file():
        raise UserError(
            f"{path} is not a model directory (no config.json); pass a directory written by save_pretrained"
        )
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as err:
        reason = str(err).splitlines()[0]
        raise UserError(f"{path / 'config.json'} is not a config transformers can read ({reason})") from None
    if config.model_type == "moelpr":
        raise UserError(f"{path} is already an MoE-LPR model; upcycle a dense model")
    return config


def _dense_skeleton(path: Path, config, checkpoint: DenseCheckpoint) -> nn.Module:
    """The dense causal LM of `config` on the meta device, in the dtype `from_pretrained` would load."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(config, "dtype", None) or checkpoint.float_dtype() or torch.get_default_dtype()
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as err:
        raise UserError(f"{path} is not a causal language model ({str(err).splitlines()[0]})") from None


class _ShardFiller:
    """Produces any tensor of the MoE model's state dict on demand, holding one layer's MLP and experts at a time."""

    def __init__(self, moe: nn.Module, checkpoint: DenseCheckpoint, source_of: dict[str, str]):
        from moelpr.model import MoEBlock

        self.moe, self.checkpoint, self.source_of = moe, checkpoint, source_of
        self.blocks = {name: m for name, m in moe.named_modules() if isinstance(m, MoEBlock)}
        self.owner = {
            f"{path}.{key}": path
            for path, block in self.blocks.items()
            for key in [*block.original.state_dict(prefix="original."), *block.experts.state_dict(prefix="experts.")]
        }
        self._cached: tuple[str, dict[str, torch.Tensor]] | None = None

    def tensor(self, name: str) -> torch.Tensor:
        if name in self.owner:  # each tensor is written once: let go of it as soon as the shard has it
            return self._layer_tensors(self.owner[name]).pop(name)
        like = self.moe.get_parameter_or_buffer(name)
        if name in self.source_of:
            return self.checkpoint.read(self.source_of[name], like.dtype)
        if like.device.type == "meta":
            raise RuntimeError(f"no source for {name}: the streamed upcycle does not know this tensor")
        return like.detach().contiguous()  # a router, drawn up front

    def mlp_and_experts(self, path: str) -> tuple[nn.Module, list[nn.Module]]:
        """The dense MLP of the block at `path`, read from the checkpoint, and its new expert groups (copies)."""
        from moelpr.model.convert import new_experts

        block = self.blocks[path]
        mlp = copy.deepcopy(block.original)  # meta: no memory
        weights = {
            key: self.checkpoint.read(self.source_of[f"{path}.original.{key}"], t.dtype)
            for key, t in block.original.state_dict(keep_vars=True).items()
        }
        mlp.load_state_dict(weights, assign=True)
        return mlp, [new_experts(mlp, group.num_experts, "copy", 0.0) for group in block.experts]

    def _layer_tensors(self, path: str) -> dict[str, torch.Tensor]:
        """The block's MLP and expert tensors not yet handed out (rebuilt if the shards come back to a layer)."""
        if self._cached is None or self._cached[0] != path:
            self._cached = None  # drop the previous layer first
            mlp, groups = self.mlp_and_experts(path)
            tensors = {
                **mlp.state_dict(prefix=f"{path}.original."),
                **nn.ModuleList(groups).state_dict(prefix=f"{path}.experts."),
            }
            self._cached = (path, tensors)
        return self._cached[1]


def stream_upcycle(
    model_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    num_experts: int | Sequence[int] = 4,
    top_k: int = 2,
    layers: Sequence[int] | None = None,
    format: str = "full",
    seed: int = 0,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> nn.Module:
    """Upcycle the dense checkpoint at `model_dir` into `output` without loading either model whole.

    Args:
        model_dir: a dense causal LM saved with `save_pretrained` (safetensors, one file or sharded).
        output: the MoE-LPR checkpoint directory (written atomically).
        num_experts / top_k / layers: as for `moelpr.upcycle` (new experts are copies of the original MLP).
        format: "full" (streamed shard by shard) or "delta" (only the new weights, written as one file, so
            they are all in memory at once).
        seed: `torch.manual_seed` before the routers are drawn; `moelpr.upcycle` after the same seed draws
            the same routers.
        max_shard_size: the largest output shard, as for `save_pretrained` ("2GB", or bytes).

    Returns:
        The MoE-LPR model on the meta device (real routers only): its config and parameter counts.
    """
    from moelpr.checkpoint import base_fingerprint, save_model
    from moelpr.upcycling.freeze import set_trainable
    from moelpr.utils.atomic import atomic_output_dir

    if format not in ("full", "delta"):
        raise UserError(f"unknown checkpoint format {format!r}; use 'full' or 'delta'")
    source = Path(model_dir)
    text_config = _read_text_config(source)  # the config's own errors come before the weights'
    checkpoint = DenseCheckpoint(source)
    lm = _dense_skeleton(source, text_config, checkpoint)
    dense_state = _DenseState(checkpoint, lm)
    moe = _meta_moe(lm, num_experts, top_k, layers, seed, base_model_path=str(source.resolve()))
    filler = _ShardFiller(moe, checkpoint, dense_state.moe_sources(moe))
    split = _shard_plan(moe, max_shard_size) if format == "full" else None
    tokenizer = _tokenizer(source)
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        moe.config.base_fingerprint = base_fingerprint(dense_state)  # one more read of every dense tensor
        if format == "full":
            _write_full(moe, filler, split, tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        else:
            for path, block in filler.blocks.items():  # every new expert in memory: the delta is one file
                block.experts = nn.ModuleList(filler.mlp_and_experts(path)[1])
            set_trainable(moe, "stage1")
            save_model(moe, tmp, format="delta", tokenizer=tokenizer, overwrite=True)
    return moe


def _meta_moe(
    lm: nn.Module,
    num_experts: int | Sequence[int],
    top_k: int,
    layers: Sequence[int] | None,
    seed: int,
    base_model_path: str,
) -> nn.Module:
    """The MoE-LPR model of the meta skeleton `lm`, with real routers drawn after `torch.manual_seed(seed)`."""
    from moelpr.model import MoELPRForCausalLM
    from moelpr.model.convert import convert_layers
    from moelpr.upcycling.freeze import set_trainable
    from moelpr.upcycling.upcycle import upcycle_config

    config = upcycle_config(lm, num_experts, top_k, layers, base_model_path=base_model_path, expert_init="copy")
    moe = MoELPRForCausalLM(config, lm=lm)  # wrapped before the surgery, as in `upcycle`
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(seed)
        convert_layers(lm, config.expert_groups, top_k, router_device="cpu")  # meta experts, real routers
    set_trainable(moe, "stage1")
    return moe


def _shard_plan(moe: nn.Module, max_shard_size: int | str):
    """Which tensors go to which file: `save_pretrained`'s tie removal and sharding, on the meta state dict."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict
    from transformers.utils import SAFE_WEIGHTS_NAME

    state = remove_tied_weights_from_state_dict(moe.state_dict(), moe)
    if list(revert_weight_conversion(moe, dict(state))) != list(state):
        raise UserError(
            f"{type(moe.lm).__name__} saves its weights under other names than it loads them; "
            "the streamed upcycle cannot write it, use moelpr.upcycle in Python"
        )
    pattern = SAFE_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors")
    try:
        return split_torch_state_dict_into_shards(state, filename_pattern=pattern, max_shard_size=max_shard_size)
    except ValueError as err:
        raise UserError(f"bad max shard size {max_shard_size!r} ({err}); use e.g. 2GB or 500MB") from None


def _write_full(moe: nn.Module, filler: _ShardFiller, split, directory: Path) -> None:
    """What `moe.save_pretrained(directory, max_shard_size=...)` writes, one shard in memory at a time."""
    from safetensors.torch import save_file
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

    moe.save_pretrained(directory, state_dict={})  # config.json, generation_config.json and the model code
    for filename, names in split.filename_to_tensors.items():
        shard = {name: filler.tensor(name) for name in names}
        save_file(shard, str(directory / filename), metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": moe.num_parameters(), **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        (directory / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _tokenizer(path: Path):
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
