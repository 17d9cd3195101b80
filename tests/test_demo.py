"""The demo (python -m jax_ep.demo) trains: a few steps of a tiny model lower the loss and
write the plot; --help lists the flags the README promises."""

import pytest

from jax_ep import demo

TINY = ["--steps", "25", "--batch", "8", "--seq_len", "16", "--d_model", "32", "--heads", "2",
        "--layers", "1", "--ffn", "32", "--experts", "8", "--top_k", "2", "--lr", "2e-2",
        "--log_every", "5"]


@pytest.mark.parametrize("framework,extra", [("flax", []),
                                              ("equinox", ["--ep", "4", "--shared_ffn", "8"])])
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


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--steps", "--experts", "--top_k", "--backend", "--layers", "--plot",
                 "--framework", "--ep"):
        assert flag in text
