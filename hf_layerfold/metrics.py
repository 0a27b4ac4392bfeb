"""Top-1 / top-5 accuracy for ``Trainer.evaluate``: computed here, no metric script fetched from the network."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def compute_metrics(eval_pred: Any) -> dict[str, float]:
    """Top-1 / top-5 accuracy as fractions in [0, 1] (``evaluate()`` reports them as eval_top1 / eval_top5).

    ``predictions`` may be logits ``(N, C)`` or already-ranked class ids ``(N, k)`` or ``(N,)`` (integers, best
    first; with one id per row top-5 equals top-1).
    """
    top1, top5, n = _hits(eval_pred.predictions, eval_pred.label_ids)
    return {"top1": top1 / n, "top5": top5 / n}


class BatchedTopK:
    """:func:`compute_metrics` for ``batch_eval_metrics=True``: Trainer hands over one batch at a time (tensors),
    and asks for the result with the last one; the hits are counted as they come."""

    def __init__(self) -> None:
        self._counts = [0, 0, 0]  # top-1 hits, top-5 hits, examples

    def __call__(self, eval_pred: Any, compute_result: bool) -> dict[str, float]:
        hits = _hits(_numpy(eval_pred.predictions), _numpy(eval_pred.label_ids))
        self._counts = [a + b for a, b in zip(self._counts, hits)]
        if not compute_result:
            return {}
        top1, top5, n = self._counts
        self._counts = [0, 0, 0]
        return {"top1": top1 / n, "top5": top5 / n}


def _numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().float().numpy() if value.is_floating_point() else value.detach().cpu().numpy()
    if isinstance(value, tuple | list):
        return type(value)(_numpy(v) for v in value)
    return value


def _hits(preds: Any, labels: Any) -> tuple[int, int, int]:
    """(top-1 hits, top-5 hits, examples)."""
    if isinstance(labels, list | tuple):  # eval_do_concat_batches=False: one entry per batch
        preds = np.concatenate([np.asarray(_first_output(p)) for p in preds])
        labels = np.concatenate([np.asarray(batch).reshape(-1) for batch in labels])
    preds, labels = np.asarray(_first_output(preds)), np.asarray(labels).reshape(-1)
    if np.issubdtype(preds.dtype, np.floating):
        k = min(5, preds.shape[-1])
        ranked = np.argsort(-preds, axis=-1, kind="stable")[:, :k]
    else:  # class ids: (N, k), or (N,) from an argmax in preprocess_logits_for_metrics
        ranked = preds.reshape(len(preds), -1)[:, :5]
    hits = ranked == labels[:, None]
    return int(hits[:, 0].sum()), int(hits.any(axis=1).sum()), len(labels)


def _first_output(outputs: Any) -> Any:
    """The logits of a model that returns several outputs (Trainer hands them over as a tuple or list)."""
    return outputs[0] if isinstance(outputs, tuple | list) else outputs


def check_metric_name(metric: str | None, metrics: dict[str, float]) -> None:
    """``metric_for_best_model`` names one of the evaluation's metrics (Trainer checks it only when it compares)."""
    if metric is None:
        return
    key = metric if metric.startswith("eval_") else f"eval_{metric}"
    if key not in metrics:
        raise KeyError(f"metric_for_best_model={metric!r}: the evaluation has no {key!r}; its metrics are "
                       f"{sorted(metrics)}")
