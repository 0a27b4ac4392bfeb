"""Measured merge costs: what each conv, and each merge a run of convs can make, costs on the target device.

Merging an expand → depthwise → project chain into one dense conv removes layers and intermediate tensors but can
add MACs; whether that pays depends on the device, the batch and the block's width and resolution (a CPU at batch 1
and a GPU at batch 128 disagree). ``measure_merge_costs`` times every conv, and every merge any plan could ask for,
as a lone conv of the merged shape at the resolution it runs at; ``LayerFoldingConfig(merge_costs=...)`` then splits
each run into the pieces of least summed latency (a per-layer latency table, as LayerMerge builds one). Any split is
folded exactly: the table changes which convs merge, never what the network computes.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
from collections.abc import Sequence

import torch
import torch.nn as nn

from .config import LayerFoldingConfig
from .gains import timing_input_size
from .graph import ConvNode
from .plan import FoldPlan, Run, iter_runs, merged_shape, run_kernel_stride, segment_model, span_key
from .prepare import foldable_sites


def mergeable_spans(model: nn.Module, config: LayerFoldingConfig | None = None,
                    sites: Sequence[str] | None = None) -> list[list[ConvNode]]:
    """Every span of convs a plan could merge under the model's config: the contiguous pieces, within
    ``max_kernel_size``, of the runs that would form were every foldable site linear (single convs included).
    ``config`` and ``sites`` default to the prepared model's; given, the model need not be prepared yet."""
    config = config if config is not None else model.layerfold_config
    unlimited = dataclasses.replace(config, max_kernel_size=10**9, max_macs_increase=None, merge_costs=None)
    seg = segment_model(model, FoldPlan(tuple(sites if sites is not None else foldable_sites(model))), unlimited)
    spans = []
    for run in [*iter_runs(seg.items), *iter_runs(seg.pre_logits)]:
        for start in range(len(run.convs)):
            for end in range(start + 1, len(run.convs) + 1):
                piece = run.convs[start:end]
                if end - start > 1 and max(run_kernel_stride(model, Run(piece))[0]) > config.max_kernel_size:
                    break  # a longer span only grows the kernel
                spans.append(piece)
    return spans


def check_merge_costs(model: nn.Module, config: LayerFoldingConfig, sites: Sequence[str] | None = None) -> None:
    """Every conv and every merge a plan of ``model`` under ``config`` could ask for has a cost in
    ``config.merge_costs`` (``sites``: the sites it will have, for a model not prepared yet). A table measured for
    another model failed only when the plan was fixed, after the search; one measured for another config (fewer
    sites, a smaller ``max_kernel_size``) silently stopped merges it lacked."""
    costs = config.merge_costs
    if costs is None:
        return
    spans = mergeable_spans(model, config, sites)
    missing = [key for key in (span_key(s[0].conv, s[-1].conv) for s in spans) if key not in costs]
    if missing:
        raise ValueError(f"merge_costs lacks {len(missing)} of the convs and merges this model and config can make "
                         f"(e.g. {missing[:3]}): it was measured for another model or config (sites, "
                         "max_kernel_size); measure it again with measure_merge_costs (or `hf-layerfold gains "
                         "--measure-merge-costs`) on this model and config")


def _input_sizes(model: nn.Module, names: set[str], input_size: Sequence[int]) -> dict[str, tuple[int, int]]:
    """Height and width of each named conv's input for one image of ``input_size`` (on a copy, in eval mode)."""
    probe = copy.deepcopy(model).eval().float().cpu()
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            sizes.setdefault(name, tuple(inputs[0].shape[-2:]))
        return hook

    for name in names:
        probe.get_submodule(name).register_forward_hook(record(name))
    with torch.no_grad():
        probe(torch.zeros(1, *input_size))
    return sizes


def measure_merge_costs(model: nn.Module, input_size: int | Sequence[int] | None = None, *, batch_size: int = 1,
                        device: str = "cpu", dtype: str = "fp32", channels_last: bool = False, rounds: int = 5,
                        round_seconds: float = 0.05, warmup: int = 3) -> dict[str, float]:
    """Milliseconds of every conv and every possible merge of a prepared (not yet planned) ``model``, for
    ``LayerFoldingConfig.merge_costs``: each timed as a lone ``nn.Conv2d`` of the merged shape (random weights:
    latency does not depend on them) on ``batch_size`` inputs at the resolution that conv sees, median of
    ``rounds``. Shapes that repeat are timed once. Measure with the config the search will use: its sites and
    ``max_kernel_size`` decide which merges exist (every merge within ``max_kernel_size`` is timed, whatever
    ``max_macs_increase``). The table records no device, batch, dtype or input size: measure it at the cell the
    folded net will serve at, since nothing checks that when it is used. The table leaves out the residual add
    that a block keeps when its branch does not merge into one conv, and the caches a conv shares with its
    neighbours inside the network."""
    from .timing import latency_samples

    input_size = timing_input_size(model, input_size, "measure_merge_costs", "its sites and merge limits decide "
                                   "which merges exist", "it times the merges of every plan",
                                   batch_size=batch_size, dtype=dtype, rounds=rounds, warmup=warmup,
                                   round_seconds=round_seconds)
    spans = mergeable_spans(model)
    sizes = _input_sizes(model, {span[0].conv for span in spans}, input_size)
    timed: dict[tuple, float] = {}
    costs: dict[str, float] = {}
    for span in spans:
        shape = merged_shape(model, span)
        key = (*shape.values(), sizes[span[0].conv])
        if key not in timed:
            kh, kw = shape["kernel_size"]
            conv = nn.Conv2d(shape["in_channels"], shape["out_channels"], (kh, kw), shape["stride"],
                             ((kh - 1) // 2, (kw - 1) // 2), groups=shape["groups"])
            samples = latency_samples({"conv": conv}, (shape["in_channels"], *sizes[span[0].conv]),
                                      batch_size=batch_size, device=device, dtype=dtype, channels_last=channels_last,
                                      warmup=warmup, rounds=rounds, round_seconds=round_seconds)
            timed[key] = statistics.median(samples["conv"])
        costs[span_key(span[0].conv, span[-1].conv)] = timed[key]
    return costs
