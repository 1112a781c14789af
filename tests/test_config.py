import pytest

from cvae_dist.config import ConfigError, Precision, load_config


def test_recipes_load(repo):
    for name in ("debug", "mnist_5k", "mnist"):
        cfg = load_config(repo / "configs" / f"{name}.yaml")
        assert cfg.data.batch_size == 128 and cfg.model.latent_dim == 8
    seed = load_config(repo / "configs" / "mnist_5k.yaml")
    assert (seed.train.epochs, seed.train.lr, seed.train.weight_decay) == (50, 1e-3, 1e-5)
    assert seed.data.train_split == "train+test"


def test_overrides_are_typed(repo):
    cfg = load_config(repo / "configs" / "debug.yaml", ["train.epochs=2", "data.batch_size=64", "train.precision=bf16"])
    assert cfg.train.epochs == 2 and cfg.data.batch_size == 64 and cfg.train.precision is Precision.bf16


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.epocs=2", "unknown config key 'train.epocs'; accepted keys in train: channels_last, "),
        ("nope=1", "unknown config key 'nope'; accepted keys: checkpoint, data, log, model"),
        ("train.epochs=abc", "config key 'train.epochs': Value 'abc' of type 'str' could not be converted to Integer"),
        ("train.precision=fp8", "config key 'train.precision': Invalid value 'fp8', expected one of [no, bf16, fp16]"),
        ("model.image_size=30", "model.image_size=30: must be a positive multiple of 8"),
        ("data.num_workers=-2", "data.num_workers=-2: must be 0 or more (or null: automatic)"),
        ("train.epochs", "override 'train.epochs': expected section.key=value"),
    ],
)
def test_bad_config_gives_one_line_error(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(expected)
    if override.startswith("train.epocs"):
        assert ", epochs, " in str(err.value)  # the key the user probably meant is listed
    assert "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_reports_config_errors_in_one_line(capsys):
    from cvae_dist.cli import main

    assert main(["train", "train.epocs=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cvae-dist train: error: unknown config key 'train.epocs'") and "\n" not in err
