"""Recipes, overrides and their one-line errors (config.py)."""

import enum
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.checks import one_line, run_cli
from support.launching import DEBUG

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
        (
            "train.precision=fp8",
            "config key 'train.precision': Invalid value 'fp8', expected one of [auto, fp32, bf16, fp16]",
        ),
        ("model.image_size=30", "model.image_size=30: must be a positive multiple of 8"),
        ("data.num_workers=-2", "data.num_workers=-2: must be 0 or more (or null: automatic)"),
        ("train.epochs", "override 'train.epochs': expected section.key=value"),
        # issue 32: each names what is wrong (not "unknown key 'train'", not "Cannot convert 'DictConfig'")
        ("train..epochs=1", "override 'train..epochs=1': 'train..epochs' has an empty name between dots; expected "),
        (
            "run_name={time}",
            "config key 'run_name': got a YAML mapping, not one value (YAML reads an unquoted {...} as "
            "a mapping); quote it for YAML, e.g. \"run_name='{time}'\" in a shell",
        ),
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


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("fp32", Precision.fp32),
        ("'fp32'", Precision.fp32),
        ("bf16", Precision.bf16),
        ("fp16", Precision.fp16),
        ("auto", Precision.auto),
    ],
)
def test_precision_by_name_on_the_command_line_and_in_yaml(tmp_path, value, expected):
    assert load_config(None, [f"train.precision={value}"]).train.precision is expected
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"train:\n  precision: {value}\n")
    assert load_config(recipe).train.precision is expected


def test_precision_defaults_to_auto():
    assert load_config(None).train.precision is Precision.auto


def test_yaml_words_stay_words_for_every_enum_key_and_booleans_still_read(tmp_path):
    # YAML 1.1 reads no/yes/on/off as booleans; enum values must survive them, boolean keys must still accept them.
    cfg = load_config(None, ["train.channels_last=no", "log.telemetry=off", "train.deterministic=yes"])
    assert cfg.train.channels_last is False and cfg.log.telemetry is False and cfg.train.deterministic is True
    for key in ("train.precision", "log.wandb", "data.on_bad_record", "train.on_nonfinite"):
        with pytest.raises(ConfigError, match=f"config key '{key}': Invalid value 'off'"):
            load_config(None, [f"{key}=off"])  # a word, named in the error, not a boolean


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("train:\n  epochs: 3\n  lr: [0.1\n", "4:1"),  # an unclosed list
        ("train:\n  epochs: 3\n log:\n  every_steps: [1\n", "3:2"),
    ],  # a recipe edited by hand, indentation broken
    ids=["unclosed", "indentation"],
)
def test_yaml_syntax_error_is_one_line_naming_file_line_and_column(tmp_path, capsys, text, where):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    message = str(err.value)
    assert message.startswith(f"{bad}:{where}: YAML syntax error") and "\n" not in message
    code, err = run_cli(capsys, ["train", "--config", bad, f"output_dir={tmp_path}"])  # the command line: one line
    assert code == 2
    assert one_line(err) == f"cvae-dist train: error: {message}"


def test_checkpoint_interval_must_align_with_loss_checks():
    with pytest.raises(ConfigError, match="multiple of log.every_steps=5"):
        load_config(DEBUG, ["log.every_steps=5", "checkpoint.every_steps=12"])


@pytest.mark.parametrize(
    "override",
    [
        "train.lr=-0.001",
        "train.lr=nan",
        "train.lr=0",
        "train.weight_decay=-1e-5",
        "train.weight_decay=nan",
        "train.weight_decay=inf",
        "train.collective_timeout_s=-5",
        "train.collective_timeout_s=604801",
        "train.collective_timeout_s=100000000000000",
        "train.seed=-1",
        "data.shuffle_buffer=-5",
        "log.straggler_fraction=0",
        "log.straggler_fraction=1.5",
        "log.straggler_intervals=0",
        "log.images_every_epochs=0",
        "log.peak_tflops=0",
        "log.peak_tflops=nan",
        "checkpoint.every_steps=-10",
        "output_dir=''",
        "data.train_split=train+",
        "log.project=' '",
        "resume=''",
        f"run_name={'x' * 250}{{time}}",
        "run_name=..",
        "run_name=.",
        "run_name=../escaped",
        "run_name=a/b",
        "run_name=.hidden",
        "run_name='a\\\\b'",
        "run_name='tab\there'",
    ],
)
def test_every_value_out_of_its_range_is_refused_in_one_line_naming_key_value_and_what_is_accepted(override):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    key = override.split("=")[0]
    assert str(err.value).startswith(f"{key}=") and ": must be " in str(err.value) and "\n" not in str(err.value)


def test_every_key_that_its_type_does_not_bound_has_a_rule():
    from dataclasses import fields, is_dataclass

    from cvae_dist.config import RULES, JobConfig

    def leaves(node, prefix=""):
        for f in fields(node):
            value = getattr(node, f.name)
            yield from leaves(value, f"{prefix}{f.name}.") if is_dataclass(value) else [(prefix + f.name, value)]

    unbounded = {key for key, value in leaves(JobConfig()) if not isinstance(value, bool | enum.Enum)}
    assert unbounded - RULES.keys() == set()
    assert RULES.keys() - unbounded == set()


def test_the_defaults_and_edge_values_that_mean_something_are_accepted():
    cfg = load_config(
        None,
        [
            "data.shuffle_buffer=0",
            "train.weight_decay=0",
            "log.straggler_fraction=1",
            "train.seed=4294967295",
            "run_name=x{time}",
            "resume=allow",
        ],
    )
    assert cfg.data.shuffle_buffer == 0 and cfg.train.seed == 2**32 - 1


def test_a_run_name_that_escapes_or_is_too_long_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "runs"
    out.mkdir()
    for name in ("x" * 256, "../outside", "a/b"):
        code, err = run_cli(capsys, ["train", "--config", DEBUG, f"output_dir={out}", f"run_name={name}"])
        assert code == 2
        one_line(err, "run_name=", "must be one directory name")
    assert list(tmp_path.iterdir()) == [out] and list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a text YAML file (byte 0 is not UTF-8)"),
        (None, "is a directory: --config takes a YAML file"),
    ],
    ids=["binary", "directory"],
)
def test_a_config_that_is_not_a_text_file_is_refused_in_one_line(tmp_path, capsys, content, expected):
    recipe = tmp_path / "recipe.yaml"
    recipe.mkdir() if content is None else recipe.write_bytes(content)
    code, err = run_cli(capsys, ["train", "--config", recipe, f"output_dir={tmp_path / 'runs'}"])
    assert code == 2
    one_line(err, str(recipe), expected)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("kind", ["fifo", "pipe"])
def test_a_config_that_is_a_pipe_is_named_as_one(tmp_path, capsys, kind):
    # `--config /dev/stdin` fed by a pipe (/dev/stdin is /proc/self/fd/0), or a named pipe: not "not found"
    if kind == "fifo":
        recipe = tmp_path / "recipe.yaml"
        os.mkfifo(recipe)
    else:
        read, write = os.pipe()
        recipe = Path(f"/proc/self/fd/{read}")
    try:
        code, err = run_cli(capsys, ["train", "--config", recipe, f"output_dir={tmp_path / 'runs'}"])
    finally:
        if kind == "pipe":
            os.close(read)
            os.close(write)
    assert code == 2
    one_line(err, f"{recipe} is a pipe, not a regular file: --config takes a YAML file")
    assert not (tmp_path / "runs").exists()


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    # Six levels of `&b [*a, ...]` in 254 bytes: OmegaConf would copy 9**6 values (minutes of CPU) before it refused the
    # unknown keys. Aliases are refused as the YAML is read (checked in a process of its own: today's code would hang).
    rows = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    rows += [f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]" for p, n in zip("abcdef", "bcdefg", strict=True)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(rows) + "\n")
    load = f"from cvae_dist.config import ConfigError, load_config\ntry: load_config({str(bomb)!r})\n"
    proc = subprocess.run(
        [sys.executable, "-c", load + "except ConfigError as e: print(e)"], capture_output=True, text=True, timeout=30
    )
    assert proc.stdout == f"{bomb}:2:8: YAML alias *a: aliases are not accepted; write the value out\n", proc.stderr
    with pytest.raises(ConfigError, match=r"^override 'log.group=\*a':1:1: YAML alias \*a: aliases are not accepted"):
        load_config(None, ["log.group=*a"])


def test_a_recipe_cannot_read_the_environment(tmp_path, monkeypatch):
    # ${oc.env:...} would copy a variable (WANDB_API_KEY, HF_TOKEN) into config.yaml, checkpoints and W&B: refused,
    # however the interpolation is spelt; interpolation of other keys stays.
    monkeypatch.setenv("CVAE_DIST_TEST_SECRET", "s3cret")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("log:\n  group: ${oc.env:CVAE_DIST_TEST_SECRET}\n")
    for path, override in [
        (recipe, None),
        (None, "log.project=${oc.env:CVAE_DIST_TEST_SECRET,x}"),
        (None, "log.group=${oc.decode:'\\${oc.env:CVAE_DIST_TEST_SECRET}'}"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(path, [override] if override else [])
        message = str(err.value)
        assert "${oc.env:CVAE_DIST_TEST_SECRET}: a recipe may not read the environment" in message, message
        assert "s3cret" not in message and "\n" not in message
    assert load_config(None, ["log.group=${log.project}-x"]).log.group == "cvae-dist-x"
