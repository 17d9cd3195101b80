"""The demo (python -m jax_ep.demo) trains: a few steps of a tiny model lower the loss and
write the plot; --help documents every flag; bad values are argparse errors, not tracebacks;
tokens dropped for capacity are reported."""

import argparse

import pytest

from jax_ep import demo

TINY = ["--steps", "25", "--batch", "8", "--seq-len", "16", "--d-model", "32", "--heads", "2",
        "--layers", "1", "--ffn", "32", "--experts", "8", "--top-k", "2", "--lr", "2e-2",
        "--log-every", "5"]


@pytest.mark.parametrize("framework,extra", [("flax", []),
                                              ("equinox", ["--ep", "4", "--shared-ffn", "8"])])
def test_demo_lowers_the_loss_and_writes_the_plot(tmp_path, capsys, framework, extra):
    plot = tmp_path / "loss.png"
    out = demo.main(TINY + extra + ["--framework", framework, "--plot", str(plot)])
    losses = out["losses"]
    assert len(losses) == 25
    # From ~ln(64) at the start; the bigram structure alone is learnable within a few steps.
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5, losses
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "loss: first step" in printed
    assert "aux = load-balancing loss" in printed


def test_capacity_drops_are_counted(capsys):
    """A receive capacity of half the routed slots drops some, and the demo reports how many
    (the models' aux dict carries num_dropped); on the hierarchical backend, on one host."""
    out = demo.main(["--steps", "2", "--batch", "8", "--seq-len", "16", "--d-model", "32",
                     "--heads", "2", "--layers", "2", "--ffn", "32", "--capacity-factor", "0.5",
                     "--backend", "hierarchical", "--plot", ""])
    assert out["backend"] == "hierarchical"
    slots = 8 * 16 * 2 * 2  # tokens x top_k x layers
    assert all(0 < d < slots for d in out["dropped"]), out["dropped"]
    assert f"dropped {out['dropped'][0]} of {slots} slots" in capsys.readouterr().out


def test_help_documents_every_flag(capsys):
    parser = demo.build_parser()
    for action in parser._actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help, f"{action.option_strings} has no help text"
    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--steps", "--experts", "--top-k", "--backend", "--layers", "--plot",
                 "--framework", "--ep", "--expert-gemm", "--coordinator", "--process-id",
                 "--num-processes", "--distributed", "--aux-coef"):
        assert flag in text
    assert "hierarchical" in text
    assert "load-balancing" in text  # the aux loss is explained


@pytest.mark.parametrize("argv,message", [
    (["--ep", "3"], "--ep 3 does not divide the 8 devices"),
    (["--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
    (["--batch", "12"], "--batch 12 must be a multiple of the 8 devices"),
    (["--experts", "12", "--ep", "8"], "--experts 12 must be a multiple of the 8 devices"),
    (["--heads", "5"], "--heads 5 must divide --d-model 64"),
    (["--top-k", "9"], "--top-k 9 is larger than --experts 8"),
    (["--capacity-factor", "-1"], "argument --capacity-factor: expected a positive number"),
    (["--backend", "nccl"], "argument --backend: invalid choice: 'nccl'"),
    (["--process-id", "1"], "--num-processes and --process-id go with --coordinator"),
    (["--coordinator", "localhost"], "--coordinator must be HOST:PORT"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
     "--process-id 2 must be below --num-processes 2"),
])
def test_bad_flags_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: python -m jax_ep.demo" in err and message in err, err


def test_flags_read_in_either_spelling():
    hyphen = demo.parse_args(["--top-k", "3", "--seq-len=8", "--capacity-factor", "1.5"])
    underscore = demo.parse_args(["--top_k", "3", "--seq_len=8", "--capacity_factor", "1.5"])
    assert vars(hyphen) == vars(underscore)
    assert (hyphen.top_k, hyphen.seq_len, hyphen.capacity_factor) == (3, 8, 1.5)
