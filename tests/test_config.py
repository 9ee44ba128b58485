"""fer_exp.config: defaults -> experiment YAML -> CLI overrides, coercion, validation, errors, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fer_exp.config import CHOICES, INPUT_SIZES, STUDY_SECTIONS, Config, ConfigError, coerce, load_config, validate

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- layering


def test_defaults_without_yaml_or_overrides():
    assert load_config() == validate(Config())
    assert load_config(None, {}) == validate(Config())


def test_empty_yaml_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == validate(Config())
    assert load_config(write(tmp_path, "# only a comment\n", "c.yaml")) == validate(Config())


@pytest.mark.parametrize("model", INPUT_SIZES)
def test_input_size_zero_is_the_models_default_and_each_model_has_its_sizes(model):
    assert Config().input_size == 0
    assert load_config(overrides={"model": model}).input_size == INPUT_SIZES[model][0]
    for size in INPUT_SIZES[model]:
        assert load_config(overrides={"model": model, "input_size": size}).input_size == size
    other = next(s for m, sizes in INPUT_SIZES.items() if m != model for s in sizes)
    with pytest.raises(ConfigError, match=f"input_size for model {model} must be one of"):
        load_config(overrides={"model": model, "input_size": other})


def test_base_file_values_come_first_and_the_file_overrides_them(tmp_path):
    write(tmp_path, "epochs: 5\nlr: 0.01\nmodel: resnet18\n", "base.yaml")
    (tmp_path / "sub").mkdir()
    path = write(tmp_path, "base: ../base.yaml\nlr: 0.002\n", "sub/variant.yaml")
    cfg = load_config(path, {"epochs": 7})
    assert (cfg.model, cfg.lr, cfg.epochs) == ("resnet18", 0.002, 7)


def test_base_errors_name_the_file(tmp_path):
    write(tmp_path, "base: b.yaml\n", "a.yaml")
    write(tmp_path, "base: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match=r"c\.yaml: its base nowhere\.yaml is not found .*relative to the file that names it"):
        load_config(write(tmp_path, "base: nowhere.yaml\n", "c.yaml"))
    write(tmp_path, "epochs: abc\n", "bad.yaml")
    with pytest.raises(ConfigError, match="bad.yaml: epochs must be int"):
        load_config(write(tmp_path, "base: bad.yaml\n", "d.yaml"))


def test_a_study_file_is_not_a_training_config(tmp_path):
    path = write(tmp_path, "epochs: 3\nsearch_space:\n  lr: {type: float, low: 0.001, high: 0.01}\n")
    with pytest.raises(ConfigError, match="fer-exp tune --config"):
        load_config(path)


def test_yaml_overrides_defaults_and_cli_overrides_yaml(tmp_path):
    path = write(tmp_path, "epochs: 5\nlr: 0.01\nmodel: resnet18\nfreeze_depth: 2\n")
    cfg = load_config(path, {"epochs": "7", "lr": None, "batch_size": None, "seed": 3})
    assert cfg.epochs == 7  # CLI beats YAML
    assert cfg.lr == 0.01  # None means "not given": the YAML value stays
    assert cfg.batch_size == Config().batch_size  # neither: the default
    assert (cfg.model, cfg.freeze_depth, cfg.seed) == ("resnet18", 2, 3)
    assert cfg.weight_decay == Config().weight_decay


def test_path_may_be_str_or_path(tmp_path):
    path = write(tmp_path, "epochs: 4\n")
    assert load_config(str(path)).epochs == load_config(path).epochs == 4


# ---------------------------------------------------------------- coercion of CLI strings


@pytest.mark.parametrize(
    "key, text, expected",
    [
        ("epochs", "3", 3),
        ("batch_size", "64", 64),
        ("lr", "0.01", 0.01),
        ("lr", "1e-4", 1e-4),
        ("warmup_epochs", "2", 2.0),
        ("channels_last", "true", True),
        ("channels_last", "True", True),
        ("channels_last", "yes", True),
        ("channels_last", "1", True),
        ("channels_last", "false", False),
        ("channels_last", "0", False),
        ("input_size", "96", 96),
        ("freeze_depth", "3", 3),
        ("model", "resnet18", "resnet18"),
    ],
)
def test_cli_strings_are_coerced(key, text, expected):
    overrides = {key: text}
    if key == "freeze_depth":
        overrides["model"] = "resnet18"
    value = getattr(load_config(overrides=overrides), key)
    assert value == expected
    assert type(value) is type(expected)


def test_yaml_native_types_pass_through(tmp_path):
    cfg = load_config(write(tmp_path, "epochs: 2.0\nlr: 1\nchannels_last: true\nrun_name: 123\n"))
    assert cfg.epochs == 2 and type(cfg.epochs) is int  # an integral float is an int
    assert cfg.lr == 1.0 and type(cfg.lr) is float
    assert cfg.channels_last is True
    assert cfg.run_name == "123"


# ---------------------------------------------------------------- errors


def test_unknown_yaml_key_names_key_file_and_suggests(tmp_path):
    path = write(tmp_path, "epoch: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "'epoch'" in message and str(path) in message
    assert "Did you mean epochs" in message
    assert "Valid config keys" in message


def test_unknown_override_key_names_option():
    with pytest.raises(ConfigError, match=r"option --no-such-key: unknown config key 'no_such_key'"):
        load_config(overrides={"no_such_key": 1})


@pytest.mark.parametrize("typo, field", [("sceduler", "scheduler"), ("epcohs", "epochs"),
                                         ("learning_rate", "lr"), ("patience", "early_stopping")])  # other tools' names
def test_unknown_key_typo_gets_suggestion(tmp_path, typo, field):
    with pytest.raises(ConfigError, match=f"Did you mean {field}"):
        load_config(write(tmp_path, f"{typo}: 1\n"))


@pytest.mark.parametrize("text", ["on: skip\n", "1: 2\n"])
def test_non_string_yaml_key_is_config_error(tmp_path, text):
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize(
    "text, pieces",
    [
        ('epochs: "abc"\n', ["epochs must be int", "'abc'"]),
        ("epochs: 1.5\n", ["epochs must be int", "1.5"]),
        ("epochs: true\n", ["epochs must be int"]),
        ("epochs:\n", ["epochs must be int", "None"]),
        ("lr: fast\n", ["lr must be float", "'fast'"]),
        ("lr: true\n", ["lr must be float"]),
        ("channels_last: maybe\n", ["channels_last must be bool", "'maybe'"]),
        ("channels_last: 1\n", ["channels_last must be bool"]),
        ("model: vgg\n", ["model must be one of cnn, resnet18", "'vgg'"]),
        ("input_size: 100\n", ["input_size must be one of 0, 48, 64, 96, 112, 224", "100"]),
        ("model: resnet18\nfreeze_depth: 7\n", ["freeze_depth must be one of 0, 1, 2, 3, 4, 5", "7"]),
        ("scheduler: step\n", ["scheduler must be one of"]),
        ("amp: fp16\n", ["amp must be one of"]),
        ("select_metric: accuracy\n", ["select_metric must be one of"]),
    ],
)
def test_bad_yaml_values_name_key_and_file(tmp_path, text, pieces):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    for piece in pieces:
        assert piece in message


@pytest.mark.parametrize(
    "key, value, piece",
    [
        ("epochs", "abc", "option --epochs: epochs must be int"),
        ("epochs", "1.5", "option --epochs: epochs must be int"),
        ("batch_size", "", "option --batch-size: batch_size must be int"),  # "" reaches coerce only via the API
        ("model", "vgg", "option --model: model must be one of"),
        ("input_size", "100", "option --input-size: input_size must be one of"),
        ("freeze_depth", "7", "option --freeze-depth: freeze_depth must be one of"),
        ("channels_last", "maybe", "option --channels-last: channels_last must be bool"),
    ],
)
def test_bad_override_values_name_option(key, value, piece):
    with pytest.raises(ConfigError) as err:
        load_config(overrides={key: value})
    assert piece in str(err.value)


def test_choices_are_accepted():
    for value in CHOICES["model"]:
        assert coerce("model", value, "test") == value
    for value in CHOICES["input_size"]:
        assert coerce("input_size", str(value), "test") == value


def test_missing_yaml_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="not found") as err:
        load_config(missing)
    assert str(missing) in str(err.value)


def test_yaml_directory_is_not_a_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path)


@pytest.mark.parametrize("text, kind", [("- epochs\n- 3\n", "list"), ("just a string\n", "str"), ("3\n", "int")])
def test_yaml_that_is_not_a_mapping(tmp_path, text, kind):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="expected a mapping") as err:
        load_config(path)
    assert str(path) in str(err.value) and kind in str(err.value)


@pytest.mark.parametrize("text", ["epochs: [1, 2\n", "model: cnn\n  lr: 0.1\n", "a: b: c\n", "\tepochs: 3\n"])
def test_invalid_yaml(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+, column \d+: ") as err:
        load_config(path)
    assert str(path) in str(err.value) and "<unicode string>" not in str(err.value)


@pytest.mark.parametrize(
    "overrides, piece",
    [
        ({"epochs": 0}, "epochs must be positive"),
        ({"epochs": -3}, "epochs must be positive"),
        ({"batch_size": 0}, "batch_size must be positive"),
        ({"eval_batch_size": -1}, "eval_batch_size must be positive"),
        ({"lr": 0}, "lr must be positive"),
        ({"lr": -0.1}, "lr must be positive"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"aug_rotation": -5}, "aug_rotation"),
        ({"warmup_epochs": -1}, "warmup_epochs"),
        ({"early_stopping": -1}, "early_stopping"),
        ({"aug_flip": 1.5}, "aug_flip must be between 0 and 1"),
        ({"aug_erasing": -0.1}, "aug_erasing must be between 0 and 1"),
        ({"dropout": 1.1}, "dropout must be between 0 and 1"),
        ({"label_smoothing": -0.1}, "label_smoothing must be between 0 and 1"),
        ({"aug_brightness": 1.0}, "aug_brightness must be in [0, 1)"),
        ({"aug_contrast": -0.2}, "aug_contrast must be in [0, 1)"),
        ({"data_seed": -2}, "data_seed must be -1 (the run's seed) or a seed from 0"),
        ({"data_seed": 2**32}, "data_seed must be -1 (the run's seed) or a seed from 0 to 2**32 - 1"),
        ({"seed": -1}, "seed must be an integer from 0 to 2**32 - 1"),
        ({"seed": 2**64 - 1, "data_seed": 0}, "seed must be an integer from 0 to 2**32 - 1"),  # (was a traceback)
        ({"copy_correlation": 0}, "copy_correlation must be above 0 and at most 1"),
        ({"copy_correlation": 1.5}, "copy_correlation must be above 0 and at most 1"),
    ],
)
def test_out_of_range_values(overrides, piece):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert piece in str(err.value)


def test_the_data_seed_is_the_runs_seed_unless_set():
    assert load_config(overrides={"seed": 3}).data_key() == ("data/fer2013", "error", 3, 0.1, "report", 1.0)
    assert load_config(overrides={"seed": 3, "data_seed": 0}).data_key() == ("data/fer2013", "error", 0, 0.1, "report", 1.0)
    from fer_exp.experiment import load_run_data

    def val_faces(**overrides):
        return load_run_data(load_config(overrides={"data": "synthetic:40,20,20", **overrides})).val.images

    assert torch.equal(val_faces(seed=1, data_seed=7), val_faces(seed=2, data_seed=7))  # one val split to share
    assert not torch.equal(val_faces(seed=1), val_faces(seed=2))


def test_zero_is_fine_where_allowed():
    cfg = load_config(overrides={"early_stopping": 0, "warmup_epochs": 0, "weight_decay": 0, "aug_rotation": 0,
                                 "aug_flip": 0, "aug_erasing": 1, "dropout": 0})
    assert cfg.early_stopping == 0 and cfg.aug_erasing == 1.0


@pytest.mark.parametrize("key, value", [("lr", "nan"), ("lr", "inf"), ("weight_decay", "nan"), ("warmup_epochs", "nan")])
def test_non_finite_floats_are_rejected(key, value):
    with pytest.raises(ConfigError, match=key):
        load_config(overrides={key: value})


@pytest.mark.parametrize("overrides", [{"pretrained": "imagenet"}, {"pretrained": "/some/weights.pth"},
                                       {"freeze_depth": 2}, {"freeze_depth": "1"}])
def test_cnn_rejects_pretrained_and_freeze_depth(overrides):
    with pytest.raises(ConfigError, match="resnet18 only"):
        load_config(overrides={"model": "cnn", **overrides})


def test_cnn_rejection_also_from_yaml(tmp_path):
    with pytest.raises(ConfigError, match="resnet18 only"):
        load_config(write(tmp_path, "model: cnn\npretrained: imagenet\n"))
    # ... and the CLI can repair a YAML's resnet-only settings by switching back
    cfg = load_config(write(tmp_path, "model: resnet18\nfreeze_depth: 2\n", "r.yaml"), {"freeze_depth": "0", "model": "cnn"})
    assert (cfg.model, cfg.freeze_depth) == ("cnn", 0)


def test_resnet_accepts_pretrained_and_freeze_depth():
    cfg = load_config(overrides={"model": "resnet18", "pretrained": "imagenet", "freeze_depth": 5, "input_size": 224})
    assert (cfg.pretrained, cfg.freeze_depth, cfg.input_size) == ("imagenet", 5, 224)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------- round trip and shipped experiments


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"model": "resnet18", "pretrained": "/tmp/w.safetensors", "freeze_depth": 3, "input_size": 224, "lr": 3e-4,
         "weight_decay": 1e-05, "warmup_epochs": 0.5, "channels_last": True, "data": "synthetic:96,32,32",
         "run_name": "123", "experiment_name": "null", "output_dir": "yes", "scheduler": "onecycle",
         "select_metric": "val_loss", "amp": "off", "seed": 0, "early_stopping": 0},
    ],
)
def test_to_yaml_round_trips(tmp_path, overrides):
    cfg = load_config(overrides=overrides)
    text = cfg.to_yaml()
    assert isinstance(yaml.safe_load(text), dict)
    assert list(yaml.safe_load(text)) == list(cfg.to_dict())  # field order kept
    again = load_config(write(tmp_path, text))
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


TRAINING_FILES = [p for p in EXPERIMENTS if not {*STUDY_SECTIONS, "arms"} & set(yaml.safe_load(p.read_text()))]


@pytest.mark.parametrize("path", TRAINING_FILES, ids=[p.name for p in TRAINING_FILES])
def test_experiment_files_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    if path.stem in CHOICES["model"]:
        assert cfg.model == path.stem
    # every key in the file took effect, and those of its base where it names one
    values = yaml.safe_load(path.read_text())
    base = values.pop("base", None)
    if base is not None:
        values = {**yaml.safe_load((path.parent / base).read_text()), **values}
    for key, value in values.items():
        assert getattr(cfg, key) == value, key


@pytest.mark.parametrize("device", ["gpu", "tpu:0", "cuda:99"])
def test_bad_or_absent_devices_are_config_errors(device):
    import torch

    if device == "cuda:99" and torch.cuda.device_count() > 99:
        pytest.skip("a machine with 100 GPUs")
    with pytest.raises(ConfigError, match="device"):
        load_config(overrides={"device": device})


def test_cpu_device_is_accepted():
    assert load_config(overrides={"device": "cpu"}).device == "cpu"


def test_underscore_spelling_of_options_is_accepted(store):
    """`mlflow run -P early_stopping=3` arrives as --early_stopping 3."""
    from click.testing import CliRunner

    from fer_exp.cli import main

    result = CliRunner().invoke(main, ["train", "--early_stopping", "abc"])
    assert result.exit_code == 2 and "early_stopping must be int" in result.output, result.output


def test_mlflow_project_environments_list_pyprojects_dependencies():
    """conda.yaml and python_env.yaml (what `mlflow run` builds without --env-manager local) carry
    exactly pyproject.toml's dependency list: one source, copied, and this test keeps the copies true."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((root / "conda.yaml").read_text())
    pip_deps = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert pip_deps == deps
    assert yaml.safe_load((root / "python_env.yaml").read_text())["dependencies"] == deps
