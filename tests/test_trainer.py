"""LayerFoldingTrainer with the real transformers.Trainer, a tiny timm EfficientNet and a Fashion-MNIST subset."""

from __future__ import annotations

import json
import logging
import math
import shutil

import datasets
import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard
from PIL import Image
from timm.models import efficientnet
from timm.models._efficientnet_builder import decode_arch_def
from transformers import EvalPrediction, TrainerCallback, TrainingArguments

import hf_layerfold as lf
from hf_layerfold.data import load_fashion_mnist, prepare_datasets
from hf_layerfold.hub import LayerFoldedModel
from hf_layerfold.layers import PaddedConv2d
from hf_layerfold.losses import alpha_regularizer, distillation_loss
from hf_layerfold.plan import applied_plan
from hf_layerfold.prepare import is_prepared
from hf_layerfold.trainer import ALPHA_GROUP, STATE_NAME, LayerFoldingTrainer, compute_metrics
from hf_layerfold.trainer_args import warn_on_few_shards

SIZE = 32
LOG_KEYS = {"loss", "task_loss", "reg_loss", "alpha_mean", "sites_past_threshold", "projected_nonlinear_layers",
            "projected_depth", "phase"}
COMPARED = ("loss", "task_loss", "reg_loss", "grad_norm", "alpha_mean", "sites_past_threshold",
            "projected_nonlinear_layers", "projected_depth", "phase")


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """A real timm EfficientNet, small enough for a CPU step in milliseconds (9 foldable sites)."""
    torch.manual_seed(seed)
    arch = [["ds_r1_k3_s1_c8"], ["ir_r2_k3_s2_e3_c16"], ["ir_r1_k5_s2_e3_c24"], ["ir_r1_k3_s1_e4_c24"]]
    model = efficientnet.EfficientNet(decode_arch_def(arch), num_classes=10, stem_size=8, num_features=64)
    model.pretrained_cfg = {"architecture": "tiny_efficientnet", "input_size": (3, SIZE, SIZE),
                            "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 1.0}
    return model


def args_for(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=16,
                learning_rate=2e-3, weight_decay=0.05, logging_steps=1, save_strategy="no", report_to=[],
                disable_tqdm=True, use_cpu=True, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


CFG = dict(alpha_init=0.5, lambda_reg=0.05, regularizer="l1", threshold=0.8, alpha_lr=0.1, search_steps=6)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fashion() -> datasets.DatasetDict:
    return load_fashion_mnist(train_size=64, test_size=32, seed=0)


def make_trainer(tmp_path, fashion, model=None, config=None, train_args=None, **kw) -> LayerFoldingTrainer:
    """Training batches use the deterministic (eval) transform, so that a resumed run can be compared number for
    number with an uninterrupted one (random augmentation is not replayed exactly by Trainer on resume)."""
    deterministic = prepare_datasets(tiny_model(), fashion["train"], fashion["test"], input_size=SIZE)[3]
    return LayerFoldingTrainer(model if model is not None else tiny_model(),
                               train_args or args_for(tmp_path, max_steps=12), data_collator=deterministic,
                               train_dataset=fashion["train"], eval_dataset=fashion["test"],
                               layerfold_config=config or lf.LayerFoldingConfig(**CFG), input_size=SIZE, **kw)


def train_logs(trainer: LayerFoldingTrainer, **kw) -> dict[int, dict]:
    trainer.train(**kw)
    return {e["step"]: e for e in trainer.state.log_history if "loss" in e}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, fashion):
    """12 steps, search ends at step 6, checkpoints every 4 steps; shared by the phase/resume/export tests."""
    out = tmp_path_factory.mktemp("baseline")
    trainer = make_trainer(out, fashion, train_args=args_for(out, max_steps=12, save_strategy="steps", save_steps=4))
    alphas_at = {}

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            alphas_at[state.global_step] = {k: v.item() for k, v in lf.alpha_parameters(trainer.model).items()}

    trainer.add_callback(Spy())
    return trainer, train_logs(trainer), alphas_at, out


# --------------------------------------------------------------------------------------------------------
# Loss, optimizer, clamping


def test_loss_terms_match_their_definitions(tmp_path, fashion):
    args = args_for(tmp_path, max_steps=1, label_smoothing_factor=0.1)
    trainer = make_trainer(tmp_path, fashion, train_args=args)
    model = trainer.model.train()
    batch = trainer.data_collator([fashion["train"][i] for i in range(6)])
    loss = trainer.compute_loss(model, batch)
    logits = model(batch["pixel_values"])
    alphas = list(lf.alpha_parameters(model).values())
    expected = F.cross_entropy(logits, batch["labels"], label_smoothing=0.1) + 0.05 * sum(1 - a for a in alphas)
    torch.testing.assert_close(loss, expected)
    loss.backward()  # both terms reach α
    assert all(a.grad is not None for a in alphas)
    paper = alpha_regularizer([torch.tensor(0.5), torch.tensor(1.0)], "paper")
    assert float(paper) == pytest.approx(0.75)

    model.eval()  # evaluation loss is the plain cross-entropy, logits returned for the metrics
    eval_loss, out = trainer.compute_loss(model, batch, return_outputs=True)
    torch.testing.assert_close(eval_loss, F.cross_entropy(out["logits"], batch["labels"]))


def test_regularizer_weights_reach_the_loss_and_a_stray_key_fails_early(tmp_path, fashion):
    config = lf.LayerFoldingConfig(**{**CFG, "regularizer_weights": {"blocks.1.*": 3.0, "blocks.0.0.bn1.act": 0.0}})
    trainer = make_trainer(tmp_path, fashion, config=config, train_args=args_for(tmp_path, max_steps=1))
    model = trainer.model.train()
    batch = trainer.data_collator([fashion["train"][i] for i in range(6)])
    torch.manual_seed(0)
    loss = trainer.compute_loss(model, batch)
    torch.manual_seed(0)
    task = F.cross_entropy(model(batch["pixel_values"]), batch["labels"])
    sites = lf.alpha_parameters(model)
    weight = {s: 0.0 if s == "blocks.0.0.bn1.act" else 3.0 if s.startswith("blocks.1.") else 1.0 for s in sites}
    assert sorted(set(weight.values())) == [0.0, 1.0, 3.0]  # every kind of match is exercised
    torch.testing.assert_close(loss, task + 0.05 * sum(weight[s] * (1 - a) for s, a in sites.items()))
    stray = lf.LayerFoldingConfig(**{**CFG, "regularizer_weights": {"blocks.7.*": 1.0}})
    with pytest.raises(ValueError, match="match no foldable site"):
        make_trainer(tmp_path, fashion, config=stray)


def test_distillation_term_with_teacher(tmp_path, fashion):
    config = lf.LayerFoldingConfig(**{**CFG, "distill_weight": 0.4, "distill_temperature": 3.0, "lambda_reg": 0.0})
    teacher = tiny_model(seed=1).eval()
    trainer = make_trainer(tmp_path, fashion, config=config, teacher_model=teacher,
                           train_args=args_for(tmp_path, max_steps=2))
    model = trainer.model.train()
    batch = trainer.data_collator([fashion["train"][i] for i in range(6)])
    loss = trainer.compute_loss(model, batch)
    s, t = model(batch["pixel_values"]), teacher(batch["pixel_values"])
    p_t = F.softmax(t / 3, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / 3, -1))).sum(-1).mean() * 9  # KL(teacher ‖ student)·T²
    torch.testing.assert_close(loss, 0.6 * F.cross_entropy(s, batch["labels"]) + 0.4 * kl)
    assert all(not p.requires_grad for p in trainer.teacher_model.parameters())
    logs = train_logs(trainer)
    assert logs[2]["distill_loss"] > 0
    with pytest.raises(ValueError, match="teacher_model"):
        make_trainer(tmp_path, fashion, config=config)


class _Wrapped(torch.nn.Module):
    """A teacher that is neither timm nor transformers: no ``num_classes`` to check before training."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_teachers_that_cannot_distill_into_the_model_are_refused_before_or_at_the_first_step(tmp_path, fashion):
    """A teacher with another head but no ``num_classes`` (a transformers classifier, a wrapper) failed at the first
    step with a bare size mismatch; the model itself as teacher froze every weight of the model."""
    config = lf.LayerFoldingConfig(**{**CFG, "distill_weight": 0.5})
    model = tiny_model()
    with pytest.raises(ValueError, match="shares weights with"):
        make_trainer(tmp_path, fashion, model=model, config=config, teacher_model=model)
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen
    big = tiny_model()
    big.reset_classifier(1000)
    hf_like = _Wrapped(big)
    hf_like.config = type("Config", (), {"num_labels": 1000})()
    with pytest.raises(ValueError, match="the teacher predicts 1000 classes, the model 10"):
        make_trainer(tmp_path, fashion, config=config, teacher_model=hf_like)
    trainer = make_trainer(tmp_path, fashion, config=config, teacher_model=_Wrapped(big),
                           train_args=args_for(tmp_path, max_steps=1))
    with pytest.raises(ValueError, match=r"the teacher's outputs have shape \(4, 1000\), the model's \(4, 10\)"):
        trainer.train()


def test_a_model_trained_with_distillation_trains_on_without_a_teacher(tmp_path, fashion, caplog):
    """Its own config (from the run that distilled) asked for a teacher: continuing to train a reloaded save
    without re-giving a config was refused."""
    config = lf.LayerFoldingConfig(**{**CFG, "distill_weight": 0.4})
    planned = lf.apply_plan(lf.prepare_model(tiny_model(), config), lf.FoldPlan())
    reloaded = LayerFoldedModel.from_pretrained(lf.save_folded(planned, tmp_path / "save"))
    with caplog.at_level(logging.WARNING, logger="hf_layerfold"):
        trainer = LayerFoldingTrainer(reloaded, args_for(tmp_path, max_steps=1), train_dataset=fashion["train"],
                                      input_size=SIZE)  # no layerfold_config: the save's own
    assert trainer.layerfold_config.distill_weight == 0.0
    assert "this run trains without distillation" in caplog.text
    trainer.train()
    # a model the user prepared with distill_weight > 0 asked for distillation: no teacher is still refused
    with pytest.raises(ValueError, match="from prepare_model / prepare_with_plan.*needs a teacher_model"):
        LayerFoldingTrainer(planned, args_for(tmp_path, max_steps=1), train_dataset=fashion["train"], input_size=SIZE)


def test_the_teacher_runs_under_the_models_mixed_precision_and_a_normalization_mismatch_is_named(
        tmp_path, fashion, caplog):
    """With ``bf16=True`` accelerate autocasts the model's forward only: the teacher ran in float32."""
    config = lf.LayerFoldingConfig(**{**CFG, "distill_weight": 0.5})
    teacher = tiny_model(seed=1)
    teacher.pretrained_cfg = {**teacher.pretrained_cfg, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    seen = []
    teacher.conv_stem.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with caplog.at_level(logging.WARNING, logger="hf_layerfold"):
        trainer = make_trainer(tmp_path, fashion, config=config, teacher_model=teacher,
                               train_args=args_for(tmp_path, max_steps=1, bf16=True))
    assert "the teacher was trained with mean/std" in caplog.text
    trainer.train()
    assert seen == [torch.bfloat16]


def test_a_schedule_free_optimizer_keeps_the_evaluated_alpha_in_range_too():
    """The clamp held the training point y of α in [0, 1], but z ran past 1 under the regularizer's push and the
    point evaluate() uses, x, fell to 0.34 for an α held at 1; the other weights are left alone."""
    schedulefree = pytest.importorskip("schedulefree")
    from hf_layerfold.losses import clamp_alphas_, clamp_schedule_free_alphas_

    for cls in (schedulefree.AdamWScheduleFree, schedulefree.SGDScheduleFree):
        alpha, weight = torch.nn.Parameter(torch.tensor([0.9, 0.2])), torch.nn.Parameter(torch.tensor([1.0]))
        twin = torch.nn.Parameter(weight.detach().clone())
        runs = [(cls([{"params": [weight]}, {"params": [alpha]}], lr=0.1), weight, alpha),
                (cls([{"params": [twin]}], lr=0.1), twin, None)]  # the same weight without α beside it
        for opt, w, a in runs:
            opt.train()
            for _ in range(60):
                opt.zero_grad()
                loss = (w ** 2).sum() - (a.sum() if a is not None else 0)  # the regularizer pushes α up
                loss.backward()
                opt.step()
                if a is not None:
                    clamp_alphas_([a])
                    clamp_schedule_free_alphas_(opt, [a])
            opt.eval()
        assert 0.98 < float(alpha.min()) and float(alpha.max()) <= 1.0
        assert torch.equal(weight, twin)


def test_a_schedule_free_run_evaluates_the_alpha_it_trains_and_its_plan_exact(tmp_path, fashion):
    """optim="schedule_free_adamw" end to end: the α that evaluate() sees (after optimizer.eval()) stays by the α
    being trained, in [0, 1] (it fell far below it as z ran past 1), and 0/1 exactly once the plan is fixed."""
    pytest.importorskip("schedulefree")
    trained, evaluated = [], []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            trained.append(torch.stack([a.detach().clone() for a in lf.alpha_parameters(model).values()]))

        def on_evaluate(self, args, state, control, model=None, **kwargs):
            evaluated.append((trained[-1], torch.stack([a.detach() for a in lf.alpha_parameters(model).values()])))

    config = lf.LayerFoldingConfig(**{**CFG, "search_steps": 30, "lambda_reg": 5.0, "alpha_lr": 1.0})
    trainer = make_trainer(tmp_path, fashion, config=config, callbacks=[Watch()], train_args=args_for(
        tmp_path, max_steps=34, optim="schedule_free_adamw", eval_strategy="steps", eval_steps=10))
    trainer.train()
    search = evaluated[:3]  # at steps 10, 20 and 30 (the plan is fixed at the end of step 30)
    assert len(evaluated) >= 3 and all(float((x - y).abs().max()) < 0.1 for y, x in search)
    assert all(0.0 <= float(x.min()) and float(x.max()) <= 1.0 for _, x in evaluated)
    trainer.evaluate()  # fine-tune: the plan's exact values
    assert set(torch.stack([a.detach() for a in lf.alpha_parameters(trainer.model).values()]).tolist()) <= {0.0, 1.0}


def test_alpha_lr_none_follows_the_optimizers_own_lr(tmp_path, fashion):
    """With optimizer_cls_and_kwargs setting lr, α took TrainingArguments.learning_rate (200x slower here)."""
    config = lf.LayerFoldingConfig(**{**CFG, "alpha_lr": None})
    trainer = make_trainer(tmp_path, fashion, config=config,
                           optimizer_cls_and_kwargs=(torch.optim.AdamW, {"lr": 1e-2}))
    groups = trainer.create_optimizer().param_groups
    assert [g["lr"] for g in groups if g.get(ALPHA_GROUP)] == [1e-2]


def test_evaluate_and_predict_refuse_a_set_whose_class_names_differ(tmp_path, fashion):
    """predict() scored test_top1 against ids that named other classes, where evaluate() refused the same set."""
    trainer = make_trainer(tmp_path, fashion)
    names = fashion["test"].features["label"].names
    other = fashion["test"].select(range(8)).cast_column("label", datasets.ClassLabel(names=names[::-1]))
    for call, said in ((trainer.evaluate, "evaluate"), (trainer.predict, "predict")):
        with pytest.raises(ValueError, match=rf"The class names of the set handed to {said}\(\)"):
            call(other)
    assert trainer.predict(other.remove_columns("label")).predictions.shape == (8, 10)  # no labels: nothing to score


def test_alpha_param_group_has_own_lr_and_no_decay(tmp_path, fashion):
    trainer = make_trainer(tmp_path, fashion)
    optimizer = trainer.create_optimizer()
    alpha_ids = {id(a) for a in lf.alpha_parameters(trainer.model).values()}
    groups = [g for g in optimizer.param_groups if g.get(ALPHA_GROUP)]
    assert len(groups) == 1 and {id(p) for p in groups[0]["params"]} == alpha_ids and len(alpha_ids) == 9
    assert groups[0]["lr"] == 0.1 and groups[0]["weight_decay"] == 0.0
    others = [g for g in optimizer.param_groups if not g.get(ALPHA_GROUP)]
    assert not alpha_ids & {id(p) for g in others for p in g["params"]}
    assert any(g["weight_decay"] == 0.05 for g in others)  # the weights still decay
    n_params = sum(1 for p in trainer.model.parameters())
    assert sum(len(g["params"]) for g in optimizer.param_groups) == n_params

    config = lf.LayerFoldingConfig(**{**CFG, "alpha_lr": None})
    trainer = make_trainer(tmp_path, fashion, config=config)
    group = next(g for g in trainer.create_optimizer().param_groups if g.get(ALPHA_GROUP))
    assert group["lr"] == trainer.args.learning_rate


def test_alpha_clamped_to_unit_interval_after_every_step(tmp_path, fashion):
    config = lf.LayerFoldingConfig(**{**CFG, "alpha_lr": 3.0, "search_steps": 100, "regularizer": "paper"})
    trainer = make_trainer(tmp_path, fashion, config=config, train_args=args_for(tmp_path, max_steps=3))
    seen = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.extend(a.item() for a in lf.alpha_parameters(trainer.model).values())

    trainer.add_callback(Watch())
    trainer.train()
    assert trainer.phase == "search"  # search longer than training: no plan fixed
    assert min(seen) >= 0.0 and max(seen) <= 1.0
    assert max(seen) == 1.0  # lr 3 overshoots: clamping is what kept α at exactly 1


def test_given_optimizer_must_hold_every_alpha(tmp_path, fashion):
    """An optimizer built from the model before the trainer prepared it holds no α: refused, not a silent no-op
    search that fixes the plan from alpha_init."""
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = make_trainer(tmp_path, fashion, model=model, optimizers=(optimizer, None))
    with pytest.raises(ValueError, match="holds 0 of the 9 trainable α"):
        trainer.create_optimizer()
    model = lf.prepare_model(tiny_model(), lf.LayerFoldingConfig(**CFG))  # built after preparation: accepted
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = make_trainer(tmp_path, fashion, model=model, optimizers=(optimizer, None))
    assert trainer.create_optimizer() is optimizer


def test_gradient_accumulation_clamps_and_switches_per_optimizer_step(tmp_path, fashion):
    trainer = make_trainer(tmp_path, fashion, config=lf.LayerFoldingConfig(**{**CFG, "search_steps": 3}),
                           train_args=args_for(tmp_path, max_steps=5, gradient_accumulation_steps=2))
    phases = []

    class Watch(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            phases.append(trainer.phase)

    trainer.add_callback(Watch())
    logs = train_logs(trainer)
    assert phases == ["search"] * 3 + ["finetune"] * 2  # one optimizer step per 2 micro-batches
    assert [logs[s]["phase"] for s in sorted(logs)] == [0, 0, 0, 1, 1]
    for s in logs:  # the regularizer is scaled like the task loss: the logged total is the sum of its parts
        assert logs[s]["loss"] == pytest.approx(logs[s]["task_loss"] + logs[s]["reg_loss"], rel=1e-5)


def test_logged_terms_add_up_when_a_log_spans_a_short_accumulation_window(tmp_path, fashion):
    """64 images in batches of 4 are 16 micro-batches: with 3 per optimizer step an epoch is 6 steps, the last of one
    micro-batch. Trainer's `loss` averages steps; the logged terms must average them the same way."""
    args = args_for(tmp_path, num_train_epochs=2, gradient_accumulation_steps=3, logging_strategy="epoch")
    logs = train_logs(make_trainer(tmp_path, fashion, config=lf.LayerFoldingConfig(**{**CFG, "search_steps": 8}),
                                   train_args=args))
    assert sorted(logs) == [6, 12]
    for s in logs:
        assert logs[s]["loss"] == pytest.approx(logs[s]["task_loss"] + logs[s]["reg_loss"], rel=1e-5)


# --------------------------------------------------------------------------------------------------------
# Phases, logs, checkpoints


def test_phase_switch_at_search_end_with_plan_applied(baseline):
    trainer, logs, alphas_at, _ = baseline
    assert sorted(logs) == list(range(1, 13))
    assert all(LOG_KEYS <= set(logs[s]) for s in logs)
    assert [logs[s]["phase"] for s in range(1, 13)] == [0] * 6 + [1] * 6
    model = trainer.model
    plan = applied_plan(model)
    expected = lf.FoldPlan(tuple(site for site, a in alphas_at[6].items() if a >= 0.8))
    assert plan == expected and 0 < len(plan) < 9  # a real mix: some sites linear, some not
    assert logs[6]["sites_past_threshold"] == len(plan)
    assert any(isinstance(m, PaddedConv2d) for m in model.modules())  # padding of merged runs was moved
    for site, alpha in lf.alpha_parameters(model).items():
        assert not alpha.requires_grad and float(alpha) == (1.0 if site in plan.linear_sites else 0.0)
    assert all(alphas_at[s] == alphas_at[7] for s in range(7, 13))  # frozen α never moves afterwards
    assert all(alphas_at[s] != alphas_at[s - 1] for s in range(2, 7))  # while searching, it does
    for s in range(1, 13):  # the logged total is the sum of its logged parts
        assert logs[s]["loss"] == pytest.approx(logs[s]["task_loss"] + logs[s]["reg_loss"], rel=1e-5)
        assert (logs[s]["reg_loss"] > 0) == (s <= 6)
    projected = lf.projected_stats(model)
    assert (logs[12]["projected_nonlinear_layers"], logs[12]["projected_depth"]) == (projected.nonlinear_layers,
                                                                                     projected.depth)
    assert projected.depth < lf.fold_stats(tiny_model(), None).depth


def test_checkpoints_record_phase_and_plan(baseline):
    trainer, _, _, out = baseline
    states = {s: json.loads((out / f"checkpoint-{s}" / STATE_NAME).read_text()) for s in (4, 8, 12)}
    assert states[4]["phase"] == "search" and states[4]["plan"] is None and states[4]["search_steps"] == 6
    assert states[8]["phase"] == "finetune"
    assert lf.FoldPlan.from_dict(states[8]["plan"]) == applied_plan(trainer.model)
    assert lf.LayerFoldingConfig.from_pretrained(out / "checkpoint-8") == trainer.layerfold_config


@pytest.mark.parametrize("step", [4, 8])
def test_resume_logs_the_same_losses(baseline, fashion, tmp_path, step):
    trainer, logs, _, out = baseline
    resumed = make_trainer(tmp_path, fashion, train_args=args_for(tmp_path, max_steps=12))
    again = train_logs(resumed, resume_from_checkpoint=str(out / f"checkpoint-{step}"))  # with restored history
    assert sorted(again) == list(range(1, 13))
    for s in range(step + 1, 13):
        for key in COMPARED:
            assert again[s][key] == pytest.approx(logs[s][key], rel=1e-4, abs=1e-6), (s, key)
    assert applied_plan(resumed.model) == applied_plan(trainer.model)
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=1e-4, atol=1e-6)


def test_resume_refuses_a_model_with_another_plan(baseline, fashion, tmp_path):
    _, _, _, out = baseline
    model = lf.prepare_model(tiny_model(), lf.LayerFoldingConfig(**CFG))
    lf.apply_plan(model, lf.FoldPlan())
    trainer = make_trainer(tmp_path, fashion, model=model)
    with pytest.raises(ValueError, match="search phase"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))


def test_evaluate_reports_top1_top5(baseline):
    trainer = baseline[0]
    metrics = trainer.evaluate()
    model = trainer.model.eval()
    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))])
    with torch.no_grad():
        logits = model(batch["pixel_values"])
    top5 = logits.topk(5, dim=-1).indices
    assert metrics["eval_top1"] == pytest.approx(float((top5[:, 0] == batch["labels"]).float().mean()))
    assert metrics["eval_top5"] == pytest.approx(float((top5 == batch["labels"][:, None]).any(1).float().mean()))
    assert metrics["eval_loss"] == pytest.approx(float(F.cross_entropy(logits, batch["labels"])), rel=1e-5)


def test_predict_on_unlabelled_batches(tmp_path, fashion):
    """predict() on a test set without labels: Trainer would call model(pixel_values=...), which timm refuses."""
    deterministic = prepare_datasets(tiny_model(), fashion["train"], fashion["test"], input_size=SIZE)[3]

    def unlabelled(examples):
        return {"pixel_values": deterministic(examples)["pixel_values"]}

    trainer = make_trainer(tmp_path, fashion, eval_data_collator=unlabelled)
    out = trainer.predict(fashion["test"].select(range(5)))
    assert out.label_ids is None and out.predictions.shape == (5, 10)
    with torch.no_grad():
        logits = trainer.model.eval()(unlabelled([fashion["test"][i] for i in range(5)])["pixel_values"])
    np.testing.assert_allclose(out.predictions, logits.numpy(), rtol=1e-5, atol=1e-6)
    # the trainer's own collator, on a test set without its label column
    default = make_trainer(tmp_path, fashion).predict(fashion["test"].select(range(5)).remove_columns("label"))
    assert default.label_ids is None and default.predictions.shape == (5, 10)


def test_sets_handed_to_evaluate_and_predict_are_read_by_their_own_column_names(tmp_path, fashion):
    """The trainer's collators were built for its training and eval sets; a set handed to evaluate() or predict()
    that names its columns otherwise used to fail with a bare KeyError inside the collator."""
    trainer = LayerFoldingTrainer(tiny_model(), args_for(tmp_path, max_steps=1), train_dataset=fashion["train"],
                                  eval_dataset=fashion["test"], layerfold_config=lf.LayerFoldingConfig(**CFG),
                                  input_size=SIZE)
    test = fashion["test"].select(range(8))
    renamed = test.rename_columns({"image": "img", "label": "labels"})
    want, got = trainer.evaluate(test), trainer.evaluate(renamed)
    assert got["eval_top1"] == want["eval_top1"] and got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-6)
    unlabelled = trainer.predict(renamed.remove_columns("labels"))
    assert unlabelled.label_ids is None
    only_label = trainer.predict(test.rename_column("label", "labels"))  # the image column as built: labels kept
    assert only_label.label_ids.tolist() == test["label"] and "test_top1" in only_label.metrics
    np.testing.assert_allclose(unlabelled.predictions, trainer.predict(test).predictions, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"Could not find the image column\. Columns found: \['label'\]"):
        trainer.evaluate(test.remove_columns("image"))
    with pytest.raises(ValueError, match=r"Could not find the label column.*eval_data_collator"):
        trainer.evaluate(test.remove_columns("label"))  # no accuracy without labels: said, not silently dropped
    with pytest.raises(ValueError, match="range over \\[10, 10\\], but the model has num_classes=10"):  # as built
        trainer.evaluate(renamed.cast_column("labels", datasets.Value("int64")).map(lambda e: {"labels": 10}))


# transformers 5.x renamed gradient_checkpointing (kept as a deprecated alias) to activation_checkpointing
CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                 else "gradient_checkpointing")


def test_gradient_checkpointing_of_a_timm_model_goes_through_timm(tmp_path, fashion):
    """Trainer turns checkpointing on with transformers' activation_checkpointing_enable, which a timm model lacks
    (train() failed at its start); timm's own switch recomputes each block and trains to the same losses. The
    caller's arguments are left as they were."""
    config = lf.LayerFoldingConfig(**{**CFG, "search_steps": 2})
    plain = make_trainer(tmp_path / "plain", fashion, config=config,
                         train_args=args_for(tmp_path / "plain", max_steps=4))
    args = args_for(tmp_path / "ckpt", max_steps=4, save_strategy="steps", save_steps=4, **{CHECKPOINTING: True})
    ckpt = make_trainer(tmp_path / "ckpt", fashion, config=config, train_args=args)
    want, got = train_logs(plain), train_logs(ckpt)
    assert not ckpt.model.grad_checkpointing and getattr(args, CHECKPOINTING)  # both as they were after train()
    saved = torch.load(tmp_path / "ckpt" / "checkpoint-4" / "training_args.bin", weights_only=False)
    assert getattr(saved, CHECKPOINTING)  # a checkpoint records the run as asked for, not as hidden from Trainer
    assert [got[s]["phase"] for s in sorted(got)] == [0, 0, 1, 1] and ckpt.phase == "finetune"
    for step in want:
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5)
    # the recomputation is real, and (as for any checkpointed BatchNorm) it updates running statistics twice
    block_bn, stem_bn = ckpt.model.blocks[1][0].bn1, ckpt.model.bn1
    assert int(block_bn.num_batches_tracked) == 2 * int(plain.model.blocks[1][0].bn1.num_batches_tracked) == 8
    assert int(stem_bn.num_batches_tracked) == int(plain.model.bn1.num_batches_tracked) == 4


def test_save_folded_while_searching_warns_and_an_empty_plan_says_so_on_the_card(baseline, tmp_path, fashion, caplog):
    """Mid-search the threshold plan is folded, not the soft-α network: the trainer says so. With no site past the
    threshold the card used to say Layer Folding made some activations linear."""
    trainer = make_trainer(tmp_path, fashion, config=lf.LayerFoldingConfig(**{**CFG, "alpha_init": 0.0}))
    with caplog.at_level(logging.WARNING, logger="hf_layerfold.trainer"):
        path = trainer.save_folded(tmp_path / "folded")
    assert [r.name for r in caplog.records if "save_folded during the search phase" in r.getMessage()] == \
        ["hf_layerfold.trainer"] and "(0 of 9 sites past 0.8)" in caplog.text
    card = " ".join((path / "README.md").read_text().split())
    assert "No activation was removed" in card and "each removed activation" not in card
    before = lf.fold_stats(tiny_model(), (3, SIZE, SIZE))
    after = lf.fold_stats(LayerFoldedModel.from_pretrained(path), (3, SIZE, SIZE))
    assert after.depth == before.depth and after.nonlinear_layers == before.nonlinear_layers
    planned = baseline[0].save_folded(tmp_path / "planned")  # fine-tuned after its plan: no warning, the usual card
    assert caplog.text.count("save_folded during the search phase") == 1
    card = " ".join((planned / "README.md").read_text().split())
    assert "No activation was removed" not in card and "each removed activation let the linear layers" in card


def test_a_sharding_scheme_is_refused_before_training_unless_the_model_has_no_alpha(tmp_path, fashion, monkeypatch):
    """accelerate turns FSDP on only on GPUs, and DeepSpeed is not installed here; ZeRO-3 is reported on
    (transformers' switch) so that the trainer's own check runs on a CPU. A folded model has no α and is not
    refused."""
    import hf_layerfold.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(ValueError, match=r"does not support DeepSpeed ZeRO-3 for a model with α parameters \(this "
                                         r"one has 9\).*accelerate launch --multi_gpu"):
        make_trainer(tmp_path, fashion)
    folded = lf.fold_model(lf.prepare_model(tiny_model(), lf.LayerFoldingConfig()))
    assert make_trainer(tmp_path, fashion, model=folded).phase == "folded"


def test_a_one_channel_model_trains_on_grayscale_and_saves_its_size(tmp_path, fashion):
    """timm keeps the pretrained 3 channels in the data config of an ``in_chans=1`` model: the collator fed it RGB
    (a conv error at the first step) and save_folded wrote 3 channels; a size with a channel count the model does
    not take is refused at construction, and a numpy side is a side."""
    import timm

    model = timm.create_model("mobilenetv2_035", pretrained=False, num_classes=10, in_chans=1)
    trainer = LayerFoldingTrainer(model, args_for(tmp_path, max_steps=2), train_dataset=fashion["train"],
                                  eval_dataset=fashion["test"], input_size=np.int64(SIZE),
                                  layerfold_config=lf.LayerFoldingConfig(**{**CFG, "search_steps": 1}))
    batch = trainer.get_train_dataloader().collate_fn([fashion["train"][i] for i in range(2)])
    assert batch["pixel_values"].shape == (2, 1, SIZE, SIZE)
    mean = next(t for t in trainer.data_collator.transform.transforms if type(t).__name__ == "Normalize").mean
    assert len(mean) == 1 and float(mean[0]) == pytest.approx(sum((0.485, 0.456, 0.406)) / 3)
    trainer.train()
    path = trainer.save_folded(tmp_path / "folded")
    saved = json.loads((path / "config.json").read_text())["pretrained_cfg"]
    assert saved["input_size"] == [1, SIZE, SIZE] and len(saved["mean"]) == len(saved["std"]) == 1
    folded = LayerFoldedModel.from_pretrained(path).eval()
    planned = trainer.model.eval()
    x = torch.randn(2, 1, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), planned(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"input_size \(1, 40, 48\) has 1 channels, but the model takes 3"):
        LayerFoldingTrainer(tiny_model(), args_for(tmp_path, max_steps=1), train_dataset=fashion["train"],
                            input_size=(1, 40, 48))


def test_a_second_train_logs_only_its_own_micro_batches(tmp_path, fashion):
    """Steps after the last log of one train() must not leak into the next train()'s task_loss."""
    trainer = make_trainer(tmp_path, fashion, config=lf.LayerFoldingConfig(**{**CFG, "search_steps": 2}),
                           train_args=args_for(tmp_path, max_steps=3, logging_steps=2))
    train_logs(trainer)  # step 3 is never logged
    again = train_logs(trainer)  # the plan is fixed: a fine-tune only, loss == task_loss
    assert trainer.phase == "finetune" and trainer.search_steps == 0
    assert again[2]["reg_loss"] == 0 and again[2]["task_loss"] == pytest.approx(again[2]["loss"], rel=1e-5)


def test_compute_metrics_accepts_logits_and_ranked_ids():
    logits = np.array([[0.1, 0.9, 0.0, 0, 0, 0, 0], [0.8, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01]], dtype=np.float32)
    labels = np.array([1, 6])
    assert compute_metrics(EvalPrediction(logits, labels)) == {"top1": 0.5, "top5": 0.5}
    ranked = np.array([[1, 0, 2, 3, 4], [6, 0, 1, 2, 3]])
    assert compute_metrics(EvalPrediction(ranked, labels)) == {"top1": 1.0, "top5": 1.0}
    argmax = np.array([1, 0])  # preprocess_logits_for_metrics=argmax: one id per row
    assert compute_metrics(EvalPrediction(argmax, labels)) == {"top1": 0.5, "top5": 0.5}
    # eval_do_concat_batches=False: one array per batch (the first batch's logits were compared with every label)
    batches = EvalPrediction([logits[:1], logits[1:]], [labels[:1], labels[1:]])
    assert compute_metrics(batches) == compute_metrics(EvalPrediction(logits, labels))


def test_save_folded_loads_back_and_matches(baseline, tmp_path):
    trainer = baseline[0]
    trainer.evaluate()
    path = trainer.save_folded(tmp_path / "folded", datasets="zalando-datasets/fashion_mnist")
    net = LayerFoldedModel.from_pretrained(path)
    planned = trainer.model.eval()
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(net(x), planned(x), rtol=1e-4, atol=1e-4)
    assert net.layerfold_plan == applied_plan(planned)
    assert net.layerfold_config == trainer.layerfold_config
    card = (path / "README.md").read_text()
    assert "top1" in card
    assert lf.fold_stats(net, None).depth < lf.fold_stats(tiny_model(), None).depth


def test_best_model_at_end_is_a_fine_tune_checkpoint(tmp_path, fashion):
    """load_best_model_at_end must not load a search-phase checkpoint (soft α) into the planned network."""
    args = args_for(tmp_path, max_steps=12, eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4,
                    load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True)
    trainer = make_trainer(tmp_path, fashion, train_args=args)  # search ends at step 6
    trainer.train()
    evaluated = [e["step"] for e in trainer.state.log_history if "eval_loss" in e]
    assert evaluated == [4, 8, 12] and trainer.phase == "finetune"
    assert trainer.state.best_model_checkpoint.endswith(("checkpoint-8", "checkpoint-12"))
    plan = applied_plan(trainer.model)
    alphas = lf.alpha_parameters(trainer.model)
    assert {v.item() for v in alphas.values()} <= {0.0, 1.0}
    assert {site for site, v in alphas.items() if v.item() == 1.0} == set(plan.linear_sites)


def test_a_search_best_is_forgotten_when_a_resumed_run_fine_tunes(tmp_path, fashion):
    """A search-only run records a search-phase best; resumed for longer, the run fine-tunes and used to load that
    soft-α checkpoint into its planned network at the end."""
    def args(max_steps):
        return args_for(tmp_path, max_steps=max_steps, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                        save_steps=2, load_best_model_at_end=True, metric_for_best_model="top1")

    config = lf.LayerFoldingConfig(**{**CFG, "search_steps": 4})
    first = make_trainer(tmp_path, fashion, config=config, train_args=args(4))
    first.train()
    assert first.state.best_global_step in (2, 4) and first.phase == "finetune"  # the search took every step
    resumed = make_trainer(tmp_path, fashion, config=config, train_args=args(8))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert resumed.state.best_global_step in (6, 8)
    alphas = lf.alpha_parameters(resumed.model)
    assert {site for site, v in alphas.items() if v.item() == 1.0} == set(applied_plan(resumed.model).linear_sites)
    assert {v.item() for v in alphas.values()} <= {0.0, 1.0}


def test_save_strategy_best_says_the_search_is_not_checkpointed(tmp_path, fashion, caplog):
    """Only fine-tune evaluations count as best, so save_strategy="best" wrote nothing during the search, silently."""
    args = args_for(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=1, save_strategy="best",
                    metric_for_best_model="top1")
    trainer = make_trainer(tmp_path, fashion, train_args=args, config=lf.LayerFoldingConfig(**{**CFG,
                                                                                               "search_steps": 2}))
    with caplog.at_level("WARNING", logger="hf_layerfold.trainer"):
        trainer.train()
    assert "save_strategy='best' writes no checkpoint during the search phase (steps 1-2)" in caplog.text
    saved = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("checkpoint-*"))
    assert saved and min(saved) > 2


def test_a_channels_last_model_checkpoints_and_resumes(tmp_path, fashion):
    """Trainer writes a timm model's state dict with safetensors, which refused channels_last (non-contiguous)
    weights at the first checkpoint, after the steps had run."""
    def run(max_steps, resume=None):
        model = tiny_model().to(memory_format=torch.channels_last)
        args = args_for(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=2)
        trainer = make_trainer(tmp_path, fashion, model=model, train_args=args,
                               config=lf.LayerFoldingConfig(**{**CFG, "search_steps": 2}))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    first = run(2)
    assert (tmp_path / "checkpoint-2" / "model.safetensors").is_file()
    resumed = run(4, resume=str(tmp_path / "checkpoint-2"))
    assert resumed.phase == "finetune"
    assert resumed.model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert first.state.global_step == 2 and resumed.state.global_step == 4


def test_resume_refuses_another_config(baseline, fashion, tmp_path):
    """The checkpoint's layerfold_config.json was never read: a trainer built without the run's config resumed it
    under the defaults (another λ, threshold, regularizer) silently, and other sites failed in transformers'
    loading code."""
    out = baseline[3]
    for changed, said in (({"lambda_reg": 0.3}, "lambda_reg: 0.05 there, 0.3 here"),
                          ({"exclude_modules": ["blocks.0.0.bn1.act"]}, r"exclude_modules: \[\] there, \['blocks")):
        trainer = make_trainer(tmp_path, fashion, config=lf.LayerFoldingConfig(**{**CFG, **changed}))
        with pytest.raises(ValueError, match=f"another LayerFoldingConfig \\({said}.*from_pretrained"):
            trainer.train(resume_from_checkpoint=str(out / "checkpoint-8"))
    same = lf.LayerFoldingConfig.from_pretrained(out / "checkpoint-4")  # what the error advises
    assert make_trainer(tmp_path, fashion, config=same).layerfold_config == baseline[0].layerfold_config


def test_the_trainer_decodes_for_its_own_collators_only(tmp_path, fashion):
    """Images are left encoded for the trainer's collators, which name a broken file; a user's eval collator still
    gets PIL images (it got {'bytes', 'path'} dicts), and so does a callback reading trainer.train_dataset."""
    seen = []

    def user_collator(examples):
        seen.append(type(examples[0]["image"]))
        return deterministic([{"image": e["image"].convert("L"), "label": e["label"]} for e in examples])

    deterministic = prepare_datasets(tiny_model(), fashion["train"], fashion["test"], input_size=SIZE)[3]
    splits = datasets.DatasetDict(train=fashion["train"], validation=fashion["test"].select(range(8)))
    trainer = LayerFoldingTrainer(tiny_model(), args_for(tmp_path, max_steps=1), train_dataset=splits,
                                  eval_data_collator=user_collator, input_size=SIZE)
    trainer.evaluate()
    assert seen and all(issubclass(t, Image.Image) for t in seen)
    assert isinstance(trainer.train_dataset[0]["image"], Image.Image)
    loader = trainer.get_train_dataloader()  # the training set, for the trainer's own collator: left encoded
    assert loader.dataset.features["image"] == datasets.Image(decode=False)
    assert isinstance(trainer.train_dataset[0]["image"], Image.Image)
    # this library's collator, passed in by the user (as the examples do), decodes too
    theirs = LayerFoldingTrainer(tiny_model(), args_for(tmp_path, max_steps=1), train_dataset=fashion["train"],
                                 data_collator=deterministic, input_size=SIZE)
    assert theirs.get_train_dataloader().dataset.features["image"] == datasets.Image(decode=False)


def test_an_older_checkpoint_config_resumes(baseline, fashion, tmp_path):
    """A layerfold_config.json written before a field existed was refused ('None there'), even with the config the
    error advised."""
    out = tmp_path / "old"
    shutil.copytree(baseline[3] / "checkpoint-8", out)
    saved = json.loads((out / "layerfold_config.json").read_text())
    del saved["alpha_sharing"], saved["blend"]
    (out / "layerfold_config.json").write_text(json.dumps(saved))
    from hf_layerfold.phases import check_resumed_config

    check_resumed_config(out, lf.LayerFoldingConfig.from_pretrained(out))
    check_resumed_config(out, baseline[0].layerfold_config)
    (out / "layerfold_config.json").write_text(json.dumps({**saved, "a_later_field": 1}))  # a newer version's
    with pytest.raises(ValueError, match=f"cannot resume from {out}: its layerfold_config.json does not load"):
        check_resumed_config(out, baseline[0].layerfold_config)


def test_eval_sets_by_name_of_any_kind(tmp_path, fashion):
    """A dict of eval sets: a datasets split gets the timm collator, a set of ready tensors the default one."""
    deterministic = prepare_datasets(tiny_model(), fashion["train"], fashion["test"], input_size=SIZE)[3]
    ready = [{"pixel_values": b, "labels": int(y)}
             for b, y in zip(*deterministic([fashion["test"][i] for i in range(8)]).values(), strict=True)]
    trainer = LayerFoldingTrainer(tiny_model(), args_for(tmp_path, max_steps=1), train_dataset=fashion["train"],
                                  eval_dataset={"fm": fashion["test"], "ready": ready}, input_size=SIZE)
    metrics = trainer.evaluate()
    assert {"eval_fm_top1", "eval_ready_top1", "eval_fm_top5", "eval_ready_top5"} <= set(metrics)
    first8 = trainer.evaluate(eval_dataset=fashion["test"].select(range(8)))
    assert metrics["eval_ready_top1"] == first8["eval_top1"]
    # a set handed to predict gets the deterministic collator (it used to get the augmenting training one)
    twice = [trainer.predict(fashion["test"].select(range(8))).predictions for _ in range(2)]
    np.testing.assert_array_equal(twice[0], twice[1])
    renamed = trainer.predict(fashion["test"].select(range(8)).rename_columns({"image": "img", "label": "labels"}))
    np.testing.assert_allclose(renamed.predictions, twice[0], rtol=1e-6, atol=1e-7)


def test_eval_labels_beyond_the_head_are_refused_at_init_with_a_given_eval_collator(tmp_path, fashion):
    """The trainer builds no collator for the eval set then, so nothing else would check it before evaluate()."""
    eval_collator = prepare_datasets(tiny_model(), fashion["test"], input_size=SIZE)[2]
    beyond = fashion["test"].select(range(4)).cast_column("label", datasets.Value("int64")).map(lambda e: {"label": 12})
    with pytest.raises(ValueError, match=r"range over \[12, 12\].*num_classes=10"):
        LayerFoldingTrainer(tiny_model(), args_for(tmp_path, max_steps=1), train_dataset=fashion["train"],
                            eval_dataset=beyond, eval_data_collator=eval_collator, input_size=SIZE)


def test_an_unshuffled_streaming_train_set_is_warned_about(tmp_path, fashion, caplog):
    """Trainer reads a stream in file order (a streaming imagefolder: one class after another)."""
    stream = fashion["train"].to_iterable_dataset(num_shards=2)
    with caplog.at_level(logging.WARNING, logger="hf_layerfold.trainer"):
        LayerFoldingTrainer(tiny_model(), args_for(tmp_path, max_steps=1), train_dataset=stream, input_size=SIZE)
    assert "the streaming training set is not shuffled" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_layerfold.trainer"):
        LayerFoldingTrainer(tiny_model(), args_for(tmp_path, max_steps=1), input_size=SIZE,
                            train_dataset=stream.shuffle(seed=0, buffer_size=8).map(lambda e: e))
    assert "not shuffled" not in caplog.text
    caplog.clear()
    shuffled = [fashion["train"].to_iterable_dataset(num_shards=2).shuffle(seed=s, buffer_size=8) for s in (0, 1)]
    with caplog.at_level(logging.WARNING, logger="hf_layerfold.trainer"):
        LayerFoldingTrainer(tiny_model(), args_for(tmp_path, max_steps=1), input_size=SIZE,
                            train_dataset=datasets.interleave_datasets(shuffled))
    assert "not shuffled" not in caplog.text  # every stream interleaved is shuffled


def test_streaming_train_set_is_split_by_shard_and_string_labels_are_the_collators(tmp_path, fashion, caplog):
    stream = fashion["train"].to_iterable_dataset(num_shards=4)
    args = args_for(tmp_path, max_steps=1)
    LayerFoldingTrainer(tiny_model(), args, train_dataset=stream, input_size=SIZE)
    assert args.accelerator_config.dispatch_batches is False  # each process decodes its own shards
    assert not warn_on_few_shards(stream, 4) and not warn_on_few_shards(fashion["train"].to_iterable_dataset(), 1)
    with caplog.at_level(logging.WARNING, logger="hf_layerfold.trainer"):
        assert warn_on_few_shards(fashion["train"].to_iterable_dataset(num_shards=1), 2)
    assert "1 shard(s) for 2 processes: each process reads and decodes the whole stream" in caplog.text
    with caplog.at_level(logging.WARNING, logger="hf_layerfold.trainer"):  # one rank ends its stream early
        assert warn_on_few_shards(fashion["train"].to_iterable_dataset(num_shards=3), 2)
    assert "3 shards for 2 processes, not a multiple" in caplog.text and "up to 2.00x as often" in caplog.text
    names = fashion["train"].features["label"].names
    named = fashion["train"].cast_column("label", datasets.Value("int64")).map(lambda e: {"label": names[e["label"]]})
    base = prepare_datasets(tiny_model(), fashion["train"], input_size=SIZE)[2]

    def by_name(examples):  # the user's collator maps class names to ids
        return base([{**e, "label": names.index(e["label"])} for e in examples])

    trainer = LayerFoldingTrainer(tiny_model(), args_for(tmp_path, max_steps=1), data_collator=by_name,
                                  train_dataset=named)
    assert trainer.get_train_dataloader() is not None


def test_card_results_name_hub_datasets_only(baseline):
    """The model-index names the eval set's Hub dataset; a local folder ('imagefolder', 'wds') is no such dataset,
    nor a Hub set's name without its owner."""
    trainer = baseline[0]
    trainer.evaluate()
    saved = trainer.eval_dataset
    try:
        for name, expected in (("imagefolder", None), ("wds", None), ("fashion_mnist", None),  # (a Hub set's,
                               ("zalando-datasets/fashion_mnist", True)):                 # without its owner)
            trainer.eval_dataset = saved.select(range(len(saved)))
            trainer.eval_dataset.info.dataset_name = name
            results = trainer._eval_results(None)
            assert (results is None) if expected is None else results["dataset"] == name
        trainer.eval_dataset = saved.to_iterable_dataset().take(7)  # a stream's subset is not its split
        assert trainer._eval_results("timm/imagenet-1k-wds")["dataset_name"] == \
            "timm/imagenet-1k-wds (streamed evaluation set)"
    finally:
        trainer.eval_dataset = saved


# --------------------------------------------------------------------------------------------------------
# Input checks and argument handling


def test_labels_outside_the_head_fail_before_training(tmp_path, fashion):
    bad = fashion["train"].cast_column("label", datasets.Value("int64")).map(lambda e: {"label": e["label"] + 5})
    with pytest.raises(ValueError, match="num_classes=10"):
        LayerFoldingTrainer(tiny_model(), args_for(tmp_path, max_steps=1), train_dataset=bad, input_size=SIZE)
    collator = make_trainer(tmp_path, fashion).data_collator  # the user's own collator: still checked
    with pytest.raises(ValueError, match="num_classes=10"):
        LayerFoldingTrainer(tiny_model(), args_for(tmp_path, max_steps=1), data_collator=collator, train_dataset=bad)


def test_config_selecting_no_site_fails(tmp_path, fashion):
    config = lf.LayerFoldingConfig(target_modules=["no_such_block.*"])
    with pytest.raises(ValueError, match="select no site"):
        LayerFoldingTrainer(tiny_model(), args_for(tmp_path, max_steps=1), train_dataset=fashion["train"],
                            layerfold_config=config)


def test_arguments_a_timm_model_needs_are_set(tmp_path, fashion):
    args = args_for(tmp_path, max_steps=1, ddp_find_unused_parameters=False, label_smoothing_factor=0.2)
    assert args.remove_unused_columns
    model = tiny_model()
    trainer = LayerFoldingTrainer(model, args, train_dataset=fashion["train"], input_size=SIZE)
    assert is_prepared(model) and trainer.layerfold_config == lf.LayerFoldingConfig()
    assert not args.remove_unused_columns and args.ddp_find_unused_parameters is True
    assert args.label_smoothing_factor == 0.2 and trainer.label_names == ["labels"]


def test_search_length_from_epochs_or_half_of_training(tmp_path, fashion):
    for cfg, expected in ((dict(search_steps=None, search_epochs=0.25), 4), (dict(search_steps=None), 5)):
        config = lf.LayerFoldingConfig(**{**CFG, **cfg, "lambda_reg": 0.0})
        trainer = make_trainer(tmp_path, fashion, config=config, train_args=args_for(tmp_path, max_steps=10))
        logs = train_logs(trainer)  # 64 examples / batch 4 = 16 steps per epoch
        assert trainer.search_steps == expected
        assert [logs[s]["phase"] for s in sorted(logs)] == [0] * expected + [1] * (10 - expected)
        assert math.isclose(logs[10]["reg_loss"], 0.0)


def test_compiled_blend_trains_like_eager(tmp_path, fashion):
    """blend="compile" (BatchNorm + blend fused and compiled) through the real Trainer, across the phase switch:
    the same losses, the same plan and a model that folds exactly, as the default eager blend."""
    from hf_layerfold.fused import BatchNormBlend2d

    def relu6_model():
        torch.manual_seed(0)
        arch = [["ds_r1_k3_s1_c8"], ["ir_r2_k3_s2_e3_c16"], ["ir_r1_k3_s1_e4_c16"]]
        model = efficientnet.EfficientNet(decode_arch_def(arch), num_classes=10, stem_size=8, num_features=32,
                                          act_layer=torch.nn.ReLU6)
        model.pretrained_cfg = tiny_model().pretrained_cfg
        return model

    runs = {}
    for blend in ("eager", "compile"):
        trainer = make_trainer(tmp_path / blend, fashion, model=relu6_model(),
                               config=lf.LayerFoldingConfig(**{**CFG, "blend": blend}),
                               train_args=args_for(tmp_path / blend, max_steps=8))
        if blend == "compile":
            assert any(isinstance(m, BatchNormBlend2d) for m in trainer.model.modules())
        runs[blend] = (trainer, train_logs(trainer))
    (eager, logs_e), (fused, logs_f) = runs["eager"], runs["compile"]
    for step in logs_e:
        assert logs_f[step]["loss"] == pytest.approx(logs_e[step]["loss"], rel=1e-4)
    assert applied_plan(fused.model) == applied_plan(eager.model) and len(applied_plan(fused.model)) > 0
    model = fused.model.eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    assert (lf.fold_model(model)(x) - model(x)).abs().max() < 1e-4


def test_block_shared_alpha_trains_checkpoints_resumes_and_folds(tmp_path, fashion):
    """alpha_sharing="block": one α per block in the optimizer (no duplicates), the sites of a block get one plan
    decision, checkpoints hold each α once and a resumed run continues from them, and the model folds exactly."""
    config = lf.LayerFoldingConfig(**{**CFG, "alpha_sharing": "block", "alpha_init": 0.7})
    train_args = args_for(tmp_path, max_steps=8, save_strategy="steps", save_steps=4)
    trainer = make_trainer(tmp_path, fashion, config=config, train_args=train_args)
    sites = lf.alpha_parameters(trainer.model)
    unique = {id(a) for a in sites.values()}
    assert len(sites) == 9 and len(unique) == 5  # one depthwise-separable block (1 site), 4 inverted residuals (2)
    group = next(g for g in trainer.create_optimizer().param_groups if g.get(ALPHA_GROUP))
    assert {id(p) for p in group["params"]} == unique and len(group["params"]) == len(unique)
    logs = train_logs(trainer)
    plan = applied_plan(trainer.model)
    assert len(plan) > 0
    by_block = {}
    for m in trainer.model.modules():
        if isinstance(m, lf.FoldableActivation):
            by_block.setdefault(m.alpha_owner, set()).add(m.site in plan.linear_sites)
    assert all(len(decisions) == 1 for decisions in by_block.values())
    state = safetensors.torch.load_file(str(tmp_path / "checkpoint-4" / "model.safetensors"))
    assert len([k for k in state if k.endswith(".alpha")]) == len(unique)

    resumed = make_trainer(tmp_path, fashion, config=config, train_args=train_args)
    logs_r = train_logs(resumed, resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    for step in range(5, 9):
        assert logs_r[step]["loss"] == pytest.approx(logs[step]["loss"], rel=1e-5)
    model = resumed.model.eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    assert (lf.fold_model(model)(x) - model(x)).abs().max() < 1e-4


def test_config_follows_the_alpha_sharing_the_model_was_prepared_with(tmp_path, fashion, caplog):
    model = lf.prepare_model(tiny_model(), lf.LayerFoldingConfig(**{**CFG, "alpha_sharing": "block"}))
    with caplog.at_level("WARNING"):
        trainer = make_trainer(tmp_path, fashion, model=model, config=lf.LayerFoldingConfig(**CFG))
    assert trainer.layerfold_config.alpha_sharing == "block" and "alpha_sharing='block'" in caplog.text


# --------------------------------------------------------------------------------------------------------
# Fine-tuning a folded model


def test_folded_model_fine_tunes_checkpoints_resumes_and_saves(baseline, fashion, tmp_path):
    """A LayerFoldedNet trains as itself (its merged convs), with distillation; the trained net is what is saved."""
    planned = baseline[0].model.eval()
    folded = lf.fold_model(planned)
    before = {k: v.clone() for k, v in folded.state_dict().items()}
    # the search knobs of the config that planned it (λ, regularizer weights naming its sites) are simply unused
    config = lf.LayerFoldingConfig(**{**CFG, "distill_weight": 0.5, "regularizer_weights": {"blocks.1.*": 2.0}})
    out = tmp_path / "run"
    trainer = make_trainer(out, fashion, model=folded, config=config, teacher_model=planned,
                           train_args=args_for(out, max_steps=6, save_strategy="steps", save_steps=3))
    assert trainer.phase == "folded"
    assert not any(g.get(ALPHA_GROUP) for g in trainer.create_optimizer().param_groups)
    model = trainer.model.train()
    batch = trainer.data_collator([fashion["train"][i] for i in range(6)])
    loss = trainer.compute_loss(model, batch)  # no regularizer: CE and KD only
    s, t = model(batch["pixel_values"]), planned(batch["pixel_values"])
    torch.testing.assert_close(loss, 0.5 * F.cross_entropy(s, batch["labels"])
                               + 0.5 * distillation_loss(s, t, config.distill_temperature))
    logs = train_logs(trainer)
    assert [logs[s]["phase"] for s in sorted(logs)] == [2] * 6 and all(logs[s]["reg_loss"] == 0 for s in logs)
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("features.") for k in changed)  # the merged convs themselves were trained

    resumed = make_trainer(out, fashion, model=lf.fold_model(planned), config=config, teacher_model=planned,
                           train_args=args_for(out, max_steps=6))
    again = train_logs(resumed, resume_from_checkpoint=str(out / "checkpoint-3"))
    for s in range(4, 7):
        assert again[s]["loss"] == pytest.approx(logs[s]["loss"], rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="'folded' run"):  # a folded checkpoint into an unfolded model
        make_trainer(tmp_path, fashion).train(resume_from_checkpoint=str(out / "checkpoint-3"))

    path = trainer.save_folded(tmp_path / "saved")
    net = LayerFoldedModel.from_pretrained(path)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(net(x), trainer.model.eval()(x), rtol=1e-5, atol=1e-5)
    assert net.layerfold_plan == applied_plan(planned)
    assert net.layerfold_config == config  # a fresh fold records no config of its own: the trainer's is carded


def test_trainer_push_to_hub_pushes_what_rebuilds_the_run(tmp_path, fashion):
    """Trainer's own push (``push_to_hub=True``) sent only model.safetensors during training and failed at the end
    in its model card, which reads ``model.config``."""
    import hub_server

    with hub_server.running_local_hub(tmp_path / "hf_home") as hub:
        args = args_for(tmp_path / "run", max_steps=8, save_strategy="steps", save_steps=4, push_to_hub=True,
                        hub_model_id="test-org/lf-run", hub_strategy="every_save", hub_token=hub_server.DEFAULT_TOKEN,
                        hub_private_repo=True)
        trainer = make_trainer(tmp_path, fashion, train_args=args, config=lf.LayerFoldingConfig(**{**CFG,
                                                                                                    "search_steps": 4}))
        trainer.train()
        files = hub.repos["test-org/lf-run"].files
        assert {"model.safetensors", STATE_NAME, "layerfold_config.json"} <= set(files)  # pushed at each save
        trainer.push_to_hub(license="mit", tags="fashion", finetuned_from="timm/mobilenetv2_050.lamb_in1k",
                            dataset_tags="zalando-datasets/fashion_mnist", language="en")  # (Trainer's card fields,
        files = hub.repos["test-org/lf-run"].files                                   # which were dropped)
        card = files["README.md"].decode()
        assert "A LayerFoldingTrainer run (finetune phase)" in card and 'snapshot_download("test-org/lf-run")' in card
        meta = ModelCard(card).data
        assert (meta.license, meta.language, meta.base_model, meta.datasets) == (
            "mit", "en", "timm/mobilenetv2_050.lamb_in1k", ["zalando-datasets/fashion_mnist"])
        assert meta.tags == ["layer-folding", "timm", "image-classification", "fashion"]
        state = safetensors.torch.load(files["model.safetensors"])
        rebuilt = lf.prepare_model(tiny_model(), lf.LayerFoldingConfig.from_dict(json.loads(
            files["layerfold_config.json"])))
        lf.apply_plan(rebuilt, lf.FoldPlan.from_state_dict(state))
        rebuilt.load_state_dict(state)
        assert rebuilt.layerfold_plan == applied_plan(trainer.model)
        # the folded push follows the run's Hub settings (hub_private_repo=True: it is private)
        trainer.save_folded(tmp_path / "folded", push_to_hub=True, repo_id="test-org/lf-folded")
        assert hub.repos["test-org/lf-folded"].private and hub.repos["test-org/lf-run"].private


def test_trainer_folded_push_goes_to_the_runs_hub_revision(tmp_path, fashion):
    """TrainingArguments(hub_revision=...) sends Trainer's pushes to that branch; the folded push follows it, unless
    it opens a pull request (which targets the default branch)."""
    import hub_server

    with hub_server.running_local_hub(tmp_path / "hf_home") as hub:
        args = args_for(tmp_path / "run", max_steps=2, hub_revision="folded", hub_token=hub_server.DEFAULT_TOKEN)
        trainer = make_trainer(tmp_path, fashion, train_args=args)
        trainer.train()
        trainer.save_folded(tmp_path / "a", push_to_hub=True, repo_id="test-org/lf-rev")
        repo = hub.repos["test-org/lf-rev"]
        assert "model.safetensors" in repo.resolve("folded").files and "model.safetensors" not in repo.files
        trainer.save_folded(tmp_path / "b", push_to_hub=True, repo_id="test-org/lf-rev", create_pr=True)
        assert "model.safetensors" in repo.resolve("refs/pr/1").files and "model.safetensors" not in repo.files


def test_a_teacher_with_another_head_is_refused(tmp_path, fashion):
    """It failed at the first step in the distillation loss (1000 against 10 logits)."""
    teacher = tiny_model()
    teacher.reset_classifier(1000)
    with pytest.raises(ValueError, match="the teacher predicts 1000 classes, the model 10"):
        make_trainer(tmp_path, fashion, teacher_model=teacher,
                     config=lf.LayerFoldingConfig(**{**CFG, "distill_weight": 0.5}))


def test_trainer_push_of_a_folded_net_is_refused(tmp_path, fashion):
    """Trainer's push would send a folded net's weights without the spec that rebuilds it (no config.json)."""
    model = lf.prepare_model(tiny_model(), lf.LayerFoldingConfig(**CFG))
    folded = lf.fold_model(lf.apply_plan(model, lf.FoldPlan()))
    with pytest.raises(ValueError, match=r"publish it with trainer.save_folded\(push_to_hub=True"):
        make_trainer(tmp_path, fashion, model=folded, train_args=args_for(tmp_path, push_to_hub=True,
                                                                          hub_model_id="test-org/x"))


def test_trainer_arguments_it_cannot_follow_are_named(tmp_path, fashion):
    with pytest.raises(ValueError, match=r"label_names=\['label'\]: LayerFoldingTrainer's batches name the labels"):
        make_trainer(tmp_path, fashion, train_args=args_for(tmp_path, max_steps=2, label_names=["label"]))
    with pytest.raises(NotImplementedError, match="does not support hyperparameter_search"):
        make_trainer(tmp_path, fashion).hyperparameter_search(n_trials=2)
    typo = args_for(tmp_path, max_steps=8, eval_strategy="steps", eval_steps=2, metric_for_best_model="accuracy")
    trainer = make_trainer(tmp_path, fashion, train_args=typo)  # the search takes 6 steps: the typo fails at step 2
    with pytest.raises(KeyError, match="metric_for_best_model='accuracy': the evaluation has no 'eval_accuracy'"):
        trainer.train()
    assert trainer.state.global_step == 2


def test_batched_metrics_and_inputs_for_metrics_match_the_default(tmp_path, fashion):
    plain = make_trainer(tmp_path, fashion).evaluate()
    batched = make_trainer(tmp_path, fashion, train_args=args_for(tmp_path, per_device_eval_batch_size=5,
                                                                  batch_eval_metrics=True)).evaluate()
    assert (batched["eval_top1"], batched["eval_top5"]) == (plain["eval_top1"], plain["eval_top5"])
    seen = []
    with_inputs = make_trainer(tmp_path, fashion, train_args=args_for(tmp_path, include_for_metrics=["inputs"]),
                               compute_metrics=lambda p: seen.append(p.inputs.shape) or compute_metrics(p))
    assert with_inputs.evaluate()["eval_top1"] == plain["eval_top1"] and seen[0][1:] == (3, SIZE, SIZE)


def test_the_card_gets_the_evaluation_of_the_model_it_folds(tmp_path, fashion):
    """After ``load_best_model_at_end`` the card got the last evaluation, of a model that was not kept; an
    ``evaluate(other_set)`` got carded under the eval set's name."""
    args = args_for(tmp_path, max_steps=12, eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=3,
                    load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=False)
    trainer = make_trainer(tmp_path, fashion, train_args=args)
    trainer.train()
    best = trainer.state.best_global_step
    at_best = next(e for e in trainer.state.log_history if e.get("step") == best and "eval_top1" in e)
    trainer.evaluate(fashion["train"].select(range(16)))  # another set: not what the card describes
    assert trainer._eval_results("zalando-datasets/fashion_mnist")["metrics"]["top1"] == at_best["eval_top1"]
    after = trainer.evaluate()  # an evaluation after training, on the eval set: the card takes it
    carded = trainer._eval_results("zalando-datasets/fashion_mnist")
    assert carded["metrics"]["top1"] == after["eval_top1"]
    assert carded["dataset_name"] == "zalando-datasets/fashion_mnist (32 evaluation images)"  # a subset, said so


def test_persistent_workers_evaluate_the_set_they_are_given(tmp_path, fashion):
    """Trainer caches one eval loader under "eval" with persistent workers and handed it out for any set."""
    args = args_for(tmp_path, dataloader_num_workers=1, dataloader_persistent_workers=True)
    trainer = make_trainer(tmp_path, fashion, train_args=args)
    own = trainer.evaluate()
    other = fashion["train"].select(range(16))
    alone = make_trainer(tmp_path, fashion).evaluate(other)
    assert trainer.evaluate(other)["eval_loss"] == pytest.approx(alone["eval_loss"], rel=1e-5)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(own["eval_loss"], rel=1e-5)  # its own loader kept


def test_a_fully_frozen_model_is_refused_before_a_fine_tune_with_nothing_to_train(tmp_path, fashion):
    """It searched, then failed at the first fine-tune step with torch's "does not require grad"."""
    config = lf.LayerFoldingConfig(**{**CFG, "search_steps": 2})
    model = lf.prepare_model(tiny_model(), config)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(".alpha"))
    trainer = make_trainer(tmp_path, fashion, model=model, config=config, train_args=args_for(tmp_path, max_steps=4))
    with pytest.raises(ValueError, match="every weight of the model is frozen"):
        trainer.train()


def test_frozen_alphas_leave_the_optimizer_state_and_language_model_options_are_named(tmp_path, fashion, caplog):
    """A schedule-free optimizer moves every parameter with state in optimizer.train()/eval(): frozen α drifted off
    0/1. NEFTune failed inside train(); Liger kernels asked for a package that patches nothing of a timm CNN."""
    config = lf.LayerFoldingConfig(**{**CFG, "search_steps": 2})
    trainer = make_trainer(tmp_path, fashion, config=config, train_args=args_for(tmp_path, max_steps=3))
    trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert not any(a in inner.state for a in trainer._alpha_params) and len(inner.state) > 0
    with pytest.raises(ValueError, match="NEFTune adds noise to a language model's input embeddings"):
        make_trainer(tmp_path, fashion, train_args=args_for(tmp_path, max_steps=1, neftune_noise_alpha=5.0))
    args = args_for(tmp_path, max_steps=1)
    args.use_liger_kernel = True
    with caplog.at_level(logging.WARNING, logger="hf_layerfold.trainer"):
        make_trainer(tmp_path, fashion, train_args=args)
    assert args.use_liger_kernel is False and "use_liger_kernel=False" in caplog.text


def test_persistent_workers_are_reused_and_not_left_running(tmp_path, fashion):
    """Every evaluate() built a new persistent loader, which accelerate keeps: two more live workers per call."""
    import multiprocessing

    args = args_for(tmp_path, dataloader_num_workers=2, dataloader_persistent_workers=True)
    trainer = make_trainer(tmp_path, fashion, train_args=args)
    other = fashion["train"].select(range(16))
    trainer.evaluate()
    live = len(multiprocessing.active_children())
    loader = trainer._eval_dataloaders["eval"]
    for _ in range(3):
        trainer.evaluate(other)
        trainer.predict(other)
        trainer.evaluate()
    assert trainer.args.dataloader_persistent_workers is True  # restored after each other set (and predict)
    assert trainer._eval_dataloaders["eval"] is loader and trainer.get_eval_dataloader() is loader
    assert len(multiprocessing.active_children()) == live


def test_an_evaluation_of_the_searching_network_is_not_carded(tmp_path, fashion):
    """An evaluation during the search measures the soft-α network, not the threshold-planned net that
    ``save_folded`` folds: the card reported it as the saved model's top-1 (from the trainer's own record and from
    Trainer's log history)."""
    args = args_for(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2)
    trainer = make_trainer(tmp_path, fashion, config=lf.LayerFoldingConfig(**{**CFG, "search_steps": 4}),
                           train_args=args)
    trainer.train()  # a search-only run: its evaluations (steps 2 and 4) are of the searching network
    assert trainer.phase == "finetune" and [e["step"] for e in trainer.state.log_history if "eval_top1" in e] == [2, 4]
    assert trainer._eval_results("zalando-datasets/fashion_mnist") is None
    trainer._own_evals.clear()  # (as after a resume: only the log history is left)
    assert trainer._eval_results("zalando-datasets/fashion_mnist") is None
    after = trainer.evaluate()  # the planned network, evaluated: that one is carded
    assert trainer._eval_results("zalando-datasets/fashion_mnist")["metrics"]["top1"] == after["eval_top1"]


def test_the_card_takes_the_best_evaluation_of_a_resumed_run_and_none_from_before_train(tmp_path, fashion):
    """A resumed run whose best checkpoint predates the resume carded its last evaluation, not the best one it
    loaded; an ``evaluate()`` before a second ``train()`` was carded for the model that run ended with."""
    calls = iter(range(100, 0, -1))  # a score that only falls, across both trainers: step 8 stays the best

    def scored(pred):
        return {**compute_metrics(pred), "score": next(calls)}

    kw = dict(max_steps=12, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
              load_best_model_at_end=True, metric_for_best_model="score")
    make_trainer(tmp_path / "a", fashion, train_args=args_for(tmp_path / "a", **kw), compute_metrics=scored).train()
    resumed = make_trainer(tmp_path / "b", fashion, train_args=args_for(tmp_path / "b", **kw),
                           compute_metrics=scored)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-8"))  # (search: steps 1-6)
    assert resumed.state.best_global_step == 8
    at_8 = next(e for e in resumed.state.log_history if e.get("step") == 8 and "eval_score" in e)
    assert resumed._carded_metrics()["eval_score"] == at_8["eval_score"]
    resumed.evaluate()
    resumed.args.eval_strategy = "no"
    resumed.train()  # a fine-tune only, evaluated by nobody: the evaluation before it describes another model
    assert resumed._carded_metrics() is None


def test_a_wrapped_model_is_refused_when_the_trainer_is_built(tmp_path, fashion):
    """A prepared model wrapped afterwards (as transformers' TimmWrapper keeps it, in ``.timm_model``) trained until
    the first log, or with no logging through the whole search, then failed; a wrapped folded net was refused as
    a model with no folding rule."""
    prepared = lf.prepare_model(tiny_model(), lf.LayerFoldingConfig(**CFG))
    for inner in (prepared, lf.fold_model(prepared)):
        wrapper = torch.nn.Module()
        wrapper.timm_model = inner
        with pytest.raises(lf.UnsupportedModelError, match=rf"is a wrapper.*pass the {type(inner).__name__} it "
                                                           r"wraps \(model\.timm_model\)"):
            make_trainer(tmp_path, fashion, model=wrapper)


def test_a_folded_nets_run_searched_nothing_and_cards_its_best(tmp_path, fashion):
    """A folded net's run took half its steps as a search length, and the card's record dropped its evaluations
    in those steps: the best checkpoint's among them."""
    prepared = lf.prepare_model(tiny_model(), lf.LayerFoldingConfig(**CFG))
    folded = lf.fold_model(lf.apply_plan(prepared, lf.FoldPlan.from_model(prepared, threshold=0.4)))
    calls = iter(range(100, 0, -1))  # a score that only falls: step 2 stays the best
    args = args_for(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                    load_best_model_at_end=True, metric_for_best_model="score")
    trainer = make_trainer(tmp_path, fashion, model=folded, train_args=args,
                           compute_metrics=lambda p: {**compute_metrics(p), "score": next(calls)})
    trainer.train()
    assert trainer.phase == "folded" and trainer.search_steps == 0 and trainer.state.best_global_step == 2
    trainer._own_evals.clear()  # (as after a resume: only the log history is left)
    assert trainer._carded_metrics()["eval_score"] == 100


def test_the_card_gives_the_measured_accuracy_without_a_hub_dataset_id(baseline, tmp_path):
    """A run on local data (no Hub id for the model-index) left its evaluation off the card, which the CLI's card
    gives for the same data."""
    trainer = baseline[0]
    top1 = trainer.evaluate()["eval_top1"]
    card = (trainer.save_folded(tmp_path / "folded") / "README.md").read_text()
    assert "model-index" not in card and f"| After folding | {top1:.2%} |" in card
    assert f"({len(trainer.eval_dataset)} images)" in card


def test_the_cards_accuracy_section_says_what_was_measured(baseline, tmp_path):
    """A compute_metrics of one's own in percent (timm.utils.accuracy's) made save_folded raise; a streamed subset
    was called its whole split, and held-out training images the `train` split."""
    trainer = baseline[0]
    own_metrics, own_eval = trainer.compute_metrics, trainer.eval_dataset

    def card(name):
        trainer.evaluate()
        return " ".join((trainer.save_folded(tmp_path / name) / "README.md").read_text().split())

    try:
        trainer.compute_metrics = lambda p: {k: 100 * v for k, v in compute_metrics(p).items()}
        assert "After folding" not in card("percent")  # (left out, not refused)
        trainer.compute_metrics = own_metrics
        trainer.eval_dataset = own_eval.to_iterable_dataset().take(7)
        assert "split (streamed; the number of images was not recorded)" in card("streamed")
        trainer.eval_dataset = trainer.train_dataset.select(range(8))  # (as train_test_split leaves it: "train")
        assert "on the `train[held-out]` split (8 images)" in card("held_out")
    finally:
        trainer.compute_metrics, trainer.eval_dataset = own_metrics, own_eval
