"""Inputs built to exhaust memory or the stack: refused in one line, before anything is built (issue 12.7)."""

import resource
import subprocess
import sys

import pytest

from cli_runner import run_llmtp
from llmtp.common.cluster.config import load_cluster_config
from llmtp.common.errors import ConfigError, FormatError
from llmtp.common.formats.tokenizer import load_tokenizer

ALIAS_BOMB = """model: m.bin
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def assert_one_line(error, *fragments):
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_yaml_alias_bomb_is_refused_before_it_grows(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    with pytest.raises(ConfigError) as error:
        load_cluster_config(path)
    assert_one_line(error, str(path), "aliases", "line 3")


@pytest.mark.parametrize("opening, closing", [("[", "]"), ("{a: ", "}")])
def test_deeply_nested_yaml_is_refused(tmp_path, opening, closing):
    path = tmp_path / "deep.yaml"
    path.write_text("model: " + opening * 6000 + "1" + closing * 6000 + "\n")
    with pytest.raises(ConfigError) as error:
        load_cluster_config(path)
    assert_one_line(error, str(path), "nested deeper")


def test_huge_yaml_is_refused(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("model: m.bin\n" + "# padding\n" * 200_000)
    with pytest.raises(ConfigError) as error:
        load_cluster_config(path)
    assert_one_line(error, str(path), "larger than")


def test_alias_bomb_through_the_cli_is_one_line_and_stays_small(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    # VmHWM, not ru_maxrss: the latter keeps the forking pytest process's peak across exec.
    code = ("import re, sys; from llmtp.coordinator.cli import main; code = main(sys.argv[1:]); "
            "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
            "print(hwm, file=sys.stderr); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code, "generate", "--config", str(path)], capture_output=True,
                            text=True, timeout=60)
    error_line, peak_kib = result.stderr.strip().splitlines()
    assert result.returncode == 2
    assert error_line.startswith("llmtp: error: ") and "aliases" in error_line
    assert int(peak_kib) < 200 * 1024  # the interpreter and numpy, nothing the bomb built


@pytest.mark.parametrize("name", ["tokenizer.bin", "tokenizer.model"])
def test_endless_tokenizer_file_is_refused_without_reading_it_all(name, tmp_path):
    # /dev/zero never ends; both readers take their bytes from one bounded read.
    link = tmp_path / name
    link.symlink_to("/dev/zero")
    with pytest.raises(FormatError) as error:
        load_tokenizer(link, 512)
    assert_one_line(error, str(link), "larger than")


def test_dev_zero_as_tokenizer_through_the_cli():
    result = run_llmtp("generate", "-z", "/dev/zero", "-n", "4", timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "/dev/zero" in result.stderr, result.stderr
