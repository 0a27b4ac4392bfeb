"""The ``hf-layerfold`` command line: help, one-line errors, a real fold → evaluate → benchmark → push, Ctrl-C."""

import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import hub_server  # tests/ is on sys.path (rootdir-relative, no __init__.py)
import pytest
import timm
import torch
from PIL import Image

import hf_layerfold as lf  # (also registers layerfold_net with timm)
from hf_layerfold import LayerFoldingConfig
from hf_layerfold.cli import CLIError, build_config, main, parse_args
from hf_layerfold.hub import LayerFoldedModel, is_folded_save

local_hub = hub_server.local_hub
ROOT = Path(__file__).resolve().parents[1]
# A real but tiny fold: random-init MobileNetV2-0.5 on 64 Fashion-MNIST images at 32 px, 2 steps. λ is large and α
# fast, so the one search step pushes α past the threshold and the fold really merges convs.
TINY_FOLD = ["fold", "--model", "mobilenetv2_050", "--no-pretrained", "--train-size", "64", "--eval-size", "32",
             "--image-size", "32", "--max-steps", "2", "--batch-size", "16", "--regularizer", "l1",
             "--lambda-reg", "10", "--alpha-lr", "1.0", "--search-steps", "1", "--threads", "1", "--quiet"]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "hf_layerfold.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("hf-layerfold: error: "), stderr
    return lines[0]


# ----------------------------------------------------------------------------------------------------------
# Help


@pytest.mark.parametrize("command", [None, "fold", "evaluate", "benchmark", "gains", "push"])
def test_help(command, capsys):
    argv = ([command] if command else []) + ["--help"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "Example" in text
    if command is None:
        for name in ("fold", "evaluate", "benchmark", "gains", "push"):
            assert f"hf-layerfold {name}" in text
    if command == "fold":  # one flag per LayerFoldingConfig field, with the field's own help
        for field in dataclasses.fields(LayerFoldingConfig):
            assert "--" + field.name.replace("_", "-") in text, field.name
        assert "--no-fold-residual" in text and "weight λ of the α regularizer" in text
    if command == "benchmark":
        assert "--batch-sizes" in text and "--channels-last" in text and "fp16" in text


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "hf-layerfold fold" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Config: flags generated from the dataclass, a YAML file, flags win


def test_config_file_then_flags(tmp_path):
    cfg = tmp_path / "fold.yaml"
    cfg.write_text("lambda_reg: 2.0\nthreshold: 0.7\ntarget_modules: ['blocks.1.*']\nfold_residual: false\n"
                   "epochs: 3\nbatch-size: 8\n")
    args = parse_args(["fold", "--config", str(cfg), "--threshold", "0.8", "--alpha-lr", "0.1", "--epochs", "5"])
    config = build_config(args.config_values, args)
    assert (config.lambda_reg, config.threshold, config.alpha_lr) == (2.0, 0.8, 0.1)
    assert config.target_modules == ["blocks.1.*"] and config.fold_residual is False
    assert (args.epochs, args.batch_size) == (5, 8)  # the file sets defaults, the command line wins
    args = parse_args(["fold", "--config", str(cfg), "--fold-residual", "--alpha-lr", "none"])
    config = build_config(args.config_values, args)
    assert config.fold_residual is True and config.alpha_lr is None and config.threshold == 0.7


def test_config_file_options_are_typed_like_flags(tmp_path):
    cfg = tmp_path / "fold.yaml"
    cfg.write_text("alpha_lr: 1e-3\npretrained: false\nmax_steps: 5\nmixed_precision: bf16\noverwrite: true\n")
    args = parse_args(["fold", "--config", str(cfg)])
    assert build_config(args.config_values, args).alpha_lr == 0.001  # YAML 1.1 reads 1e-3 as a string
    assert (args.pretrained, args.max_steps, args.mixed_precision, args.overwrite) == (False, 5, "bf16", True)
    args = parse_args(["fold", "--config", str(cfg), "--pretrained", "--max-steps", "7"])
    assert (args.pretrained, args.max_steps) == (True, 7)
    cfg.write_text("plan: [bn1, blocks.1.1, blocks.1.0.bn1.act]\n")  # a list, or the flag's comma-separated text
    assert parse_args(["fold", "--config", str(cfg)]).plan == "bn1,blocks.1.1,blocks.1.0.bn1.act"
    cfg.write_text("plan: bn1,blocks.1.1\n")
    assert parse_args(["fold", "--config", str(cfg)]).plan == "bn1,blocks.1.1"
    args = parse_args(["fold", "--config", str(cfg), "--epochs", "2", "--no-overwrite"])  # flags win over the file
    assert (args.max_steps, args.epochs, args.overwrite) == (None, 2.0, False)
    assert parse_args(["fold", "--config", str(cfg), "--epoch", "2"]).max_steps is None  # (argparse abbreviates)
    cfg.write_text("epochs: [1, 2]\n")
    with pytest.raises(CLIError, match="epochs takes one value"):
        parse_args(["fold", "--config", str(cfg)])


def test_overwrite_never_replaces_a_foreign_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("keep me")
    (tmp_path / "file.txt").write_text("a file")
    for out, expected in (("notes", "holds files that are not a folded-model save"),
                          ("file.txt/sub", "file.txt is a file")):
        assert main(["fold", "--output-dir", out, "--overwrite"]) == 2
        assert expected in one_error_line(capsys.readouterr().err)
    assert (notes / "thesis.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "notes"]


def test_saved_layerfold_config_json_is_a_valid_config_file(tmp_path):
    path = LayerFoldingConfig(lambda_reg=0.75, search_steps=5).save_pretrained(tmp_path)
    args = parse_args(["fold", "--config", str(path)])
    assert build_config(args.config_values, args) == LayerFoldingConfig(lambda_reg=0.75, search_steps=5)


# ----------------------------------------------------------------------------------------------------------
# User mistakes: one line on stderr, exit code 2, no traceback


def test_unknown_model_in_subprocess():
    proc = run_cli("fold", "--model", "mobilenetv2_05O", "--output-dir", "/tmp/never-written-hf-layerfold")
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert "unknown model 'mobilenetv2_05O'" in line and "mobilenetv2_050" in line  # a suggestion
    assert "Traceback" not in proc.stderr and not Path("/tmp/never-written-hf-layerfold").exists()


def test_invalid_config_value_in_subprocess():
    proc = run_cli("fold", "--threshold", "1.5")
    assert proc.returncode == 2, proc.stderr
    assert "LayerFoldingConfig.threshold=1.5 is invalid" in one_error_line(proc.stderr)
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv, expected", [
    (["evaluate", "lite0-imagenet", "--dataset", "./no/such/dir"], "cannot read dataset './no/such/dir'"),
    (["evaluate", "no_such_model_name"], "unknown model 'no_such_model_name'"),
    (["evaluate", "./no/such/save"], "model directory ./no/such/save does not exist"),
    (["push", "somewhere"], "required: --repo-id"),
    (["fold", "--push-to-hub"], "--push-to-hub needs --repo-id"),
    (["fold", "--regularizer", "l3"], "LayerFoldingConfig.regularizer='l3' is invalid"),
    (["fold", "--lambda-reg", "lots"], "argument --lambda-reg: invalid float value: 'lots'"),
    (["benchmark", "x", "--batch-sizes", "1,a"], "--batch-sizes must be comma-separated integers"),
    (["benchmark", "x", "--dtype", "fp8"], "invalid choice: 'fp8'"),
    (["gains", "mobilenetv2_05O"], "unknown model 'mobilenetv2_05O'"),
    (["gains", "mobilenetv2_050", "--min-saving", "-0.1"], "--min-saving must lie in [0, 1)"),
    (["gains", "mobilenetv2_050", "--output", "."], "--output . is a directory; give a file path"),
    (["gains", "mobilenetv2_050", "--alpha-sharing", "layer"], "LayerFoldingConfig.alpha_sharing='layer' is invalid"),
    (["fold", "--batch-size", "0"], "argument --batch-size: must be an integer > 0, got '0'"),
    (["fold", "--max-steps", "-4"], "argument --max-steps: must be an integer > 0, got '-4'"),
    (["fold", "--lr", "nan"], "argument --lr: must be a finite number > 0, got 'nan'"),
    (["fold", "--weight-decay", "inf"], "argument --weight-decay: must be a finite number >= 0, got 'inf'"),
    (["evaluate", "x", "--num-workers", "-1"], "argument --num-workers: must be an integer >= 0, got '-1'"),
    (["benchmark", "x", "--rounds", "0"], "argument --rounds: must be an integer > 0, got '0'"),
    (["gains", "x", "--threads", "-1"], "argument --threads: must be an integer > 0, got '-1'"),
    (["fold", "--seed", "-1"], "argument --seed: must be an integer >= 0, got '-1'"),  # (it blamed the dataset)
    (["evaluate", "x", "--seed", "-1"], "argument --seed: must be an integer >= 0, got '-1'"),
    (["benchmark", "mobilenetv2_050"], "mobilenetv2_050 is not a folded save"),
    (["fold", "--push-to-hub", "--repo-id", "bad repo"], "--repo-id 'bad repo' is not a valid Hub repo id"),
    (["push", "x", "--repo-id", "a/b/c"], "--repo-id 'a/b/c' is not a valid Hub repo id"),
    (["fold", "--output-dir", "."], "is the current directory or one above it"),
    (["fold", "--output-dir", ".."], "is the current directory or one above it"),
    (["fold", "--bogus", "1"], "unrecognized arguments: --bogus 1 (see 'hf-layerfold fold --help')"),
    (["fold", "--plan", "./no/plan.json"], "--plan ./no/plan.json: no such file or directory"),
    (["fold", "--plan", ""], "--plan is empty: name at least one block or site"),  # (was silently no plan)
    (["gains", "mobilenetv2_050", "--plan", " "], "--plan is empty"),
    (["benchmark", "notes.txt"], "notes.txt is a file; give a folded-save directory"),  # (said: does not exist)
    (["evaluate", "x", "--device", "meta"], "supported devices are cpu, cuda, cuda:N and auto"),  # (ran on CPU)
    (["gains", "mobilenetv2_050", "--device", "mps"], "supported devices are cpu, cuda, cuda:N and auto"),
    (["fold", "--model", "lite0-imagenet", "--no-pretrained"], "for random weights use the timm name"),
    (["evaluate", ""], "the model name is empty"),  # (took the working directory)
    (["fold", "--plan", "adir"], "--plan adir is a folder without layerfold_plan.json"),  # (said: no such file)
    (["fold", "--output-dir", "dangling"], "is a symbolic link to"),  # (trained, then failed to save)
])
def test_user_mistakes_are_one_line(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # fold's default output dir stays inside tmp_path
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert expected in one_error_line(captured.err)
    assert not (tmp_path / "outputs").exists()


def test_an_empty_plan_list_in_a_config_file_is_no_plan(tmp_path):
    """``plan: []`` (like ``plan: null``) leaves the search on; it became an empty --plan, refused as such."""
    (tmp_path / "c.yaml").write_text("plan: []\nthreshold: 0.7\n")
    args = parse_args(["fold", "--config", str(tmp_path / "c.yaml")])
    assert args.plan is None


def test_bad_config_files(tmp_path, capsys):
    bad_type, unknown, broken = tmp_path / "a.yaml", tmp_path / "b.json", tmp_path / "c.yaml"
    bad_type.write_text("threshold: high\n")
    unknown.write_text('{"lambda": 1}')
    broken.write_text("threshold: [0.5\n")
    cases = {bad_type: "LayerFoldingConfig.threshold='high' is invalid: must be a finite number",
             unknown: "unknown key(s) ['lambda']", broken: "not valid YAML/JSON",
             tmp_path / "missing.yaml": "cannot read config file"}
    trailing = tmp_path / "d.json"  # YAML would read it; a .json file is held to JSON
    trailing.write_text('{"threshold": 0.5,}')
    cases[trailing] = "d.json is not valid JSON: Expecting property name"
    # training options in the file go through the flags' own types and choices, and say which file was wrong
    for i, (text, expected) in enumerate((
            ('overwrite: "false"\n', "overwrite must be true or false, got 'false'"),
            ("mixed_precision: fp8\n", "argument --mixed-precision: invalid choice: 'fp8'"),
            ("epochs: [1]\n", "epochs takes one value, got [1]"),
            ("batch_size: 0\n", "argument --batch-size: must be an integer > 0, got '0'"),
            ("target_modules: 5\n", "LayerFoldingConfig.target_modules=5 is invalid"),
            ("alpha_lr: 1e-3\nfold_residual: 1\n", "LayerFoldingConfig.fold_residual=1 is invalid"))):
        path = tmp_path / f"options{i}.yaml"
        path.write_text(text)
        cases[path] = expected
    for path, expected in cases.items():
        assert main(["fold", "--config", str(path)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert expected in line, line
        if "argument" in expected or "true or false" in expected:
            assert f"config file {path}" in line
    with pytest.raises(CLIError):  # the same check through the API the demo and scripts use
        parse_args(["fold", "--config", str(unknown)])


@pytest.fixture
def tiny_imagefolder(tmp_path):
    """Four 8-px images in two class folders (imagefolder layout, no splits)."""
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / "images" / label / f"{i}.png")
    return tmp_path / "images"


# Exit codes follow the cause (the EXIT_CODES in --help): 2 the input is wrong, 1 a resource could not be reached.
# Each case stops before any training. HF_HUB_OFFLINE is set (conftest.py): the Hub cannot be reached.
@pytest.mark.parametrize("argv, code, expected", [
    (["evaluate", "someone/folded-x"], 1, "cannot load folded model 'someone/folded-x': FileNotFoundError: "
     "'someone/folded-x' is neither a local directory"),
    (["benchmark", "someone/folded-x"], 1, "cannot load folded model 'someone/folded-x'"),
    (["gains", "hf-hub:timm/not_cached_here"], 1, "cannot create model 'hf-hub:timm/not_cached_here'"),
    (["evaluate", "mobilenetv2_050", "--no-pretrained", "--dataset", "someone/no-such-dataset"], 1,
     "cannot load dataset 'someone/no-such-dataset': ConnectionError"),
    (["fold", "--model", "mobilenetv2_050", "--dataset", "someone/no-such-dataset"], 1,
     "cannot load dataset 'someone/no-such-dataset'"),
    (["evaluate", "mobilenetv2_050", "--dataset", "IMAGES"], 1,  # pre-trained weights that are not in the cache
     "cannot create model 'mobilenetv2_050': LocalEntryNotFoundError"),
    (["evaluate", "botnet50ts_256", "--dataset", "IMAGES"], 2, "No pretrained weights exist for botnet50ts_256"),
    (["push", "./no/such/save", "--repo-id", "a/b"], 2, "save directory ./no/such/save does not exist"),
    (["gains", "IMAGES"], 2, "not a timm model name"),  # a folder that is not a folded save
    (["gains", "mobilenetv2_050", "--output", "IMAGES/a/0.png/gains.json"], 2, "0.png is a file"),
    (["evaluate", "mobilenetv2_050", "--no-pretrained", "--dataset", "IMAGES/a/0.png"], 2, "is a file; expected a "
     "directory in imagefolder layout"),
    (["fold", "--model", "mobilenetv2_050", "--no-pretrained", "--dataset", "IMAGES", "--plan", "blocks.1.1,blocks.9"],
     2, "--plan blocks.1.1,blocks.9: no foldable site inside block(s) ['blocks.9']"),
    (["fold", "--model", "mobilenetv2_050", "--no-pretrained", "--dataset", "IMAGES", "--plan", "IMAGES/a/0.png"],
     2, "0.png is not a valid FoldPlan JSON file"),
])
def test_exit_code_follows_the_cause(argv, code, expected, tiny_imagefolder, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("IMAGES", str(tiny_imagefolder)) for a in argv] + ["--quiet"]
    assert main(argv) == code, capsys.readouterr().err
    assert expected in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "outputs").exists()


def test_a_missing_hub_repo_is_the_users_mistake(local_hub, capsys):
    """Online, a repo that does not exist is exit code 2 (offline, the same id is 1: the Hub was not reached)."""
    assert main(["evaluate", "test-org/no-such-model", "--quiet"]) == 2
    assert "cannot load folded model 'test-org/no-such-model'" in one_error_line(capsys.readouterr().err)
    assert main(["gains", "hf-hub:test-org/no-such-model", "--quiet"]) == 2
    assert "cannot create model 'hf-hub:test-org/no-such-model'" in one_error_line(capsys.readouterr().err)


def test_an_unwritable_output_dir_stops_fold_before_training(tiny_imagefolder, tmp_path, capsys, monkeypatch):
    import hf_layerfold.cli_fold

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(hf_layerfold.cli_fold.tempfile, "mkdtemp", read_only)
    out = tmp_path / "out"
    assert main([*TINY_FOLD, "--dataset", str(tiny_imagefolder), "--output-dir", str(out)]) == 2
    assert f"cannot write to --output-dir {out}: Permission denied" in one_error_line(capsys.readouterr().err)
    # found before anything is loaded: a dataset that does not exist is not reached
    assert main([*TINY_FOLD, "--dataset", str(tmp_path / "missing"), "--output-dir", str(out)]) == 2
    assert f"cannot write to --output-dir {out}: Permission denied" in one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_failure_code_tells_an_unreachable_resource_from_a_wrong_name():
    import importlib
    import typing

    from huggingface_hub import errors

    from hf_layerfold.workflow import failure_code

    # the HTTP client huggingface_hub builds its errors from (httpx, or its fork httpx2)
    response_type = typing.get_type_hints(errors.HfHubHTTPError.__init__)["response"]
    httpx = importlib.import_module(response_type.__module__.split(".")[0])

    def http(cls, status):
        return cls("x", response=httpx.Response(status, request=httpx.Request("GET", "https://hub.invalid/x")))

    unreachable = [errors.OfflineModeIsEnabled("offline"), ConnectionError("Couldn't reach 'x' on the Hub"),
                   TimeoutError(), http(errors.HfHubHTTPError, 503), http(errors.HfHubHTTPError, 429),
                   http(errors.GatedRepoError, 403), httpx.ConnectError("no route")]
    wrong = [http(errors.RepositoryNotFoundError, 401), http(errors.RevisionNotFoundError, 404),
             http(errors.HfHubHTTPError, 400), RuntimeError("No pretrained weights exist for x"),
             ValueError("corrupt weights file"), FileNotFoundError("no such directory")]
    assert [failure_code(e) for e in unreachable] == [1] * len(unreachable)
    assert [failure_code(e) for e in wrong] == [2] * len(wrong)
    try:  # the cause counts: a wrapper raised from a network error
        try:
            raise ConnectionError("down")
        except ConnectionError as err:
            raise RuntimeError("download failed") from err
    except RuntimeError as wrapped:
        assert failure_code(wrapped) == 1


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "Exit codes" in text and "  1    " in text and "  2    " in text and "  130  " in text


# ----------------------------------------------------------------------------------------------------------
# A real run: fold → save → evaluate → benchmark → push


@pytest.fixture(scope="module")
def folded_save(tmp_path_factory):
    parent = tmp_path_factory.mktemp("fold")
    out = parent / "mnv2-folded"
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([*TINY_FOLD, "--output-dir", str(out)])
    assert code == 0
    return out, stdout.getvalue()


def test_gains_on_a_folded_save_names_what_to_pass(folded_save, capsys):
    out, _ = folded_save
    assert main(["gains", str(out), "--quiet"]) == 2
    assert "is a folded save: it has no folds left to time" in one_error_line(capsys.readouterr().err)


def test_fold_writes_a_loadable_folded_save(folded_save):
    out, printed = folded_save
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # the training scratch is gone
    assert {"model.safetensors", "config.json", "layerfold_config.json", "README.md"} <= {p.name for p in
                                                                                        out.iterdir()}
    assert is_folded_save(out)
    net = LayerFoldedModel.from_pretrained(out)
    via_timm = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert net.pretrained_cfg["input_size"] == [3, 32, 32] and net.num_classes == 10
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), via_timm(x))
    info = net.layerfold_info
    assert len(info["plan"]["linear_sites"]) > 0  # the search really linearized sites...
    assert info["stats_after"]["depth"] < info["stats_before"]["depth"]  # ... and the fold removed convs
    assert info["config"]["lambda_reg"] == 10 and info["config"]["regularizer"] == "l1"
    assert re.search(r"depth \(convs\)\s+\d+\s+\d+", printed) and "saved folded model to" in printed
    # --no-pretrained: random weights, so not the license timm's cfg names for its own weights
    assert "license" not in net.pretrained_cfg and "license:" not in (out / "README.md").read_text()


def test_evaluate_reproduces_the_accuracy_measured_by_fold(folded_save, capsys):
    out, printed = folded_save
    assert main(["evaluate", str(out), "--limit", "32", "--json", "--threads", "1", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 32 and result["split"] == "test"
    assert result["device"] in ("cpu", "cuda")  # the device that ran, not the flag's "auto"
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
    # fold evaluated the planned model on the same stratified 32-image subset; the folded save agrees
    assert f"{result['top1']:.2%}" in re.search(r"eval top-1 \(test\)\s+(\S+)", printed).group(1)


def test_evaluate_on_an_imagefolder(folded_save, tmp_path, capsys):
    from hf_layerfold.data import load_fashion_mnist

    images = load_fashion_mnist(test_size=20)["test"]
    for i, row in enumerate(images):  # class folders named by label id: imagefolder sorts them, ids stay the same
        folder = tmp_path / "images" / str(row["label"])
        folder.mkdir(parents=True, exist_ok=True)
        row["image"].save(folder / f"{i}.png")
    out, _ = folded_save
    assert main(["evaluate", str(out), "--dataset", str(tmp_path / "images"), "--json", "--quiet"]) == 0
    from_folder = json.loads(capsys.readouterr().out)
    assert from_folder["images"] == 20 and from_folder["split"] == "train"  # a folder without splits: all of it
    assert main(["evaluate", str(out), "--limit", "20", "--json", "--quiet"]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert (from_folder["top1"], from_folder["top5"]) == (direct["top1"], direct["top5"])  # the same 20 images


def test_evaluate_refuses_a_head_not_trained_on_the_dataset_classes(capsys):
    """A pretrained model used to get a fresh head for the dataset's classes: its accuracy was chance, unsaid."""
    from types import SimpleNamespace

    from hf_layerfold.cli_commands import _check_classes

    assert main(["evaluate", "lite0-imagenet", "--limit", "10", "--quiet"]) == 2
    assert "lite0-imagenet predicts 1000 classes, the dataset has 10" in one_error_line(capsys.readouterr().err)
    data = SimpleNamespace(num_classes=3, label_names=["cat", "dog", "owl"])
    model = SimpleNamespace(num_classes=3, pretrained_cfg={"label_names": ["dog", "cat", "owl"]})
    with pytest.raises(CLIError, match="same classes in another order"):
        _check_classes(model, "m", data)
    model.pretrained_cfg["label_names"] = ["cat", "dog", "owl"]
    _check_classes(model, "m", data)  # the same classes, the same ids
    # integer labels without names: their count is the largest label + 1, so they may cover some of the classes
    _check_classes(model, "m", SimpleNamespace(num_classes=2, label_names=None))
    with pytest.raises(CLIError, match=r"predicts 3 classes, the dataset has 4: .*fold\)\.$"):  # (no base hint)
        _check_classes(model, "m", SimpleNamespace(num_classes=4, label_names=None))


def test_benchmark_on_cpu(folded_save, capsys):
    out, _ = folded_save
    threads = torch.get_num_threads()
    assert main(["benchmark", str(out), "--device", "cpu", "--batch-sizes", "1,2", "--rounds", "2", "--warmup", "1",
                 "--threads", "1", "--json", "--quiet"]) == 0
    assert torch.get_num_threads() == threads  # restored
    result = json.loads(capsys.readouterr().out)
    assert result["input_size"] == [3, 32, 32] and set(result["latency_ms"]) == {"1", "2"}
    names = ["base (mobilenetv2_050)", "base, BN fused", "layer-folded"]
    for bs in ("1", "2"):
        assert list(result["latency_ms"][bs]) == names and all(v > 0 for v in result["latency_ms"][bs].values())
    stats = result["stats"]
    assert stats["base, BN fused"]["depth"] == stats[names[0]]["depth"] > stats["layer-folded"]["depth"]
    assert main(["benchmark", str(out), "--rounds", "1", "--warmup", "1", "--threads", "1", "--quiet"]) == 0
    table = capsys.readouterr().out
    # another base architecture than the save's: a speed-up against it used to be printed
    assert main(["benchmark", str(out), "--base-model", "resnet10t", "--quiet"]) == 2
    assert "was folded from mobilenetv2_050, not resnet10t" in one_error_line(capsys.readouterr().err)
    assert "bs 1 speed-up" in table and "layer-folded" in table and "1.00x" in table  # base row vs itself


def test_benchmark_builds_a_one_channel_base_for_a_one_channel_save(tmp_path, capsys):
    """The base model was built with 3 input channels and timed on the save's 1-channel input (a traceback)."""
    model = lf.prepare_model(timm.create_model("mobilenetv2_050", num_classes=4, in_chans=1), lf.LayerFoldingConfig())
    lf.apply_plan(model, lf.FoldPlan.from_blocks(model, ["blocks.1.1"]))
    save = lf.save_folded(model, tmp_path / "gray", pretrained_cfg_overlay={"input_size": (1, 32, 32)})
    assert main(["benchmark", str(save), "--device", "cpu", "--batch-sizes", "1", "--rounds", "1", "--warmup", "1",
                 "--threads", "1", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["input_size"] == [1, 32, 32] and all(v > 0 for v in result["latency_ms"]["1"].values())


def test_gains_measures_each_block_and_writes_a_config_fold_reads(tmp_path, capsys):
    out = tmp_path / "gains.json"
    assert main(["gains", "mobilenetv2_050", "--image-size", "64", "--rounds", "3", "--round-seconds", "0.01",
                 "--alpha-sharing", "block", "--max-macs-increase", "0", "--threads", "1", "--output", str(out),
                 "--measure-merge-costs", "--json", "--quiet"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["input_size"] == [3, 64, 64] and measured["baseline_ms"] > 0 and len(measured["groups"]) == 18
    assert measured["saved_ms"]["blocks.1.0.bn1.act"] == pytest.approx(
        measured["baseline_ms"] - measured["groups"]["blocks.1.0.bn1.act"]["ms"])
    weights = measured["regularizer_weights"]
    assert len(weights) == 34 and sum(weights.values()) / 34 == pytest.approx(1.0)
    args = parse_args(["fold", "--config", str(out), "--lambda-reg", "0.02"])
    config = build_config(args.config_values, args)  # the written file is a fold config: same selection + weights
    assert config.regularizer_weights == weights and config.alpha_sharing == "block"
    assert config.max_macs_increase == 0 and config.lambda_reg == 0.02
    convs = {n for n, m in timm.create_model("mobilenetv2_050").named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert convs < set(config.merge_costs) and all(v > 0 for v in config.merge_costs.values())  # and the merges
    args = parse_args(["fold", "--regularizer-weights", str(out)])  # or the weights alone, from that file
    assert build_config(args.config_values, args).regularizer_weights == weights
    assert measured["merge_costs"] == config.merge_costs  # --json prints the table too (it was left out)


def test_gains_times_a_plan_before_it_is_trained(capsys):
    argv = ["gains", "mobilenetv2_050", "--image-size", "32", "--rounds", "2", "--round-seconds", "0.005",
            "--threads", "1", "--plan", "blocks.1.1,blocks.2.0.bn1.act", "--quiet"]
    assert main([*argv, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["linear_sites"] == ["blocks.1.1.bn1.act", "blocks.1.1.bn2.act", "blocks.2.0.bn1.act"]
    assert plan["speedup"] > 0 and plan["plan_ms"] == pytest.approx(plan["baseline_ms"] / plan["speedup"])
    assert plan["estimated_speedup"] > 0
    assert main(argv) == 0
    assert re.search(r"the plan \(3 sites linear\) folded: .* ms BN-fused, [\d.]+x measured \([\d.]+x estimated",
                     capsys.readouterr().out)
    assert main([*argv, "--alpha-sharing", "block"]) == 2  # a fused block needs one α per site; found before timing
    assert "a plan takes whole blocks" in one_error_line(capsys.readouterr().err)


def test_push_to_local_hub(folded_save, local_hub, capsys, tmp_path):
    out, _ = folded_save
    assert main(["push", str(out), "--repo-id", "test-org/mnv2-folded", "--quiet"]) == 0
    assert "pushed" in capsys.readouterr().out
    files = local_hub.repos["test-org/mnv2-folded"].files
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    card = files["README.md"].decode()
    assert "hf-hub:test-org/mnv2-folded" in card and str(out) not in card  # snippets name the repo
    assert str(out) in (out / "README.md").read_text()  # the local save itself is untouched
    from_hub = timm.create_model("hf-hub:test-org/mnv2-folded", pretrained=True).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(from_hub(x), LayerFoldedModel.from_pretrained(out)(x))
    moved = tmp_path / "moved"  # a save moved after it was written: the card still names where it was saved
    shutil.copytree(out, moved)
    assert main(["push", str(moved), "--repo-id", "test-org/moved", "--quiet"]) == 0
    card = local_hub.repos["test-org/moved"].files["README.md"].decode()
    assert 'create_model("hf-hub:test-org/moved"' in card and 'from_pretrained("test-org/moved")' in card
    assert str(out) not in card and str(moved) not in card
    # a card written for another repo is pointed at this one; files beside the save are not published
    (moved / "secret.env").write_text("TOKEN=x")
    assert main(["push", str(moved), "--repo-id", "test-org/final", "--quiet"]) == 0
    files = local_hub.repos["test-org/final"].files
    assert "secret.env" not in files and "model.safetensors" in files
    (moved / "README.md").write_text(files["README.md"].decode())  # as downloaded: it names test-org/final
    assert main(["push", str(moved), "--repo-id", "test-org/again", "--quiet"]) == 0
    card = local_hub.repos["test-org/again"].files["README.md"].decode()
    assert 'from_pretrained("test-org/again")' in card and "test-org/final" not in card
    assert main(["push", str(moved), "--repo-id", "test-org/again", "--revision", "v2", "--quiet"]) == 0
    assert local_hub.repos["test-org/again"].resolve("v2").files["model.safetensors"] == files["model.safetensors"]
    assert 'pipeline("image-classification", model="test-org/again", revision="v2")' in \
        local_hub.repos["test-org/again"].resolve("v2").files["README.md"].decode()
    assert main(["push", str(moved), "--repo-id", "test-org/again", "--revision", "v2", "--create-pr", "--quiet"]) == 2
    assert "cannot take --revision" in capsys.readouterr().err
    # a save named by a relative path such as `..` (the temporary push folder was named after it: a crash)
    (moved / "sub").mkdir()
    here = os.getcwd()
    try:
        os.chdir(moved / "sub")
        assert main(["push", "..", "--repo-id", "test-org/parent", "--quiet"]) == 0
    finally:
        os.chdir(here)
    assert local_hub.repos["test-org/parent"].files["model.safetensors"] == files["model.safetensors"]
    # a card downloaded from a branch, pushed to another repo's default branch: no branch of the old repo is named
    (moved / "README.md").write_bytes(local_hub.repos["test-org/again"].resolve("v2").files["README.md"])
    assert main(["push", str(moved), "--repo-id", "test-org/other", "--quiet"]) == 0
    card = local_hub.repos["test-org/other"].files["README.md"].decode()
    assert 'create_model("hf-hub:test-org/other", pretrained=True)' in card and '"v2"' not in card and "@v2" not in card
    assert 'from_pretrained("test-org/other")' in card and "test-org/again" not in card


def test_push_refuses_an_incomplete_or_broken_save(folded_save, local_hub, capsys, tmp_path):
    """A push deletes from the repo what the save lacks: a save without weights emptied the repo's model."""
    out, _ = folded_save
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "model.safetensors").unlink()
    assert main(["push", str(broken), "--repo-id", "test-org/kept", "--quiet"]) == 2
    assert "incomplete folded save (no model.safetensors)" in one_error_line(capsys.readouterr().err)
    (broken / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:1000])
    assert main(["push", str(broken), "--repo-id", "test-org/kept", "--quiet"]) == 2
    assert "does not load as a folded model" in one_error_line(capsys.readouterr().err)
    assert "test-org/kept" not in local_hub.repos


def test_fold_refuses_a_teacher_with_another_head(folded_save, tmp_path, capsys):
    """The teacher keeps its own head: a timm checkpoint's 1000 classes were replaced by a random 10-class head."""
    timm.models.save_for_hf(timm.create_model("mobilenetv2_050"), tmp_path / "imagenet", safe_serialization=True)
    teacher = f"local-dir:{tmp_path / 'imagenet'}"
    argv = [*TINY_FOLD, "--teacher", teacher, "--distill-weight", "0.5", "--output-dir", str(tmp_path / "o")]
    assert main(argv) == 2
    assert f"teacher {teacher!r} has 1000 classes, the dataset 10" in one_error_line(capsys.readouterr().err)


def test_fold_fine_tunes_a_folded_save_as_it_is(folded_save, tmp_path, capsys):
    """``fold --model <folded save>``: no search and no new plan; the merged convs train and the save keeps the
    original plan and base network in its card."""
    src, _ = folded_save
    out = tmp_path / "more"
    before = LayerFoldedModel.from_pretrained(src)
    argv = [*TINY_FOLD, "--output-dir", str(out)]
    argv[argv.index("--model") + 1] = str(src)
    argv[argv.index("--no-pretrained")] = "--pretrained"  # ignored for a folded save
    assert main([*argv, "--lr", "3e-4"]) == 0
    assert "saved folded model to" in capsys.readouterr().out
    after = LayerFoldedModel.from_pretrained(out)
    assert type(after) is type(before) and after.model_args == before.model_args  # same architecture
    assert after.layerfold_info["plan"] == before.layerfold_info["plan"]
    assert after.layerfold_info["stats_before"] == before.layerfold_info["stats_before"]
    changed = [k for k, v in before.state_dict().items() if not torch.equal(v, after.state_dict()[k])]
    assert any(not k.startswith("classifier") for k in changed)  # the merged convs trained, not only the head


def test_fold_with_a_fixed_plan_skips_the_search(folded_save, tmp_path, capsys):
    """``fold --plan``: the named blocks and single sites are linear from the first step (a site of a block alone:
    a fused block, whatever --alpha-sharing says), nothing else; and a folded save's plan can be reused."""
    argv = [*TINY_FOLD, "--alpha-sharing", "block"]  # λ = 10 would linearize much more, were there a search
    loud = [arg for arg in argv if arg != "--quiet"]  # (progress bars and Trainer's log dicts: stderr only)
    assert main([*loud, "--plan", "blocks.1.1, blocks.2.0.bn1.act", "--output-dir", str(tmp_path / "a")]) == 0
    net = LayerFoldedModel.from_pretrained(tmp_path / "a")
    sites = ["blocks.1.1.bn1.act", "blocks.1.1.bn2.act", "blocks.2.0.bn1.act"]
    assert net.layerfold_info["plan"]["linear_sites"] == sorted(sites)
    assert net.layerfold_info["config"]["alpha_sharing"] == "site"
    assert net.layerfold_info["stats_after"]["depth"] == net.layerfold_info["stats_before"]["depth"] - 3
    printed = capsys.readouterr()
    assert "saved folded model to" in printed.out and "'train_runtime'" in printed.err
    assert "train_runtime" not in printed.out and "it/s" not in printed.out  # stdout keeps only the result
    src, _ = folded_save  # the plan the search found there, reused by naming the save
    assert main([*argv, "--plan", str(src), "--output-dir", str(tmp_path / "b")]) == 0
    reused = LayerFoldedModel.from_pretrained(tmp_path / "b").layerfold_info["plan"]
    assert reused == LayerFoldedModel.from_pretrained(src).layerfold_info["plan"]
    capsys.readouterr()
    assert main([*argv, "--model", str(src), "--plan", "blocks.1.1", "--output-dir", str(tmp_path / "c")]) == 2
    assert "--plan applies to an unfolded model" in one_error_line(capsys.readouterr().err)


def test_a_plan_from_another_architectures_save_is_named(folded_save, caplog):
    """Site names of mobilenetv2_050 match mobilenetv2_100, but which activations pay to remove need not."""
    from hf_layerfold.workflow import fixed_plan

    src, _ = folded_save
    with caplog.at_level("WARNING", logger="hf_layerfold"):
        same = fixed_plan(str(src), timm.create_model("mobilenetv2_050", num_classes=10))
        assert "was made for" not in caplog.text
        other = fixed_plan(str(src), timm.create_model("mobilenetv2_100", num_classes=10))
    assert other == same and len(same)
    assert f"--plan {src} was made for mobilenetv2_050, not mobilenetv2_100" in caplog.text


def test_fold_refuses_to_overwrite(folded_save, capsys, tmp_path):
    out, _ = folded_save
    assert main([*TINY_FOLD, "--output-dir", str(out)]) == 2
    assert "pass --overwrite" in one_error_line(capsys.readouterr().err)
    # a folded save with the user's own files beside it is never replaced, --overwrite or not (it deleted them)
    kept = tmp_path / "kept"
    shutil.copytree(out, kept)
    (kept / "NOTES.md").write_text("keep me")
    assert main([*TINY_FOLD, "--output-dir", str(kept), "--overwrite"]) == 2
    assert "also ['NOTES.md'], which a save does not write" in one_error_line(capsys.readouterr().err)
    assert (kept / "NOTES.md").read_text() == "keep me" and is_folded_save(kept)


# ----------------------------------------------------------------------------------------------------------
# Ctrl-C


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_fold_leaves_nothing(sig, tmp_path):
    out = tmp_path / "folded"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    argv = [a for a in TINY_FOLD if a != "--quiet"]
    argv[argv.index("--max-steps") + 1] = "100000"
    # a Ctrl-C as at a terminal: a suite started in the background (`cmd &`) runs with SIGINT ignored, which the
    # child would inherit, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen([sys.executable, "-m", "hf_layerfold.cli", *argv, "--output-dir", str(out)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 90
        seen = ""
        while " 1/100000 " not in seen:  # the first training step has completed
            assert time.monotonic() < deadline, seen
            char = proc.stderr.read(1)
            assert char, f"fold exited early: {seen}"
            seen += char
        assert [p.name for p in tmp_path.iterdir()][0].startswith(".folded.train-")  # scratch during training
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "hf-layerfold: interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no output dir, no scratch


def test_a_ctrl_c_swallowed_where_it_landed_still_stops_the_fold_before_it_saves(folded_save, tmp_path, capsys,
                                                                                    monkeypatch):
    """A KeyboardInterrupt raised inside a weakref callback (as in torch.compile's first step) is printed and dropped
    by Python: the fold ran on, exited 0 and, with --overwrite, replaced the save the user meant to keep."""
    import weakref

    from hf_layerfold import trainer as trainer_module

    out = tmp_path / "kept"
    shutil.copytree(folded_save[0], out)
    before = (out / "model.safetensors").read_bytes()
    real_step = trainer_module.LayerFoldingTrainer.training_step
    steps = []

    def step_with_a_lost_interrupt(self, *args, **kwargs):
        if not steps:
            def callback(ref):
                signal.raise_signal(signal.SIGINT)  # the handler runs here, inside the callback

            class Target:
                pass

            target = Target()
            ref = weakref.ref(target, callback)
            del target  # the callback runs now; its KeyboardInterrupt is printed and dropped
            assert ref() is None
        steps.append(1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.LayerFoldingTrainer, "training_step", step_with_a_lost_interrupt)
    argv = [a for a in TINY_FOLD if a != "--quiet"]
    argv[argv.index("--max-steps") + 1] = "5"
    assert main([*argv, "--output-dir", str(out), "--overwrite"]) == 130
    assert len(steps) == 1  # stopped at the end of the step the Ctrl-C came in
    from hf_layerfold.workflow import INTERRUPTED

    assert not INTERRUPTED.is_set()  # a later command in this process (any thread) starts unstopped
    assert (out / "model.safetensors").read_bytes() == before
    assert "hf-layerfold: interrupted" in capsys.readouterr().err


def test_not_a_save_says_why_and_a_bad_base_tag_is_one_line(folded_save, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(folded_save[0], broken)
    (broken / "config.json").write_text('{"architecture": "layerfold_net", ')
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "layerfold_state.json").write_text("{}")
    timm_dir = tmp_path / "timm-checkpoint"
    timm_dir.mkdir()
    (timm_dir / "config.json").write_text(json.dumps({"architecture": "mobilenetv2_050", "num_classes": 10}))
    for folder, said in ((broken, "its config.json does not read as JSON"),
                         (timm_dir, f"describes 'mobilenetv2_050', a timm checkpoint: give local-dir:{timm_dir}"),
                         (checkpoint, "a LayerFoldingTrainer checkpoint: resume it with trainer.train(")):
        assert main(["evaluate", str(folder), "--quiet"]) == 2
        assert said in one_error_line(capsys.readouterr().err)
    assert main(["benchmark", str(folded_save[0]), "--base-model", "mobilenetv2_050.no_such_tag", "--quiet"]) == 2
    assert "cannot create base model 'mobilenetv2_050.no_such_tag'" in one_error_line(capsys.readouterr().err)


def test_an_unreadable_image_is_one_line(tmp_path, capsys):
    """Not an image, and a truncated JPEG (which used to end in a traceback naming no file): one line, the file
    named."""
    for split in ("train", "validation"):
        for label in ("a", "b"):  # two classes: imagefolder gives a label column
            (tmp_path / split / label).mkdir(parents=True)
            (tmp_path / split / label / "1.png").write_bytes(b"not a png")
    assert main(["evaluate", "mobilenetv2_050", "--no-pretrained", "--dataset", str(tmp_path), "--quiet"]) == 2
    assert "a dataset image cannot be read" in one_error_line(capsys.readouterr().err)
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, "JPEG")
    for label in ("a", "b"):
        (tmp_path / "validation" / label / "1.png").unlink()
        (tmp_path / "validation" / label / "1.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert main(["evaluate", "mobilenetv2_050", "--no-pretrained", "--dataset", str(tmp_path), "--split",
                 "validation", "--image-size", "32", "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert re.search("image file is truncated|Truncated File Read", line)
    assert str(tmp_path / "validation" / "a" / "1.jpg") in line


def test_what_a_worker_raised_and_an_oversized_image_are_one_line(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from hf_layerfold.cli import _worker_message
    from hf_layerfold.collate import ImageReadError, _open

    wrapped = ImageReadError("Caught ImageReadError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                             "call last):\n  File \"x.py\", line 1, in f\nhf_layerfold.collate.ImageReadError: cannot "
                             "read image a/1.png: truncated\n")
    assert _worker_message(wrapped) == "cannot read image a/1.png: truncated"
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # 4096 px is then over twice the limit: a "bomb"
    with pytest.raises(ImageReadError, match=r"big\.png: .*raise PIL\.Image\.MAX_IMAGE_PIXELS"):
        _open(str(tmp_path / "big.png"), str(tmp_path / "big.png"))


def test_an_eval_split_of_fashion_mnist_train_is_cut_to_the_eval_size():
    """``evaluate --split train --limit 16`` evaluated all 60000 training images."""
    from hf_layerfold.workflow import load_data

    data = load_data("fashion-mnist", eval_size=16, need_train=False, eval_split="train")
    assert len(data.eval) == 16


def test_a_dataset_with_class_names_as_labels_is_a_cli_error_not_a_traceback(tmp_path):
    """No ClassLabel: the CLI counts classes from the labels, which must be integer ids."""
    from PIL import Image

    from hf_layerfold.workflow import CLIError, load_data

    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8)).save(folder / f"{i}.png")
    (folder / "metadata.csv").write_text("file_name,label\n0.png,cat\n1.png,dog\n")
    with pytest.raises(CLIError, match="label.*expected integer class ids.*class_encode_column"):
        load_data(str(folder), need_train=False)


def test_a_folder_of_images_without_class_folders_is_told_the_layout(tmp_path):
    from hf_layerfold.workflow import load_data

    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    with pytest.raises(CLIError, match="has images but no class labels: .*class_name/xxx.png.*two class folders"):
        load_data(str(tmp_path), need_train=False)


def test_a_failed_fold_leaves_no_folders_it_created(tmp_path, capsys):
    out = tmp_path / "new" / "sub" / "out"
    assert main([*TINY_FOLD, "--target-modules", "nothing.*", "--output-dir", str(out)]) == 2
    assert "select no site" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
