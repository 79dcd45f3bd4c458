"""backbone.pretrained "default" on first use (model/weights_download.py): the file is downloaded into torch hub's
checkpoint folder and loaded; a failed download leaves nothing there and says what to do; --dry-run downloads
nothing. Downloads come from local file:// URLs (or a patched fetcher), never the network."""
import hashlib
import os

import pytest
import torch

import model.pretrained as pretrained
import trainSSL
from model import build_model
from model.pretrained import load_pretrained
from model.weights_download import hash_prefix
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """torch hub's folder in tmp_path; the ImageNet "default" files are served from tmp_path/server."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    server = tmp_path / "server"
    server.mkdir()
    monkeypatch.setattr(pretrained, "IMAGENET_URL", server.as_uri() + "/")
    return tmp_path / "hub" / "checkpoints", server


def serve(server, monkeypatch, content: bytes, name: str) -> str:
    """Put `content` on the local server as the ResNet-18 ImageNet file `name`; returns its URL."""
    (server / name).write_bytes(content)
    monkeypatch.setitem(pretrained.IMAGENET_FILES, 18, name)
    return pretrained.IMAGENET_URL + name


def resnet18_bytes(tmp_path) -> tuple[bytes, torch.nn.Module]:  # (bytes of the file, torchvision ResNet-18)
    torch.manual_seed(0)
    import torchvision
    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), tmp_path / "weights.pth")
    return (tmp_path / "weights.pth").read_bytes(), tv


def test_download_from_a_local_url_lands_in_the_cache_and_loads(hub, tmp_path, monkeypatch, capsys):
    cache, server = hub
    content, tv = resnet18_bytes(tmp_path)
    name = f"resnet18-{hashlib.sha256(content).hexdigest()[:8]}.pth"  # torch hub's convention: hash prefix
    assert hash_prefix(name) == name[9:17]
    url = serve(server, monkeypatch, content, name)

    model = build_model("3", 4, "imagenet", 18, "default", verbose=False)
    assert sorted(os.listdir(cache)) == [name] and (cache / name).read_bytes() == content  # no .partial left
    assert f'Downloading: "{url}" to {cache / name}' in capsys.readouterr().out
    report = model.pretrained_report
    assert report.path == str(cache / name) and report.loaded == 120
    assert torch.equal(model.layer3[1].conv2.weight, tv.layer3[1].conv2.weight)

    def no_network(*args, **kwargs):
        raise AssertionError("a cached file must not be downloaded again")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    again = load_pretrained(torch.nn.Linear(1, 1), "default", "3", "imagenet", 18)  # read from the cache
    assert again.path == str(cache / name) and len(again.skipped) == len(tv.state_dict())


@pytest.mark.parametrize("case", ["offline", "wrong_hash", "not_weights"])
def test_a_failed_download_leaves_no_file_and_says_what_to_do(case, hub, monkeypatch):
    cache, server = hub
    content = bytes(range(256)) * 64
    if case == "offline":  # nothing at the URL, as without network
        url = pretrained.IMAGENET_URL + "resnet18-f37072fd.pth"
        reason = "URLError"
    elif case == "wrong_hash":  # a corrupted transfer: the content does not have the hash the name promises
        url = serve(server, monkeypatch, content[:-100], f"resnet18-{hashlib.sha256(content).hexdigest()[:8]}.pth")
        reason = "invalid hash value"
    else:  # no hash in the name; the file arrives but is an error page, not weights
        url = serve(server, monkeypatch, b"<html>503 Service Unavailable</html>", "resnet18.pth")
        reason = "UnpicklingError"
    path = str(cache / os.path.basename(url))
    with pytest.raises(UserError) as err:
        load_pretrained(torch.nn.Linear(1, 1), "default", "3", "imagenet", 18)
    message = str(err.value)
    assert reason in message and f"URL:        {url}" in message and f"save it as: {path}" in message
    assert "backbone.pretrained" in message and '"none"' in message and "local weights file" in message
    assert not cache.exists() or os.listdir(cache) == []


def test_an_interrupted_download_leaves_no_file(hub, monkeypatch):
    cache, _ = hub

    def interrupted(url, model_dir, file_name, **kwargs):  # the whole file arrived, then Ctrl-C
        os.makedirs(model_dir, exist_ok=True)
        open(os.path.join(model_dir, file_name), "wb").write(b"x" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_pretrained(torch.nn.Linear(1, 1), "default", "3", "imagenet", 18)
    assert os.listdir(cache) == []


def test_dry_run_reports_the_download_and_fetches_nothing(hub, monkeypatch, capsys, tmp_path):
    cache, _ = hub

    def no_network(*args, **kwargs):
        raise AssertionError("--dry-run must not download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    argv = ["--config", os.path.join(ROOT, "configs", "demo.json"), "--dry-run", "--device", "cpu",
            "--set", "backbone.pretrained=default", "--set", "backbone.width=64",  # the demo's width is 32
            "--set", f"utils.checkpoint_dir={tmp_path}"]  # not the repository's runs/: `make demo` may have a run there
    trainSSL.main(argv)
    path = cache / "resnet18-f37072fd.pth"
    url = pretrained.IMAGENET_URL + "resnet18-f37072fd.pth"
    assert f"{path} not cached yet: training will download {url} there first" in capsys.readouterr().out
    assert not cache.exists()
    os.makedirs(cache)
    path.write_bytes(b"")
    trainSSL.main(argv)
    assert f"{path} (cached; not loaded in a dry run)" in capsys.readouterr().out
