"""The ``hf-layerfold`` commands (fold, evaluate, benchmark, push, gains) and their private helpers.

Split from ``cli.py`` so that each reader stays short: ``cli.py`` keeps the console entry point and the argument
parsing, this module what each command does with the parsed arguments. ``cli.py`` imports from here, never the
other way round; ``PROG`` lives here because the commands print it, and ``cli.py`` re-exports it.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .cli_config import build_config
from .files import write_text_atomic
from .timing import measure_latency, resolve_device
from .workflow import (
    LITE0_ALIAS,
    CLIError,
    check_model_name,
    check_weights_choice,
    create_base_model,
    evaluate_model,
    fixed_plan,
    fmt_count,
    format_table,
    load_data,
    load_model,
    model_input_size,
    model_kind,
    plan_source,
    set_input_size,
    suggest_model_names,
    training_arguments,
)

PROG = "hf-layerfold"

logger = logging.getLogger(__name__)


def _check_output_dir(path: Path, overwrite: bool) -> None:
    """``--output-dir`` must be new, empty, or an earlier folded save (replaced only with ``--overwrite``); a
    directory holding anything else is never replaced, with ``--overwrite`` or without."""
    from .hub import check_not_working_directory, foreign_entries, is_folded_save

    try:
        check_not_working_directory(path)
    except FileExistsError as err:
        raise CLIError(f"--output-dir {err}") from None
    existing = next((p for p in path.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise CLIError(f"cannot create --output-dir {path}: {existing} is a file")
    if existing is not None:  # where the scratch and the save will be created: writable? (before any loading)
        try:
            Path(tempfile.mkdtemp(prefix=".hf-layerfold-probe-", dir=existing)).rmdir()
        except OSError as err:  # a full disk is the environment's (1), a read-only place the user's choice (2)
            raise CLIError(f"cannot write to --output-dir {path}: {err.strerror or err}",
                           code=1 if err.errno == errno.ENOSPC else 2) from None
    if path.is_symlink() and not path.exists():
        raise CLIError(f"--output-dir {path} is a symbolic link to {os.readlink(path)}, which does not exist")
    if not path.exists():
        return
    if not path.is_dir():
        raise CLIError(f"output path {path} exists and is not a directory")
    if not any(path.iterdir()):
        return
    if not is_folded_save(path):
        raise CLIError(f"output directory {path} holds files that are not a folded-model save; choose another "
                       "--output-dir (--overwrite replaces only an earlier folded save)")
    extra = foreign_entries(path)
    if extra:
        raise CLIError(f"output directory {path} holds a folded model and also {extra}, which a save does not write; "
                       "choose another --output-dir (--overwrite replaces only an earlier folded save)")
    if not overwrite:
        raise CLIError(f"output directory {path} already holds a folded model; pass --overwrite to replace it")


def _check_repo_id(repo_id: str) -> None:
    from .hub import check_repo_id

    try:
        check_repo_id(repo_id, "--repo-id")
    except ValueError as err:
        raise CLIError(str(err)) from None


def _scratch_dir(output: Path) -> Path:
    """Trainer scratch next to the output (same filesystem, easy to spot); removed when the run ends or is stopped."""
    output.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output.name}.train-", dir=output.parent))


def _remove_created_parents(output: Path, existed: Path | None) -> None:
    """After a run that wrote nothing: remove the (empty) folders _scratch_dir created above the output."""
    for parent in output.parents:
        if existed is not None and parent == existed:
            break
        try:
            parent.rmdir()  # only if empty
        except OSError:
            break


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record is logged: a handler keeping the stream of its first
    ``main()`` call wrote to a closed one once the caller had replaced it (main() inside a longer-lived process)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _stderr_progress_callback():
    from transformers import ProgressCallback

    class StderrProgressCallback(ProgressCallback):
        """Trainer's progress bar, with the per-step log dicts on stderr (tqdm.write prints them to stdout)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            import contextlib

            with contextlib.redirect_stdout(sys.stderr):
                return super().on_log(args, state, control, logs=logs, **kwargs)

    return StderrProgressCallback


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


def cmd_fold(args: argparse.Namespace) -> int:
    from .hub import PushToHubError
    from .trainer import LayerFoldingTrainer

    config = build_config(args.config_values, args)
    output = Path(args.output_dir).expanduser().absolute()
    _check_output_dir(output, args.overwrite)
    if args.push_to_hub and not args.repo_id:
        raise CLIError("--push-to-hub needs --repo-id (e.g. your-org/mobilenetv2-folded)")
    if args.repo_id:
        _check_repo_id(args.repo_id)
    check_weights_choice(args.model, args.pretrained)
    device = args.device  # resolved by main (cli.py)
    if device.startswith("cuda:") and device != "cuda:0":  # Trainer trains on its own device (LOCAL_RANK's)
        raise CLIError(f"fold --device {device}: training runs on the first visible GPU; choose the GPU with "
                       f"CUDA_VISIBLE_DEVICES={device.split(':')[1]} and --device cuda")
    folded_input = model_kind(args.model) == "folded"  # a folded save trains on as itself: no search, no plan
    if args.plan is not None and folded_input:
        raise CLIError(f"--plan applies to an unfolded model; {args.model} is already folded with its own plan")
    if args.plan is not None:
        plan_source(args.plan)  # a missing plan file (or an empty --plan) is refused before the data loads
    data = load_data(args.dataset, train_size=args.train_size, eval_size=args.eval_size, seed=args.seed,
                     eval_split=args.eval_split)
    if folded_input:
        model = load_model(args.model)
        logger.info("%s is already folded: fine-tuning its merged convs (no α search; the search settings of the "
                    "config are ignored). It has no BatchNorm left: a lower --lr than for the unfolded network "
                    "(3e-4 trained where 1e-3 diverged on Fashion-MNIST)", args.model)
    else:
        model = create_base_model(args.model, data.num_classes, pretrained=args.pretrained)
    set_input_size(model, args.image_size)
    if args.plan is not None:
        config = _fix_plan(model, args.plan, config)
    teacher = None
    if args.teacher:
        teacher = load_model(args.teacher, pretrained=True, weights_hint=False)  # with its own head
        if int(getattr(teacher, "num_classes", data.num_classes)) != data.num_classes:
            raise CLIError(f"teacher {args.teacher!r} has {teacher.num_classes} classes, the dataset "
                           f"{data.num_classes}")
    elif config.distill_weight > 0:
        raise CLIError(f"--distill-weight {config.distill_weight} needs --teacher (a model fine-tuned on the dataset)")
    base_model_id = None if args.model == LITE0_ALIAS else (model.pretrained_cfg or {}).get("hf_hub_id")
    if not args.pretrained or folded_input:  # a folded save's card keeps the base model it names
        base_model_id = None
    # random weights carry timm's pretrained cfg too, license included: it is not theirs (the Lite0 alias always loads
    # its bundled weights)
    random_weights = not args.pretrained and not folded_input and args.model != LITE0_ALIAS

    existed = next((p for p in output.parents if p.exists()), None)  # folders made below it go if nothing is saved
    try:
        scratch = _scratch_dir(output)
    except OSError as err:  # e.g. a read-only place: found before any training
        raise CLIError(f"cannot write to --output-dir {output}: {err.strerror or err}") from None
    try:
        targs = training_arguments(
            str(scratch), epochs=args.epochs, max_steps=args.max_steps or -1, batch_size=args.batch_size,
            lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, seed=args.seed,
            num_workers=args.num_workers, logging_steps=args.logging_steps, device=device,
            mixed_precision=args.mixed_precision, progress=not args.quiet)
        try:
            trainer = LayerFoldingTrainer(model=model, args=targs, train_dataset=data.train, eval_dataset=data.eval,
                                          layerfold_config=config, teacher_model=teacher,
                                          input_size=args.image_size)
        except ValueError as err:  # no foldable site, unsupported model, labels that do not fit the head
            raise CLIError(str(err)) from None
        if args.quiet:  # without progress bars Trainer would print each log dict instead
            from transformers import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        else:  # the progress bar writes each log dict with tqdm.write, to stdout: keep stdout for the result
            from transformers import ProgressCallback

            trainer.remove_callback(ProgressCallback)
            trainer.add_callback(_stderr_progress_callback())
        logger.info("training %s on %s (%d images, eval on %d of split %r); scratch %s", args.model, args.dataset,
                    len(data.train), len(data.eval), data.eval_split, scratch)
        trainer.train()
        metrics = trainer.evaluate()
        accuracy = {"after": metrics["eval_top1"], "split": data.eval_split, "metric": "top-1 accuracy",
                    "images": len(data.eval)}
        if data.hub_id:
            accuracy["dataset"] = data.hub_id
        try:
            # _check_output_dir asked for --overwrite already; the save itself still refuses files added since
            path = trainer.save_folded(output, overwrite=False, push_to_hub=args.push_to_hub,
                                       repo_id=args.repo_id, private=args.private, token=args.token,
                                       base_model=base_model_id, datasets=data.hub_id, accuracy=accuracy,
                                       plan_searched=None if folded_input else not args.plan,
                                       **({"license": False} if random_weights else {}))
        except PushToHubError as err:
            raise CLIError(str(err), code=1) from None
        except OSError as err:  # e.g. the disk is full: nothing half-written is left (the save is atomic)
            raise CLIError(f"cannot write the folded model to {output}: {err.strerror or err}", code=1) from None
    except KeyboardInterrupt:
        logger.info("interrupted: removing the training scratch; %s was not written", output)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not output.exists():
            _remove_created_parents(output, existed)

    block = json.loads((Path(path) / "config.json").read_text()).get("layerfold", {})
    before, after = block.get("stats_before") or {}, block.get("stats_after") or {}
    rows = [[name, fmt_count(before.get(key)), fmt_count(after.get(key))]
            for name, key in (("non-linear layers", "nonlinear_layers"), ("depth (convs)", "depth"),
                              ("params", "params"), ("MACs / image", "macs"))]
    rows.append([f"eval top-1 ({data.eval_split})", "", f"{metrics['eval_top1']:.2%}"])
    rows.append([f"eval top-5 ({data.eval_split})", "", f"{metrics['eval_top5']:.2%}"])
    print(format_table(["", "before (base network)", "after (layer-folded)"], rows))
    print(f"saved folded model to {path}" + (f" and pushed it to {args.repo_id}" if args.push_to_hub else ""))
    return 0


def _fix_plan(model, spec: str, config):
    """Prepare ``model`` and fix the plan ``--plan`` names (``prepare_with_plan``: one α per site): training is then
    the fine-tune phase only. Returns the config the model was prepared with."""
    from .plan import prepare_with_plan
    from .prepare import alpha_parameters, select_sites

    try:
        select_sites(model, config)  # an unsupported model, or a config that selects no site, said before the plan
    except ValueError as err:
        raise CLIError(str(err)) from None
    plan = fixed_plan(spec, model)  # resolved against the model's sites before the model changes
    try:
        prepare_with_plan(model, plan, config)
    except ValueError as err:  # a site that --target-modules / --exclude-modules leave out
        raise CLIError(f"--plan {spec}: {err}") from None
    logger.info("--plan: %d of %d sites linear from the first step; no α search (lambda_reg and the search "
                "settings are unused)", len(plan), len(alpha_parameters(model)))
    return model.layerfold_config


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
    base = timm.create_model(arch, pretrained=False, num_classes=folded.num_classes,
                             in_chans=getattr(folded, "in_chans", 3)).eval()
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
    from .config import CONFIG_NAME as LAYERFOLD_CONFIG_NAME
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
