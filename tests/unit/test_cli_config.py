"""Unit tests for flashrun.cli.build_config: options as the click command parses them, plus a fake environment.

The options come from the real click command (`run.make_context(...).params`), so option names, defaults and
PET_* fallbacks are exactly what `flashrun` passes; the command itself never runs.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from flashrun.cli import build_config, run
from flashrun.config import DEFAULT_RDZV_PORT, Detection, Endpoint, LaunchConfig, StdSpec
from flashrun.errors import FlashrunError

SLURM_ENV = {
    "SLURM_JOB_ID": "1234",
    "SLURM_NNODES": "2",
    "SLURM_NODEID": "1",
    "SLURM_JOB_NODELIST": "n[1-2]",
    "SLURM_STEP_ID": "0",
}


@pytest.fixture(autouse=True)
def no_pet_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """click reads PET_* from os.environ: make sure the caller's environment cannot leak into the options."""
    for name in list(os.environ):
        if name.startswith("PET_"):
            monkeypatch.delenv(name)


@pytest.fixture
def script(tmp_path: Path) -> str:
    path = tmp_path / "train.py"
    path.write_text("print('hello')\n")
    return str(path)


def options(*args: str) -> dict[str, object]:
    return run.make_context("flashrun", list(args)).params


def config(*args: str, env: Mapping[str, str] | None = None) -> LaunchConfig:
    return build_config(options(*args), {} if env is None else env)


def raises_naming(*fragments: str) -> AbstractContextManager[pytest.ExceptionInfo[FlashrunError]]:
    """pytest.raises(FlashrunError) whose message contains every fragment, in order."""
    return pytest.raises(FlashrunError, match=".*".join(re.escape(fragment) for fragment in fragments))


# Defaults -------------------------------------------------------------------------------------------------------


def test_single_node_defaults(script: str) -> None:
    cfg = config(script)

    assert (cfg.min_nodes, cfg.max_nodes, cfg.nproc_per_node) == (1, 1, 1)
    assert cfg.standalone is False
    assert cfg.rdzv_endpoint is None
    assert cfg.node_rank is None
    assert cfg.max_restarts == 0
    assert cfg.role == "default"
    assert cfg.hosts_coordinator


def test_script_runs_under_this_python_unbuffered_with_its_arguments(script: str) -> None:
    cfg = config(script, "--lr", "0.1", "data")

    assert cfg.entrypoint == (sys.executable, "-u", script)
    assert cfg.script_args == ("--lr", "0.1", "data")


def test_options_after_the_script_belong_to_the_script(script: str) -> None:
    cfg = config(script, "--nnodes", "2")

    assert cfg.max_nodes == 1
    assert cfg.script_args == ("--nnodes", "2")


def test_module_runs_with_python_dash_m() -> None:
    cfg = config("-m", "my.package")

    assert cfg.entrypoint == (sys.executable, "-u", "-m", "my.package")


def test_base_env_is_the_given_environment(script: str) -> None:
    env = {"PATH": "/usr/bin", "FOO": "bar"}

    assert config(script, env=env).base_env == env


def test_underscore_spelling_of_an_option_is_accepted(script: str) -> None:
    assert config("--nproc_per_node", "3", script).nproc_per_node == 3


# Slurm ----------------------------------------------------------------------------------------------------------


def test_slurm_fills_nnodes_node_rank_run_id_and_endpoint(script: str) -> None:
    cfg = config(script, env=SLURM_ENV)

    assert (cfg.min_nodes, cfg.max_nodes) == (2, 2)
    assert cfg.node_rank == 1
    assert cfg.run_id == "1234"
    assert cfg.rdzv_endpoint == Endpoint("n1", 20000 + 1234)
    assert not cfg.hosts_coordinator


def test_slurm_port_is_derived_from_the_job_id(script: str) -> None:
    cfg = config(script, env={**SLURM_ENV, "SLURM_JOB_ID": "987654"})

    assert cfg.rdzv_endpoint == Endpoint("n1", 20000 + 7654)


def test_explicit_options_win_over_slurm(script: str) -> None:
    cfg = config(
        "--nnodes", "2:4", "--node-rank", "0", "--rdzv-id", "mine", "--rdzv-endpoint", "head:5000", script,
        env=SLURM_ENV,
    )

    assert (cfg.min_nodes, cfg.max_nodes) == (2, 4)
    assert cfg.node_rank == 0
    assert cfg.run_id == "mine"
    assert cfg.rdzv_endpoint == Endpoint("head", 5000)


def test_standalone_ignores_slurm(script: str) -> None:
    cfg = config("--standalone", script, env=SLURM_ENV)

    assert (cfg.min_nodes, cfg.max_nodes) == (1, 1)
    assert cfg.node_rank is None
    assert cfg.run_id != "1234"
    assert cfg.rdzv_endpoint is None


def test_malformed_slurm_environment_is_an_error_naming_the_variable(script: str) -> None:
    with raises_naming("Slurm", "SLURM_NODEID"):
        config(script, env={**SLURM_ENV, "SLURM_NODEID": "5"})


def test_non_numeric_slurm_job_id_still_derives_a_stable_port(script: str) -> None:
    first = config(script, env={**SLURM_ENV, "SLURM_JOB_ID": "abc"})
    again = config(script, env={**SLURM_ENV, "SLURM_JOB_ID": "abc"})

    assert first.rdzv_endpoint == again.rdzv_endpoint
    assert 20000 <= first.rdzv_endpoint.port < 30000


# PET_* environment fallbacks ------------------------------------------------------------------------------------


def test_pet_nproc_per_node_is_the_fallback_for_the_option(script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PET_NPROC_PER_NODE", "3")

    cfg = config(script)

    assert cfg.nproc_per_node == 3
    assert cfg.redirects == {rank: StdSpec() for rank in range(3)}


def test_explicit_option_wins_over_its_pet_variable(script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PET_NPROC_PER_NODE", "3")

    assert config("--nproc-per-node", "2", script).nproc_per_node == 2


# Rendezvous -----------------------------------------------------------------------------------------------------


def test_standalone_generates_run_id_and_token(script: str) -> None:
    first = config("--standalone", script)
    second = config("--standalone", script)

    assert first.standalone
    assert first.run_id != "none"
    assert first.run_id != second.run_id
    assert re.fullmatch(r"[0-9a-f]{32}", first.token)


def test_standalone_with_several_nodes_is_an_error(script: str) -> None:
    with raises_naming("--standalone", "--nnodes is 2"):
        config("--standalone", "--nnodes", "2", script)


def test_multi_node_without_an_endpoint_is_an_error(script: str) -> None:
    with raises_naming("--nnodes 2", "--rdzv-endpoint"):
        config("--nnodes", "2", script)


def test_multi_node_endpoint_with_default_port(script: str) -> None:
    cfg = config("--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", "head", script)

    assert cfg.rdzv_endpoint == Endpoint("head", DEFAULT_RDZV_PORT)
    assert cfg.hosts_coordinator


def test_multi_node_master_addr_stands_in_for_the_endpoint(script: str) -> None:
    cfg = config("--nnodes", "2", "--master-addr", "head", "--master-port", "29600", script)

    assert cfg.rdzv_endpoint == Endpoint("head", DEFAULT_RDZV_PORT)
    assert cfg.master_addr == "head"
    assert cfg.master_port == 29600


def test_token_comes_from_the_environment_for_multi_node(script: str) -> None:
    cfg = config("--nnodes", "2", "--rdzv-endpoint", "head", script, env={"FLASHRUN_TOKEN": "t0k"})

    assert cfg.token == "t0k"


def test_token_file_option_is_read(script: str, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")

    cfg = config("--nnodes", "2", "--rdzv-endpoint", "head", "--token-file", str(token_file), script)

    assert cfg.token == "from-file"


def test_node_rank_other_than_zero_on_a_single_node_is_an_error(script: str) -> None:
    with raises_naming("--node-rank is 1", "single node"):
        config("--node-rank", "1", script)


def test_rdzv_conf_and_shutdown_timeout_set_the_timeouts(script: str) -> None:
    cfg = config("--rdzv-conf", "join_timeout=90", "--shutdown-timeout", "12", script)

    assert cfg.timeouts.join_s == 90.0
    assert cfg.timeouts.stop_grace_s == 12.0


def test_rdzv_conf_last_call_timeout_is_an_unknown_key(script: str) -> None:
    with raises_naming("--rdzv-conf", "unknown key", "last_call_timeout"):
        config("--nnodes", "1:2", "--rdzv-endpoint", "head", "--rdzv-conf", "last_call_timeout=4", script)


def test_rdzv_conf_keep_alive_sets_the_node_timeout_as_torchrun_counts_a_node_dead(script: str) -> None:
    both = config("--rdzv-conf", "keep_alive_interval=1.5,keep_alive_max_attempt=2", script)
    one = config("--rdzv-conf", "keep_alive_interval=2", script)  # torchrun's default of 3 attempts for the other

    assert both.detection.node_timeout_s == 3.0
    assert one.detection.node_timeout_s == 6.0
    assert config(script).detection.node_timeout_s == Detection().node_timeout_s


@pytest.mark.parametrize(("conf", "named"), [
    ("keep_alive_interval=soon", "keep_alive_interval must be a positive number of seconds, got 'soon'"),
    ("keep_alive_max_attempt=1.5", "keep_alive_max_attempt must be a positive integer, got '1.5'"),
    ("keep_alive_max_attempt=0", "keep_alive_max_attempt must be a positive integer, got '0'"),
    ("keep_alive_interval=0.1,keep_alive_max_attempt=2",
     "keep_alive_interval x keep_alive_max_attempt (0.2 s) must be longer than the heartbeat interval (0.25 s)"),
])
def test_bad_rdzv_conf_keep_alive_is_a_one_line_error(script: str, conf: str, named: str) -> None:
    with raises_naming("--rdzv-conf", named):
        config("--rdzv-conf", conf, script)


def test_bad_rdzv_conf_key_is_an_error(script: str) -> None:
    with raises_naming("--rdzv-conf", "nonsense"):
        config("--rdzv-conf", "nonsense=1", script)


# Output options -------------------------------------------------------------------------------------------------


def test_output_options_are_parsed_for_the_node(script: str) -> None:
    cfg = config(
        "--nproc-per-node", "2", "--redirects", "1", "--tee", "0:2", "--local-ranks-filter", "1",
        "--log-dir", "logs", script,
    )

    assert cfg.redirects == {0: StdSpec(stdout=True), 1: StdSpec(stdout=True)}
    assert cfg.tee == {0: StdSpec(stderr=True), 1: StdSpec()}
    assert cfg.local_ranks_filter == frozenset({1})
    assert cfg.log_dir == os.path.abspath("logs")


# Errors ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--numa-binding", "node"], "--numa-binding"),
        (["--run-path"], "--run-path"),
        (["--logs-specs", "x"], "--logs-specs"),
        (["--event-log-handler", "x"], "--event-log-handler"),
        (["--duplicate-stdout-filters", "x"], "--duplicate-stdout-filters"),
        (["--duplicate-stderr-filters", "x"], "--duplicate-stderr-filters"),
        (["--virtual-local-rank"], "--virtual-local-rank"),
    ],
)
def test_unsupported_torchrun_option_is_an_error_naming_it(script: str, args: list[str], flag: str) -> None:
    with raises_naming("does not support", flag):
        config(*args, script)


def test_nonexistent_script_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "no_such_train.py")

    with raises_naming(repr(missing), "does not exist"):
        config(missing)


def test_no_python_with_an_unknown_executable_is_an_error_naming_it() -> None:
    with raises_naming("--no-python", "'definitely-not-a-flashrun-executable'"):
        config("--no-python", "definitely-not-a-flashrun-executable")


def test_module_and_no_python_together_are_an_error(script: str) -> None:
    with raises_naming("--module", "--no-python"):
        config("--module", "--no-python", script)


def test_bad_nnodes_is_an_error_naming_it(script: str) -> None:
    with raises_naming("--nnodes", "'3:1'"):
        config("--nnodes", "3:1", script)


def test_a_batch_script_without_srun_is_not_treated_as_a_multi_node_step(script: str) -> None:
    batch_env = {key: value for key, value in SLURM_ENV.items() if key != "SLURM_STEP_ID"}

    cfg = config(script, env=batch_env)

    assert (cfg.min_nodes, cfg.max_nodes, cfg.rdzv_endpoint) == (1, 1, None)


def test_standalone_ignores_a_broken_slurm_environment(script: str) -> None:
    cfg = config("--standalone", script, env={"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0"})

    assert cfg.standalone and cfg.max_nodes == 1
