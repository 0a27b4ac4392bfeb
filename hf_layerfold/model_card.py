"""The model card of a folded checkpoint: a Jinja template rendered through huggingface_hub's ``ModelCard``.

Every number on the card is one that was measured or counted; a quantity nobody measured is left out (no
"None", no "N/A"). Layer-level facts (what was merged into what) come from the plan and the folded spec.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any
from urllib.parse import quote

import torch.nn as nn
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .collate import CHANNEL_MODES
from .folded_net import LayerFoldedNet
from .plan import ResidualItem, Run, segment_model

TEMPLATE = "folded_model_card.md"
TAGS = ("layer-folding", "image-classification", "timm")
CITATION = """@inproceedings{bendror2022layerfolding,
  title         = {Layer Folding: Neural Network Depth Reduction using Activation Linearization},
  author        = {Ben Dror, Amir and Zehngut, Niv and Raviv, Avraham and Artyomov, Evgeny and Vitek, Ran and
                   Jevnisek, Roy},
  booktitle     = {Proceedings of the British Machine Vision Conference (BMVC)},
  year          = {2022},
  eprint        = {2106.09309},
  archivePrefix = {arXiv}
}"""
HUB_REF = re.compile(r"(?:hf-hub:)?(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")
STAT_NAMES = {
    "nonlinear_layers": "Non-linear activations",
    "depth": "Depth (convolutions on the longest path)",
    "convs": "Convolutions",
    "params": "Parameters",
    "macs": "MACs per image",
}


# ----------------------------------------------------------------------------------------------------------
# What was folded: walk the segmentation of the planned model and the folded spec in lockstep (one spec entry
# per segmentation item), so the merged kernel sizes are read from what was actually built.


def _common_block(paths: Sequence[str]) -> str:
    parents = [p.split(".")[:-1] for p in paths]
    common: list[str] = []
    for parts in zip(*parents):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common) if common else f"{paths[0]} … {paths[-1]}" if len(paths) > 1 else paths[0]


def _between(order: dict[str, int], sites: Sequence[str], convs: Sequence[str]) -> list[str]:
    """Plan sites that sit between the first and last conv of a merge (module order = forward order in timm)."""
    lo, hi = order[convs[0]], order[convs[-1]]
    return [s for s in sites if lo < order.get(s, -1) < hi]


def fold_rows(planned: nn.Module, net: LayerFoldedNet) -> list[dict]:
    """One row per merged conv of ``net``: the block, activations removed, convs merged, merged kernel, stride."""
    plan = planned.layerfold_plan
    order = {name: i for i, (name, _) in enumerate(planned.named_modules())}
    seg = segment_model(planned, plan)
    rows: list[dict] = []

    def walk(items: list, specs: list[dict]) -> None:
        if len(items) != len(specs):
            raise RuntimeError("the folded spec does not match the planned model's segmentation")
        for item, spec in zip(items, specs):
            if isinstance(item, ResidualItem) and not item.absorbed:
                walk(item.branch, spec["branch"])
                if item.shortcut is not None:
                    walk(item.shortcut, spec["shortcut"])
                continue
            if isinstance(item, Run) and len(item.convs) > 1:
                runs, absorbed = [item], False
            elif isinstance(item, ResidualItem):
                runs, absorbed = [item.branch[0], *(item.shortcut or [])], True
            else:
                continue
            convs = [c.conv for run in runs for c in run.convs]
            removed = [s for run in runs for s in _between(order, plan.linear_sites, [c.conv for c in run.convs])]
            rows.append({"block": _common_block(convs), "activations_removed": removed, "convs": convs,
                         "kernel": list(spec["kernel"]), "stride": list(spec["stride"]),
                         "residual_absorbed": absorbed})

    walk(seg.items, net.model_args["features"])
    walk(seg.pre_logits, net.model_args["pre_logits"])
    return rows


def split_hub_ref(ref: str) -> tuple[str | None, str | None]:
    """``(repo_id, revision)`` of ``org/name``, ``org/name@revision`` or ``hf-hub:org/name[@revision]``;
    ``(None, None)`` for anything else (e.g. a timm architecture name)."""
    match = HUB_REF.fullmatch(ref)
    return (match["repo"], match["revision"]) if match else (None, None)


def point_card_at(text: str, repo_id: str, revision: str | None = None) -> str:
    """The card's loading snippets pointed at ``repo_id`` (its branch ``revision``: ``hf-hub:org/name@rev`` for
    timm, ``revision="rev"`` for the others): they name the path the model was saved at (which need not be where it
    is now), or the repo it was saved for, if another."""
    saved_at = re.search(r'"local-dir:((?:[^"\\]|\\.)+)"', text)  # (the path as the card quotes it)
    if saved_at:
        text = text.replace(f'"local-dir:{saved_at[1]}"', f'"hf-hub:{repo_id}"')
        text = text.replace(f'"{saved_at[1]}"', f'"{repo_id}"')
    else:
        saved_for = re.search(r'"hf-hub:([^"@]+)(?:@((?:[^"\\]|\\.)+))?"', text)  # (a branch it was pushed to)
        if saved_for and (saved_for[1] != repo_id or saved_for[2]):
            if saved_for[2]:  # the snippets load the repo's default branch unless --revision says otherwise
                text = text.replace(f'"hf-hub:{saved_for[1]}@{saved_for[2]}"', f'"hf-hub:{saved_for[1]}"')
                text = text.replace(f', revision="{saved_for[2]}")', ")")
            text = text.replace(f'"hf-hub:{saved_for[1]}"', f'"hf-hub:{repo_id}"')
            text = text.replace(f'"{saved_for[1]}"', f'"{repo_id}"')
    if revision:
        text = text.replace(f'"hf-hub:{repo_id}"', f'"hf-hub:{repo_id}@{revision}"')
        text = text.replace(f'"{repo_id}")', f'"{repo_id}", revision="{revision}")')
    return text


def _in_quotes(text: str) -> str:
    """``text`` as it goes between the double quotes of the card's Python snippets (a path may hold ``"`` or ``\\``)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def unmerged_sites(info: Mapping[str, Any]) -> list[str]:
    """Removed activations that no merge row of ``info["folds"]`` accounts for: where a merge was split (by
    ``max_kernel_size``, ``max_macs_increase`` or ``merge_costs``) the activation is gone, but the convolutions on
    either side of it stay separate."""
    merged = {s for row in info.get("folds") or [] for s in row["activations_removed"]}
    return [s for s in (info.get("plan") or {}).get("linear_sites", []) if s not in merged]


def _by_block(sites: Sequence[str]) -> list[dict]:
    by_block: dict[str, list[str]] = {}
    for site in sites:
        by_block.setdefault(_site_block(site), []).append(site)
    return [{"block": b, "activations": _code_list(s, b)} for b, s in by_block.items()]


def _site_block(site: str) -> str:
    parts = site.split(".")
    return ".".join(parts[:-2]) if len(parts) > 2 else parts[0]


def _relative(path: str, block: str) -> str:
    return path[len(block) + 1:] if block and path.startswith(block + ".") else path


def _code_list(names: Sequence[str], block: str, sep: str = ", ") -> str:
    return sep.join(f"`{_relative(n, block)}`" for n in names)


def _size(values: Sequence[int]) -> str:
    return str(values[0]) if len(set(values)) == 1 else "×".join(str(v) for v in values)


# ----------------------------------------------------------------------------------------------------------
# Measured quantities → table rows.


def _fmt_stat(key: str, value: int) -> str:
    return f"{value / 1e6:,.2f} M" if key == "macs" else f"{value:,}"


def _fmt_change(key: str, before: int, after: int) -> str:
    delta = after - before
    absolute = f"{delta / 1e6:+,.2f} M" if key == "macs" else f"{delta:+,}"
    return absolute + (f" ({delta / before:+.1%})" if before else "")


def stats_rows(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> list[dict]:
    rows = []
    for key, name in STAT_NAMES.items():
        a = after.get(key)
        if a is None:
            continue
        b = None if before is None else before.get(key)
        rows.append({"name": name, "after": _fmt_stat(key, a), "before": "" if b is None else _fmt_stat(key, b),
                     "change": "" if b is None else _fmt_change(key, b, a)})
    return rows


def _require(section: str, data: Mapping[str, Any], keys: Sequence[str]) -> None:
    missing = [k for k in keys if data.get(k) is None]
    if missing:
        raise ValueError(f"card field {section!r} needs {missing} (got keys {sorted(data)})")


def latency_section(latency: Mapping[str, Any] | None) -> dict | None:
    """``{"before_ms", "after_ms", "device", "batch_size", "dtype"}`` → rows; either time may be absent."""
    if not latency:
        return None
    _require("latency", latency, ("device", "batch_size", "dtype"))
    before, after = latency.get("before_ms"), latency.get("after_ms")
    if before is None and after is None:
        raise ValueError("card field 'latency' needs 'before_ms' and/or 'after_ms' (measured milliseconds)")
    for v in (before, after):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"card field 'latency' times must be positive milliseconds, got {v}")
    setting = f"Measured on {latency['device']}, batch size {latency['batch_size']}, {latency['dtype']}"
    if latency.get("input_size") is not None:
        setting += f", input {_size(list(latency['input_size']))}"
    rows = [{"name": n, "value": f"{v:.3f} ms"} for n, v in (("Before folding", before), ("After folding", after))
            if v is not None]
    if before is not None and after is not None:
        rows.append({"name": "Speed-up", "value": f"{before / after:.2f}×"})
    return {"setting": setting + ".", "header": "Latency per batch", "rows": rows}


def accuracy_section(accuracy: Mapping[str, Any] | None) -> dict | None:
    """``{"before", "after", "split", "dataset"?, "metric"?, "images"?}`` with fractions in [0, 1] → rows."""
    if not accuracy:
        return None
    _require("accuracy", accuracy, ("split",))
    before, after = accuracy.get("before"), accuracy.get("after")
    if before is None and after is None:
        raise ValueError("card field 'accuracy' needs 'before' and/or 'after' (measured fractions in [0, 1])")
    for v in (before, after):
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError(f"card field 'accuracy' values must be fractions in [0, 1], got {v}")
    metric = accuracy.get("metric", "top-1 accuracy")
    where = f"the `{accuracy['split']}` split" + (f" of `{accuracy['dataset']}`" if accuracy.get("dataset") else "")
    if accuracy.get("images"):  # a subset is not the split
        where += f" ({accuracy['images']} images)"
    elif accuracy.get("streamed"):  # a stream of unknown length: maybe its first N (take(n)), not the whole split
        where += " (streamed; the number of images was not recorded)"
    rows = [{"name": n, "value": f"{v:.2%}"} for n, v in (("Before folding", before), ("After folding", after))
            if v is not None]
    if before is not None and after is not None:
        rows.append({"name": "Change", "value": f"{(after - before) * 100:+.2f} points"})
    return {"setting": f"{metric.capitalize()} on {where}.", "header": metric.capitalize(), "rows": rows}


def _metric_value(metric: Any, value: Any) -> Any:
    """A plain YAML scalar: numpy / torch scalars become Python numbers (yaml.dump would write a
    ``!!python/object`` tag that no card parser reads back); a missing or non-finite value is refused."""
    if value is None:
        raise ValueError(f"card field 'eval_results': metric {metric!r} has no value (leave out what was not measured)")
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"card field 'eval_results': metric {metric!r} is {value} (not a measurement)")
    return value


def eval_results_from(value: Any) -> list[EvalResult] | None:
    """``EvalResult`` objects, or dicts: ``{"dataset", "metrics": {name: value}, "split"?, "dataset_name"?}``
    or EvalResult's own field names (``task_type`` defaults to image-classification)."""
    if value is None:
        return None
    items = [value] if isinstance(value, EvalResult | Mapping) else list(value)
    out: list[EvalResult] = []
    for item in items:
        if isinstance(item, EvalResult):
            out.append(dataclasses.replace(item, metric_value=_metric_value(item.metric_type, item.metric_value)))
        elif "metrics" in item:
            _require("eval_results", item, ("dataset", "metrics"))
            for metric, score in item["metrics"].items():
                out.append(EvalResult(task_type="image-classification", dataset_type=item["dataset"],
                                      dataset_name=item.get("dataset_name", item["dataset"]), metric_type=metric,
                                      metric_value=_metric_value(metric, score), dataset_split=item.get("split"),
                                      dataset_config=item.get("config")))
        else:
            fields = {"task_type": "image-classification", **item}
            fields["metric_value"] = _metric_value(fields.get("metric_type"), fields.get("metric_value"))
            out.append(EvalResult(**fields))
    return out or None


# ----------------------------------------------------------------------------------------------------------


def template_path() -> str:
    return str(resources.files("hf_layerfold").joinpath("templates", TEMPLATE))


def render_card(info: Mapping[str, Any], *, load_id: str, is_hub: bool, title: str,
                base_model: str | None = None, datasets: str | list[str] | None = None,
                license: str | None = None, eval_results: Any = None, latency: Mapping | None = None,
                accuracy: Mapping | None = None, tags: Sequence[str] = (), language: str | list[str] | None = None,
                template: str | os.PathLike | None = None, plan_searched: bool | None = None,
                custom_ops: Sequence[str] = (), load_revision: str | None = None,
                num_classes: int | None = None) -> ModelCard:
    """The card of a folded checkpoint whose ``layerfold`` block is ``info`` (see ``hub.save_folded``);
    ``load_revision``: the branch of the Hub repo ``load_id`` its loading snippets name; ``num_classes`` 0: a
    feature extractor (no classifier), whose card has no image-classification task or snippets."""
    results = eval_results_from(eval_results)
    tags = [tags] if isinstance(tags, str) else list(tags)  # one tag, not one per character
    features = num_classes == 0  # no classifier: pooled features (or the feature map, global_pool='')
    task = "image-feature-extraction" if features else "image-classification"
    base_tags = [t if t != "image-classification" else task for t in TAGS]
    card_data = ModelCardData(library_name="timm", tags=list(dict.fromkeys([*base_tags, *tags])),
                              base_model=split_hub_ref(base_model)[0] if base_model else None,
                              datasets=datasets, license=license, language=language,
                              pipeline_tag=task, eval_results=results,
                              model_name=title if results else None)
    folds = [{"block": r["block"], "activations": _code_list(r["activations_removed"], r["block"]) or "",
              "convs": _code_list(r["convs"], r["block"], " + "), "kernel": "×".join(map(str, r["kernel"])),
              "stride": _size(r["stride"]), "residual": "yes" if r["residual_absorbed"] else "no"}
             for r in info.get("folds") or []]
    sites = list((info.get("plan") or {}).get("linear_sites", []))
    # (folds recorded but empty: every removed activation sits where a merge was split, none merged)
    unmerged = unmerged_sites(info) if info.get("folds") is not None else []
    arch = info.get("base_architecture")
    base_description = f"`{arch}`" if arch else "CNN"
    repo, revision = split_hub_ref(base_model) if base_model else (None, None)
    if base_model and repo is None:
        raise ValueError(f"base_model {base_model!r} is not a Hub repo id ('org/name', optionally '@revision')")
    if repo:  # the metadata field takes a repo id: a revision is named here
        base_description += f" derived from [`{repo}`](https://huggingface.co/{repo})"
        if revision:
            base_description += (f" at revision [`{revision}`]"
                                 f"(https://huggingface.co/{repo}/tree/{quote(revision, safe='')})")
    input_size = info.get("stats_input_size")
    eval_rows = [{"dataset": r.dataset_name, "split": r.dataset_split or "", "metric": r.metric_type,
                  "value": r.metric_value} for r in results or []]
    config = dict(info.get("config") or {})
    if isinstance(config.get("merge_costs"), dict):  # a latency table: its size, not its ~100 lines
        config["merge_costs"] = f"{len(config['merge_costs'])} measured conv / merge latencies (config.json)"
    card = ModelCard.from_template(
        card_data, template_path=str(template or template_path()), title=title, base_description=base_description,
        folds=folds, removed_count=len(sites),
        removed_sites=_by_block(sites), unmerged_sites=_by_block(unmerged), unmerged_count=len(unmerged),
        has_before=bool(info.get("stats_before")), stats=stats_rows(info.get("stats_before"), info["stats_after"]),
        stats_input="×".join(map(str, input_size[1:])) + " pixels" if input_size else "the model's input size",
        latency=latency_section(latency), accuracy=accuracy_section(accuracy), eval_rows=eval_rows,
        timm_id=_in_quotes(("hf-hub:" if is_hub else "local-dir:") + load_id
                           + (f"@{load_revision}" if is_hub and load_revision else "")),
        load_id=_in_quotes(load_id),
        revision_arg=f', revision="{_in_quotes(load_revision)}"' if is_hub and load_revision else "",
        one_channel=bool(input_size) and input_size[0] == 1,  # (kept for templates of users' own)
        channels=input_size[0] if input_size else 3,  # (not 3: transformers' pipeline, RGB only, cannot feed it)
        image_mode=CHANNEL_MODES.get(input_size[0] if input_size else 3, "RGB"),  # as the collator converts
        config_json=json.dumps(config, indent=2, sort_keys=True) if config else "", citation=CITATION,
        plan_searched=plan_searched, custom_ops=", ".join(f"`{k}`" for k in custom_ops), features=features)
    return card


def training_run_card(repo_id: str, arch: str | None, num_classes: int, phase: str, linear_sites: int | None,
                      sites: int, in_chans: int = 3, *, language: str | list[str] | None = None,
                      license: str | None = None, tags: str | list[str] | None = None,
                      base_model: str | None = None, datasets: str | list[str] | None = None) -> str:
    """The card of a ``LayerFoldingTrainer`` run pushed by Trainer (``push_to_hub=True``): prepared or planned
    weights, not the folded model, and how to rebuild them (with the metadata Trainer's push was given)."""
    state = ("its search for the activations that can go was under way" if linear_sites is None else
             f"its plan makes {linear_sites} of {sites} activation sites linear")
    name = arch or "<the timm architecture>"
    channels = f", in_chans={in_chans}" if in_chans != 3 else ""

    def listed(value: str | list[str] | None) -> list[str]:
        return [value] if isinstance(value, str) else list(value or [])

    all_tags = ["layer-folding", "timm", "image-classification"]
    all_tags += [t for t in listed(tags) if t not in all_tags]
    meta = {"library_name": "hf_layerfold", "tags": all_tags, "license": license, "language": language,
            "base_model": base_model, "datasets": listed(datasets) or None}
    header = ModelCardData(**{k: v for k, v in meta.items() if v is not None}).to_yaml()
    return f"""---
{header}
---

# A LayerFoldingTrainer run ({phase} phase)

The weights of a `{name}` prepared for Layer Folding: {state}. This is not the folded model.
`layerfold_state.json` holds the phase and the plan, `layerfold_config.json` the config. To rebuild the model:

```python
from pathlib import Path

import timm
from huggingface_hub import snapshot_download
from safetensors.torch import load_file

import hf_layerfold as lf

folder = Path(snapshot_download("{repo_id}"))
# (with any other arguments the run's model was created with)
model = lf.prepare_model(timm.create_model("{name}", num_classes={num_classes}{channels}),
                         lf.LayerFoldingConfig.from_pretrained(folder))
state = load_file(folder / "model.safetensors")
plan = lf.FoldPlan.from_state_dict(state)
if plan is not None:
    lf.apply_plan(model, plan)
model.load_state_dict(state)
```

The folded model is published by `trainer.save_folded(push_to_hub=True, repo_id=...)`.
"""
