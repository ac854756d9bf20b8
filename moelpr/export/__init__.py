"""Export an MoE-LPR model for use without moelpr, and generate text.

`export_model(model, output, format=...)`:
- `hf`: the full checkpoint, which carries the model definition (`trust_remote_code=True` loads it without
  moelpr): the same as `save_model(model, output, format="full")` plus the tokenizer and generation config;
  what turns a delta checkpoint into one stock tools load;
- `mixtral` / `qwen3_moe` / `qwen2_moe`: a stock transformers MoE checkpoint, written only when the
  conversion is exact (see `moelpr.export.native`).
"""

from __future__ import annotations

import os
from pathlib import Path

from moelpr.errors import UserError

FORMATS = ("hf", "mixtral", "qwen3_moe", "qwen2_moe")
# max |Δlogits| accepted by the post-conversion check, by parameter dtype (16-bit: rounding of the fused copies)
TOLERANCE = {"float32": 1e-4, "float64": 1e-8}
TOLERANCE_16BIT = 5e-2


def export_model(
    model,
    output: str | os.PathLike,
    *,
    format: str = "hf",
    overwrite: bool = False,
    source_dir: str | os.PathLike | None = None,
    verify: bool = True,
) -> Path:
    """Write `model` (a `MoELPRForCausalLM`) to `output` atomically.

    Args:
        format: one of `FORMATS`.
        overwrite: replace a non-empty `output`.
        source_dir: the model's directory; its tokenizer files and generation config are copied.
        verify: for the native formats, compare logits of the converted model with ours before writing.

    Raises:
        UserError: unknown format, a model that is not MoE-LPR, or a conversion that would not be exact
            (the message lists every reason).
    """
    from moelpr.export import native
    from moelpr.export.files import copy_aux_files
    from moelpr.model import MoELPRForCausalLM
    from moelpr.utils.atomic import atomic_output_dir

    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    if not isinstance(model, MoELPRForCausalLM):
        raise UserError(
            f"{type(model).__name__} is not an MoE-LPR model; export takes an upcycled model "
            "(a dense model needs no export: use its directory as it is)"
        )
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"output {out} exists and is not an empty directory; pass --overwrite or choose another")
    reasons = [] if format == "hf" else native.unsupported_reasons(model, format)
    if reasons:
        raise UserError(f"cannot export to {format}: " + "; ".join(reasons))
    target = None
    if format != "hf":
        target = native.build_native(model, format)
        if verify:
            diff = native.max_logit_difference(model, target)
            dtype = str(model.dtype).removeprefix("torch.")
            if not diff <= TOLERANCE.get(dtype, TOLERANCE_16BIT):
                raise UserError(
                    f"cannot export to {format}: the converted model's logits differ from ours by {diff:.3g} "
                    "(please report this); nothing was written"
                )
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        (model if target is None else target).save_pretrained(tmp)
        copy_aux_files(Path(source_dir) if source_dir else None, tmp)
    return Path(output)
