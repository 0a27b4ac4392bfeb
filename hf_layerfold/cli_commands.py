"""The ``hf-layerfold`` commands evaluate, benchmark, push and gains, and helpers the commands share.

Split from ``cli.py`` so that each reader stays short: ``cli.py`` keeps the console entry point and the argument
parsing, this module (and ``cli_fold.py``, for ``fold``) what each command does with the parsed arguments. ``cli.py``
imports from here, never the other way round; ``PROG`` lives here because the commands print it, and ``cli.py``
re-exports it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .cli_config import build_config
from .files import write_text_atomic
from .timing import measure_latency, resolve_device
from .workflow import (
    LITE0_ALIAS,
    CLIError,
    check_model_name,
    create_base_model,
    evaluate_model,
    fixed_plan,
    fmt_count,
    format_table,
    load_data,
    load_model,
    model_input_size,
    model_kind,
    suggest_model_names,
)

PROG = "hf-layerfold"

logger = logging.getLogger(__name__)


def _check_repo_id(repo_id: str) -> None:
    from .hub import check_repo_id

    try:
        check_repo_id(repo_id, "--repo-id")
    except ValueError as err:
        raise CLIError(str(err)) from None


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record is logged: a handler keeping the stream of its first
    ``main()`` call wrote to a closed one once the caller had replaced it (main() inside a longer-lived process)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(verbose: bool, quiet: bool = False) -> None:
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    root = logging.getLogger("hf_layerfold")
    if not root.handlers:
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    if quiet:  # the progress bars of datasets too (loading, splitting, casting)
        import datasets

        datasets.disable_progress_bars()


# ----------------------------------------------------------------------------------------------------------
# Commands


def cmd_evaluate(args: argparse.Namespace) -> int:
    kind = model_kind(args.model)
    data = load_data(args.dataset, eval_size=args.limit, seed=args.seed, need_train=False, eval_split=args.split)
    # a pretrained model keeps its own head: one made for the dataset would be untrained, its accuracy chance
    random_weights = kind == "base" and not args.pretrained
    model = load_model(args.model, data.num_classes if random_weights else None, pretrained=args.pretrained)
    _check_classes(model, args.model, data, base=kind == "base")
    result = evaluate_model(model, data.eval, image_size=args.image_size, batch_size=args.batch_size,
                            device=args.device, num_workers=args.num_workers, progress=not args.quiet)
    result.update(model=args.model, dataset=args.dataset, split=data.eval_split,
                  device=str(resolve_device(args.device)))  # ("auto": the device that ran)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model} on {args.dataset} [{data.eval_split}], {result['images']} images: "
              f"top-1 {result['top1']:.2%}, top-5 {result['top5']:.2%}")
    return 0


def _check_classes(model, name: str, data, *, base: bool = False) -> None:
    """The model must predict the dataset's classes, with the same ids: else its accuracy means nothing. A dataset
    without class names (integer labels) counts as many classes as its largest label says: it may cover only some
    of the model's."""
    counted = data.label_names is None
    if model.num_classes < data.num_classes or (model.num_classes != data.num_classes and not counted):
        hint = ", or pass --no-pretrained for a random-weights baseline" if base else ""
        raise CLIError(f"{name} predicts {model.num_classes} classes, the dataset has {data.num_classes}: its head "
                       "was not trained on these classes. Evaluate a model fine-tuned on them (the output of "
                       f"hf-layerfold fold){hint}.")
    if counted and model.num_classes != data.num_classes:
        logger.warning("the dataset's labels are integers up to %d and name no classes: taking them as the first %d "
                       "of %s's %d class ids", data.num_classes - 1, data.num_classes, name, model.num_classes)
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    if not names or not data.label_names or list(names) == list(data.label_names):
        return
    if sorted(names) == sorted(data.label_names):
        raise CLIError(f"{name} and the dataset have the same classes in another order (model: {list(names)}; "
                       f"dataset: {list(data.label_names)}): class ids would be compared across different classes. "
                       "Give the dataset its classes in the model's order (imagefolder folders sort by name as "
                       "text: e.g. 00_coat, 01_dress, ...).")
    logger.warning("the model's class names %s are not the dataset's %s: the accuracy compares class ids",
                   list(names)[:5], list(data.label_names)[:5])


def _parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise CLIError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise CLIError(f"--batch-sizes must be positive integers, got {text!r}")
    return sizes


def cmd_benchmark(args: argparse.Namespace) -> int:
    import timm
    import torch

    from .fold import fold_model
    from .stats import fold_stats

    sizes = _parse_batch_sizes(args.batch_sizes)
    if model_kind(args.model) != "folded":  # before anything is loaded (a timm name would download weights)
        raise CLIError(f"{args.model} is not a folded save; benchmark compares a folded save (directory or Hub id) "
                       "with its base model")
    folded = load_model(args.model)
    info = getattr(folded, "layerfold_info", None)
    if info is None:
        raise CLIError(f"{args.model} is not a folded model; benchmark compares a folded save with its base model")
    recorded = info.get("base_architecture")
    if args.base_model and recorded and timm.is_model(recorded) and _arch(args.base_model) != _arch(recorded):
        raise CLIError(f"{args.model} was folded from {recorded}, not {args.base_model}: a speed-up against another "
                       "architecture means nothing (--base-model is for saves that do not name their base)")
    arch = _timm_name(args.base_model or recorded)
    if not arch:
        raise CLIError(f"{args.model} does not name its base architecture; pass --base-model TIMM_NAME")
    if not timm.is_model(arch):
        raise CLIError(f"unknown base model {arch!r}{suggest_model_names(arch)}")
    try:
        base = timm.create_model(arch, pretrained=False, num_classes=folded.num_classes,
                                 in_chans=getattr(folded, "in_chans", 3)).eval()
    except Exception as err:  # e.g. an unknown pretrained tag (timm.is_model ignores the tag: "name.no_such_tag")
        raise CLIError(f"cannot create base model {arch!r}: {type(err).__name__}: {err}") from None
    input_size = model_input_size(folded, args.image_size)
    models = {f"base ({arch})": base, "base, BN fused": fold_model(base), "layer-folded": folded}
    try:
        stats = {name: fold_stats(m, input_size) for name, m in models.items()}
    except RuntimeError as err:  # counting MACs runs one image: out of memory at a huge --image-size
        raise CLIError(f"counting the models' MACs at {'x'.join(map(str, input_size))} failed: {err}", code=1) \
            from None
    results: dict[int, dict[str, float]] = {}
    for bs in sizes:
        logger.info("timing batch size %d on %s (%s%s)", bs, args.device, args.dtype,
                    ", channels_last" if args.channels_last else "")
        try:
            results[bs] = measure_latency(models, input_size, batch_size=bs, device=args.device, dtype=args.dtype,
                                          channels_last=args.channels_last, warmup=args.warmup, rounds=args.rounds)
        except RuntimeError as err:  # e.g. an op without fp16 kernels on CPU, or out of memory
            raise CLIError(f"timing failed at batch size {bs} ({args.dtype} on {args.device}): {err}",
                           code=1) from None
    base_name = next(iter(models))
    if args.json:
        print(json.dumps({"device": str(resolve_device(args.device, timing=True)), "dtype": args.dtype,
                          "channels_last": args.channels_last,
                          "input_size": list(input_size), "threads": torch.get_num_threads(),
                          "latency_ms": {str(bs): r for bs, r in results.items()},
                          "stats": {n: s.to_dict() for n, s in stats.items()}}))
        return 0
    header = ["model", "non-linear", "depth", "params", "MACs"]
    for bs in sizes:
        header += [f"bs {bs} ms", f"bs {bs} speed-up"]
    rows = []
    for name in models:
        s = stats[name]
        row = [name, s.nonlinear_layers, s.depth, fmt_count(s.params), fmt_count(s.macs)]
        for bs in sizes:
            row += [f"{results[bs][name]:.3f}", f"{results[bs][base_name] / results[bs][name]:.2f}x"]
        rows.append(row)
    threads = torch.get_num_threads()
    where = args.device + (f" ({threads} thread{'s' if threads > 1 else ''})" if args.device == "cpu" else "")
    print(f"latency per batch, {where}, {args.dtype}{', channels_last' if args.channels_last else ''}, "
          f"input {'x'.join(map(str, input_size))}; median of {args.rounds} rounds")
    print(format_table(header, rows))
    return 0


def _timm_name(name: str) -> str:
    """The timm model name behind a CLI model name (the Lite0 alias names bundled tf_efficientnet_lite0 weights)."""
    return "tf_efficientnet_lite0" if name == LITE0_ALIAS else name


def _arch(name: str) -> str:
    """The timm architecture a model name builds: the Lite0 alias resolved, a pretrained tag and a deprecated name
    (``tf_efficientnet_b0_ap`` builds ``tf_efficientnet_b0``) mapped to it."""
    import timm.models

    name = _timm_name(name)
    try:
        deprecated = timm.models.get_deprecated_models()
    except AttributeError:  # (a timm without it: names are compared as they are)
        deprecated = {}
    return (deprecated.get(name) or name).split(".")[0]


def _check_complete_save(folder: Path, name: str) -> None:
    """Every file ``save_folded`` writes is there (only a folded net's save has no layerfold_config.json) and the
    weights load into the structure config.json describes: a push deletes what the save lacks from the repo."""
    from .config import LAYERFOLD_CONFIG_NAME
    from .folded_net import UnknownLayerTypeError
    from .hub import SAVE_FILES, WEIGHTS_NAME, LayerFoldedModel

    missing = sorted(n for n in set(SAVE_FILES) - {LAYERFOLD_CONFIG_NAME} if not (folder / n).is_file())
    if missing:
        raise CLIError(f"{name} is an incomplete folded save (no {', '.join(missing)}); pushing it would remove those "
                       "files from the repo: save the model again with save_folded or `hf-layerfold fold`")
    try:
        LayerFoldedModel.from_pretrained(folder)
    except UnknownLayerTypeError as err:  # an op registered by the user's code, not in this process
        logger.warning("%s uses an op this process has not registered (%s): its structure is not checked", name, err)
        _check_weights_file(folder / WEIGHTS_NAME, name)
    except Exception as err:  # a truncated or edited file: the repo would hold a model that does not load
        raise CLIError(f"{name} does not load as a folded model ({type(err).__name__}: {err}); not pushed") from None


def _check_weights_file(path: Path, name: str) -> None:
    import safetensors.torch

    try:
        safetensors.torch.load_file(str(path))
    except Exception as err:  # safetensors' own error type for a truncated file
        raise CLIError(f"{name}: its weights file does not load ({type(err).__name__}: {err}); not pushed") from None


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import PushToHubError, check_push_target, foreign_entries, is_folded_save, push_save

    folder = Path(args.save_dir).expanduser().absolute()
    _check_repo_id(args.repo_id)
    try:
        check_push_target(args.revision, args.create_pr)
    except ValueError:
        raise CLIError("--create-pr opens a pull request against the default branch; it cannot take --revision") \
            from None
    if not folder.exists():
        raise CLIError(f"save directory {args.save_dir} does not exist")
    if not is_folded_save(folder):
        raise CLIError(f"{args.save_dir} is not a folded-model save (expected a layerfold_net config.json)")
    _check_complete_save(folder, args.save_dir)  # a push replaces the repo's files with the save's
    others = foreign_entries(folder)
    if others:
        logger.warning("not pushing %s: only the save's own files go to the Hub", others)
    try:
        url = push_save(folder, args.repo_id, private=args.private, token=args.token,
                        commit_message=args.commit_message, revision=args.revision, create_pr=args.create_pr)
    except PushToHubError as err:
        raise CLIError(f"pushing {args.save_dir} to {args.repo_id!r} failed: {err.__cause__.__class__.__name__}: "
                       f"{err.__cause__}", code=1) from None
    print(f"pushed {args.save_dir} to {url or args.repo_id}")
    return 0


def _gains_output(path: str | None) -> Path | None:
    if path is None:
        return None
    out = Path(path).expanduser()
    if out.is_dir():
        raise CLIError(f"--output {path} is a directory; give a file path, e.g. {out / 'gains.json'}")
    existing = next((p for p in out.absolute().parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise CLIError(f"cannot write --output {path}: {existing} is a file")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"cannot create the folder of --output {path}: {err.strerror or err}") from None
    return out


def cmd_gains(args: argparse.Namespace) -> int:
    from .gains import measure_fold_gains, measure_plan_speedup
    from .graph import UnsupportedModelError
    from .hub import is_folded_save
    from .prepare import prepare_model

    config = build_config(args.config_values, args)
    if not 0 <= args.min_saving < 1:
        raise CLIError(f"--min-saving must lie in [0, 1) (a fraction of the baseline latency), got {args.min_saving}")
    out = _gains_output(args.output)  # before the timing: a bad path should not cost the measurement
    if args.measure_merge_costs and out is None and not args.json:
        logger.warning("--measure-merge-costs without --output or --json: the merge-cost table is measured but not "
                       "written anywhere; add --output FILE to use it with fold --config FILE")
    arch = _timm_name(args.model)
    if is_folded_save(Path(arch).expanduser()):
        raise CLIError(f"{arch} is a folded save: it has no folds left to time; gains takes the timm name of its "
                       "base architecture")
    check_model_name(arch)  # a folded save has no folds left to time: only base models
    model = create_base_model(arch, pretrained=False)  # latency does not depend on the weights
    if args.measure_merge_costs:  # a table given as well is replaced by the measurement: not checked
        config.merge_costs = None
    try:
        prepare_model(model, config)
    except (UnsupportedModelError, ValueError) as err:
        raise CLIError(str(err)) from None
    plan = fixed_plan(args.plan, model) if args.plan is not None else None  # refused now (an empty one too)
    input_size = model_input_size(model, args.image_size)
    if args.measure_merge_costs:  # first: each group's fold below then merges as the table says
        from .merge_costs import measure_merge_costs

        logger.info("timing every conv and every merge of %s: batch %d on %s", arch, args.batch_size, args.device)
        try:
            costs = measure_merge_costs(model, input_size, batch_size=args.batch_size, device=args.device,
                                        dtype=args.dtype, channels_last=args.channels_last,
                                        round_seconds=min(args.round_seconds, 0.05))
        except RuntimeError as err:
            raise CLIError(f"timing failed ({args.dtype} on {args.device}): {err}", code=1) from None
        config.merge_costs = costs  # the prepared model holds this same config: its folds now follow the table
    logger.info("timing %s and each of its α groups folded alone: batch %d on %s (%s%s), input %s", arch,
                args.batch_size, args.device, args.dtype, ", channels_last" if args.channels_last else "",
                "x".join(map(str, input_size)))
    try:
        gains = measure_fold_gains(model, input_size, batch_size=args.batch_size, device=args.device,
                                   dtype=args.dtype, channels_last=args.channels_last, rounds=args.rounds,
                                   round_seconds=args.round_seconds)
    except RuntimeError as err:  # e.g. out of memory, an op without kernels for this dtype
        raise CLIError(f"timing failed ({args.dtype} on {args.device}): {err}", code=1) from None
    try:
        weights = gains.weights(args.min_saving)
    except ValueError as err:
        raise CLIError(str(err), code=1) from None
    timed_plan = None
    if plan is not None:
        logger.info("timing the plan (%d sites) folded, beside the BN-fused model", len(plan))
        try:
            timed_plan = measure_plan_speedup(model, plan, input_size, batch_size=args.batch_size,
                                              device=args.device, dtype=args.dtype, channels_last=args.channels_last,
                                              rounds=args.rounds, round_seconds=args.round_seconds)
        except RuntimeError as err:
            raise CLIError(f"timing failed ({args.dtype} on {args.device}): {err}", code=1) from None
        try:
            estimate = gains.estimated_speedup(plan.linear_sites)
        except ValueError:  # part of a measured group, or groups saving more than the whole forward: no estimate
            estimate = None
        timed_plan = {"linear_sites": list(plan.linear_sites), **timed_plan, "estimated_speedup": estimate}
    if out is not None:
        try:
            write_text_atomic(out, json.dumps({**config.to_dict(), "regularizer_weights": weights}, indent=2) + "\n")
        except OSError as err:
            raise CLIError(f"cannot write --output {out}: {err.strerror or err}", code=1) from None
    if args.json:
        print(json.dumps({**gains.to_dict(), "saved_ms": gains.saved_ms(), "regularizer_weights": weights,
                          **({"merge_costs": config.merge_costs} if args.measure_merge_costs else {}),
                          **({"plan": timed_plan} if timed_plan else {})}))
        return 0
    saved = gains.saved_ms()
    rows = [[owner, len(g["sites"]), f"{g['ms']:.3f}", f"{saved[owner]:+.3f}",
             f"{gains.baseline_ms / g['ms']:.3f}x", f"{weights[g['sites'][0]]:.2f}"]
            for owner, g in gains.groups.items()]
    print(f"BN-fused {arch}: {gains.baseline_ms:.3f} ms per batch of {args.batch_size} on {args.device}; two "
          f"copies of it timed {2 * gains.noise_ms:.3f} ms apart (median): smaller savings are noise, and a repeated "
          "measurement can differ by more on a shared CPU")
    print(format_table(["α group (first site)", "sites", "folded alone ms", "saved ms", "speed-up",
                        "weight per site"], rows))
    if timed_plan is not None:
        estimate = timed_plan["estimated_speedup"]
        print(f"the plan ({len(plan)} sites linear) folded: {timed_plan['plan_ms']:.3f} ms against "
              f"{timed_plan['baseline_ms']:.3f} ms BN-fused, {timed_plan['speedup']:.3f}x measured"
              + (f" ({estimate:.3f}x estimated from the groups' savings)" if estimate else ""))
    if out is not None:
        print(f"wrote the config with these regularizer_weights to {out}; use it with: "
              f"{PROG} fold --config {out} --lambda-reg ...")
    return 0
