"""The pure mathematics of each method, usable from any training loop."""

from poise.functional.confidence import confidence_ratios, confidence_scores
from poise.functional.extensions import (
    batch_confidence_ratios,
    boost_coefficients_from_ratios,
    cross_modal_distillation,
    distillation_kl,
    distillation_roles,
    modality_dropout_mask,
    modality_dropout_scale,
    uncertainty_weighted_loss,
    weak_boost_coefficients,
)
from poise.functional.curves import (
    centroid_gaps,
    modality_gap,
    normalized_feature_sums,
    overfitting_to_generalization_ratio,
    overfitting_to_generalization_ratios,
)
from poise.functional.gblend import gblend_weights
from poise.functional.jigsaw import jigsaw_permutations, jigsaw_tile_size, jigsaw_tiles, shuffle_tiles
from poise.functional.mla import (
    entropy_fusion_weights,
    entropy_fusion_weights_released,
    fixed_fusion_weights,
    fuse_logits,
    owm_project,
    owm_update,
    owm_update_released,
    released_owm_alpha,
)
from poise.functional.ogm import (
    ge_noise,
    modulate_gradients,
    modulation_coefficients,
    ogm_coefficients,
    opm_drop_probabilities,
    opm_feature_scale,
    opm_keep_mask,
    opm_loss_rows,
    opm_theta,
    select_modulated_parameters,
)
from poise.functional.contrastive import cross_modal_info_nce, info_nce, nt_xent
from poise.functional.teachers import ensemble_logits, feature_distillation_losses
from poise.functional.cosine import cosine_logits
from poise.functional.pareto import pareto_combine, pareto_weights
from poise.functional.prototypes import prototype_entropy, prototype_logits, update_prototypes
from poise.functional.shapley import agm_coefficients, shapley_responses
from poise.functional.relearning import (
    clustering_purity,
    kmeans_purity,
    minmax_scale,
    reinitialise,
    relearning_strength,
)
from poise.functional.valuation import modality_copies, sample_copies, sample_shapley_values
from poise.functional.reconboost import boosting_loss, ga_loss, reconboost_schedule
from poise.functional.inforeg import add_proximal_gradient, fisher_trace, inforeg_coefficients, prime_window_slope
from poise.functional.mbsd import mbsd_alignment, mbsd_distillation_kl, mbsd_released_kl, mbsd_sample_weights
from poise.functional.amco import amco_class_mask, amco_mask_fraction, amco_softmax_mass
from poise.functional.arl import arl_dependence_weights, logit_magnitude
from poise.functional.greedy import (
    apply_gate,
    conditional_learning_speeds,
    mmtm,
    mmtm_gates,
    rebalance_target,
    squared_norm_ratio,
    squeeze,
)
from poise.functional.dimml import (
    confidence_weighted_logits,
    decoupled_dimensions,
    dimension_decoupled_contrastive,
    dimension_discriminability,
    discriminative_dimensions,
)
from poise.functional.lfm import (
    hessian_vector_product,
    js_divergence,
    lfm_alpha_lr,
    lfm_alpha_update,
    lfm_loss,
    lfm_schedule,
    pairwise_alignment,
)
from poise.functional.cggm import cggm_coefficients, cggm_direction_loss, gradient_cosines, head_weight_gradient
from poise.functional.cml import cml_confidence_penalty, prediction_confidence, removal_chain
from poise.functional.g2d import logit_distillation_loss, smp_coefficients, teacher_confidence_sums
from poise.functional.remix import kl_from_uniform, remix_assignment, remix_order
from poise.functional.losses import present_cross_entropy

__all__ = [
    "present_cross_entropy",
    "confidence_ratios",
    "confidence_scores",
    "batch_confidence_ratios",
    "boost_coefficients_from_ratios",
    "cross_modal_distillation",
    "distillation_kl",
    "distillation_roles",
    "modality_dropout_mask",
    "modality_dropout_scale",
    "uncertainty_weighted_loss",
    "weak_boost_coefficients",
    "entropy_fusion_weights",
    "entropy_fusion_weights_released",
    "fixed_fusion_weights",
    "fuse_logits",
    "gblend_weights",
    "centroid_gaps",
    "modality_gap",
    "normalized_feature_sums",
    "overfitting_to_generalization_ratio",
    "overfitting_to_generalization_ratios",
    "jigsaw_permutations",
    "jigsaw_tile_size",
    "jigsaw_tiles",
    "shuffle_tiles",
    "owm_project",
    "owm_update",
    "owm_update_released",
    "released_owm_alpha",
    "ensemble_logits",
    "feature_distillation_losses",
    "cross_modal_info_nce",
    "info_nce",
    "nt_xent",
    "ge_noise",
    "modulate_gradients",
    "modulation_coefficients",
    "ogm_coefficients",
    "opm_drop_probabilities",
    "opm_feature_scale",
    "opm_keep_mask",
    "opm_loss_rows",
    "opm_theta",
    "select_modulated_parameters",
    "cosine_logits",
    "pareto_combine",
    "pareto_weights",
    "prototype_entropy",
    "prototype_logits",
    "update_prototypes",
    "agm_coefficients",
    "shapley_responses",
    "add_proximal_gradient",
    "fisher_trace",
    "inforeg_coefficients",
    "prime_window_slope",
    "clustering_purity",
    "kmeans_purity",
    "minmax_scale",
    "reinitialise",
    "relearning_strength",
    "modality_copies",
    "sample_copies",
    "sample_shapley_values",
    "boosting_loss",
    "ga_loss",
    "reconboost_schedule",
    "mbsd_alignment",
    "mbsd_distillation_kl",
    "mbsd_released_kl",
    "mbsd_sample_weights",
    "amco_class_mask",
    "amco_mask_fraction",
    "amco_softmax_mass",
    "arl_dependence_weights",
    "logit_magnitude",
    "apply_gate",
    "conditional_learning_speeds",
    "mmtm",
    "mmtm_gates",
    "rebalance_target",
    "squared_norm_ratio",
    "squeeze",
    "confidence_weighted_logits",
    "decoupled_dimensions",
    "dimension_decoupled_contrastive",
    "dimension_discriminability",
    "discriminative_dimensions",
    "hessian_vector_product",
    "js_divergence",
    "lfm_alpha_lr",
    "lfm_alpha_update",
    "lfm_loss",
    "lfm_schedule",
    "pairwise_alignment",
    "cggm_coefficients",
    "cggm_direction_loss",
    "gradient_cosines",
    "head_weight_gradient",
    "cml_confidence_penalty",
    "prediction_confidence",
    "removal_chain",
    "logit_distillation_loss",
    "smp_coefficients",
    "teacher_confidence_sums",
    "kl_from_uniform",
    "remix_assignment",
    "remix_order",
]
