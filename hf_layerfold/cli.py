"""``hf-layerfold``: fold, evaluate, benchmark and push layer-folded timm models from the shell.

Every command reports a user mistake (unknown model, unreadable dataset, invalid config value, missing
repo id, ...) as one ``hf-layerfold: error: ...`` line on stderr with exit code 2, never a traceback;
failures of the environment (the Hub or network unreachable, e.g. offline; weights not in the cache; a push;
a full disk) are one line too, with exit code 1; an interrupted command exits 130 (``EXIT_CODES``). The building
blocks (model and dataset resolution, evaluation, tables) live in ``workflow.py``, latency in ``timing.py``, the
commands themselves in ``cli_fold.py`` (``cmd_fold``) and ``cli_commands.py`` (the others); this module parses the
command line and dispatches to them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import re
import signal
import sys
import threading
import typing
from collections.abc import Sequence

from PIL.Image import DecompressionBombError, UnidentifiedImageError

from .cli_commands import (  # the commands (and PROG) used to live here: still importable from this module
    PROG,
    _setup_logging,
    cmd_benchmark,
    cmd_evaluate,
    cmd_gains,
    cmd_push,
)
from .cli_config import add_config_flags, build_config, read_mapping_file  # noqa: F401  (build_config: re-exported)
from .cli_fold import cmd_fold
from .collate import ImageReadError
from .config import LayerFoldingConfig
from .timing import DTYPES
from .workflow import FASHION_MNIST, INTERRUPTED, LITE0_ALIAS, CLIError, torch_device

# The LayerFoldingConfig fields that decide what a fold makes (gains takes these; the others only shape training).
FOLD_SHAPE_FIELDS = ("target_modules", "exclude_modules", "alpha_sharing", "max_kernel_size", "max_macs_increase",
                     "merge_costs", "fold_residual")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one error line (with a pointer to --help) instead of a usage dump."""

    def error(self, message: str) -> typing.NoReturn:
        raise CLIError(f"{message} (see '{self.prog} --help')")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout; appends a default only where it says something (not None / False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or \
                action.default == argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


def _number(kind: type, low: float, strict: bool) -> typing.Callable[[str], typing.Any]:
    """An argparse type: ``kind`` (int or float) above ``low`` (``strict``) or at least ``low``; argparse turns
    the message into "argument --flag: must be ..." (one error line, exit code 2)."""
    what = f"{'an integer' if kind is int else 'a finite number'} {'>' if strict else '>='} {low:g}"

    def convert(text: str) -> typing.Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not math.isfinite(value) or not (value > low if strict else value >= low):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return convert


POSITIVE_INT = _number(int, 0, strict=True)
COUNT = _number(int, 0, strict=False)
POSITIVE = _number(float, 0, strict=True)
NON_NEGATIVE = _number(float, 0, strict=False)


# ----------------------------------------------------------------------------------------------------------
# Parser


DESCRIPTION = f"""\
Layer Folding for timm CNNs: learn which activations can become linear while fine-tuning, then fold
the network exactly into fewer, larger convolutions.

  {PROG} fold       fine-tune + fold a model on a dataset and save it (optionally push it)
  {PROG} evaluate   top-1 / top-5 of a folded save or a timm model on a dataset
  {PROG} benchmark  latency of a folded save against its base architecture
  {PROG} gains      what folding each block saves on a device: latency-aware regularizer weights for fold
  {PROG} push       upload an existing folded save to the Hugging Face Hub

Examples:
  {PROG} fold --model {LITE0_ALIAS} --dataset {FASHION_MNIST} --image-size 64 --epochs 1 \\
      --train-size 2000 --lambda-reg 0.5 --alpha-lr 0.05 --output-dir outputs/lite0-folded
  {PROG} benchmark outputs/lite0-folded --device cpu --batch-sizes 1,32
"""

DEVICE_HELP = "cpu, cuda, cuda:N or auto (cuda when available, else cpu)"

EXIT_CODES = """\
Exit codes (every error is one "hf-layerfold: error: ..." line on stderr):
  0    success
  1    a resource could not be reached or written: the Hub or network (offline, a download, a push), model
       weights or a dataset that are not available here, a timing that failed (out of memory), a full disk
  2    the input is wrong: a bad flag or config value, an unknown model, a dataset path that does not exist or
       holds no readable images, a model path that is not a folded save, an unusable --output-dir, a --device
       this machine does not have, ...
  130  interrupted (Ctrl-C or SIGTERM); an interrupted fold leaves no output and no scratch behind
"""

FOLD_EPILOG = f"""\
Examples:
  {PROG} fold --model {LITE0_ALIAS} --dataset {FASHION_MNIST} --image-size 64 --train-size 2000 \\
      --epochs 1 --lambda-reg 0.5 --alpha-lr 0.05 --output-dir outputs/lite0-folded
  {PROG} fold --model mobilenetv2_100 --dataset ./my_images --config fold.yaml --threshold 0.8 \\
      --push-to-hub --repo-id me/mobilenetv2-folded
  {PROG} fold --model outputs/lite0-folded --dataset {FASHION_MNIST} --image-size 64 --lr 3e-4 \\
      --max-steps 500 --output-dir outputs/lite0-folded-more
  {PROG} fold --model {LITE0_ALIAS} --plan bn1,blocks.1.1,blocks.2.1,blocks.1.0.bn1.act --image-size 64 \\
      --output-dir outputs/lite0-fixed-plan

--config takes YAML or JSON (a saved layerfold_config.json works): LayerFoldingConfig fields and, optionally,
any training option of this command (epochs: 2, batch_size: 64, ...). Flags on the command line win.
Training scratch lives in a hidden directory next to --output-dir and is removed when the run ends, fails or
is interrupted; the output directory is written atomically at the end, so an interrupted run leaves nothing.
"""


LIST_OPTIONS = frozenset({"plan"})  # fold options given comma-separated on the command line, as a list in --config


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The top-level parser, and the ``fold`` sub-parser (its defaults take values from ``--config``)."""
    from . import __version__

    parser = _Parser(prog=PROG, description=DESCRIPTION, epilog=EXIT_CODES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def common(p: argparse.ArgumentParser, trains: bool = False) -> None:
        p.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads; unset: torch's choice")
        p.add_argument("--quiet", action="store_true",
                       help="no progress bars" + (" nor per-step training logs" if trains else ""))
        p.add_argument("--verbose", action="store_true", help="debug logging")

    fold = sub.add_parser(
        "fold", formatter_class=_Formatter, epilog=FOLD_EPILOG,
        help="fine-tune + fold a model on a dataset and save it",
        description="Prepare a pre-trained CNN for Layer Folding, fine-tune it on a dataset (phase 1 learns which "
                    "activations can become linear, phase 2 fine-tunes with that plan fixed; --plan fixes one and "
                    "skips phase 1), fold it exactly into "
                    "a shallower network and save it (model.safetensors, config.json, layerfold_config.json, "
                    "layerfold_plan.json and a model card).")
    io = fold.add_argument_group("model, data and output")
    io.add_argument("--config", metavar="FILE", help="YAML/JSON file with LayerFoldingConfig fields (and training "
                    "options); command-line flags override it")
    io.add_argument("--model", default=LITE0_ALIAS,
                    help=f"timm model name (e.g. mobilenetv2_100, resnet50.a1_in1k, hf-hub:org/name), "
                         f"{LITE0_ALIAS!r} for the bundled ImageNet EfficientNet-Lite0 weights, or a folded save "
                         "(directory or Hub id) to fine-tune further as it is (no search)")
    io.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                    help="load the timm model's pre-trained weights (Layer Folding starts from a trained network)")
    io.add_argument("--dataset", default=FASHION_MNIST,
                    help=f"{FASHION_MNIST!r}, a directory in imagefolder layout, or a Hub dataset id")
    io.add_argument("--eval-split", default=None, help="split to evaluate on; unset: validation/val/test, else "
                    "a held-out 10%% of train (at most 1000 images)")
    io.add_argument("--train-size", type=POSITIVE_INT, default=None,
                    help="train on a random subset of this many images")
    io.add_argument("--eval-size", type=POSITIVE_INT, default=None,
                    help="evaluate on a random subset of this many images")
    io.add_argument("--image-size", type=POSITIVE_INT, default=None,
                    help="train / evaluate at this resolution; unset: the model's. Recorded in the saved config")
    io.add_argument("--teacher", default=None, help="teacher for distillation (--distill-weight > 0): a folded "
                    "save, a timm name or hf-hub: id with a head for the dataset's classes")
    io.add_argument("--output-dir", default="outputs/folded", help="where the folded model is saved")
    io.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                    help="replace an earlier folded save in --output-dir (a directory holding anything else is "
                         "never replaced); --no-overwrite undoes overwrite: true in --config")
    io.add_argument("--push-to-hub", action=argparse.BooleanOptionalAction, default=False,
                    help="also push the save to the Hub (needs --repo-id)")
    io.add_argument("--repo-id", default=None, help="Hub repo for --push-to-hub, e.g. your-org/model-folded")
    io.add_argument("--private", action="store_true", help="create the Hub repo private")
    io.add_argument("--token", default=None, help="Hub token; unset: HF_TOKEN or the logged-in one")
    train = fold.add_argument_group("training")
    train.add_argument("--epochs", type=POSITIVE, default=1.0, help="training epochs (both phases together)")
    train.add_argument("--max-steps", type=POSITIVE_INT, default=None, help="training steps; overrides --epochs")
    train.add_argument("--batch-size", type=POSITIVE_INT, default=32, help="per-device batch size")
    train.add_argument("--lr", type=POSITIVE, default=1e-3, help="learning rate of the weights (α: --alpha-lr)")
    train.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.0, help="AdamW weight decay (never applied to α)")
    train.add_argument("--warmup-steps", type=NON_NEGATIVE, default=0, help="lr warm-up steps (a float < 1: a ratio)")
    train.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no", help="autocast dtype")
    train.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available, else cpu); pick the "
                       "GPU with CUDA_VISIBLE_DEVICES")
    train.add_argument("--num-workers", type=COUNT, default=0, help="dataloader worker processes")
    train.add_argument("--logging-steps", type=POSITIVE_INT, default=10,
                       help="log loss, α and projected depth every N steps")
    train.add_argument("--seed", type=COUNT, default=0, help="seed of weights init, data order and subsets")
    train.add_argument("--plan", metavar="NAMES|FILE", default=None,
                       help="skip the α search and fine-tune with this plan fixed from the first step: "
                            "comma-separated blocks (every site inside) and single sites (an inverted residual's "
                            "expand activation alone makes a fused block), e.g. bn1,blocks.1.1,blocks.1.0.bn1.act; "
                            "or a plan JSON file (layerfold_plan.json), or a local folded save (a folder), whose "
                            "plan is reused (in a --config file: the names as a list)")
    common(fold, trains=True)
    add_config_flags(fold)
    fold.set_defaults(func=cmd_fold)

    evaluate = sub.add_parser(
        "evaluate", formatter_class=_Formatter, help="top-1 / top-5 of a model on a dataset",
        description="Evaluate a folded save (directory or Hub id) or a timm model on a labelled image dataset "
                    "with the model's own eval preprocessing.",
        epilog=f"Example:\n  {PROG} evaluate outputs/lite0-folded --dataset {FASHION_MNIST} --limit 1000")
    evaluate.add_argument("model", help=f"folded-model directory or Hub id, a timm model name, or {LITE0_ALIAS!r}")
    evaluate.add_argument("--dataset", default=FASHION_MNIST,
                          help=f"{FASHION_MNIST!r}, a directory in imagefolder layout, or a Hub dataset id")
    evaluate.add_argument("--split", default=None, help="split; unset: validation/val/test, else the whole "
                          "(only) split, e.g. all of train for an imagefolder without splits")
    evaluate.add_argument("--limit", type=POSITIVE_INT, default=None,
                          help="evaluate on a random subset of this many images")
    evaluate.add_argument("--image-size", type=POSITIVE_INT, default=None, help="resolution; unset: the model's config")
    evaluate.add_argument("--batch-size", type=POSITIVE_INT, default=64, help="batch size")
    evaluate.add_argument("--device", default="auto", help=DEVICE_HELP)
    evaluate.add_argument("--num-workers", type=COUNT, default=0, help="dataloader worker processes")
    evaluate.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                          help="pre-trained weights for a timm model name")
    evaluate.add_argument("--seed", type=COUNT, default=0, help="seed of the --limit subset")
    evaluate.add_argument("--json", action="store_true", help="print the result as one JSON line")
    common(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    bench = sub.add_parser(
        "benchmark", formatter_class=_Formatter, help="latency of a folded save vs. its base architecture",
        description="Time a folded save against its base architecture (timm, randomly initialised: latency does "
                    "not depend on the weights), as is and with BatchNorm fused, at one or more batch sizes.",
        epilog=f"Examples:\n  {PROG} benchmark outputs/lite0-folded --device cpu --batch-sizes 1,32\n"
               f"  {PROG} benchmark me/lite0-folded --device cuda --batch-sizes 1,128 --dtype bf16 --channels-last")
    bench.add_argument("model", help="folded-model directory or Hub id")
    bench.add_argument("--base-model", default=None, help="timm name of the base, for a save that does not name a "
                       "timm architecture it was folded from (unset: the save's base_architecture)")
    bench.add_argument("--device", default="cpu", help=DEVICE_HELP + " (the device to time on)")
    bench.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes, e.g. 1,128")
    bench.add_argument("--dtype", choices=DTYPES, default="fp32", help="model and input dtype")
    bench.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    bench.add_argument("--image-size", type=POSITIVE_INT, default=None, help="resolution; unset: the save's input size")
    bench.add_argument("--warmup", type=COUNT, default=3, help="untimed forwards per model first")
    bench.add_argument("--rounds", type=POSITIVE_INT, default=7, help="interleaved timing rounds (median is reported)")
    bench.add_argument("--json", action="store_true", help="print the results as one JSON line")
    common(bench)
    bench.set_defaults(func=cmd_benchmark)

    gains = sub.add_parser(
        "gains", formatter_class=_Formatter, help="measure what folding each block saves; latency-aware weights",
        description="Fold each α group of a base model alone (a block with --alpha-sharing block) and time it "
                    "beside the BN-fused model on the target device. Writes a config whose regularizer_weights "
                    "push each group in proportion to the latency it saves, so that fold removes first the "
                    "activations that buy speed on that device.",
        epilog=f"Examples:\n  {PROG} gains mobilenetv2_100 --device cuda --batch-size 128 --alpha-sharing block "
               f"--output gains.json\n  {PROG} fold --model mobilenetv2_100 --config gains.json --lambda-reg 0.02\n"
               f"  {PROG} gains {LITE0_ALIAS} --device cuda --batch-size 128 --plan bn1,blocks.1.1,blocks.1.0.bn1.act"
               f"\n  {PROG} fold --model {LITE0_ALIAS} --plan bn1,blocks.1.1,blocks.1.0.bn1.act ...")
    gains.add_argument("model", help=f"timm model name (weights are not loaded) or {LITE0_ALIAS!r}")
    gains.add_argument("--device", default="cpu", help=DEVICE_HELP + " (the device the folded model will run on)")
    gains.add_argument("--batch-size", type=POSITIVE_INT, default=1, help="batch size to time at")
    gains.add_argument("--dtype", choices=DTYPES, default="fp32", help="model and input dtype")
    gains.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    gains.add_argument("--image-size", type=POSITIVE_INT, default=None, help="resolution; unset: the model's")
    gains.add_argument("--rounds", type=POSITIVE_INT, default=7, help="interleaved timing rounds (median is used)")
    gains.add_argument("--round-seconds", type=POSITIVE, default=0.25,
                       help="seconds spent running each model per round (merge-cost timing uses at most 0.05)")
    gains.add_argument("--measure-merge-costs", action="store_true",
                       help="also time every conv and every merge a plan could make, and write that table "
                            "(merge_costs) into --output: fold then splits each run where this device is fastest")
    gains.add_argument("--min-saving", type=float, default=0.0,
                       help="a group saving at most this fraction of the baseline latency weighs 0")
    gains.add_argument("--output", default=None, metavar="FILE",
                       help="write the config (these flags + regularizer_weights) as JSON for fold --config")
    gains.add_argument("--plan", metavar="NAMES|FILE", default=None,
                       help="also time this plan folded (as fold --plan takes it), beside the BN-fused model: the "
                            "speed-up it would give on this device, before training it")
    gains.add_argument("--json", action="store_true", help="print the measurement as one JSON line")
    common(gains)
    add_config_flags(gains, "Layer Folding config (the sites, α sharing and merge limits decide each fold; "
                            "--output writes them with the weights)", only=FOLD_SHAPE_FIELDS)
    gains.set_defaults(func=cmd_gains)

    push = sub.add_parser(
        "push", formatter_class=_Formatter, help="upload a folded save to the Hugging Face Hub",
        description="Push an existing folded save directory to a Hub model repo (created if missing), with the "
                    "model card's loading snippets pointed at the repo.",
        epilog=f"Example:\n  {PROG} push outputs/lite0-folded --repo-id your-org/lite0-folded --private")
    push.add_argument("save_dir", help="a directory written by fold / save_folded")
    push.add_argument("--repo-id", required=True, help="Hub model repo, e.g. your-org/lite0-folded")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--token", default=None, help="Hub token; unset: HF_TOKEN or the logged-in one")
    push.add_argument("--commit-message", default="Upload layer-folded model (hf_layerfold)", help="commit message")
    push.add_argument("--revision", default=None, help="branch to push to (created if missing); default: main")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    common(push)
    push.set_defaults(func=cmd_push)
    return parser, fold


def _given_options(parser: argparse.ArgumentParser, fold: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The fold options on the command line, as argparse reads them (``--epoch 2`` abbreviates ``--epochs``):
    parsed again with every default suppressed, so only what was given comes back."""
    defaults = {action: action.default for action in fold._actions}
    try:
        for action in fold._actions:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_known_args(argv)[0]))
    finally:
        for action, default in defaults.items():
            action.default = default


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser, fold = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(parser, argv)
    args.config_values = {}
    if getattr(args, "command", None) == "fold" and args.config:
        values = read_mapping_file(args.config)
        config_fields = {f.name for f in dataclasses.fields(LayerFoldingConfig)}
        options = {a.dest for a in fold._actions if a.dest not in ("help", "config")
                   and not a.dest.startswith("cfg_")}
        unknown = sorted(set(values) - config_fields - options)
        if unknown:
            raise CLIError(f"config file {args.config}: unknown key(s) {unknown}; allowed: LayerFoldingConfig "
                           f"fields {sorted(config_fields)} and fold options {sorted(options)}")
        training = {k: v for k, v in values.items() if k in options}
        given = _given_options(parser, fold, argv)
        if "epochs" in given and "max_steps" not in given:  # --epochs on the command line beats the file's max_steps
            training.pop("max_steps", None)
        if training:  # the file's options go through argparse like flags (types, choices), before the flags given
            tokens = _option_tokens(fold, training, args.config)
            try:
                _parse(parser, ["fold", *tokens])
            except CLIError as err:
                raise CLIError(f"config file {args.config}: {err}") from None
            at = argv.index("fold")
            args = _parse(parser, [*argv[: at + 1], *tokens, *argv[at + 1:]])  # later flags win
        args.config_values = {k: v for k, v in values.items() if k in config_fields}
    return args


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parse_args``, with an unknown flag pointed at its command's help rather than the top-level one."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        command = f" {args.command}" if getattr(args, "command", None) else ""
        raise CLIError(f"unrecognized arguments: {' '.join(extra)} (see '{PROG}{command} --help')")
    return args


def _option_tokens(parser: argparse.ArgumentParser, values: dict, path: str) -> list[str]:
    """Command-line tokens for training options read from a config file (``epochs: 2`` → ``--epochs=2``)."""
    actions = {a.dest: a for a in parser._actions}
    tokens = []
    for key, value in values.items():
        action = actions[key]
        flag = action.option_strings[0]
        if action.nargs == 0:  # a switch: --overwrite, --pretrained / --no-pretrained
            if not isinstance(value, bool):
                raise CLIError(f"config file {path}: {key} must be true or false, got {value!r}")
            if isinstance(action, argparse.BooleanOptionalAction):
                tokens.append(flag if value else "--no-" + flag[2:])
            elif value:
                tokens.append(flag)
        elif key in LIST_OPTIONS and isinstance(value, list) and all(isinstance(v, str) for v in value):
            if value:  # plan: [bn1, blocks.1.1] is --plan=bn1,blocks.1.1; an empty list, like null, is unset
                tokens.append(f"{flag}={','.join(value)}")
        elif isinstance(value, dict | list):
            raise CLIError(f"config file {path}: {key} takes one value, got {value!r}")
        elif value is not None:  # null: unset
            tokens.append(f"{flag}={value}")
    return tokens


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hf-layerfold`` (and ``python -m hf_layerfold.cli``); returns the exit code."""
    with _sigterm_as_interrupt():
        try:
            args = parse_args(argv)
            if getattr(args, "command", None) is None:
                build_parser()[0].print_help(sys.stderr)
                return 2
            _setup_logging(args.verbose, args.quiet)
            if getattr(args, "device", None) is not None:  # "auto" resolved once: results and logs name the device
                args.device = str(torch_device(args.device, timing=args.command in ("benchmark", "gains")))
            if not args.threads:
                return int(args.func(args) or 0)
            import torch

            previous = torch.get_num_threads()
            torch.set_num_threads(args.threads)
            try:
                return int(args.func(args) or 0)
            finally:
                torch.set_num_threads(previous)  # main() may run inside a longer-lived process
        except CLIError as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return err.code
        except (ImageReadError, UnidentifiedImageError, DecompressionBombError) as err:  # the user's dataset
            print(f"{PROG}: error: a dataset image cannot be read: {_worker_message(err)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130


def _worker_message(err: BaseException) -> str:
    """The error's own message, also when a DataLoader worker raised it: torch then re-raises it in the main process
    with the worker's traceback in the message."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if re.match(r"[\w.]+(Error|Exception): ", last) else last


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """``kill`` (SIGTERM) unwinds like Ctrl-C while a command runs, so an interrupted ``fold`` removes its
    scratch as promised; the previous handler is back afterwards."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        INTERRUPTED.set()  # remembered: the exception below may be swallowed where it lands (see INTERRUPTED)
        raise KeyboardInterrupt

    INTERRUPTED.clear()
    previous_term = signal.signal(signal.SIGTERM, interrupt)
    # SIGINT too, unless it is ignored (a job started in the background by a non-interactive shell)
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        if previous_int is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, previous_int)
        INTERRUPTED.clear()  # this command's stop: a later main() (in any thread) starts unstopped


if __name__ == "__main__":
    sys.exit(main())
