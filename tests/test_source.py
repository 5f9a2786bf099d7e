"""Model sources: folders, the demo (cached, atomic, checksum-pinned download) and a pre-filled HF cache.
The tests that convert or serve the demo's real files skip without them."""

import json
import shutil
from pathlib import Path

import pytest

from swarm.model import source
from swarm.model.convert import convert_llama2c
from swarm.model.source import ModelSourceError, fetch_demo_source, resolve_model
from swarm.tensorfile import read_header


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("CAKE_SWARM_DEMO_SRC", raising=False)
    return tmp_path / "xdg" / "cake-swarm"


def test_existing_folder_is_itself(tmp_path):
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()


def test_unknown_spec_says_what_is_accepted():
    with pytest.raises(ModelSourceError, match="'demo'.*repo id"):
        resolve_model("./no/such/folder")
    with pytest.raises(ModelSourceError, match="expected a checkpoint folder"):
        resolve_model("not a model")


def test_demo_converted_once_into_the_cache(cache, monkeypatch, stories260k, tmp_path):
    monkeypatch.setenv("CAKE_SWARM_DEMO_SRC", str(stories260k))
    folder = resolve_model("demo")
    assert folder == cache / "models" / "demo-stories260K-q4-v2"
    expected = convert_llama2c(stories260k, tmp_path / "expected", bits=4, group_size=32)
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (folder / name).read_bytes() == (expected / name).read_bytes(), name
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp folder left behind
    stamp = (folder / "config.json").stat().st_mtime_ns
    monkeypatch.setenv("CAKE_SWARM_DEMO_SRC", str(cache / "does-not-exist"))  # not needed once cached
    assert resolve_model("demo") == folder
    assert (folder / "config.json").stat().st_mtime_ns == stamp


def test_a_conversion_from_before_the_end_tokens_is_not_used(cache, monkeypatch, stories260k):
    old = cache / "models" / "demo-stories260K-q4"
    old.mkdir(parents=True)
    (old / "config.json").write_text(json.dumps({"eos_token_id": 2}))  # the demo that never stopped
    monkeypatch.setenv("CAKE_SWARM_DEMO_SRC", str(stories260k))
    folder = resolve_model("demo")
    assert folder != old and json.loads((folder / "config.json").read_text())["eos_token_id"] == [1, 2]


def test_failed_demo_conversion_leaves_nothing(cache, tmp_path, monkeypatch, stories260k):
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(stories260k / "tok512.model", bad)  # no weights
    monkeypatch.setenv("CAKE_SWARM_DEMO_SRC", str(bad))
    with pytest.raises(ValueError):
        resolve_model("demo")
    assert list((cache / "models").iterdir()) == []


def test_demo_defaults_to_shared_folder_beside_repo(cache, tmp_path, monkeypatch):
    import swarm

    beside = tmp_path / "shared" / "models" / "stories260K"
    beside.mkdir(parents=True)
    monkeypatch.setattr(swarm, "__file__", str(tmp_path / "repo" / "swarm" / "__init__.py"))
    assert source.demo_source() == beside


def test_demo_download_checks_sha256(tmp_path, stories260k):
    served = tmp_path / "served"
    shutil.copytree(stories260k, served)
    dest = fetch_demo_source(tmp_path / "dl", base_url=served.as_uri() + "/")
    assert {p.name for p in dest.iterdir()} == set(source.DEMO_FILES)
    assert (dest / "stories260K.bin").read_bytes() == (stories260k / "stories260K.bin").read_bytes()

    tampered = served / "tok512.model"
    tampered.chmod(0o644)
    data = tampered.read_bytes()
    tampered.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    (dest / "tok512.model").unlink()
    with pytest.raises(ModelSourceError, match="tok512.model has sha256 .* expected dfff07d9"):
        fetch_demo_source(dest, base_url=served.as_uri() + "/")
    assert not (dest / "tok512.model").exists() and not (dest / "tok512.model.part").exists()


def test_demo_download_missing_file_is_clear(tmp_path):
    with pytest.raises(ModelSourceError, match="download of .*stories260K.bin failed"):
        fetch_demo_source(tmp_path / "dl", base_url=(tmp_path / "empty").as_uri() + "/")


def _fill_hub_cache(hub: Path, repo_id: str, files: list[Path]) -> Path:
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    for f in files:
        shutil.copy(f, snapshot / f.name)
    return snapshot


def test_hf_repo_id_from_prefilled_cache_offline(tmp_path, monkeypatch, tiny_llama):
    hub = tmp_path / "hub"
    folder = tiny_llama.folder
    snapshot = _fill_hub_cache(hub, "someone/tiny-4bit", sorted(folder.glob("*.json")) + [folder / "model.safetensors"])
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = resolve_model("someone/tiny-4bit")
    assert folder.resolve() == snapshot.resolve()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    assert "model.norm.weight" in read_header(folder / "model.safetensors")[0]


def test_hf_repo_missing_from_cache_names_the_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelSourceError, match="'someone/absent-model'.*local Hugging Face cache"):
        resolve_model("someone/absent-model", offline=True)
