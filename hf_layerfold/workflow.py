"""What the CLI and the demo are built from: resolve a model name or a dataset source, evaluate, tabulate.

Each user mistake (unknown model, unreadable dataset, ...) raises :class:`CLIError`, which the CLI prints as one
``hf-layerfold: error:`` line; any other program can catch it the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .timing import DeviceError, MissingDeviceError, resolve_device

LITE0_ALIAS = "lite0-imagenet"
FASHION_MNIST = "fashion-mnist"
EVAL_SPLITS = ("validation", "valid", "val", "test")

logger = logging.getLogger(__name__)


# Set by the CLI's SIGINT / SIGTERM handler. The KeyboardInterrupt it raises can be lost: raised inside a weakref
# callback or __del__ (Python prints and drops it) or inside torch.compile (torch turns it into another exception,
# which blend="auto" takes for a compile failure). cmd_fold checks this at every training step and before saving.
INTERRUPTED = threading.Event()


def raise_if_interrupted() -> None:
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt


class CLIError(Exception):
    """A failure reported as one ``hf-layerfold: error:`` line (exit 2: the user's input, 1: the environment)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(" ".join(str(message).split()))  # one line, whatever the wrapped error looked like
        self.code = code


def failure_code(err: BaseException) -> int:
    """The exit code for a model or dataset that failed to load with ``err``: 1 when a resource could not be reached
    (offline, network, server, access), 2 when the name or file given is wrong (no such repo, no such weights, ...)."""
    import urllib.error

    from huggingface_hub import errors

    for _ in range(8):  # the error, then what it was raised from
        if isinstance(err, ConnectionError | TimeoutError | errors.LocalEntryNotFoundError | urllib.error.URLError |
                      errors.GatedRepoError):
            return 1  # (OfflineModeIsEnabled and datasets' "Couldn't reach ..." are ConnectionErrors)
        if isinstance(err, errors.RepositoryNotFoundError | errors.RevisionNotFoundError | errors.EntryNotFoundError):
            return 2
        if isinstance(err, errors.HfHubHTTPError):
            status = getattr(err.response, "status_code", None)
            return 1 if status is None or status in (401, 403, 429) or status >= 500 else 2
        if type(err).__module__.startswith(("httpx", "requests", "urllib3")) and \
                re.search(r"Connect|Timeout|Network|Proxy|Transport", type(err).__name__):
            return 1
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        if err is None:
            break
    return 2


# ----------------------------------------------------------------------------------------------------------
# Models


def suggest_model_names(name: str) -> str:
    import timm

    close = difflib.get_close_matches(name, [LITE0_ALIAS, *timm.list_models()], n=3, cutoff=0.6)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def check_model_name(name: str) -> bool:
    """Refuse an unknown model name before any data is loaded; returns whether it names a remote/local checkpoint."""
    import timm

    remote = name.startswith(("hf-hub:", "local-dir:"))
    if not remote and name != LITE0_ALIAS and not timm.is_model(name):
        raise CLIError(f"unknown model {name!r}: not a timm model name nor {LITE0_ALIAS!r}{suggest_model_names(name)}")
    return remote


def check_weights_choice(name: str, pretrained: bool) -> None:
    """``lite0-imagenet`` names its bundled weights: random weights are asked for by the timm name."""
    if name == LITE0_ALIAS and not pretrained:
        raise CLIError(f"{LITE0_ALIAS} is EfficientNet-Lite0 with its bundled ImageNet weights; for random weights "
                       "use the timm name tf_efficientnet_lite0")


def create_base_model(name: str, num_classes: int | None = None, *, pretrained: bool = True,
                      weights_hint: bool = True):
    """An unfolded timm model to fold: ``lite0-imagenet`` (bundled ImageNet EfficientNet-Lite0 weights) or a timm
    name (``mobilenetv2_100``, ``resnet50.a1_in1k``, ``hf-hub:org/name``, ``local-dir:/path``)."""
    import timm

    if name == LITE0_ALIAS:
        from .pretrained import load_efficientnet_lite0_imagenet

        check_weights_choice(name, pretrained)

        try:
            return load_efficientnet_lite0_imagenet(num_classes=1000 if num_classes is None else num_classes)
        except (ImportError, FileNotFoundError) as err:
            raise CLIError(str(err), code=1) from None
    remote = check_model_name(name)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as err:  # a download (offline, no such repo, auth) or a checkpoint that does not load
        hint = " (pass --no-pretrained for random weights)" if pretrained and not remote and weights_hint else ""
        raise CLIError(f"cannot create model {name!r}: {type(err).__name__}: {err}{hint}",
                       code=failure_code(err)) from None


def model_kind(name: str) -> str:
    """``"folded"`` (a folded save: directory, ``local-dir:`` or Hub id) or ``"base"`` (a model to create);
    an unknown name or a missing directory is refused here, before any data is loaded."""
    import timm

    from .model_card import split_hub_ref

    local = Path(name.split(":", 1)[1] if name.startswith("local-dir:") else name).expanduser()
    if not name.strip():  # (Path("") is the working directory)
        raise CLIError("the model name is empty: give a timm model name, a folded save or a Hub id")
    if local.is_dir():
        from .hub import is_folded_save

        if not is_folded_save(local):
            if name.startswith("local-dir:"):
                return "base"  # a timm checkpoint directory
            raise CLIError(f"{name} is a directory but not a folded-model save ({_not_a_save_reason(local)})")
        return "folded"
    if name == LITE0_ALIAS or name.startswith(("hf-hub:", "local-dir:")) or timm.is_model(name):
        return "base"
    if local.exists():
        raise CLIError(f"{name} is a file; give a folded-save directory, a Hub id or a timm model name")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CLIError(f"model directory {name} does not exist")
    if split_hub_ref(name)[0] is not None:  # a Hub id (optionally @revision) of a folded model
        return "folded"
    raise CLIError(f"unknown model {name!r}: not a folded-model directory or Hub id, a timm model name, "
                   f"nor {LITE0_ALIAS!r}{suggest_model_names(name)}")


def _not_a_save_reason(folder: Path) -> str:
    """Why a directory is not a folded save, for the error line: a corrupt config.json, a training checkpoint, ..."""
    import json

    from .folded_model import CONFIG_NAME
    from .phases import STATE_NAME
    from .timm_registry import ARCHITECTURE

    config = folder / CONFIG_NAME
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError) as err:
            return f"its config.json does not read as JSON: {err}"
        arch = data.get("architecture") if isinstance(data, dict) else None
        if arch == ARCHITECTURE:  # (save_folded records its plan and config there)
            return (f"its config.json names {ARCHITECTURE!r} but has no 'layerfold' block (plan, config, stats), "
                    "which hf_layerfold.save_folded writes: save the net again with save_folded")
        if isinstance(arch, str) and arch:
            return (f"its config.json describes {arch!r}, a timm checkpoint: give local-dir:{folder} to use it as "
                    "the base model")
        return "its config.json names no architecture"
    if (folder / STATE_NAME).is_file():
        return ("a LayerFoldingTrainer checkpoint: resume it with trainer.train(resume_from_checkpoint=...) and write "
                "the folded model with trainer.save_folded")
    return "no layerfold_net config.json"


def load_model(name: str, num_classes: int | None = None, *, pretrained: bool = True, weights_hint: bool = True):
    """Any model the CLI can evaluate: a folded save (directory or Hub id) or an unfolded base model (``num_classes``
    given: with a new head of that size; ``weights_hint``: suggest --no-pretrained when its weights fail)."""
    from .hub import LayerFoldedModel

    if model_kind(name) == "base":
        return create_base_model(name, num_classes, pretrained=pretrained, weights_hint=weights_hint)
    try:
        return LayerFoldedModel.from_pretrained(name)
    except Exception as err:  # offline, no such repo, a corrupt save
        raise CLIError(f"cannot load folded model {name!r}: {type(err).__name__}: {err}",
                       code=failure_code(err)) from None


def plan_source(spec: str) -> Path | None:
    """The file or folded save ``fold --plan`` reads, or ``None`` when ``spec`` is a list of block and site names;
    a path that does not exist is refused here, before any data is loaded."""
    if not spec.strip():  # (Path("") is the working directory)
        raise CLIError("--plan is empty: name at least one block or site (e.g. blocks.1.1), or give a plan file")
    from .plan import PLAN_NAME

    path = Path(spec).expanduser()
    if path.is_dir() and not (path / PLAN_NAME).is_file():
        raise CLIError(f"--plan {spec} is a folder without {PLAN_NAME}: give a plan JSON file, a folded save, or "
                       "comma-separated block and site names")
    if path.exists():
        return path
    if spec.endswith((".json", "/")) or spec.startswith((".", "/", "~")) or "/" in spec:
        raise CLIError(f"--plan {spec}: no such file or directory (give a plan JSON file, a folded save, or "
                       "comma-separated block and site names such as blocks.1.1,blocks.1.0.bn1.act)")
    return None


def fixed_plan(spec: str, model):
    """The :class:`~hf_layerfold.FoldPlan` ``--plan`` names for ``model`` (prepared or not): a plan JSON file (or a
    folded save's ``layerfold_plan.json``), or comma-separated names, each a block (every site inside it) or one
    site (an inverted residual's expand activation alone makes a fused block)."""
    from .plan import FoldPlan, check_plan

    source = plan_source(spec)
    try:
        if source is not None:
            plan = FoldPlan.load(source)
        else:
            plan = FoldPlan.from_blocks(model, [name.strip() for name in spec.split(",") if name.strip()])
        check_plan(model, plan)
    except OSError as err:
        raise CLIError(f"cannot read --plan {spec}: {err.strerror or err}") from None
    except ValueError as err:
        raise CLIError(f"--plan {spec}: {err}") from None
    if not len(plan):
        raise CLIError(f"--plan {spec} makes no site linear: name at least one block or site")
    if source is not None and source.is_dir():  # a folded save names the architecture its plan was made for
        from .folded_model import read_save_info

        folded_from = (read_save_info(source) or {}).get("base_architecture")
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        if folded_from and arch and folded_from != arch:
            logger.warning("--plan %s was made for %s, not %s: its site names match here, but which activations pay "
                           "to remove differs between architectures", spec, folded_from, arch)
    return plan


def set_input_size(model, image_size: int | None) -> None:
    """Record the resolution the model is trained / evaluated at in its ``pretrained_cfg`` (transforms read it)."""
    if image_size is None:
        return
    from .collate import drop_test_size, input_channels

    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg["input_size"] = (input_channels(model), image_size, image_size)
    drop_test_size(cfg)
    model.pretrained_cfg = cfg


def model_input_size(model, image_size: int | None = None) -> tuple[int, int, int]:
    from .collate import data_config, model_input_shape

    size = tuple(data_config(model)["input_size"])  # (3, ...) for an in_chans=1 model: the channels come from it
    return model_input_shape(model, image_size if image_size else size[1:])


# ----------------------------------------------------------------------------------------------------------
# Datasets


@dataclasses.dataclass
class DataSplits:
    train: Any
    eval: Any
    eval_split: str
    num_classes: int
    label_names: list[str] | None
    hub_id: str | None  # for the model card's eval results


def _subset(ds, size: int | None, seed: int):
    if size is None or size >= len(ds):
        return ds
    if size <= 0:
        raise CLIError(f"subset size must be positive, got {size}")
    return ds.shuffle(seed=seed).select(range(size))


def _unlabelled(split: Any) -> bool:
    """Whether a map-style split's labels are all negative (an unlabelled test split: -1 for every row)."""
    import datasets
    import pyarrow.compute as pc

    from .data import detect_columns, integer_labels

    if not isinstance(split, datasets.Dataset):
        return False
    try:
        labels = integer_labels(split, detect_columns(split)[1])
    except (ValueError, TypeError):
        return False
    return len(labels) > 0 and pc.max(labels).as_py() < 0


def load_data(source: str, *, train_size: int | None = None, eval_size: int | None = None, seed: int = 0,
              need_train: bool = True, eval_split: str | None = None) -> DataSplits:
    """``fashion-mnist`` (local Debian files, else the Hub), an imagefolder directory, or a Hub dataset id."""
    import datasets

    from .data import (
        FASHION_MNIST_HUB_ID,
        DatasetNotAvailableError,
        detect_columns,
        integer_labels,
        label_names_of,
        load_fashion_mnist,
        load_image_dataset,
        num_labels_of,
    )

    try:
        if source == FASHION_MNIST:  # stratified subsets of train and test; an eval split of train is cut below
            splits, hub_id = load_fashion_mnist(train_size=train_size, test_size=eval_size, seed=seed), \
                FASHION_MNIST_HUB_ID
            train_size = None
            if eval_split != "train":
                eval_size = None
        else:
            splits = load_image_dataset(source)
            hub_id = None if Path(source).expanduser().exists() else source
    except DatasetNotAvailableError as err:  # the whole message: which file is missing, why the Hub failed, the fix
        raise CLIError(str(err), code=1) from None
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(f"cannot read dataset {source!r}: {err}", code=failure_code(err)) from None
    except Exception as err:  # datasets' own errors for unknown Hub ids, offline mode, bad layouts
        local = "" if Path(source).expanduser().exists() else f" (nor is there a local folder {source!r})"
        raise CLIError(f"cannot load dataset {source!r}: {type(err).__name__}: {err}{local}",
                       code=failure_code(err)) from None
    if not isinstance(splits, datasets.DatasetDict):
        splits = datasets.DatasetDict({"train": splits})
    if not len(splits):
        raise CLIError(f"dataset {source!r} has no splits")

    if eval_split is not None and eval_split not in splits:
        raise CLIError(f"dataset {source!r} has no split {eval_split!r} (splits: {', '.join(splits)})")
    unlabelled = [s for s in EVAL_SPLITS if s in splits and eval_split is None and _unlabelled(splits[s])]
    chosen = eval_split or next((s for s in EVAL_SPLITS if s in splits and s not in unlabelled), None)
    train = splits["train"] if "train" in splits else None
    if chosen is None and not need_train:  # evaluation only: the whole (only) split
        chosen = "train" if train is not None else next(iter(splits))
    if unlabelled:  # (Hub test splits often carry -1 for every label: nothing to score)
        instead = (f"evaluating split {chosen!r} instead" if chosen else
                   "evaluating data held out of 'train' instead")
        logger.warning("skipping the %s split%s as evaluation data: %s no labels (only -1); %s (--eval-split "
                       "chooses)", " and ".join(map(repr, unlabelled)), "s" if len(unlabelled) > 1 else "",
                       "they have" if len(unlabelled) > 1 else "it has", instead)
    if chosen is None:  # no held-out split: carve one off the training data
        if train is None:
            raise CLIError(f"dataset {source!r} has neither a 'train' nor an evaluation split ({', '.join(splits)})")
        if len(train) < 2:
            raise CLIError(f"dataset {source!r} has only a 'train' split, with {len(train)} row(s): too small to "
                           "split off evaluation data; give it an evaluation split (validation, val or test) or at "
                           "least 2 rows")
        parts = train.train_test_split(test_size=min(0.1, 1000 / len(train)), seed=seed)
        train, evaluation, chosen = parts["train"], parts["test"], "train[held-out]"
    else:
        evaluation = splits[chosen]
    if need_train and train is None:
        raise CLIError(f"dataset {source!r} has no 'train' split (splits: {', '.join(splits)})")

    try:
        _, label_column = detect_columns(evaluation)
    except ValueError as err:
        if hub_id is None and "image" in evaluation.column_names and len(evaluation.column_names) == 1:
            # a local folder read by imagefolder without labels: images directly in it (or in train/ / test/),
            # or a single class folder (imagefolder gives labels only for two class folders or more)
            raise CLIError(f"dataset {source!r} has images but no class labels: imagefolder takes each image's "
                           "class from its folder, class_name/xxx.png (optionally under train/ and test/), and "
                           "needs at least two class folders") from None
        raise CLIError(f"dataset {source!r}: {err}") from None
    reference = train if train is not None else evaluation
    num_classes = num_labels_of(reference, label_column)
    if num_classes is None:  # no ClassLabel: integer ids, counted by the largest (class names, nulls: refused here)
        import pyarrow.compute as pc

        try:
            high = pc.max(integer_labels(reference, label_column)).as_py()
        except ValueError as err:
            raise CLIError(f"dataset {source!r}: {err}") from None
        if high is None or high < 0:
            raise CLIError(f"dataset {source!r}: label column {label_column!r} holds no class id (no rows, or only "
                           "negative 'unlabelled' ids)")
        num_classes = int(high) + 1
    names = label_names_of(reference, label_column)
    if names and all(n.isdigit() for n in names) and names != sorted(names, key=int):
        i = next(i for i, (a, b) in enumerate(zip(names, sorted(names, key=int))) if a != b)
        logger.warning("the class names are numbers ordered as text (%s, ...): class id %d is the class named %r; "
                       "name folders with leading zeros (00, 01, ..., 10) to keep their numeric order",
                       ", ".join(names[:5]), i, names[i])
    logger.debug("dataset %s: %d classes (%s%s)", source, num_classes, ", ".join(map(str, (names or [])[:10])),
                ", ..." if names and len(names) > 10 else "")
    train = _subset(train, train_size, seed) if need_train else None
    evaluation = _subset(evaluation, eval_size, seed)
    return DataSplits(train, evaluation, chosen, num_classes, names, hub_id)


# ----------------------------------------------------------------------------------------------------------
# Evaluation


def torch_device(name: str, *, timing: bool = False):
    """:func:`resolve_device` for the CLI's ``--device`` flag: its failures as one-line ``CLIError`` s."""
    try:
        return resolve_device(name, timing=timing)
    except MissingDeviceError as err:
        raise CLIError(f"--device {name} but {err.reason}") from None
    except DeviceError as err:
        raise CLIError(f"invalid --device {name!r}: {err.reason}") from None


def evaluate_model(model, dataset, *, image_size: int | None = None, batch_size: int = 64, device: str = "cpu",
                   num_workers: int = 0, progress: bool = True) -> dict[str, float]:
    """Top-1 / top-5 accuracy (fractions) of ``model`` on a labelled image dataset, with the model's eval transform."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from .collate import as_input_of, image_mode
    from .data import ImageClassificationCollator, build_transforms, check_labels, defer_decoding, detect_columns

    image_column, label_column = detect_columns(dataset)
    try:
        check_labels(dataset, label_column, int(model.num_classes))
    except ValueError as err:
        raise CLIError(str(err)) from None
    collator = ImageClassificationCollator(build_transforms(model, is_training=False, input_size=image_size),
                                           image_column, label_column, image_mode(model))
    loader = DataLoader(defer_decoding(dataset), batch_size=batch_size, collate_fn=collator, num_workers=num_workers)
    dev = torch_device(device)
    model = model.to(dev).eval()
    top1 = top5 = total = 0
    with torch.inference_mode():
        for batch in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
            logits = model(as_input_of(model, batch["pixel_values"].to(dev)))
            labels = batch["labels"].to(dev)
            ranked = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            hits = ranked == labels[:, None]
            top1 += int(hits[:, 0].sum())
            top5 += int(hits.any(dim=-1).sum())
            total += len(labels)
    if total == 0:
        raise CLIError("the evaluation dataset is empty")
    return {"top1": top1 / total, "top5": top5 / total, "images": total}


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *map(line, cells[1:])])


def fmt_count(value: int | None, unit: str = "") -> str:
    if value is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:.2f} {suffix}{unit}"
    return f"{value}{(' ' + unit) if unit else ''}"


# ----------------------------------------------------------------------------------------------------------
# Training


def training_arguments(output_dir: str, *, epochs: float = 1.0, max_steps: int = -1, batch_size: int = 32,
                       lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: float = 0, seed: int = 0,
                       num_workers: int = 0, logging_steps: int = 10, device: str = "auto",
                       mixed_precision: str = "no", progress: bool = True):
    """``TrainingArguments`` for a run that keeps nothing on disk but the folded save (no checkpoints, no trackers)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir, num_train_epochs=epochs, max_steps=max_steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size, learning_rate=lr, weight_decay=weight_decay,
        warmup_steps=warmup_steps, lr_scheduler_type="cosine", seed=seed, dataloader_num_workers=num_workers,
        logging_steps=logging_steps, save_strategy="no", eval_strategy="no", report_to="none",
        remove_unused_columns=False, use_cpu=device.startswith("cpu"), bf16=mixed_precision == "bf16",
        fp16=mixed_precision == "fp16", disable_tqdm=not progress)
