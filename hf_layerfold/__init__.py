"""hf_layerfold: Layer Folding for timm CNNs, native to the Hugging Face stack.

Learn which activations of a pre-trained CNN can become linear, then fold the network exactly into
fewer, larger convs::

    import timm, hf_layerfold as lf
    model = lf.prepare_model(timm.create_model("mobilenetv2_100", pretrained=True),
                             lf.LayerFoldingConfig(lambda_reg=0.25))
    ...  # fine-tune (LayerFoldingTrainer), α moves toward 1 on sites that can go
    folded = lf.fold_model(model)  # plan = sites with α ≥ threshold
"""

from .activation import FoldableActivation
from .config import LayerFoldingConfig
from .fold import fold_model
from .fold_math import add_shortcut_tap, compose_convs, dilate_kernel, fuse_bn, grouped_to_dense
from .folded_net import LayerFoldedNet, register_op
from .gains import FoldGains, measure_fold_gains, measure_plan_speedup
from .graph import UnsupportedModelError, register_block_rule, register_model_rule
from .hub import LayerFoldedModel, PushToHubError, save_folded  # also registers layerfold_net with timm
from .merge_costs import measure_merge_costs
from .metrics import compute_metrics
from .plan import FoldPlan, apply_plan, prepare_with_plan
from .prepare import alpha_parameters, foldable_sites, prepare_model, unique_alphas
from .stats import FoldStats, fold_stats, projected_stats

__version__ = "0.1.0"


def __getattr__(name: str):
    """The trainer imports transformers; load it only when asked for."""
    if name == "LayerFoldingTrainer":
        from .trainer import LayerFoldingTrainer

        return LayerFoldingTrainer
    raise AttributeError(f"module 'hf_layerfold' has no attribute {name!r}")


__all__ = [
    "FoldGains",
    "FoldPlan",
    "FoldStats",
    "FoldableActivation",
    "LayerFoldedModel",
    "LayerFoldedNet",
    "LayerFoldingConfig",
    "LayerFoldingTrainer",
    "PushToHubError",
    "UnsupportedModelError",
    "add_shortcut_tap",
    "alpha_parameters",
    "apply_plan",
    "compose_convs",
    "compute_metrics",
    "dilate_kernel",
    "fold_model",
    "fold_stats",
    "foldable_sites",
    "fuse_bn",
    "grouped_to_dense",
    "measure_fold_gains",
    "measure_merge_costs",
    "measure_plan_speedup",
    "prepare_model",
    "prepare_with_plan",
    "projected_stats",
    "register_block_rule",
    "register_model_rule",
    "register_op",
    "save_folded",
    "unique_alphas",
]
