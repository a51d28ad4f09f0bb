"""daemon/config.py: the YAML file, environment and --set layers, and every error at once."""

from pathlib import Path

import pydantic
import pytest
import yaml

from everlearn.buffers import BufferConfig, build_buffer
from everlearn.daemon import cli
from everlearn.daemon.config import Config, load_config
from everlearn.errors import ConfigError, EverlearnError

pytestmark = pytest.mark.unit

REPO = Path(__file__).parents[2]
EXAMPLES = REPO / "examples"


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _fields(model, prefix=""):
    """Every leaf field of a (nested) pydantic model as {dotted path: value}."""
    out = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        path = f"{prefix}{name}"
        if hasattr(type(value), "model_fields"):
            out.update(_fields(value, path + "."))
        else:
            out[path] = value
    return out


# -- the embedded default and the examples -------------------------------------


def test_local_example_is_the_embedded_default_field_for_field():
    loaded = load_config(EXAMPLES / "local.yaml", env={})
    default = Config()
    got, want = _fields(loaded), _fields(default)
    assert got.keys() == want.keys()
    differing = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert differing == {}
    assert loaded == default


def test_local_example_names_every_field_explicitly():
    # "Copy this file to start your own": it must spell out every field, not rely on defaults.
    data = yaml.safe_load((EXAMPLES / "local.yaml").read_text())
    leaves = set()

    def walk(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
            else:
                leaves.add(f"{prefix}{k}")

    walk(data)
    assert leaves == set(_fields(Config()))


@pytest.mark.parametrize("name", ["kafka.yaml", "s3.yaml"])
def test_the_kafka_and_s3_examples_are_valid_and_say_what_they_are_for(name):
    cfg = load_config(EXAMPLES / name, env={})
    assert cfg.source.url.startswith(name.split(".")[0].replace("kafka", "kafka://").replace("s3", "s3://"))
    if name == "kafka.yaml":
        assert cfg.source.kafka.dlq_topic and cfg.source.kafka.id_from == "key"


def test_kafka_urls_and_options_are_checked_with_messages_that_say_how_to_fix_them():
    with pytest.raises(ConfigError) as e:
        load_config(env={}, overrides=["source.url=kafka://broker/news", "source.kafka.id_from=topic", "source.kafka.start=middle"])
    msg = str(e.value)
    assert "brokers must be HOST:PORT" in msg and "kafka://broker-1:9092" in msg
    assert "source.kafka.id_from: 'topic': use field, key, offset or header:NAME" in msg
    assert "source.kafka.start" in msg
    with pytest.raises(ConfigError, match="topics are 1-249 of"):
        load_config(env={}, overrides=["source.url=kafka://b:9092/bad topic"])


def test_kafka_passwords_come_from_the_environment_or_a_file_and_never_from_the_config(tmp_path, monkeypatch):
    from everlearn.daemon.kafka_config import KafkaConfig

    cfg = KafkaConfig(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="u", sasl_password_env="KPW")
    with pytest.raises(ConfigError, match="environment variable KPW"):
        cfg.client_kwargs(["b:9092"])
    monkeypatch.setenv("KPW", "s3cret")
    kw = cfg.client_kwargs(["b:9092"])
    assert kw["sasl_plain_password"] == "s3cret" and kw["sasl_mechanism"] == "SCRAM-SHA-512" and kw["ssl_check_hostname"]
    assert "s3cret" not in cfg.model_dump_json()
    (tmp_path / "pw").write_text("from-file\n")
    kw = KafkaConfig(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u",
                     sasl_password_file=str(tmp_path / "pw")).client_kwargs(["b:9092"])
    assert kw["sasl_plain_password"] == "from-file" and "ssl_cafile" not in kw
    with pytest.raises(ConfigError, match="needs sasl_mechanism, sasl_username"):
        KafkaConfig(security_protocol="SASL_SSL").client_kwargs(["b:9092"])
    with pytest.raises(pydantic.ValidationError):
        KafkaConfig(sasl_password="inline")  # there is no field for an inline password


def test_no_path_and_no_environment_gives_the_embedded_default():
    assert load_config(None, env={}) == Config()


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_loads(path):
    assert isinstance(load_config(path, env={}), Config)


def test_there_is_at_least_one_example():
    assert list(EXAMPLES.glob("*.yaml"))


# -- every problem at once, with its field path -----------------------------------


INVALID = """\
run_dir: runs/x
ray:
  num_cpus: 2
  colour: blue            # unknown field
source:
  max_doc_bytes: lots     # wrong type
train:
  batch_size: 0           # out of range (ge=1)
gate:
  min_improvement: 1.5    # out of range (le=1)
bogus_section: {}         # unknown top-level field
"""


def test_invalid_file_reports_every_problem_with_its_path(tmp_path):
    p = _write(tmp_path, INVALID)
    with pytest.raises(ConfigError) as exc:
        load_config(p, env={})
    msg = str(exc.value)
    assert str(p) in msg
    assert "5 problems" in msg
    lines = [line.strip() for line in msg.splitlines()[1:]]
    by_path = {line.split(":", 1)[0]: line for line in lines}
    assert set(by_path) == {"ray.colour", "source.max_doc_bytes", "train.batch_size", "gate.min_improvement", "bogus_section"}
    assert "remove it or check its spelling" in by_path["ray.colour"]
    assert "remove it or check its spelling" in by_path["bogus_section"]
    assert "'lots'" in by_path["source.max_doc_bytes"]
    assert "greater than or equal to 1" in by_path["train.batch_size"]
    assert "less than or equal to 1" in by_path["gate.min_improvement"]


def test_config_error_is_an_everlearn_error():
    assert issubclass(ConfigError, EverlearnError)


def test_missing_file_has_a_helpful_message(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist") as exc:
        load_config(missing, env={})
    assert str(missing) in str(exc.value)
    assert "-c" in str(exc.value)


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_non_mapping_yaml_is_rejected(tmp_path, text, kind):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=f"must hold a mapping of sections, got {kind}"):
        load_config(p, env={})


def test_unparseable_yaml_is_rejected(tmp_path):
    p = _write(tmp_path, "ray: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p, env={})


def test_empty_file_is_the_default(tmp_path):
    assert load_config(_write(tmp_path, ""), env={}) == Config()


def test_cross_field_position_embeddings_below_seq_len(tmp_path):
    p = _write(tmp_path, "model:\n  max_position_embeddings: 128\ntrain:\n  seq_len: 256\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, env={})
    assert "model.max_position_embeddings (128) must be >= train.seq_len (256)" in str(exc.value)


def test_cross_field_position_embeddings_equal_seq_len_is_fine(tmp_path):
    p = _write(tmp_path, "model:\n  max_position_embeddings: 256\ntrain:\n  seq_len: 256\n")
    assert load_config(p, env={}).model.max_position_embeddings == 256


def test_cross_field_metrics_and_serve_on_one_port(tmp_path):
    p = _write(tmp_path, "serve:\n  port: 9400\nmetrics:\n  port: 9400\n")
    with pytest.raises(ConfigError, match="metrics.port and serve.port are both 9400"):
        load_config(p, env={})


# -- the buffer section ---------------------------------------------------------------


def _problem(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(None, env={}, overrides=overrides)
    return str(exc.value)


BOTH_CAPACITIES = "set exactly one of buffer.capacity (sequences) and buffer.capacity_tokens (tokens); set the other to null"


@pytest.mark.parametrize("kind", ["uniform", "weighted", "stratified"])
def test_capacity_tokens_sizes_the_buffer_in_sequences(kind):
    cfg = load_config(None, env={}, overrides=["buffer.capacity=null", "buffer.capacity_tokens=1000", "train.seq_len=256", f"buffer.kind={kind}"])
    assert cfg.buffer.capacity is None and cfg.buffer.capacity_tokens == 1000
    assert cfg.buffer.sequences(cfg.train.seq_len) == 3  # 1000 // 256
    buf = build_buffer(cfg.buffer, cfg.train.seq_len)
    assert buf.kind == kind
    assert buf.capacity == 3 and buf.seq_len == 256


def test_capacity_in_sequences_is_taken_as_is():
    cfg = BufferConfig(capacity=7)
    assert cfg.sequences(256) == cfg.sequences(8) == 7
    assert build_buffer(cfg, 16).capacity == 7


def test_capacity_tokens_of_exactly_one_sequence_is_fine():
    cfg = load_config(None, env={}, overrides=["buffer.capacity=null", "buffer.capacity_tokens=256", "train.seq_len=256"])
    assert build_buffer(cfg.buffer, cfg.train.seq_len).capacity == 1


@pytest.mark.parametrize(
    "overrides",
    [["buffer.capacity_tokens=1000"], ["buffer.capacity=null"], ["buffer.capacity=4", "buffer.capacity_tokens=1000"]],
    ids=["both-set", "both-null", "both-set-explicitly"],
)
def test_exactly_one_capacity(overrides):
    msg = _problem(overrides)
    assert BOTH_CAPACITIES in msg
    assert "buffer.capacity " in msg and "buffer.capacity_tokens " in msg


def test_capacity_tokens_below_seq_len():
    msg = _problem(["buffer.capacity=null", "buffer.capacity_tokens=255", "train.seq_len=256"])
    assert "buffer.capacity_tokens (255) holds less than one sequence of train.seq_len (256) tokens" in msg


def test_weight_field_needs_the_weighted_kind():
    for kind in ("uniform", "stratified"):
        msg = _problem(["buffer.weight_field=quality", f"buffer.kind={kind}"])
        assert f"buffer.weight_field needs buffer.kind: weighted (it is {kind!r})" in msg
    cfg = load_config(None, env={}, overrides=["buffer.weight_field=quality", "buffer.kind=weighted"])
    assert cfg.buffer.weight_field == "quality"


def test_replay_boost_below_replay_fraction():
    msg = _problem(["buffer.replay_fraction=0.3", "buffer.replay_boost=0.2"])
    assert "buffer.replay_boost (0.2) is below buffer.replay_fraction (0.3)" in msg
    # equal is no boost but allowed; null is never boosted
    assert load_config(None, env={}, overrides=["buffer.replay_fraction=0.3", "buffer.replay_boost=0.3"]).buffer.replay_boost == 0.3
    assert load_config(None, env={}).buffer.replay_boost is None


@pytest.mark.parametrize("weights", ["{a: 0}", "{a: 1.5, b: -2}"])
def test_domain_weights_must_be_positive(weights):
    msg = _problem([f"buffer.domain_weights={weights}"])
    assert "buffer.domain_weights must all be > 0" in msg


def test_buffer_problems_are_reported_together_with_the_others(tmp_path):
    p = _write(tmp_path, """\
train:
  batch_size: 0
buffer:
  kind: uniform
  capacity: 2048
  capacity_tokens: 1000
  weight_field: quality
  replay_fraction: 0.25
  replay_boost: 0.1
""")
    with pytest.raises(ConfigError) as exc:
        load_config(p, env={})
    msg = str(exc.value)
    for text in (
        BOTH_CAPACITIES,
        "buffer.weight_field needs buffer.kind: weighted (it is 'uniform')",
        "buffer.replay_boost (0.1) is below buffer.replay_fraction (0.25)",
        "train.batch_size: Input should be greater than or equal to 1",
    ):
        assert text in msg


def test_problem_count_counts_each_buffer_problem():
    # three buffer problems and one train problem are four problems, not two
    msg = _problem(["train.batch_size=0", "buffer.capacity_tokens=1000", "buffer.weight_field=quality", "buffer.replay_boost=0.1"])
    assert "(4 problems)" in msg


def test_cross_field_problems_are_reported_together():
    # both cross checks fail: each must be reported, not only the first
    msg = _problem(["model.max_position_embeddings=128", "train.seq_len=256", "buffer.capacity=null", "buffer.capacity_tokens=100"])
    assert "model.max_position_embeddings (128) must be >= train.seq_len (256)" in msg
    assert "buffer.capacity_tokens (100) holds less than one sequence of train.seq_len (256) tokens" in msg


# -- environment -------------------------------------------------------------------


def test_environment_overrides_apply():
    cfg = load_config(None, env={"EVERLEARN_SERVE__PORT": "8001", "EVERLEARN_RUN_DIR": "/x", "HOME": "/ignored"})
    assert cfg.serve.port == 8001
    assert cfg.run_dir == "/x"
    assert cfg.checkpoint_url == str(Path("/x") / "checkpoints")


def test_environment_overrides_the_file(tmp_path):
    p = _write(tmp_path, "serve:\n  port: 8100\n  num_replicas: 2\n")
    cfg = load_config(p, env={"EVERLEARN_SERVE__PORT": "8001"})
    assert cfg.serve.port == 8001
    assert cfg.serve.num_replicas == 2  # the rest of the section is kept


def test_environment_values_are_yaml_scalars():
    cfg = load_config(None, env={
        "EVERLEARN_RAY__INCLUDE_DASHBOARD": "true",
        "EVERLEARN_SCHEDULE__PEAK_LR": "3.0e-3",
        "EVERLEARN_CHECKPOINT__URL": "null",
        "EVERLEARN_SOURCE__STORAGE_OPTIONS": "{anon: true}",
    })
    assert cfg.ray.include_dashboard is True
    assert cfg.schedule.peak_lr == pytest.approx(3.0e-3)
    assert cfg.checkpoint.url is None
    assert cfg.source.storage_options == {"anon": True}


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError) as exc:
        load_config(None, env={"EVERLEARN_SERVE__PORT": "eighty"})
    msg = str(exc.value)
    assert "serve.port" in msg
    assert "EVERLEARN_SERVE__PORT" in msg


def test_unknown_environment_field_names_the_variable():
    with pytest.raises(ConfigError) as exc:
        load_config(None, env={"EVERLEARN_SERVE__PROT": "8001"})
    assert "serve.prot" in str(exc.value)
    assert "EVERLEARN_SERVE__PROT" in str(exc.value)


def test_numeric_looking_value_for_a_string_field():
    cfg = load_config(None, env={"EVERLEARN_RUN_DIR": "2024"}, overrides=["source.default_domain=42"])
    assert cfg.run_dir == "2024"
    assert cfg.source.default_domain == "42"


# -- --set --------------------------------------------------------------------------


def test_set_overrides_apply_and_win_over_environment(tmp_path):
    p = _write(tmp_path, "gate:\n  every_steps: 3\n")
    cfg = load_config(p, env={"EVERLEARN_GATE__EVERY_STEPS": "5"}, overrides=["gate.every_steps=7", "run_dir=/y"])
    assert cfg.gate.every_steps == 7
    assert cfg.run_dir == "/y"


def test_bad_set_value_names_the_flag():
    with pytest.raises(ConfigError) as exc:
        load_config(None, env={}, overrides=["gate.every_steps=0"])
    assert "gate.every_steps" in str(exc.value)
    assert "--set gate.every_steps=0" in str(exc.value)


def test_set_without_equals_is_a_problem_reported_with_the_others():
    with pytest.raises(ConfigError) as exc:
        load_config(None, env={}, overrides=["gate.every_steps", "train.batch_size=-1"])
    msg = str(exc.value)
    assert "2 problems" in msg
    assert "--set 'gate.every_steps': expected key.path=value" in msg
    assert "train.batch_size" in msg


# -- the CLI ----------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("EVERLEARN_"):
            monkeypatch.delenv(key)


def test_cli_validate_valid_file(capsys, clean_env):
    path = EXAMPLES / "local.yaml"
    assert cli.main(["validate", "-c", str(path)]) == 0
    out, err = capsys.readouterr()
    assert f"{path}: valid" in out
    assert err == ""


def test_cli_validate_show_prints_the_resolved_config(capsys, clean_env):
    assert cli.main(["validate", "--show", "--set", "serve.port=8123"]) == 0
    out = capsys.readouterr().out
    shown = yaml.safe_load(out.split("\n", 1)[1])
    assert shown["serve"]["port"] == 8123
    assert Config.model_validate(shown).serve.port == 8123


def test_cli_validate_invalid_file(tmp_path, capsys, clean_env):
    p = _write(tmp_path, INVALID)
    assert cli.main(["validate", "-c", str(p)]) == 2
    out, err = capsys.readouterr()
    assert "valid" not in out
    assert err.startswith("everlearn validate: invalid configuration")
    for path in ("ray.colour", "source.max_doc_bytes", "train.batch_size", "gate.min_improvement", "bogus_section"):
        assert f"  {path}:" in err


def test_cli_validate_missing_file(tmp_path, capsys, clean_env):
    assert cli.main(["validate", "-c", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("field", ["train.resources", "gate.evaluator_resources", "serve.resources"])
def test_custom_resources_are_checked(field):
    cfg = load_config(env={}, overrides=[f"{field}={{everlearn_gpu: 1}}"])
    section, name = field.split(".")
    assert getattr(getattr(cfg, section), name) == {"everlearn_gpu": 1.0}
    with pytest.raises(ConfigError, match=rf"{field}.*'GPU' is not a custom resource: CPUs and GPUs have their own num_cpus / num_gpus"):
        load_config(env={}, overrides=[f"{field}={{GPU: 1}}"])
    with pytest.raises(ConfigError, match=rf"{field}.*amount >= 0"):
        load_config(env={}, overrides=[f"{field}={{x: -1}}"])
