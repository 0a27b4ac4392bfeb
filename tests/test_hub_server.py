"""The local Hub server drives the real huggingface_hub client (and timm) end to end, offline."""

import json

import hub_server  # tests/ is on sys.path (rootdir-relative, no __init__.py)
import pytest
import torch
from hub_server import DEFAULT_TOKEN, running_local_hub
from huggingface_hub import constants, create_repo, hf_hub_download, model_info, upload_file, upload_folder
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils._runtime import is_xet_available

local_hub = hub_server.local_hub  # make the fixture visible to this module

REPO = "test-org/tiny"
README = "---\nlicense: apache-2.0\ntags:\n- test\n---\n# tiny\n"


@pytest.fixture
def pipelined_uploads(monkeypatch):
    """Records the upload_folder calls taking the hf_xet pipeline (the default when hf_xet is installed)."""
    from huggingface_hub import _upload_pipeline

    calls = []
    original = _upload_pipeline.pipelined_upload

    def spy(*args, **kwargs):
        calls.append(kwargs.get("repo_id"))
        return original(*args, **kwargs)

    monkeypatch.setattr(_upload_pipeline, "pipelined_upload", spy)
    return calls


def _make_folder(path, seed=0):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(4, 3, generator=g), "b": torch.zeros(4)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"architecture": "tiny", "seed": seed}))
    (path / "README.md").write_text(README)
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_create_repo_exist_ok_twice(local_hub):
    url1 = create_repo(REPO, exist_ok=True)
    url2 = create_repo(REPO, exist_ok=True)
    assert url1 == url2 == f"{local_hub.url}/{REPO}"
    assert url1.repo_id == REPO and url1.endpoint == local_hub.url
    with pytest.raises(HfHubHTTPError) as exc:
        create_repo(REPO)  # without exist_ok the 409 surfaces
    assert exc.value.response.status_code == 409
    repo = local_hub.repos[REPO]
    assert list(repo.files) == [".gitattributes"] and len(repo.history) == 1  # like the real Hub
    assert not local_hub.unhandled


def test_upload_folder_then_download_each_file(local_hub, tmp_path, pipelined_uploads):
    local = _make_folder(tmp_path / "export")
    create_repo(REPO, exist_ok=True)
    info = upload_folder(repo_id=REPO, folder_path=tmp_path / "export", commit_message="add tiny")

    repo = local_hub.repos[REPO]
    assert info.oid == repo.head.oid and len(info.oid) == 40
    assert repo.head.summary == "add tiny"
    assert {k: v for k, v in repo.files.items() if k != ".gitattributes"} == local
    assert pipelined_uploads == ([REPO] if is_xet_available() else [])  # the path users get

    for name, content in local.items():
        path = hf_hub_download(REPO, name)
        assert path.startswith(constants.HF_HUB_CACHE)
        with open(path, "rb") as f:
            assert f.read() == content
    # pinned to the commit sha too
    with open(hf_hub_download(REPO, "config.json", revision=info.oid), "rb") as f:
        assert f.read() == local["config.json"]

    mi = model_info(REPO)
    assert mi.sha == info.oid
    assert sorted(s.rfilename for s in mi.siblings) == sorted([".gitattributes", *local])

    # Re-uploading identical files makes no commit (the client compares the oids preupload returns).
    again = upload_folder(repo_id=REPO, folder_path=tmp_path / "export")
    assert again.oid == info.oid and len(repo.history) == 2

    # A change is a new commit on top.
    (tmp_path / "export" / "config.json").write_text('{"changed": true}')
    third = upload_folder(repo_id=REPO, folder_path=tmp_path / "export")
    assert third.oid != info.oid and repo.head.parent == info.oid
    assert repo.files["config.json"] == b'{"changed": true}'
    assert not local_hub.unhandled


def test_missing_file_repo_and_revision_errors(local_hub):
    create_repo(REPO, exist_ok=True)
    with pytest.raises(EntryNotFoundError) as exc:
        hf_hub_download(REPO, "nope.bin")
    assert isinstance(exc.value, RemoteEntryNotFoundError)  # also an HfHubHTTPError
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("test-org/does-not-exist", "config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, ".gitattributes", revision="no-such-branch")
    assert not local_hub.unhandled


def test_forced_commit_failure_raises_and_keeps_local_files(local_hub, tmp_path, pipelined_uploads):
    local = _make_folder(tmp_path / "export")
    create_repo(REPO, exist_ok=True)
    head_before = local_hub.repos[REPO].head.oid

    local_hub.fail_next_commit = True
    with pytest.raises(HfHubHTTPError) as exc:
        upload_folder(repo_id=REPO, folder_path=tmp_path / "export")  # hf_xet pipelined path
    assert exc.value.response.status_code == local_hub.fail_commit_status
    assert "simulated commit failure" in str(exc.value)
    assert not local_hub.fail_next_commit  # one-shot
    assert pipelined_uploads == ([REPO] if is_xet_available() else [])
    assert local_hub.repos[REPO].head.oid == head_before  # nothing committed
    assert {p.name: p.read_bytes() for p in (tmp_path / "export").iterdir()} == local

    local_hub.fail_next_commit = True
    with pytest.raises(HfHubHTTPError):
        upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)  # create_commit path
    assert local_hub.repos[REPO].head.oid == head_before

    # The hub is healthy again: the same push now goes through.
    upload_folder(repo_id=REPO, folder_path=tmp_path / "export")
    assert local_hub.repos[REPO].files["model.safetensors"] == local["model.safetensors"]


@pytest.mark.skipif(not is_xet_available(), reason="only the hf_xet pipeline retries commits")
def test_one_500_is_retried_by_the_xet_pipeline(local_hub, tmp_path):
    _make_folder(tmp_path / "export")
    create_repo(REPO, exist_ok=True)
    local_hub.fail_commit_status, local_hub.fail_commits = 500, 1
    info = upload_folder(repo_id=REPO, folder_path=tmp_path / "export")  # retried after 1 s, then succeeds
    assert info.oid == local_hub.repos[REPO].head.oid
    assert [r.status for r in local_hub.requests if "/commit/" in r.path] == [500, 200]


def test_tree_listing_delete_patterns_and_branches(local_hub, tmp_path):
    api = local_hub.api()
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=b"1", path_in_repo="logs/a.txt", repo_id=REPO)
    api.upload_file(path_or_fileobj=b"2", path_in_repo="logs/deep/b.txt", repo_id=REPO)
    assert api.list_repo_files(REPO) == [".gitattributes", "logs/a.txt", "logs/deep/b.txt"]
    assert [e.path for e in api.list_repo_tree(REPO, path_in_repo="logs")] == ["logs/deep", "logs/a.txt"]

    _make_folder(tmp_path / "export")
    api.upload_folder(repo_id=REPO, folder_path=tmp_path / "export", delete_patterns="logs/**")
    assert not any(p.startswith("logs/") for p in local_hub.repos[REPO].files)

    api.create_branch(REPO, branch="dev")
    api.upload_file(path_or_fileobj=b"dev", path_in_repo="dev.txt", repo_id=REPO, revision="dev")
    assert "dev.txt" not in local_hub.repos[REPO].files
    with open(hf_hub_download(REPO, "dev.txt", revision="dev"), "rb") as f:
        assert f.read() == b"dev"
    assert api.file_exists(REPO, "dev.txt", revision="dev") and not api.file_exists(REPO, "dev.txt")
    assert not local_hub.unhandled


def test_timm_push_and_load_roundtrip(local_hub):
    timm = pytest.importorskip("timm")
    from timm.models import push_to_hf_hub

    torch.manual_seed(0)
    model = timm.create_model("mobilenetv2_050", pretrained=False, num_classes=10).eval()
    push_to_hf_hub(model, REPO, commit_message="timm push")  # create_repo + file_exists + upload_folder
    files = local_hub.repos[REPO].files
    assert {"config.json", "model.safetensors", "pytorch_model.bin", "README.md"} <= set(files)

    loaded = timm.create_model(f"hf-hub:{REPO}", pretrained=True).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not local_hub.unhandled
    print("\nendpoints called:\n  " + "\n  ".join(local_hub.endpoints_called()))


def test_patches_are_undone_and_offline_is_overridden(tmp_path, monkeypatch):
    # Simulate a suite running with HF_HUB_OFFLINE=1 (read into constants at import).
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.hf_api as hf_api

    before = (constants.ENDPOINT, constants.HF_HUB_CACHE, hf_api.api.endpoint)
    with running_local_hub(tmp_path / "home") as hub:
        assert constants.ENDPOINT == hf_api.api.endpoint == hub.url
        assert constants.HF_HUB_OFFLINE is False
        create_repo(REPO)
        upload_file(path_or_fileobj=b"hello", path_in_repo="a.txt", repo_id=REPO, token=DEFAULT_TOKEN)
        with open(hf_hub_download(REPO, "a.txt"), "rb") as f:
            assert f.read() == b"hello"
    assert (constants.ENDPOINT, constants.HF_HUB_CACHE, hf_api.api.endpoint) == before
    assert constants.HF_HUB_OFFLINE is True


def test_writes_need_the_token(local_hub):
    with pytest.raises(HfHubHTTPError) as exc:
        create_repo(REPO, token="hf_wrong")
    assert exc.value.response.status_code == 401
    assert REPO not in local_hub.repos
