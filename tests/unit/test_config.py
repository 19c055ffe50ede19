"""Unit tests for flashrun.config: option parsers and validated timeouts.

Every error is a FlashrunError whose message names the bad value, so the user can see what to fix.
"""

from __future__ import annotations

import dataclasses
import re
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from flashrun.config import (
    Endpoint,
    StdSpec,
    Timeouts,
    parse_endpoint,
    parse_local_ranks_filter,
    parse_nnodes,
    parse_nproc_per_node,
    parse_rdzv_conf,
    parse_std_spec,
    resolve_token,
    timeouts_from_rdzv_conf,
)
from flashrun.errors import EXIT_USAGE, FlashrunError


def raises_naming(*fragments: str) -> AbstractContextManager[pytest.ExceptionInfo[FlashrunError]]:
    """pytest.raises(FlashrunError) whose message contains every fragment, in order."""
    return pytest.raises(FlashrunError, match=".*".join(re.escape(fragment) for fragment in fragments))


# --nnodes -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [("2", (2, 2)), ("1:4", (1, 4)), (" 3 : 3 ", (3, 3))])
def test_parse_nnodes_accepts_n_and_min_max(text: str, expected: tuple[int, int]) -> None:
    assert parse_nnodes(text) == expected


@pytest.mark.parametrize("text", ["0", "2:1", "0:2", "x", "1:2:3", "", "-1", "1.5"])
def test_parse_nnodes_rejects_bad_values(text: str) -> None:
    with raises_naming("--nnodes", repr(text)):
        parse_nnodes(text)


def test_flashrun_error_defaults_to_the_usage_exit_code() -> None:
    with pytest.raises(FlashrunError) as info:
        parse_nnodes("x")
    assert info.value.exit_code == EXIT_USAGE


# --nproc-per-node -----------------------------------------------------------------------------------------------


def test_parse_nproc_per_node_accepts_a_positive_integer() -> None:
    assert parse_nproc_per_node("4", cpu_count=16, gpu_count=8) == 4


def test_parse_nproc_per_node_cpu_uses_the_cpu_count() -> None:
    assert parse_nproc_per_node("cpu", cpu_count=16, gpu_count=8) == 16


def test_parse_nproc_per_node_gpu_uses_the_gpu_count() -> None:
    assert parse_nproc_per_node("gpu", cpu_count=16, gpu_count=8) == 8


def test_parse_nproc_per_node_gpu_without_gpus_is_an_error() -> None:
    with raises_naming("--nproc-per-node gpu", "no CUDA device"):
        parse_nproc_per_node("gpu", cpu_count=16, gpu_count=0)


def test_parse_nproc_per_node_auto_prefers_gpus() -> None:
    assert parse_nproc_per_node("auto", cpu_count=16, gpu_count=8) == 8


def test_parse_nproc_per_node_auto_falls_back_to_cpus() -> None:
    assert parse_nproc_per_node("auto", cpu_count=16, gpu_count=0) == 16


@pytest.mark.parametrize("text", ["0", "-1", "two", "", "1.5", "GPU "])
def test_parse_nproc_per_node_rejects_bad_values(text: str) -> None:
    with raises_naming("--nproc-per-node", repr(text.strip())):
        parse_nproc_per_node(text, cpu_count=16, gpu_count=8)


def test_parse_nproc_per_node_rejects_non_ascii_digits_with_a_flashrun_error() -> None:
    # "²".isdigit() is True but int("²") raises ValueError: the user must get a usage error, not a traceback.
    with raises_naming("--nproc-per-node", "'²'"):
        parse_nproc_per_node("²", cpu_count=16, gpu_count=8)


# --rdzv-endpoint ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("node1", Endpoint("node1", 29400)),
        ("node1:1234", Endpoint("node1", 1234)),
        ("10.0.0.1:5", Endpoint("10.0.0.1", 5)),
        ("[::1]:29500", Endpoint("::1", 29500)),
        ("[fe80::1]", Endpoint("fe80::1", 29400)),
        ("  node1:80  ", Endpoint("node1", 80)),
    ],
)
def test_parse_endpoint_accepts_host_and_optional_port(text: str, expected: Endpoint) -> None:
    assert parse_endpoint(text, default_port=29400) == expected


def test_endpoint_brackets_ipv6_hosts_when_printed() -> None:
    assert str(Endpoint("::1", 29400)) == "[::1]:29400"
    assert str(Endpoint("node1", 29400)) == "node1:29400"


@pytest.mark.parametrize("text", ["", "node1:", ":29400", "::1", "a:b:c", "node1:port", "[::1", "[]:1", "[::1]:"])
def test_parse_endpoint_rejects_malformed_values(text: str) -> None:
    with raises_naming("--rdzv-endpoint", repr(text)):
        parse_endpoint(text, default_port=29400)


def test_parse_endpoint_rejects_a_port_out_of_range() -> None:
    with raises_naming("--rdzv-endpoint", "65536"):
        parse_endpoint("node1:65536", default_port=29400)


# --rdzv-conf and timeouts ---------------------------------------------------------------------------------------


def test_parse_rdzv_conf_reads_key_value_pairs() -> None:
    assert parse_rdzv_conf("join_timeout=5, last_call_timeout = 2,") == {
        "join_timeout": "5",
        "last_call_timeout": "2",
    }


def test_parse_rdzv_conf_of_empty_text_is_empty() -> None:
    assert parse_rdzv_conf("") == {}


def test_parse_rdzv_conf_keeps_equals_signs_in_values() -> None:
    assert parse_rdzv_conf("a=b=c") == {"a": "b=c"}


@pytest.mark.parametrize(("text", "bad_item"), [("join_timeout", "join_timeout"), ("a=1,=2", "=2")])
def test_parse_rdzv_conf_rejects_items_without_key_and_value(text: str, bad_item: str) -> None:
    with raises_naming("--rdzv-conf", repr(bad_item)):
        parse_rdzv_conf(text)


def test_timeouts_from_empty_rdzv_conf_are_the_defaults() -> None:
    assert timeouts_from_rdzv_conf({}, shutdown_timeout_s=None) == Timeouts()


def test_timeouts_from_rdzv_conf_read_the_join_timeout() -> None:
    timeouts = timeouts_from_rdzv_conf({"join_timeout": "120.5"}, None)

    assert timeouts.join_s == 120.5
    assert timeouts == Timeouts(join_s=120.5)


def test_timeouts_from_rdzv_conf_reject_last_call_timeout_as_unknown() -> None:
    # The job starts as soon as MIN nodes joined (later ones are spares): there is no last-call window.
    with raises_naming("--rdzv-conf", "unknown key", "last_call_timeout", "join_timeout"):
        timeouts_from_rdzv_conf({"join_timeout": "120", "last_call_timeout": "2.5"}, None)


def test_timeouts_have_no_last_call_window() -> None:
    assert "last_call_s" not in {field.name for field in dataclasses.fields(Timeouts)}


def test_timeouts_from_rdzv_conf_ignore_torchrun_keys_flashrun_does_not_need() -> None:
    conf = {"timeout": "10", "read_timeout": "60", "is_host": "true"}

    assert timeouts_from_rdzv_conf(conf, None) == Timeouts()


def test_timeouts_from_rdzv_conf_reject_an_unknown_key() -> None:
    with raises_naming("--rdzv-conf", "unknown key", "bogus_key"):
        timeouts_from_rdzv_conf({"bogus_key": "1"}, None)


def test_timeouts_from_rdzv_conf_reject_a_value_that_is_not_a_number() -> None:
    with raises_naming("--rdzv-conf", "join_timeout", "'soon'"):
        timeouts_from_rdzv_conf({"join_timeout": "soon"}, None)


def test_timeouts_from_rdzv_conf_reject_a_non_positive_value() -> None:
    with raises_naming("join_s", "-1.0"):
        timeouts_from_rdzv_conf({"join_timeout": "-1"}, None)


def test_shutdown_timeout_sets_the_stop_grace() -> None:
    assert timeouts_from_rdzv_conf({}, shutdown_timeout_s=10.0).stop_grace_s == 10.0


def test_long_shutdown_timeout_raises_the_stop_ack_deadline_to_stay_valid() -> None:
    timeouts = timeouts_from_rdzv_conf({}, shutdown_timeout_s=100.0)

    assert timeouts.stop_grace_s == 100.0
    assert timeouts.stop_ack_s > timeouts.stop_grace_s + timeouts.kill_wait_s


def test_default_timeouts_are_valid() -> None:
    Timeouts()


@pytest.mark.parametrize("field", ["join_s", "stop_grace_s", "kill_wait_s", "stop_ack_s"])
@pytest.mark.parametrize("value", [0.0, -5.0])
def test_timeouts_reject_non_positive_values(field: str, value: float) -> None:
    with raises_naming(field, "> 0", repr(value)):
        Timeouts(**{field: value})


def test_timeouts_reject_nan() -> None:
    with raises_naming("join_s", "nan"):
        Timeouts(join_s=float("nan"))


def test_timeouts_reject_a_stop_ack_not_longer_than_grace_plus_kill_wait() -> None:
    with raises_naming("stop_ack_s (35.0)", "stop_grace_s + kill_wait_s (35.0)"):
        Timeouts(stop_grace_s=30.0, kill_wait_s=5.0, stop_ack_s=35.0)


def test_timeouts_accept_a_stop_ack_just_over_grace_plus_kill_wait() -> None:
    assert Timeouts(stop_grace_s=30.0, kill_wait_s=5.0, stop_ack_s=35.5).stop_ack_s == 35.5


# --redirects / --tee --------------------------------------------------------------------------------------------


def test_parse_std_spec_single_code_applies_to_every_local_rank() -> None:
    assert parse_std_spec("3", "--tee", nproc=2) == {
        0: StdSpec(stdout=True, stderr=True),
        1: StdSpec(stdout=True, stderr=True),
    }


@pytest.mark.parametrize(
    ("code", "expected"),
    [("0", StdSpec()), ("1", StdSpec(stdout=True)), ("2", StdSpec(stderr=True)), ("", StdSpec())],
)
def test_parse_std_spec_codes(code: str, expected: StdSpec) -> None:
    assert parse_std_spec(code, "--redirects", nproc=1) == {0: expected}


def test_parse_std_spec_per_rank_form_sets_listed_ranks_only() -> None:
    assert parse_std_spec("0:1,1:2", "--redirects", nproc=3) == {
        0: StdSpec(stdout=True),
        1: StdSpec(stderr=True),
        2: StdSpec(),
    }


@pytest.mark.parametrize(("text", "bad"), [("4", "'4'"), ("x", "'x'"), ("0:9", "'9'"), ("a:1", "'a:1'")])
def test_parse_std_spec_rejects_bad_values(text: str, bad: str) -> None:
    with raises_naming("--tee", bad):
        parse_std_spec(text, "--tee", nproc=2)


def test_parse_std_spec_rejects_non_ascii_digit_rank_with_a_flashrun_error() -> None:
    # "²".isdigit() is True but int("²") raises ValueError: the user must get a usage error, not a traceback.
    with raises_naming("--tee", "²"):
        parse_std_spec("²:1", "--tee", nproc=2)


# --local-ranks-filter -------------------------------------------------------------------------------------------


def test_parse_local_ranks_filter_empty_means_no_filter() -> None:
    assert parse_local_ranks_filter("", nproc=4) is None
    assert parse_local_ranks_filter("  ", nproc=4) is None


def test_parse_local_ranks_filter_reads_a_comma_separated_set() -> None:
    assert parse_local_ranks_filter("0, 2", nproc=4) == frozenset({0, 2})


@pytest.mark.parametrize("text", ["a", "0,,1", "1.0"])
def test_parse_local_ranks_filter_rejects_non_integers(text: str) -> None:
    with raises_naming("--local-ranks-filter", repr(text)):
        parse_local_ranks_filter(text, nproc=4)


def test_parse_local_ranks_filter_rejects_ranks_outside_the_node() -> None:
    with raises_naming("--local-ranks-filter", "[-1, 4]", "0..3"):
        parse_local_ranks_filter("0,4,-1", nproc=4)


# Token ----------------------------------------------------------------------------------------------------------


def test_resolve_token_reads_and_strips_the_token_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("  abc123\n")

    assert resolve_token(str(token_file), {"FLASHRUN_TOKEN": "from-env"}, standalone=False) == "abc123"


def test_resolve_token_rejects_an_empty_token_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("\n  \n")

    with raises_naming("--token-file", str(token_file), "empty"):
        resolve_token(str(token_file), {}, standalone=False)


def test_resolve_token_rejects_a_missing_token_file(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-token"

    with raises_naming("--token-file", str(missing)):
        resolve_token(str(missing), {}, standalone=False)


def test_resolve_token_falls_back_to_the_environment() -> None:
    assert resolve_token(None, {"FLASHRUN_TOKEN": "from-env"}, standalone=False) == "from-env"


def test_resolve_token_generates_a_random_token_for_standalone() -> None:
    first = resolve_token(None, {}, standalone=True)
    second = resolve_token(None, {}, standalone=True)

    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert first != second


def test_resolve_token_prefers_the_environment_to_generating_one() -> None:
    assert resolve_token(None, {"FLASHRUN_TOKEN": "from-env"}, standalone=True) == "from-env"


def test_resolve_token_without_any_source_is_empty() -> None:
    assert resolve_token(None, {}, standalone=False) == ""
