import pytest

from ironman_nb.config import ConfigError, PlotConfig, PrepareConfig, TrainConfig


def test_defaults_are_valid():
    for cls in (PrepareConfig, TrainConfig, PlotConfig):
        assert cls.from_params().to_dict() == cls.defaults()


def test_unknown_name_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown parameter 'learnig_rate'.*did you mean 'learning_rate'"):
        TrainConfig.from_params(learnig_rate=1e-4)


def test_wrong_type_names_the_field():
    with pytest.raises(ConfigError, match=r"TrainConfig.lora_r: must be an integer \(got str '8'\)"):
        TrainConfig.from_params(lora_r="8")
    with pytest.raises(ConfigError, match=r"TrainConfig.precision: must be one of"):
        TrainConfig.from_params(precision="float32")


def test_number_given_for_a_string_explains_papermill_typing():
    # `papermill -p base_model 1234` hands the kernel an int
    with pytest.raises(ConfigError, match=r"base_model: must be a string \(got int 1234\).*-r base_model 1234"):
        TrainConfig.from_params(base_model=1234)


def test_out_of_range_values_are_refused():
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_params(learning_rate=-1.0, lora_dropout=1.5, max_steps=0)
    text = str(err.value)
    assert "learning_rate: must be > 0" in text
    assert "lora_dropout: must be in [0, 1)" in text
    assert "max_steps: must be -1" in text
    with pytest.raises(ConfigError, match="eval_fraction"):
        PrepareConfig.from_params(eval_fraction=1.0)


def test_whole_floats_become_ints_and_ints_are_floats():
    cfg = TrainConfig.from_params(max_steps=10.0, lora_alpha=32)
    assert cfg.max_steps == 10 and isinstance(cfg.max_steps, int)
    assert TrainConfig.from_params(num_train_epochs=2).num_train_epochs == 2
    with pytest.raises(ConfigError):
        TrainConfig.from_params(max_steps=10.5)
    with pytest.raises(ConfigError, match="must be an integer"):
        TrainConfig.from_params(lora_r=True)


def test_token_shaped_values_are_refused_and_masked():
    token = "hf_" + "a1B2c3D4e5" * 4
    with pytest.raises(ConfigError) as err:
        PrepareConfig.from_params(input_path=token)
    assert token not in str(err.value)
    assert "HF_TOKEN" in str(err.value)


def test_from_namespace_reads_only_its_fields():
    namespace = {**PlotConfig.defaults(), "smoothing": 0.0, "unrelated": 1}
    assert PlotConfig.from_namespace(namespace).smoothing == 0.0
    with pytest.raises(ConfigError, match="does not define smoothing"):
        PlotConfig.from_namespace({"trainer_state": "x", "output_dir": "y"})


def test_configs_are_frozen():
    cfg = PlotConfig()
    with pytest.raises(Exception):
        cfg.smoothing = 0.1
