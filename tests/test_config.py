import pytest

from selfplay.config import ConfigError, build_config, load_config, DEFAULT_CONFIG


def test_default_config_loads_and_overrides_parse_as_yaml():
    cfg = load_config(DEFAULT_CONFIG, ["trainer.lr=3e-4", "graph.hint=false", "lora.target_modules=[q_proj]"])
    assert cfg.trainer.lr == 3e-4 and cfg.graph.hint is False and cfg.lora.target_modules == ["q_proj"]


@pytest.mark.parametrize("override,key", [
    ("trainer.lrr=1", "trainer.lrr"), ("trainer.lr=abc", "trainer.lr"), ("graph.group_size=1", "graph.group_size"),
    ("nope.x=1", "nope"), ("trainer.aggregation=mean", "trainer.aggregation"),
])
def test_bad_keys_and_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        build_config({}, [override])
    msg = str(e.value)
    assert key in msg and "\n" not in msg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_every_field_is_documented():
    from selfplay.config import RunConfig, Section

    def walk(model):
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, Section):
                walk(ann)
            else:
                assert f.description, f"{model.__name__}.{name} has no description"
    walk(RunConfig)


@pytest.mark.parametrize("overrides,words", [
    (["curriculum.fresh_fraction=0.8", "curriculum.replay_fraction=0.3"], "fresh_fraction + curriculum.replay_fraction"),
    (["curriculum.min_count=5", "curriculum.max_count=4"], "curriculum.min_count"),
    (["eval.min_count=4", "eval.max_count=3"], "eval.min_count"),
    (["eval.n_tasks=0"], "eval.n_tasks"),
    (["curriculum.max_count=6"], "solver"),  # mutations add a 7th number: the solver cannot certify it
    (["eval.max_count=7"], "solver"),
    (["curriculum.ops=+^"], "curriculum.ops"),
    (["model.backend=vllm_server"], "model.servers"),
    (["model.backend=vllm", "generation.compile=true"], "generation.compile"),  # would compile nothing
    (["rewards.student_source=oracle"], "rewards.student_source"),
    (["trainer.hindsight_numbers=true"], "trainer.hindsight_numbers"),  # no hindsight term: would add nothing
    (["trainer.hindsight_solved_hinted=true"], "trainer.hindsight_solved_hinted"),  # likewise
])
def test_cross_field_checks_give_one_line_errors(overrides, words):
    with pytest.raises(ConfigError) as e:
        build_config({}, overrides)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_shipped_config_found_from_any_folder(tmp_path, monkeypatch):
    from selfplay.config import config_path

    monkeypatch.chdir(tmp_path)  # no configs/ here: the shipped copy is used
    assert config_path("configs/countdown-tiny.yaml") == DEFAULT_CONFIG
    with pytest.raises(ConfigError, match="not found"):
        config_path("configs/nope.yaml")


def test_a_lone_hint_with_a_group_baseline_is_warned_and_printed_once(tmp_path):
    import io

    from rich.console import Console

    from selfplay.config import config_warnings
    from selfplay.reporting import RunLogger

    lone = ["graph.hint_source=tutor", "graph.hints_per_round=1", "trainer.hint_baseline=group"]
    assert config_warnings(load_config(DEFAULT_CONFIG)) == []  # the default's one hint has the batch baseline
    assert config_warnings(build_config({}, lone[:2] + ["trainer.hint_baseline=batch"])) == []
    assert config_warnings(build_config({}, lone + ["trainer.train_tutor=false"])) == []  # a frozen tutor: meant
    assert config_warnings(build_config({}, ["graph.hints_per_round=2"])) == []  # two hints: a group baseline
    (w,) = config_warnings(build_config({}, lone))
    assert "trainer.hint_baseline=batch" in w and "\n" not in w
    buf = io.StringIO()
    RunLogger(tmp_path, build_config({}, lone + ["logging.tensorboard=false"]), Console(file=buf, width=400)).jsonl.close()
    assert buf.getvalue().count("never train") == 1
