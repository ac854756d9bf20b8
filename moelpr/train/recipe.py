"""`Recipe`: everything one training run needs, as one validated dataclass (the YAML file is its serialised form).

A recipe holds the moelpr knobs below plus any `transformers.TrainingArguments` field under its own name
(`learning_rate`, `per_device_train_batch_size`, `output_dir`, ...); those are collected into
`Recipe.training_args`. Command-line overrides (`--key value`) win over the file; `--prepared DIR` replaces the
file's `corpora:` (and `--corpora` its `prepared:`).

`torch_compile: true` (a TrainingArguments field, with `torch_compile_backend` / `torch_compile_mode`) compiles the
whole model before training: every forward (routing, attention, norms, losses) and, through AOTAutograd, its
backward; the optimizer step stays eager. The experts compile on the grouped path in bfloat16 (what `auto` trains
with on GPUs of compute capability ≥ 9.0: no graph break); the loop path (CPU) and float32 grouped matmuls run
eagerly between compiled graphs (docs/benchmarks.md §8).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moelpr.errors import UserError
from moelpr.model.options import DEFAULTS, check_positive_int, check_settings

_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")  # YAML 1.1 reads 3e-4 (no dot) as a string
_PATH_KEYS = (
    "model",
    "corpora",
    "prepared",
    "validation",
    "output_dir",
    "cache_dir",
    "num_experts",
    "similarity",
    "resume_from_checkpoint",
)
DEFAULT_CLASSIFIER_TOP_K = 7  # LayerMoE's Qwen scripts: classifiers in 7 of 24 layers
METHODS = ("moe", "moe_one_stage", "full", "lora", "llama_pro", "loramoe")
SAVE_FORMATS = ("delta", "full")


@dataclass(kw_only=True)
class Recipe:
    """One training run: MoE-LPR stage 1 or 2, or a baseline (full fine-tuning, LoRA, LLaMA-Pro).

    Restarting (`moelpr.train.resume`): the same recipe run again after its run was killed resumes from the last
    complete checkpoint in `output_dir/checkpoints/` (a partial one, killed while writing, is skipped with a
    warning; if none is complete the run starts again). `overwrite: true` starts again instead, removing those
    checkpoints. `resume_from_checkpoint` (a TrainingArguments field) makes it explicit: `true` = the last complete
    checkpoint, which must exist; a `checkpoint-N` path = that one; `false` = never resume, so checkpoints of an
    earlier run are refused (set `overwrite: true` to start again). A finished run (a trained model in
    output_dir) is not resumed: the command stops unless `overwrite: true` is set.
    """

    model: str
    """Dense model directory (stage 1 and baselines), or a stage-1 output directory (stage 2)."""
    corpora: Any = None
    """Corpora spec: a YAML / dataset_info.json path, or an inline list of corpus entries (see moelpr.data);
    prepared into `cache_dir` before training (or give `prepared`)."""
    prepared: str | None = None
    """A dataset directory made by `moe-lpr prepare` (instead of `corpora`): memory-mapped, nothing tokenised."""
    validation: Any = None
    """Validation corpora (a corpora spec, or a directory from `moe-lpr prepare`): loss and bits per byte per
    language and role, and the router monitor, at every evaluation (`eval_strategy`, default "steps" when this is
    set; names such as `eval_old_bpb` serve as `metric_for_best_model`)."""
    weights: dict[str, float] | None = None
    """Corpus name → weight (its share of the training tokens), replacing the corpora's weight / tokens / epochs."""
    method: str = "moe"
    """"moe" (MoE-LPR, stage 1 or 2), "moe_one_stage" (the paper's "MoE": upcycled, every parameter trained in one
    stage on all corpora), or a baseline on the dense model: "full", "lora", "llama_pro", "loramoe"."""
    stage: int = 1
    """MoE-LPR stage: 1 = post-pretraining on the new languages, 2 = review with the LPR loss."""
    num_experts: Any = 4
    """Experts per MoE layer counting the original one; or one count per layer; or an allocation.json path
    holding `experts_per_layer` (LayerMoE). With `expand: true`: the NEW experts of the added group, as a
    per-layer list (as LayerMoE's G2 additions), or an allocation.json whose `experts_per_layer` counts the
    existing layer as one expert, so new = N_l − 1 (what `moe-lpr allocate` writes)."""
    top_k: int = DEFAULTS["num_experts_per_tok"]
    """Experts per token."""
    layers: list[int] | None = None
    """Layers to upcycle (default: all); only with a single `num_experts`."""
    aux_loss_coef: float = DEFAULTS["aux_loss_coef"]
    """Weight of the load-balancing loss (stage 1)."""
    lpr_loss_coef: float = DEFAULTS["lpr_loss_coef"]
    """Weight of the LPR loss (stage 2)."""
    lpr_loss_form: str = DEFAULTS["lpr_loss_form"]
    """"paper" (−log G₀) or "official" (CE on the softmax probabilities, as the official code)."""
    lpr_loss_reduction: str = DEFAULTS["lpr_loss_reduction"]
    """"mean" over (MoE layer, old token) pairs (official code) or "sum" over layers and old tokens per LM target
    token (the paper's Σ_{t∈B}, on the NTP loss's scale; docs/method.md §2.3)."""
    router_warning_threshold: float = 0.1
    """Stage 2: warn (one line) about MoE layers whose old-language tokens still take more than this share of
    their output mix from new experts at the end of training (train_metrics.json: `router_convergence`)."""
    expert_init: str = DEFAULTS["expert_init"]
    """Stage 1: new experts start as "copy" of the original FFN (the paper's Expert-Copy) or "random" (the
    "w/o Expert-Copy" ablation)."""
    balance_loss_form: str = DEFAULTS["balance_loss_form"]
    """"mixtral" (official code, ≈ k when balanced) or "paper" (÷ k)."""
    moe_dispatch: str = DEFAULTS["moe_dispatch"]
    """How the MoE blocks run their experts: "auto" (by device: grouped matmuls when training on a GPU, the loop on
    CPU and for inference) or "reference", "loop", "grouped", "triton" (docs/design.md, "Dispatch")."""
    cutoff_len: int = 1024
    """Tokens per packed training block."""
    max_docs: int | None = None
    """Keep at most this many documents of every corpus that sets no `max_docs` of its own (stage-2 replay)."""
    expand: bool = False
    """Lifelong expansion (stage 1 only): add a new expansion group to a model that finished stage 2, train only
    its experts and router rows on the corpora whose `group` is the new group's number (G1 = 1, G2 = 2, ...)."""
    classifier_layers: list[int] | None = None
    """Stage 2 (LayerMoE): MoE layers that get a language-group classifier in front of the router."""
    similarity: str | None = None
    """Stage 2 (LayerMoE): similarity.json of the model; classifiers go to the `classifier_top_k` MoE layers of
    highest S_l (instead of listing `classifier_layers`)."""
    classifier_top_k: int | None = None
    """How many layers `similarity` picks (default 7, as LayerMoE's Qwen scripts: 7 of 24 layers)."""
    classifier_groups: int | None = None
    """Classifier classes (default: the corpora's largest `group` + 1, at least 2; 3 after G0 → G1 → G2)."""
    classifier_pooling: str = DEFAULTS["classifier_pooling"]
    """"sequence" (one decision per sequence, official code) or "token"."""
    cls_loss_coef: float = DEFAULTS["cls_loss_coef"]
    """Weight of the classifier cross-entropy (stage 2)."""
    continue_: bool = False
    """YAML key `continue`: stage 1 continues training an already upcycled model instead of refusing it."""
    save_format: str | None = None
    """"full" (default: every weight plus the model code beside config.json, so stock transformers / lm-eval load
    it with trust_remote_code) or "delta" (moe only: the MoE weights plus the base's path; loads with moelpr)."""
    overwrite: bool = False
    """Start again: replace a trained model in output_dir and remove the checkpoints of an earlier run (without
    it, the same recipe resumes a killed run from its last complete checkpoint)."""
    on_bad_record: str = "error"
    """Malformed corpus records: "error" (stop, naming file and line) or "skip"."""
    cache_dir: str | None = None
    """Where raw `corpora` are prepared (keyed by tokenizer, files and settings; default: a `moelpr` folder in
    the datasets cache)."""
    num_proc: int = 1
    """Tokenisation processes (shared by the processes of a multi-process launch)."""
    streaming: bool = False
    """Read, tokenise and pack raw corpora on the fly, mixed by weight (needs `max_steps`)."""
    lora_rank: int = 8
    """LoRA baseline: rank."""
    lora_alpha: int = 16
    """LoRA baseline: alpha."""
    loramoe_experts: int = 8
    """LoRAMoE baseline: LoRA experts per MLP linear (rank `lora_rank`, scaling `lora_alpha` / rank; the paper:
    8 experts of rank 180)."""
    lora_target: Any = "all-linear"
    """LoRA baseline: target modules ("all-linear" or a list of module names)."""
    llama_pro_blocks: int | None = None
    """LLaMA-Pro baseline: number of added blocks."""
    llama_pro_every: int | None = None
    """LLaMA-Pro baseline: add one block after every this many layers (instead of `llama_pro_blocks`)."""
    training_args: dict[str, Any] = field(default_factory=dict)
    """`transformers.TrainingArguments` fields given in the recipe (output_dir, learning_rate, ...)."""

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        if self.stage not in (1, 2) or isinstance(self.stage, bool):
            raise UserError(f"stage must be 1 or 2, got {self.stage!r}")
        if self.stage == 2 and self.method != "moe":
            raise UserError(f"stage 2 exists only for method: moe, not {self.method!r}; drop stage or set method: moe")
        check_settings(self)  # the settings shared with the model config (moelpr.model.options)
        _check_choice("on_bad_record", self.on_bad_record, ("error", "skip"))
        if self.save_format is None:
            self.save_format = "full"
        _check_choice("save_format", self.save_format, SAVE_FORMATS)
        if self.save_format == "delta" and self.method != "moe":
            raise UserError(f"save_format: delta is only for method: moe; use save_format: full for {self.method}")
        for key in ("top_k", "cutoff_len", "num_proc", "lora_rank", "lora_alpha", "loramoe_experts"):
            check_positive_int(key, getattr(self, key))
        for key in ("max_docs", "llama_pro_blocks", "llama_pro_every"):
            if getattr(self, key) is not None:
                check_positive_int(key, getattr(self, key))
        if self.method != "llama_pro" and (self.llama_pro_blocks is not None or self.llama_pro_every is not None):
            raise UserError(f"llama_pro_blocks / llama_pro_every only apply to method: llama_pro, not {self.method!r}")
        if (
            isinstance(self.router_warning_threshold, bool)
            or not isinstance(self.router_warning_threshold, (int, float))
            or not 0 <= self.router_warning_threshold <= 1
        ):
            raise UserError(
                f"router_warning_threshold must be a share between 0 and 1, got {self.router_warning_threshold!r}"
            )
        for key in ("continue_", "overwrite", "streaming", "expand"):
            if not isinstance(getattr(self, key), bool):
                raise UserError(f"{yaml_key(key)} must be true or false, got {getattr(self, key)!r}")
        if not isinstance(self.model, (str, os.PathLike)) or not str(self.model):
            raise UserError(f"model must be a model directory, got {self.model!r}")
        if self.layers is not None and (
            not isinstance(self.layers, list)
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers)
        ):
            raise UserError(f"layers must be a list of layer indices such as [0, 1, 5], got {self.layers!r}")
        self._check_layermoe()
        if not self.training_args.get("output_dir"):
            raise UserError("the recipe needs output_dir: the directory the trained model is written to")
        if self.streaming and int(self.training_args.get("max_steps", -1) or -1) <= 0:
            raise UserError("streaming: true needs max_steps (a streamed dataset has no length)")
        self._check_data()
        self._check_validation()

    def _check_validation(self) -> None:
        """Evaluation settings that only make sense with validation data, and its default schedule."""
        args = self.training_args
        strategy = str(args.get("eval_strategy", "no"))
        if self.validation in (None, ""):
            if strategy != "no":
                raise UserError(
                    f"eval_strategy: {strategy} needs validation data; add validation: (a corpora spec or a "
                    "prepared directory) or drop eval_strategy"
                )
            if args.get("load_best_model_at_end"):
                raise UserError("load_best_model_at_end needs validation data; add validation: or drop it")
            return
        if not isinstance(self.validation, (str, os.PathLike, list)):
            raise UserError(f"validation must be a corpora spec or a prepared directory, got {self.validation!r}")
        if "eval_strategy" not in args:
            args["eval_strategy"] = strategy = "steps"  # eval_steps defaults to logging_steps
        if strategy == "no" and args.get("load_best_model_at_end"):
            raise UserError("load_best_model_at_end evaluates during training; set eval_strategy (steps or epoch)")

    def _check_data(self) -> None:
        """`corpora` or `prepared`, and what goes with each."""
        if (self.corpora in (None, "")) == (self.prepared in (None, "")):
            raise UserError(
                "the recipe needs corpora: (a corpora spec) or prepared: (a directory from `moe-lpr prepare`)"
                + (", not both" if self.prepared else "")
            )
        if self.prepared is not None:
            if not isinstance(self.prepared, (str, os.PathLike)):
                raise UserError(f"prepared must be a directory made by `moe-lpr prepare`, got {self.prepared!r}")
            if self.streaming:
                raise UserError("prepared data is memory-mapped, not streamed; drop streaming: true")
            if self.max_docs is not None:
                raise UserError(
                    "max_docs applies when corpora are prepared; set max_docs on the corpora given to `moe-lpr prepare`"
                )
        if self.weights is not None and (
            not isinstance(self.weights, dict)
            or not self.weights
            or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                for k, v in self.weights.items()
            )
        ):
            raise UserError(
                f"weights must map corpus names to numbers > 0, e.g. {{el: 1, hu: 1, tr: 2}}; got {self.weights!r}"
            )

    def _check_layermoe(self) -> None:
        """LayerMoE keys: lifelong expansion (stage 1) and classifiers (stage 2)."""
        if self.expand:
            if self.method != "moe" or self.stage != 1:
                raise UserError("expand: true is lifelong stage 1 (method: moe, stage: 1); drop expand for this run")
            if self.continue_ or self.layers is not None:
                raise UserError("expand: true adds a new expert group; it does not combine with continue or layers")
            if isinstance(self.num_experts, int):
                raise UserError(
                    "with expand: true give num_experts as a per-layer list of NEW experts or an "
                    f"allocation.json, not the single count {self.num_experts!r}"
                )
        if self.classifier_groups is not None:
            if (
                isinstance(self.classifier_groups, bool)
                or not isinstance(self.classifier_groups, int)
                or self.classifier_groups < 2
            ):
                raise UserError(f"classifier_groups must be an integer ≥ 2, got {self.classifier_groups!r}")
        if self.classifier_top_k is not None:
            check_positive_int("classifier_top_k", self.classifier_top_k)
            if self.similarity is None:
                raise UserError("classifier_top_k picks layers by similarity; also give similarity: similarity.json")
        if self.classifier_layers is not None:
            layers = self.classifier_layers
            if (
                not isinstance(layers, list)
                or not layers
                or len(set(layers)) != len(layers)
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
            ):
                raise UserError(
                    f"classifier_layers must be a list of distinct layer indices such as [5, 6], got {layers!r}"
                )
            if self.similarity is not None:
                raise UserError("give classifier_layers or similarity (with classifier_top_k), not both")
        if self.similarity is not None and (
            not isinstance(self.similarity, (str, os.PathLike)) or not str(self.similarity)
        ):
            raise UserError(f"similarity must be the path of a similarity.json, got {self.similarity!r}")
        if self.wants_classifiers and (self.method != "moe" or self.stage != 2):
            raise UserError("classifier_layers / similarity set the LayerMoE classifiers of stage 2; remove them here")

    @property
    def wants_classifiers(self) -> bool:
        """Whether this (stage-2) run adds LayerMoE classifiers."""
        return self.classifier_layers is not None or self.similarity is not None

    @property
    def output_dir(self) -> Path:
        return Path(self.training_args["output_dir"])

    def experts_per_layer(self) -> int | list[int]:
        """`num_experts` as an int or a per-layer list (reading an allocation.json when given a path)."""
        value = self.num_experts
        if isinstance(value, (str, os.PathLike)):
            path = Path(value)
            if not path.is_file():
                raise UserError(
                    f"num_experts file {os.fspath(value)!r} does not exist; give a count, a list or an allocation.json"
                )
            try:
                value = json.loads(path.read_text()).get("experts_per_layer")
            except (json.JSONDecodeError, AttributeError):
                raise UserError(f"{path} is not an allocation.json (a JSON object with experts_per_layer)") from None
            if value is None:
                raise UserError(f"{path} has no experts_per_layer; write it with `moe-lpr allocate`")
        if isinstance(value, bool) or not isinstance(value, (int, list)):
            raise UserError(f"num_experts must be a count, a per-layer list or an allocation.json path, got {value!r}")
        return value

    def to_dict(self) -> dict[str, Any]:
        """The recipe as YAML keys (training arguments flattened back to the top level)."""
        out = {yaml_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "training_args"}
        out.update(self.training_args)
        return json.loads(json.dumps(out, default=str))


def yaml_key(name: str) -> str:
    return "continue" if name == "continue_" else name


def _check_choice(key: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise UserError(f"unknown {key} {value!r}; valid: {', '.join(valid)}")


def recipe_keys() -> tuple[dict[str, str], dict[str, str]]:
    """(moelpr recipe keys as written in YAML, TrainingArguments field names), each → its type as text."""
    from transformers import TrainingArguments

    own = {yaml_key(f.name): str(f.type) for f in dataclasses.fields(Recipe) if f.name != "training_args"}
    ta = {f.name: str(f.type) for f in dataclasses.fields(TrainingArguments) if f.init and not f.name.startswith("_")}
    return own, ta


def load_recipe(
    source: str | os.PathLike | dict[str, Any], overrides: list[str] | dict[str, Any] | None = None
) -> Recipe:
    """Read a recipe YAML (or a dict), apply the overrides, and validate it.

    Args:
        source: path to a recipe YAML file, or its parsed content.
        overrides: `--key value` command-line tokens, or a dict; they win over the file.
    """
    import yaml

    if isinstance(source, dict):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"recipe file {os.fspath(source)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise UserError(f"cannot parse recipe {path}{where}; fix the YAML") from None
        if not isinstance(raw, dict):
            raise UserError(f"recipe {path} must be a mapping of keys to values, got {type(raw).__name__}")
    own, ta_fields = recipe_keys()
    if isinstance(overrides, dict):
        given = dict(overrides)
    else:
        from moelpr.train.overrides import parse_overrides, typed

        types = {**ta_fields, **own}
        given = {k: typed(v, types.get(k, "Any")) for k, v in parse_overrides(list(overrides or [])).items()}
    for key, other in (("prepared", "corpora"), ("corpora", "prepared")):
        if given.get(key) not in (None, "") and other not in given:
            raw.pop(other, None)  # the data named on the command line replaces the file's
    raw.update(given)
    kwargs: dict[str, Any] = {"training_args": {}}
    for key, value in raw.items():
        if isinstance(value, str) and key not in _PATH_KEYS and _FLOAT.match(value):
            value = float(value)
        if key in own:
            kwargs["continue_" if key == "continue" else key] = value
        elif key in ta_fields:
            kwargs["training_args"][key] = value
        else:
            close = difflib.get_close_matches(str(key), sorted({*own, *ta_fields}), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"unknown recipe key {key!r}{hint}")
    if kwargs.get("model") in (None, ""):
        raise UserError("the recipe needs model: a model directory")
    return Recipe(**kwargs)
