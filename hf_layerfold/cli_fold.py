"""``hf-layerfold fold``: train (search, plan, fine-tune) and fold a model, then save (and push) it.

The longest command, with its own helpers: the output folder checks (a folder holding anything but an earlier
folded save is never replaced), the scratch folder Trainer writes its checkpoints to, and the progress output
kept on stderr so that stdout holds only the result.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .cli_commands import _check_repo_id
from .cli_config import build_config
from .folded_model import read_save_info
from .workflow import (
    LITE0_ALIAS,
    CLIError,
    check_weights_choice,
    create_base_model,
    fixed_plan,
    fmt_count,
    format_table,
    load_data,
    load_model,
    model_kind,
    plan_source,
    raise_if_interrupted,
    set_input_size,
    training_arguments,
)

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


def _interrupt_callback():
    from transformers import TrainerCallback

    class InterruptCallback(TrainerCallback):
        """Stops training at the next step after a Ctrl-C / SIGTERM whose KeyboardInterrupt was swallowed."""

        def on_step_end(self, args, state, control, **kwargs):
            raise_if_interrupted()

    return InterruptCallback()


def _stderr_progress_callback():
    from transformers import ProgressCallback

    class StderrProgressCallback(ProgressCallback):
        """Trainer's progress bar, with the per-step log dicts on stderr (tqdm.write prints them to stdout)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            import contextlib

            with contextlib.redirect_stdout(sys.stderr):
                return super().on_log(args, state, control, logs=logs, **kwargs)

    return StderrProgressCallback


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
        trainer.add_callback(_interrupt_callback())
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
        raise_if_interrupted()
        metrics = trainer.evaluate()
        raise_if_interrupted()  # never replace --output-dir after a Ctrl-C, even one swallowed during evaluation
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

    block = read_save_info(path) or {}
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
