"""Run configuration: validated by pydantic, assembled from defaults, a dataset's own defaults, an
optional YAML file and ``--set key=value`` overrides (later wins). Unknown keys are refused with the
closest valid key."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from poise.errors import ConfigError, closest


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# What a search may vary in an option (``poise tune``): a class's ``tunable`` ClassVar maps option names to
# these. ``suggest`` takes an Optuna trial (duck-typed: this module does not import Optuna).
@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False

    def suggest(self, trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def __str__(self) -> str:
        return f"[{self.low:g}, {self.high:g}]" + (" log" if self.log else "")


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int

    def suggest(self, trial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high)

    def __str__(self) -> str:
        return f"{{{self.low}, ..., {self.high}}}"


@dataclass(frozen=True)
class Choice:
    options: tuple

    def suggest(self, trial, name: str):
        return trial.suggest_categorical(name, list(self.options))

    def __str__(self) -> str:
        return "{" + ", ".join(map(str, self.options)) + "}"


class TrainerConfig(_Strict):
    epochs: int = Field(20, ge=1, description="training epochs")
    batch_size: int = Field(64, ge=1, description="samples per step")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd or adamw")
    lr: float = Field(0.01, gt=0, description="learning rate")
    momentum: float = Field(0.9, ge=0, description="SGD momentum")
    weight_decay: float = Field(1e-4, ge=0, description="weight decay (decoupled for adamw)")
    scheduler: Literal["none", "step", "cosine"] = Field("none", description="none, step or cosine (over all epochs)")
    step_size: int = Field(10, ge=1, description="epochs between learning-rate decays (step scheduler)")
    gamma: float = Field(0.1, gt=0, description="decay factor (step scheduler)")
    grad_clip: float | None = Field(None, gt=0, description="max global gradient norm; none: no clipping")
    device: str = Field("cpu", description="cpu, cuda or cuda:N")
    threads: int = Field(
        1, ge=0, description="CPU threads of torch's operators in a run; the numbers depend on it (1: the same on every "
                             "machine; 0: leave the process's setting, torch's default uses every core)"
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    progress: bool = Field(True, description="progress bar over epochs (only on a terminal)")
    probe: bool = Field(True, description="fit a frozen linear probe per modality on the best checkpoint")
    tensorboard: bool = Field(True, description="TensorBoard logs in the run folder")
    amp: Literal["none", "bf16", "fp16"] = Field(
        "none", description="mixed precision: none, bf16 (autocast) or fp16 (autocast with a gradient scaler)"
    )
    accumulate: int = Field(
        1, ge=1, description="micro-batches per optimizer step; batch_size stays the samples per optimizer step"
    )
    checkpoint: bool = Field(True, description="write checkpoint.pt in the run folder after every epoch (for --resume)")
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="also write it every N optimizer steps within an epoch; none: at epoch ends only"
    )
    dist_backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="process-group backend under torchrun; auto: nccl on CUDA, gloo on CPU"
    )

    #: what ``poise tune`` varies for every method alike (the baseline included)
    tunable: ClassVar[dict[str, FloatRange | IntRange | Choice]] = {"lr": FloatRange(1e-3, 0.3, log=True)}


class DataConfig(_Strict):
    protocol: Literal["poise", "released"] = Field(
        "poise", description="poise: select the epoch on a validation split; released: as the released code of OGM-GE, MLA "
        "and BalanceBenchmark, train on the whole training list and also report the epoch of best TEST accuracy "
        "(test-selected, under its own key 'released_test_selected')"
    )
    val_fraction: float = Field(
        0.15, ge=0, lt=1, description="share of the training data held out for model selection (0 only under protocol released)"
    )
    missing_rate: float = Field(0.0, ge=0, lt=1, description="per-modality missing probability, train and val "
                                "(never every modality of a sample: one is restored at random)")
    missing_rate_test: float | None = Field(None, ge=0, lt=1, description="missing probability on test (default: missing_rate)")
    split_seed: int = Field(0, ge=0, description="seed of the data splits (kept apart from the run seed)")
    standardize: bool = Field(
        False, description="standardise each vector / sequence feature with train-split statistics (on for npz)"
    )

    @model_validator(mode="after")
    def _protocol_and_validation_share(self) -> DataConfig:
        if self.protocol == "released":
            if "val_fraction" in self.model_fields_set and self.val_fraction != 0:
                raise ValueError(f"protocol released trains on the whole training list: data.val_fraction must be 0 "
                                 f"(it is {self.val_fraction})")
            self.val_fraction = 0.0
        elif self.val_fraction == 0:
            raise ValueError("data.val_fraction 0 leaves nothing to select the epoch on; it is allowed only with "
                             "data.protocol released (test-selected, as the papers' code)")
        return self


class ModelConfig(_Strict):
    fusion: str | None = Field(None, description="concat, sum, gated, film, shared, mfb (default: the method's)")
    fusion_options: dict[str, Any] = Field(
        default_factory=dict, description="keyword options of the configured fusion (mfb: factors, output_dim, dropout)"
    )
    feature_dim: int = Field(64, ge=1, description="size of every encoder's output feature")
    encoders: dict[str, str] = Field(default_factory=dict, description="modality -> encoder name")
    encoder_options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="modality -> encoder keyword options")
    mid_fusion: Literal["none", "mmtm"] | None = Field(
        None, description="a module between the encoders' stages: mmtm, or none (default: the method's, else none)"
    )
    mid_fusion_options: dict[str, Any] = Field(
        default_factory=dict, description="keyword options of the mid-fusion (mmtm: stages, ratio, gate_scale)"
    )


class RunConfig(_Strict):
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    dataset: dict[str, Any] = Field(default_factory=dict, description="options of the dataset kind")
    method: dict[str, dict[str, Any]] = Field(default_factory=dict, description="method name -> its options")


def describe_validation_error(err: Exception, prefix: str = "") -> str:
    """One sentence for the first problem in a pydantic ValidationError."""
    if not isinstance(err, ValidationError):
        return str(err)
    first = err.errors()[0]
    loc = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(first["loc"]))
    if first["type"] == "extra_forbidden":
        suggestion = _closest_key(err, first)
        parent = loc.rsplit(".", 1)[0] + "." if "." in loc else ""
        if suggestion.startswith(" (did you mean '"):
            suggestion = suggestion.replace(" (did you mean '", f" (did you mean '{parent}", 1)
        return f"unknown config key '{loc}'{suggestion}"
    if first["type"] == "missing":
        return f"config key '{loc}' is required"
    if first["type"] == "value_error" and "error" in first.get("ctx", {}):
        message = str(first["ctx"]["error"])
        return f"'{loc}': {message}" if first["loc"] and f"'{loc}'" not in message else message
    return f"invalid value {first.get('input')!r} for '{loc}': {first['msg']}"


def _closest_key(err: ValidationError, first: dict) -> str:
    model = {"RunConfig": RunConfig}.get(err.title)
    if model is None:
        return ""
    for part in first["loc"][:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return ""
        model = ann
    return closest(str(first["loc"][-1]), model.model_fields)


def merge(base: dict, override: dict) -> dict:
    """Deep merge of nested dictionaries (override wins)."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_set(items: list[str]) -> dict:
    """``["trainer.epochs=5", "method.ogm_ge.alpha=0.5"]`` -> nested dict; values are parsed as YAML."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got '{item}'")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set key '{key}' conflicts with an earlier value")
        node[parts[-1]] = value
    return out


PRESET_DIR = Path(__file__).parent / "configs"


def load_config_file(path: str) -> dict:
    """A YAML file, or the name of a preset shipped in ``poise/configs``."""
    p = Path(path)
    if not p.exists() and (PRESET_DIR / f"{path}.yaml").exists():
        p = PRESET_DIR / f"{path}.yaml"
    if not p.exists():
        presets = [q.stem for q in PRESET_DIR.glob("*.yaml")]
        raise ConfigError(f"config file '{path}' does not exist and is not a preset{closest(path, presets)}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{p}' cannot be read as text: {e.__class__.__name__}") from None
    if data is None:
        raise ConfigError(f"config file '{p}' is empty; give at least one section (trainer, data, model, dataset, method)")
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping of sections (trainer, data, model, ...)")
    return data


def build_config(*layers: dict) -> RunConfig:
    merged: dict = {}
    for layer in layers:
        merged = merge(merged, layer or {})
    try:
        return RunConfig(**merged)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e)) from None


def config_keys() -> list[tuple[str, Any, str]]:
    """(key, default, description) of every fixed config key, for ``poise list`` and the README."""
    rows = []
    for section, model in (("trainer", TrainerConfig), ("data", DataConfig), ("model", ModelConfig)):
        for key, f in model.model_fields.items():
            default = f.default_factory() if f.default_factory is not None else f.default
            rows.append((f"{section}.{key}", default, f.description or ""))
    rows.append(("dataset.<option>", None, "options of the dataset kind (see the dataset's section)"))
    rows.append(("method.<name>.<option>", None, "options of one method (see the method's section)"))
    return rows


def option_rows(model: type[BaseModel]) -> list[tuple[str, Any, str]]:
    """(option, default, description) of a dataset's or method's options, as a user writes them
    (the alias where there is one; a required option's default is the text 'required')."""
    rows = []
    for name, f in model.model_fields.items():
        if f.is_required():
            default: Any = "required"
        else:
            default = f.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                default = default.model_dump()
            elif isinstance(default, dict):
                default = {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in default.items()}
        rows.append((f.alias or name, default, f.description or ""))
    return rows


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
