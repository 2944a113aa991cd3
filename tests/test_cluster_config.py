"""The cluster YAML: defaults, paths relative to the file, and one-line errors that name
the file, the field path and what is allowed; keys are required off loopback."""

import copy
from pathlib import Path

import pytest
import yaml

from cli_runner import run_llmtp
from llmtp.common.cluster.config import Keys, Timeouts, is_loopback, load_cluster_config
from llmtp.common.errors import ConfigError

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
KEYS = {"coordinator_public": "keys/coordinator.key", "coordinator_secret": "keys/coordinator.key_secret",
        "worker_public": "keys/worker.key", "worker_secret": "keys/worker.key_secret"}
VALID = {
    "model": "models/model.bin",
    "tokenizer": "models/tokenizer.bin",
    "shards": "shards",
    "coordinator": {"host": "127.0.0.1"},
    "workers": [{"host": "127.0.0.1", "port": 5555, "shard": 0},
                {"host": "127.0.0.1", "port": 5557, "shard": 1, "threads": 2}],
}


def write(tmp_path, data, name="cluster.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def changed(edit) -> dict:
    data = copy.deepcopy(VALID)
    edit(data)
    return data


def test_a_valid_config_with_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir("/")  # relative paths follow the YAML's folder, not the current directory
    config = load_cluster_config(write(tmp_path, VALID))
    assert config.model == tmp_path / "models/model.bin" and config.shards == tmp_path / "shards"
    assert config.coordinator_folder == tmp_path / "shards" / "127.0.0.1"
    first, second = config.workers
    assert (first.threads, first.peer_port, first.bind) == (0, 5556, "127.0.0.1")
    assert (second.threads, second.peer_port, second.endpoint) == (2, 5558, "tcp://127.0.0.1:5557")
    assert config.timeouts == Timeouts() and config.reduce == "peers" and config.keys is None
    assert "not encrypted" in config.plaintext_notice()


def test_every_field_given(tmp_path):
    data = changed(lambda d: d.update(timeouts={"reply": 5, "reduce": 2.5}, reduce="star", keys=KEYS))
    data["workers"] = [{"host": "10.0.0.3", "port": 6000, "shard": 1, "threads": 4, "peer_port": 7000, "bind": "*"},
                       {"host": "node-2.lan", "port": 6000, "shard": 0}]
    config = load_cluster_config(write(tmp_path, data))
    assert config.timeouts == Timeouts(reply=5, reduce=2.5) and config.reduce == "star"
    assert config.keys == Keys(**{name: tmp_path / value for name, value in KEYS.items()})
    assert config.workers[0].bind_endpoint == "tcp://*:6000" and config.workers[0].peer_port == 7000
    assert [w.host for w in config.by_shard()] == ["node-2.lan", "10.0.0.3"]
    assert config.plaintext_notice() is None


# (edit of VALID, field path named in the error, words of what is allowed)
BAD_FIELDS = {
    "model missing": (lambda d: d.pop("model"), "model", "missing; expected a path (llama2.c or GGUF file, Hugging Face folder)"),
    "model not a string": (lambda d: d.update(model=3), "model", "expected a path"),
    "unknown top-level field": (lambda d: d.update(modle="x"), "modle",
                                "unknown field; allowed: model, tokenizer, shards, coordinator, workers"),
    "coordinator a list": (lambda d: d.update(coordinator=["a"]), "coordinator", "expected a mapping with host"),
    "coordinator host missing": (lambda d: d.update(coordinator={}), "coordinator.host", "missing"),
    "coordinator unknown field": (lambda d: d["coordinator"].update(port=1), "coordinator.port",
                                  "unknown field; allowed: host"),
    "workers empty": (lambda d: d.update(workers=[]), "workers", "expected a non-empty list"),
    "worker not a mapping": (lambda d: d["workers"].__setitem__(1, "127.0.0.1:5557"), "workers[1]",
                             "expected a mapping with host, port, shard"),
    "port missing": (lambda d: d["workers"][1].pop("port"), "workers[1].port", "missing; expected an integer 1..65535"),
    "port a string": (lambda d: d["workers"][1].update(port="5557"), "workers[1].port", "an integer 1..65535"),
    "port too big": (lambda d: d["workers"][0].update(port=70000), "workers[0].port", "an integer 1..65535"),
    "port a bool": (lambda d: d["workers"][0].update(port=True), "workers[0].port", "an integer 1..65535"),
    "port typo": (lambda d: d["workers"][0].update(prot=d["workers"][0].pop("port")), "workers[0].prot",
                  "unknown field; allowed: host, port, shard, threads, peer_port, bind"),
    "host with a space": (lambda d: d["workers"][0].update(host="my host"), "workers[0].host",
                          "an IPv4 address or a host name"),
    "host with a port": (lambda d: d["workers"][0].update(host="127.0.0.1:80"), "workers[0].host", "host name"),
    "shard out of range": (lambda d: d["workers"][1].update(shard=2), "workers[1].shard", "expected 0..1"),
    "shard twice": (lambda d: d["workers"][1].update(shard=0), "workers[1].shard",
                    "already workers[0]'s; each shard 0..1 appears once"),
    "threads negative": (lambda d: d["workers"][1].update(threads=-1), "workers[1].threads", "an integer >= 0"),
    "peer_port clashes": (lambda d: d["workers"][1].update(port=5556), "workers[1].port",
                          "5556 on 127.0.0.1 is already workers[0].peer_port"),
    "localhost is 127.0.0.1": (lambda d: d["workers"][1].update(host="localhost", port=5555), "workers[1].port",
                               "already workers[0].port"),
    "no room for peer_port": (lambda d: d["workers"][1].update(port=65535), "workers[1].port", "set peer_port"),
    "bind bad": (lambda d: d["workers"][0].update(bind="a b"), "workers[0].bind", "or * for all interfaces"),
    "timeouts not a mapping": (lambda d: d.update(timeouts=5), "timeouts", "a mapping with reply, reduce"),
    "timeout zero": (lambda d: d.update(timeouts={"reply": 0}), "timeouts.reply", "a number of seconds > 0"),
    "timeout unknown": (lambda d: d.update(timeouts={"step": 1}), "timeouts.step", "allowed: reply, reduce"),
    "reduce unknown mode": (lambda d: d.update(reduce="ring"), "reduce", "peers or star"),
    "keys field missing": (lambda d: d.update(keys={k: v for k, v in KEYS.items() if k != "worker_secret"}),
                           "keys.worker_secret", "missing; expected a key file path"),
    "keys unknown field": (lambda d: d.update(keys={**KEYS, "worker": "x"}), "keys.worker", "unknown field"),
    "worker off loopback without keys": (lambda d: d["workers"][1].update(host="10.0.0.2"), "workers[1].host",
                                         "not a loopback address, and there are no keys; keys are required off "
                                         "loopback (make them with `llmtp keygen -o DIR`"),
    "coordinator off loopback without keys": (lambda d: d["coordinator"].update(host="node-1"), "coordinator.host",
                                              "keys are required off loopback"),
    "bind to all interfaces without keys": (lambda d: d["workers"][0].update(bind="*"), "workers[0].bind",
                                            "keys are required off loopback"),
}


@pytest.mark.parametrize("case", sorted(BAD_FIELDS))
def test_a_wrong_or_missing_field_is_one_line_naming_it(tmp_path, case):
    edit, field, allowed = BAD_FIELDS[case]
    path = write(tmp_path, changed(edit))
    with pytest.raises(ConfigError) as error:
        load_cluster_config(path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {field}: "), message
    assert allowed in message, message


@pytest.mark.parametrize("text, expected", [
    ("", "top level: empty is not allowed; expected a mapping with model"),
    ("- a\n- b\n", "top level: ['a', 'b'] is not allowed; expected a mapping"),
    ("model: [a\n", "not valid YAML at line 2"),
    ("model: a\nmodel: b\n", "not valid YAML at line 2, column 1: field 'model' appears twice"),
    ("model: !!python/object:os.system echo\n", "not valid YAML"),  # safe_load: no Python objects
])
def test_a_file_that_is_not_a_config(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=f"^{path}: ") as error:
        load_cluster_config(path)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_a_missing_file_and_a_missing_worker_index(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read cluster config"):
        load_cluster_config(tmp_path / "nope.yaml")
    config = load_cluster_config(write(tmp_path, VALID))
    with pytest.raises(ConfigError, match=r"--index 2 is outside 0..1 \(the config lists 2 workers\)"):
        config.worker(2)


def test_keys_allow_any_address(tmp_path):
    data = changed(lambda d: d.update(keys=KEYS, coordinator={"host": "192.168.1.10"}))
    data["workers"][0]["host"] = "192.168.1.11"
    assert load_cluster_config(write(tmp_path, data)).workers[0].host == "192.168.1.11"


def test_loopback_addresses():
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "localhost"]))
    assert not any(map(is_loopback, ["10.0.0.1", "0.0.0.0", "*", "localhost.example", "node-1"]))


@pytest.mark.parametrize("name", ["local-2workers.yaml", "lan-3hosts.yaml"])
def test_the_deploy_examples_are_valid(name):
    config = load_cluster_config(DEPLOY / name)
    assert config.n_workers == {"local-2workers.yaml": 2, "lan-3hosts.yaml": 3}[name]


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    bad = write(tmp_path, changed(lambda d: d["workers"][0].update(port="x")))
    for args in (["generate", "--config", bad], ["shard", "--config", bad],
                 ["worker", "--config", bad, "--index", 0]):
        result = run_llmtp(*args)
        assert result.returncode == 2, result.stderr
        assert result.stderr == f"llmtp: error: {bad}: workers[0].port: 'x' is not allowed; " \
                                f"expected an integer 1..65535\n"
    good = write(tmp_path, VALID, "good.yaml")
    result = run_llmtp("worker", "--config", good, "--index", 0, "--bind", "tcp://127.0.0.1:1")
    assert result.returncode == 2 and "--bind cannot go with --config" in result.stderr
    result = run_llmtp("worker", "--config", good)
    assert result.returncode == 2 and "--config needs --index" in result.stderr
