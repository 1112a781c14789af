"""`CVAE.from_pretrained` and the CLI check an export's config.json (RULES, no unknown key, the weights' shapes)
before building a model (issue 32, 7)."""

import json

import pytest
import torch

from cvae_dist import inference
from cvae_dist.config import ConfigError, ModelConfig
from cvae_dist.model import CVAE

SHAPE = {"latent_dim": 8, "filters": 16, "image_size": 32}  # a small model: the weights the configs below sit beside

# config.json as edited -> what the one line says. Only meta tensors may be built (none of these costs much unchecked).
BAD = [
    ({**SHAPE, "extra": 1}, "unknown key 'extra'; accepted: an object of latent_dim, filters, image_size (integers)"),
    ({**SHAPE, "image_size": 32.7}, "image_size=32.7: must be an integer, a positive multiple of 8"),
    ({**SHAPE, "filters": 1e9}, "filters=1000000000.0: must be an integer, a positive multiple of 4"),
    ({**SHAPE, "filters": True}, "filters=True: must be an integer"),
    ({**SHAPE, "filters": 0}, "filters=0: must be an integer, a positive multiple of 4"),
    ({"latent_dim": 8, "filters": 16}, "no image_size; accepted"),
    ({**SHAPE, "filters": 2**62}, "cannot be built"),
    ({**SHAPE, "latent_dim": 10**30}, "cannot be built"),
    ({**SHAPE, "latent_dim": 4}, "holds decoder.linear.weight with shape [256, 8], where a CVAE of latent_dim=4"),
    ({**SHAPE, "filters": 128}, "where a CVAE of latent_dim=8, filters=128, image_size=32 has"),
]


def export(path, config: dict):
    CVAE(ModelConfig(**SHAPE)).save_pretrained(path)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def built(monkeypatch) -> list[str]:
    """The devices of every convolution built while the test runs (the checks build on "meta" only)."""
    devices = []
    reset = torch.nn.Conv2d.reset_parameters
    monkeypatch.setattr(torch.nn.Conv2d, "reset_parameters", lambda m: (devices.append(m.weight.device.type), reset(m)))
    return devices


@pytest.mark.parametrize(("config", "said"), BAD)
def test_from_pretrained_refuses_a_bad_config_json_in_one_line_before_building(tmp_path, built, config, said):
    path = export(tmp_path / "export", config)
    built.clear()
    with pytest.raises(ConfigError) as refused:
        CVAE.from_pretrained(path)
    message = str(refused.value)
    assert message.startswith(str(path / "config.json")) and said in message and "\n" not in message
    assert set(built) <= {"meta"}


def hub_cache(root, config: dict):
    """A hub repo `someone/cvae` as the hub's cache holds it (what `local_files_only=True` reads)."""
    repo = root / "models--someone--cvae"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    return export(repo / "snapshots" / ("0" * 40), config)


@pytest.mark.parametrize(("config", "said"), BAD[:3])
def test_from_pretrained_checks_a_hub_repos_config_json_too(tmp_path, built, config, said):
    hub_cache(tmp_path, config)
    built.clear()
    with pytest.raises(ConfigError, match="^someone/cvae \\(hub\\): config.json: ") as refused:
        CVAE.from_pretrained("someone/cvae", cache_dir=tmp_path, local_files_only=True)
    assert said in str(refused.value) and set(built) <= {"meta"}


def test_a_good_export_loads_from_a_directory_and_the_hub(tmp_path):
    local = export(tmp_path / "export", SHAPE)
    hub_cache(tmp_path / "cache", SHAPE)
    for model in (
        CVAE.from_pretrained(local),
        CVAE.from_pretrained("someone/cvae", cache_dir=tmp_path / "cache", local_files_only=True),
    ):
        assert model.config == ModelConfig(**SHAPE) and not model.training


def test_the_cli_checks_config_json_with_the_same_rules(tmp_path):
    # The CLI's own reading took int(32.7) == 32 and a float 1e9 as they came: now the one check of from_pretrained.
    for config, said in BAD[1:3]:
        with pytest.raises(ConfigError, match=said):
            inference.load_model(checkpoint=export(tmp_path / str(len(said)), config))
