"""A peer that dies, stalls or skips a call must not hang the others (CPU, 2 processes of 4
devices, gloo): within about EPConfig.timeout_s every surviving process gets an error naming
jax_ep, the peer process and the phase. The mechanism is the same for every CPU backend (a
step before each call), so the cases alternate between the reference and hierarchical ones.
The workers are tests/peer_failure_worker.py; the cuda backend's counterpart (a peer that dies
in the middle of a call) is tests/test_peer_failure_cuda.py. The two `slow` tests pin down what
JAX and XLA do where jax_ep cannot act (docs/multihost.md).
"""

from __future__ import annotations

import json

import pytest

from jax_ep import local_world

TIMEOUT_S = 2.0
# Above timeout_s: a host callback's wait, the KV store's round trips and a loaded machine.
SLACK_S = 4.0
CPU_ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}


def _run(scenario: str, backend: str = "reference", env: dict | None = None,
         layout: str = "normal"):
    """Runs the scenario on 2 processes; returns ({process: {name: result}}, log)."""
    results = local_world.launch(
        "tests.peer_failure_worker", 2,
        ["--scenario", scenario, "--backend", backend, "--layout", layout, "--timeout",
         str(TIMEOUT_S)],
        timeout_s=90, env=dict(CPU_ENV, **(env or {})))
    log = "\n".join(f"--- process {i} (exit {rc}) ---\n{out[-6000:]}"
                    for i, (rc, out) in enumerate(results))
    reports: dict[int, dict] = {}
    for i, (_, out) in enumerate(results):
        for line in out.splitlines():
            if line.startswith("RESULT "):
                record = json.loads(line[len("RESULT "):])
                reports.setdefault(i, {})[record["name"]] = record
    return reports, log


def _assert_names_peer(record: dict, peer: int, phase: str, log: str) -> None:
    """The call raised within about timeout_s, with jax_ep's message naming the peer and the
    phase, and group.check() raises the same EPPeerError afterwards."""
    assert record["raised"] is not None, log
    message = record["message"]
    assert "jax_ep: EPGroup #0 over processes [0, 1]" in message, log
    assert f"process {peer}" in message and phase in message, log
    assert record["elapsed"] < TIMEOUT_S + SLACK_S, log
    assert record["check_raised"] == "EPPeerError", log
    assert record["check_message"] in message, log


def test_peer_dead_after_creation_fails_the_first_dispatch():
    """Was: a gloo DEADLINE_EXCEEDED after 30 s naming neither jax_ep nor the peer."""
    reports, log = _run("dies_after_create", "reference")
    first = reports[0]["first_dispatch"]
    _assert_names_peer(first, 1, "did not reach call 0 (dispatch)", log)
    assert first["elapsed"] > TIMEOUT_S - 0.5, log
    # The group is unusable now: the next call fails at once with the same message.
    again = reports[0]["next_dispatch"]
    assert again["elapsed"] < 1.5 and again["check_message"] == first["check_message"], log


def test_peer_that_closed_the_group_fails_the_dispatch_at_once():
    """A peer that left normally (close(), or interpreter exit, which closes open groups) is
    named at once, without waiting for timeout_s."""
    reports, log = _run("closes_after_create")
    record = reports[0]["dispatch"]
    _assert_names_peer(record, 1, "closed the group", log)
    assert "reach call 0 (dispatch)" in record["message"], log
    assert record["elapsed"] < 2.0, log


def test_peer_killed_between_calls():
    """Was: blocked about 100 s, then JAX's coordination service aborted the survivor."""
    reports, log = _run("killed_between_calls", "hierarchical")
    assert reports[0]["first_step"]["raised"] is None, log
    # The rematerialised gradient step makes three jax_ep calls (0, 1, 2); the next starts at 3.
    _assert_names_peer(reports[0]["next_step"], 1, "did not reach call 3 (dispatch)", log)


def test_peer_dead_between_dispatch_and_combine_of_one_step():
    """Process 1 dies inside a jitted step after dispatch: process 0 fails at the combine."""
    reports, log = _run("dies_mid_step", "hierarchical")
    assert "process 1: dying between dispatch and combine" in log, log
    _assert_names_peer(reports[0]["step"], 1, "did not reach call 1 (combine)", log)


@pytest.mark.parametrize("backend, layout", [("reference", "normal"),
                                             ("hierarchical", "normal"),
                                             ("hierarchical", "padded")])
def test_peer_alive_but_skipping_a_call_fails_both(backend, layout):
    """Was: the survivor hung indefinitely. Now process 0 names process 1 after timeout_s,
    and process 1's late call fails at once naming process 0 (which gave up on it)."""
    reports, log = _run("skips_a_call", backend, layout=layout)
    assert reports[0]["first_step"]["raised"] is None, log
    _assert_names_peer(reports[0]["second_step"], 1, "did not reach call 2 (dispatch)", log)
    late = reports[1]["late_step"]
    _assert_names_peer(late, 0, "gave up waiting for this process (1) to reach call 2", log)
    assert late["elapsed"] < 2.0, log


def test_late_creation_fails_on_every_process():
    """Was: process 0 raised TimeoutError, process 1 (later) got a group nobody serves."""
    reports, log = _run("late_creation")
    early, late = reports[0]["create"], reports[1]["create"]
    assert early["is_timeout"] and early["is_peer_error"], log
    assert f"process 1 did not create this EPGroup within {TIMEOUT_S:g} s" in early["message"], log
    assert TIMEOUT_S - 0.5 < early["elapsed"] < TIMEOUT_S + SLACK_S, log
    assert late["is_timeout"] and late["is_peer_error"], log
    assert "process 0 gave up waiting for this process (1) to create this EPGroup" in \
        late["message"], log
    assert late["elapsed"] < 2.0, log


def test_close_of_many_groups_with_a_dead_peer_is_bounded_in_total():
    """Was: timeout_s per open group, in turn. Now one timeout_s for all, each group warned."""
    reports, log = _run("close_with_dead_peer")
    record = reports[0]["close_all"]
    assert record["closed"] == [True, True, True], log
    assert record["elapsed"] < TIMEOUT_S + SLACK_S, log
    assert len(record["warnings"]) == 3, log
    assert all("process 1 did not reach 'close'" in w for w in record["warnings"]), log


@pytest.mark.slow
def test_service_host_death_terminates_the_others_at_once():
    """Process 0 runs jax.distributed's coordination service: when it dies, JAX terminates
    every other process at once (SIGABRT, JAX's message), before jax_ep can say anything; as
    docs/multihost.md says."""
    results = local_world.launch(
        "tests.peer_failure_worker", 2,
        ["--scenario", "service_host_killed", "--timeout", str(TIMEOUT_S)],
        timeout_s=60, env=CPU_ENV)
    (code0, out0), (code1, out1) = results
    assert code0 == -9 and code1 == -6, (out0[-3000:], out1[-3000:])
    assert "JAX distributed service detected fatal errors" in out1, out1[-3000:]
    assert '"name": "next_step"' not in out1, out1[-3000:]


@pytest.mark.slow
def test_xla_collective_timeout_flag_bounds_a_gloo_collective():
    """What jax_ep cannot check (a peer that dies inside a collective, after its call's check;
    any collective outside jax_ep): bounded only by XLA's --xla_cpu_collective_timeout_seconds
    (30 minutes by default), with gloo's message, as docs/multihost.md says."""
    flags = CPU_ENV["XLA_FLAGS"] + f" --xla_cpu_collective_timeout_seconds={TIMEOUT_S:.0f}"
    reports, log = _run("gloo_flag", env={"XLA_FLAGS": flags})
    record = reports[0]["lonely_all_to_all"]
    assert record["raised"] == "JaxRuntimeError", log
    assert "Gloo all-to-all failed" in record["message"], log
    assert "Timed out waiting" in record["message"], log
    assert record["elapsed"] < TIMEOUT_S + SLACK_S, log
