"""Unimodal teachers and ensembles (Du et al., "On Uni-Modal Feature Learning in Supervised Multi-Modal
Learning", ICML 2023): UMT distils frozen, unimodally trained encoders into the fused model's encoders;
UME predicts with an ensemble of independently trained unimodal models.

Both obtain their unimodal models the same way (:func:`unimodal_models`): a model named in the
options' checkpoints is loaded from the ``best.pt`` of a ``poise train --method unimodal:<m>`` run;
every other modality is trained by a nested run of the same trainer (the unimodal baseline, on the
training samples that have the modality, best epoch chosen on the validation samples that have it;
the test split is never read).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from poise.config import Choice, FloatRange
from poise.config import ModelConfig, RunConfig
from poise.data.base import DataSplits
from poise.errors import ConfigError, DataError, closest
from poise.functional.teachers import ensemble_logits, feature_distillation_losses
from poise.methods.base import Method, MethodParams
from poise.methods.baselines import Joint, Unimodal
from poise.models.fusion import ConcatFusion, SumFusion
from poise.models.model import MultimodalModel, build_model

if TYPE_CHECKING:
    from poise.data.base import DatasetInfo
    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput
    from poise.train.context import TrainContext

#: the fusion of the unimodal models trained here: with one modality it is one linear head
UNIMODAL_FUSION = "sum"


# ---- obtaining unimodal models ---------------------------------------------------------------------
def _samples_with(dataset: Dataset, column: int) -> Dataset:
    """The samples of ``dataset`` that have the modality of ``present`` column ``column``."""
    present = getattr(dataset, "present", None)
    if present is None or bool(present[:, column].all()):
        return dataset
    return Subset(dataset, present[:, column].nonzero().squeeze(1).tolist())


def unimodal_run_config(config: RunConfig, epochs: int | None) -> RunConfig:
    """The configuration of a nested unimodal run: same encoders and optimiser, a linear head, no
    probe, logs or progress bar."""
    data = config.model_dump()
    data["trainer"].update(probe=False, progress=False, tensorboard=False)
    if epochs is not None:
        data["trainer"]["epochs"] = epochs
    data["model"].update(fusion=UNIMODAL_FUSION, fusion_options={})
    data["method"] = {}
    return RunConfig(**data)


def train_unimodal_model(ctx: TrainContext, modality: str, epochs: int | None) -> MultimodalModel:
    """Train ``unimodal:<modality>`` with the run's trainer on the training samples that have the
    modality; the best epoch is chosen on the validation samples that have it."""
    from poise.train.trainer import Trainer

    column = list(ctx.info.modalities).index(modality)
    val = _samples_with(ctx.splits.val, column)
    # the nested run's closing report is on validation data: the test split stays unread
    splits = DataSplits(ctx.info, _samples_with(ctx.splits.train, column), val, val)
    trainer = Trainer(splits, Unimodal(modality=modality), unimodal_run_config(ctx.config, epochs), seed=ctx.seed,
                      method_name=f"unimodal:{modality}")
    trainer.fit()
    return trainer.model


def load_unimodal_model(info: DatasetInfo, modality: str, path: str | Path) -> MultimodalModel:
    """The one-modality model saved in ``path`` (the ``best.pt`` of a ``unimodal:<modality>`` run),
    built from the model configuration stored beside its weights."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint '{path}' for modality '{modality}' does not exist")
    from poise.train.checkpoint import read_torch_file

    checkpoint = read_torch_file(path, f"the best.pt of a unimodal:{modality} run")
    expected = f"expected the best.pt of `poise train --method unimodal:{modality}`"
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict)
            and isinstance(checkpoint.get("config"), dict) and isinstance(checkpoint["config"].get("model"), dict)):
        raise DataError(f"checkpoint '{path}' is not a poise run checkpoint ({expected})")
    state: dict[str, Any] = checkpoint["model"]
    held = sorted({key.split(".")[1] for key in state if key.startswith("encoders.")})
    if held != [modality]:
        raise DataError(f"checkpoint '{path}' holds encoders for {held or 'no modality'}, not a one-modality "
                        f"model of '{modality}' ({expected})")
    try:
        mc = ModelConfig(**checkpoint["config"]["model"])
    except ValidationError:
        raise DataError(f"checkpoint '{path}' has an invalid model configuration ({expected})") from None
    model = build_model(info, (modality,), mc.fusion or Unimodal.default_fusion, feature_dim=mc.feature_dim,
                        encoders=mc.encoders, encoder_options=mc.encoder_options, fusion_options=mc.fusion_options)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise DataError(f"checkpoint '{path}' does not match the model of modality '{modality}' it describes: "
                        f"{str(err).splitlines()[0]}") from None
    return model


def unimodal_models(ctx: TrainContext, modalities: tuple[str, ...], checkpoints: dict[str, str],
                    epochs: int | None) -> dict[str, MultimodalModel]:
    """One trained one-modality model per modality, in eval mode, frozen, on the run's device: loaded
    from ``checkpoints`` where named, trained otherwise."""
    models = {}
    for m in modalities:
        if m in checkpoints:
            model = load_unimodal_model(ctx.info, m, checkpoints[m])
        else:
            model = train_unimodal_model(ctx, m, epochs)
        models[m] = model.to(ctx.device).eval().requires_grad_(False)
    return models


def validation_accuracy(ctx: TrainContext, model: MultimodalModel, modality: str) -> float:
    """Accuracy of a one-modality model on the validation samples that have its modality."""
    from poise.train.evaluation import evaluate_split

    column = list(ctx.info.modalities).index(modality)
    loader = ctx.make_loader(_samples_with(ctx.splits.val, column), False)
    return evaluate_split(model, Joint(), loader, ctx.info.num_classes, ctx.device)["accuracy"]


def check_checkpoints(method: str, checkpoints: dict[str, str], modalities: tuple[str, ...]) -> None:
    for m, path in checkpoints.items():
        if m not in modalities:
            raise ConfigError(f"method.{method}: checkpoint given for unknown modality '{m}'{closest(m, modalities)}")
        if not Path(path).is_file():
            raise ConfigError(f"method.{method}: checkpoint '{path}' for modality '{m}' does not exist")


# ---- UMT -------------------------------------------------------------------------------------------
class UMTParams(MethodParams):
    distill_weight: float = Field(1.0, ge=0, description="lambda: weight of each modality's feature MSE to its teacher")
    teacher_epochs: int | None = Field(None, ge=1, description="epochs of each teacher's training (default: trainer.epochs)")
    teacher_checkpoints: dict[str, str] = Field(
        default_factory=dict, description="modality -> best.pt of a unimodal run, used as that modality's teacher"
    )

    tunable = {"distill_weight": FloatRange(0.1, 10.0, log=True)}


class UMT(Method):
    """Uni-Modal Teacher: ``CE(fused) + lambda * sum_m MSE(h_m, t_m)``, where ``t_m`` is the feature of a
    frozen encoder trained on modality m alone (eval mode, no gradient) and ``h_m`` the fused model's
    pooled encoder feature, both before any feature scaling. The MSE of a modality counts only the
    samples that have it. Teachers come from the run's own nested unimodal runs, or from
    ``teacher_checkpoints``; they must produce features of the run's ``model.feature_dim``.
    Loss terms are logged as ``distill/<modality>`` (already weighted); each teacher's validation
    accuracy is recorded once, at setup, as ``teacher_val_accuracy/<modality>``."""

    name = "umt"
    family = "losses"
    Params: ClassVar[type[MethodParams]] = UMTParams
    min_modalities = 2

    def check(self, info, modalities, fusion):
        super().check(info, modalities, fusion)
        check_checkpoints(self.name, self.params.teacher_checkpoints, modalities)

    def setup(self, ctx):
        super().setup(ctx)
        if not ctx.training:
            return
        p = self.params
        models = unimodal_models(ctx, ctx.model.modalities, p.teacher_checkpoints, p.teacher_epochs)
        self.teachers: dict[str, nn.Module] = {}
        for m, model in models.items():
            width = model.fusion.feature_dims[m]
            if width != ctx.model.fusion.feature_dims[m]:
                raise DataError(f"the teacher of modality '{m}' ({p.teacher_checkpoints.get(m, 'trained here')}) gives "
                                f"{width}-d features, the model {ctx.model.fusion.feature_dims[m]}-d")
            self.record(f"teacher_val_accuracy/{m}", validation_accuracy(ctx, model, m))
            self.teachers[m] = model.encoders[m]

    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        terms = {"ce": F.cross_entropy(output.logits, batch.labels)}
        with torch.no_grad():
            teacher_features = {m: teacher(batch.inputs[m]) for m, teacher in self.teachers.items()}
        present = {m: batch.present_of(m) for m in self.teachers}
        student = {m: output.features[m] for m in self.teachers}
        for m, mse in feature_distillation_losses(student, teacher_features, present).items():
            terms[f"distill/{m}"] = self.params.distill_weight * mse
        return terms


# ---- UME -------------------------------------------------------------------------------------------
class UMEParams(MethodParams):
    combine: Literal["logits", "probs"] = Field(
        "logits", description="average the members' logits, or their softmax probabilities (then log)"
    )
    member_epochs: int | None = Field(None, ge=1, description="epochs of each member's training (default: trainer.epochs)")
    member_checkpoints: dict[str, str] = Field(
        default_factory=dict, description="modality -> best.pt of a unimodal run, used as that modality's member"
    )

    tunable = {"combine": Choice(("logits", "probs"))}


def _linear_head(model: MultimodalModel, modality: str) -> nn.Linear:
    """The linear layer that gives a one-modality model's logits (sum or concat fusion)."""
    fusion = model.fusion
    if isinstance(fusion, SumFusion):
        return fusion.fc[modality]
    if isinstance(fusion, ConcatFusion):
        return fusion.fc  # one modality: z = h W^T + b
    raise DataError(f"the unimodal model of '{modality}' uses {type(fusion).__name__}; UME needs its logits from "
                    "a linear head (a unimodal run with fusion concat or sum)")


class UME(Method):
    """Uni-Modal Ensemble: one model per modality, each trained alone (or loaded), combined at test time
    by the mean of their logits (default) or of their probabilities over the modalities each sample has.

    The members are copied into the run's model, whose sum fusion holds one linear head per modality,
    so ``z_m`` of that model is exactly member m's logits. The model is then frozen: the trainer's
    epochs train nothing (each runs the frozen ensemble over the training data in eval mode to log its
    train loss and accuracy, and scores it on validation). ``member_epochs`` sets the members' training
    apart from ``trainer.epochs``, which can then be 1. Therefore:

    - fused accuracy: the ensemble's;
    - unimodal accuracy of modality m: member m alone, i.e. the unimodal baseline with its own head;
    - probe accuracy of modality m: a fresh linear probe on member m's frozen encoder, the encoder a
      modality learns with no other modality in the way: the reference that balancing methods aim for.
    """

    name = "ume"
    family = "test-time fusion"
    Params: ClassVar[type[MethodParams]] = UMEParams
    min_modalities = 2
    default_fusion = "sum"
    fusions = ("sum",)
    owns_optimizer_step = True

    def check(self, info, modalities, fusion):
        super().check(info, modalities, fusion)
        check_checkpoints(self.name, self.params.member_checkpoints, modalities)

    def setup(self, ctx):
        super().setup(ctx)
        if not ctx.training:
            return
        p = self.params
        members = unimodal_models(ctx, ctx.model.modalities, p.member_checkpoints, p.member_epochs)
        for m, member in members.items():
            self.record(f"member_val_accuracy/{m}", validation_accuracy(ctx, member, m))
            source = p.member_checkpoints.get(m, "trained here")
            try:
                ctx.model.encoders[m].load_state_dict(member.encoders[m].state_dict())
                ctx.model.fusion.fc[m].load_state_dict(_linear_head(member, m).state_dict())
            except RuntimeError as err:
                raise DataError(f"the unimodal model of '{m}' ({source}) does not match this run's model "
                                f"configuration: {str(err).splitlines()[0]}") from None
        ctx.model.requires_grad_(False)

    def on_step_start(self, batch):
        # the ensemble is fixed: no batch-norm statistics move during the trainer's epochs
        self.ctx.model.eval()
        return None

    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        return {"ce": F.cross_entropy(self.predict(output, batch), batch.labels)}

    def backward(self, terms, output, batch) -> None:
        """Nothing to train."""

    def predict(self, output: ModelOutput, batch: MultimodalBatch) -> Tensor:
        present = torch.stack([batch.present_of(m) for m in output.unimodal_logits], dim=1)
        return ensemble_logits(output.unimodal_logits, present, self.params.combine)


__all__ = ["UME", "UMT", "check_checkpoints", "load_unimodal_model", "train_unimodal_model", "unimodal_models", "unimodal_run_config"]
