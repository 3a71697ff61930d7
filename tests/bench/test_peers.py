"""``mnet bench --peers``: every installed contender computes mnet's quantity on identical weights (BackPACK,
curvlinops, Opacus and torch.func where installed; JAX's autodiff always), a sampled quantity's many-draw estimate
lands near the exact one in every framework, and an absent peer is skipped with its reason."""

import json

import numpy as np
import pytest

from mnet.bench import peer_quantities, peers, versus
from tests.helpers import load_experiment, run_mnet

#: Relative error over a leaf, float32: sums of a few thousand terms in different orders (4.8e-7 the most seen).
FLOAT32 = 1e-5
#: A sampled quantity's 256-draw estimate against the exact one: 0.06 to 0.07 measured in every framework; a wrong
#: scale (the batch mean against the sum, a missing 1/sqrt(draws)) is an error of 0.5 or more.
SAMPLED = 0.25
AVAILABLE = peers.availability()
#: The peers each row compares, where they are installed.
ROW_PEERS = {
    "P1": {"torch autograd", "BackPACK", "curvlinops", "Opacus", "torch.func"},
    "P2": {"torch autograd", "BackPACK"},
    "P3": {"torch autograd", "BackPACK", "Opacus", "torch.func"},
}


def row_problem(row, available):
    if row == "P1":
        problem = peers.mlp_problem([30, 16, 12, 5], 6)
        return problem, peer_quantities.mlp_quantities(problem, available)
    if row == "P2":
        problem = peers.mlp_problem([30, 16, 5], 6, "tanh")
        return problem, peer_quantities.tanh_quantities(problem, available)
    problem = peers.cnn_problem(3, (2, 3))
    return problem, peer_quantities.cnn_quantities(problem, available)


@pytest.mark.parametrize("row", ["P1", "P2", "P3"])
def test_every_installed_contender_agrees_with_mnet(row):
    if row == "P3" and not peer_quantities.installed(AVAILABLE, "torch"):
        pytest.skip(f"the CNN row builds its CNN in PyTorch: torch {AVAILABLE['torch']}")
    problem, quantities = row_problem(row, AVAILABLE)
    contenders, agreement = versus.checked(problem, quantities, AVAILABLE)
    assert set(agreement) == set(contenders)
    for name, error in agreement.items():
        quantity = name.split(" · ")[0]
        assert error < (SAMPLED if quantity in peer_quantities.EXACT_OF else FLOAT32), (name, error)
    # every quantity of the row has mnet's contender, and JAX's autodiff wherever it has a way to the number
    assert {name.split(" · ")[0] for name in contenders} == {"gradient", *quantities}
    assert all(f"{quantity} · mnet" in contenders for quantity in quantities)
    assert "gradient · jax.grad" in contenders
    for peer in ROW_PEERS[row]:
        module = "torch" if peer == "torch autograd" else peer
        assert any(peer in name for name in contenders) == peer_quantities.installed(AVAILABLE, module), peer


def test_a_sampled_contender_is_checked_by_its_many_draws_and_timed_with_one():
    problem = peers.mlp_problem([30, 16, 5], 6)
    contenders, agreement = versus.checked(problem, peer_quantities.mlp_quantities(problem, AVAILABLE), AVAILABLE)
    framework, mnet_mc = contenders["diag GGN MC(1) · mnet"]
    exact = contenders["diag GGN exact · mnet"][1]
    one_draw = versus.relative_error(mnet_mc.convert(mnet_mc.call()), exact.convert(exact.call()))
    assert framework == "mnet" and agreement["diag GGN MC(1) · mnet"] < SAMPLED < one_draw


def test_relative_error_is_per_leaf():
    small, large = np.ones(2), 1e6 * np.ones(3)
    assert versus.relative_error([small * 1.5, large], [small, large]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shape"):
        versus.relative_error([np.ones(3)], [np.ones(2)])


def test_absent_peers_are_skipped_with_their_reason(monkeypatch):
    """With every PyTorch peer absent, P1 and P2 run with mnet and JAX's autodiff alone (built in mnet when torch is
    absent too), the reasons are in the result and the table, and P3 (its CNN built in PyTorch) is not offered."""
    skipped = {peer: f"skipped: {peer} cannot be imported (ImportError: test)" for peer in peers.PEER_MODULES}
    problem = peers.mnet_only([30, 16, 5], 6, "relu", 0)
    contenders, agreement = versus.checked(problem, peer_quantities.mlp_quantities(problem, skipped), skipped)
    assert {framework for framework, _ in contenders.values()} == {"mnet", "jax"}
    assert all(
        error < (SAMPLED if name.split(" · ")[0] in peer_quantities.EXACT_OF else FLOAT32)
        for name, error in agreement.items()
    )
    monkeypatch.setattr(peers, "availability", lambda: skipped)
    result = run_mnet("bench", "--quick", "--peers", "--rows", "P1,P2", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout.strip().splitlines()[-1])["rows"]}
    assert set(rows) == {"P1", "P2"} and rows["P1"]["extra"]["peers"] == skipped
    assert all(row["extra"]["frameworks"][name] in ("mnet", "jax") for row in rows.values() for name in row["seconds"])
    assert all(seconds > 0 for row in rows.values() for seconds in row["seconds"].values())
    markdown = versus.markdown_table(rows["P2"]).splitlines()
    assert markdown[0] == "| quantity | mnet | autodiff in JAX | PyTorch peers |"
    assert (
        markdown[2].startswith("| gradient | ") and " g) | jax.grad " in markdown[2] and markdown[2].endswith(" | - |")
    )
    assert markdown[3].startswith("| diag Hessian | ") and markdown[3].endswith(" | - | - |")
    # a quantity with two mnet contenders names the second: one_pass's line holds "three calls" beside it
    together = next(line for line in versus.markdown_table(rows["P1"]).splitlines() if "together" in line)
    mnet_cell = together.split(" | ")[1]
    assert mnet_cell.count(" ms (") == 2 and "; three calls " in mnet_cell and not mnet_cell.startswith("three")
    table = run_mnet("bench", "--quick", "--peers", "--rows", "P2")
    assert table.returncode == 0 and "BackPACK skipped: BackPACK cannot be imported" in table.stdout
    refused = run_mnet("bench", "--quick", "--peers", "--rows", "P3")
    assert refused.returncode == 2 and "P3" in refused.stderr and refused.stderr.count("\n") == 1


def test_peer_rows_need_the_flag():
    result = run_mnet("bench", "--quick", "--rows", "P1")
    assert result.returncode == 2 and "need --peers" in result.stderr and result.stderr.count("\n") == 1


def test_peer_scaling_quick(tmp_path):
    """The scaling experiment's smoke test: every followed contender of the installed peers in every configuration,
    each a positive multiple of its framework's gradient, the JSON and the figure written."""
    results = load_experiment("peer_scaling").main(["--quick", "--out", str(tmp_path)])
    expected = {
        f"{quantity} · {contender}"
        for quantity, followed in load_experiment("peer_scaling").FOLLOWED.items()
        for contender in followed
        if contender in ("mnet", "jax.jvp + jax.vjp", "jax.jvp of jax.grad")
        or peer_quantities.installed(AVAILABLE, contender.split()[0])
    }
    for sweep in ("batch", "width", "depth"):
        assert len(results["sweeps"][sweep]) == 2
        for configuration in results["sweeps"][sweep].values():
            assert set(configuration["multiples"]) == expected
            assert all(m > 0 for m in configuration["multiples"].values())
            assert all(s > 0 for s in configuration["gradient_seconds"].values())
    assert json.loads((tmp_path / "peer_scaling.json").read_text())["sweeps"].keys() == {"batch", "width", "depth"}
    assert (tmp_path / "peer_scaling.png").stat().st_size > 10_000
