"""The influence and spectrum experiments' ``--quick`` runs: every figure written, every number in its range, and
the rankings' summaries consistent with their curves."""

import jax.numpy as jnp
import numpy as np

from tests.helpers import load_experiment


def test_mislabeled_digits_quick(tmp_path):
    results = load_experiment("mislabeled_digits").main(["--quick", "--out", str(tmp_path)])
    assert results["flipped"] == 20 and results["n"] == 200
    assert set(results["rankings"]) == {"training loss", "ekfac", "kfac", "diag", "identity", "ggn"}
    for ranking in results["rankings"].values():
        assert 0.0 <= ranking["auc"] <= 1.0
        curve = ranking["curve"]
        assert np.all(np.diff(curve) >= 0) and curve[-1] == 1.0
        assert ranking["found"] == sorted(ranking["found"])
    assert results["top"].helpful.shape == (4, 4)
    for name in ("mislabeled_digits.png", "influential_digits.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_auc_and_found_curve_on_known_orders():
    module = load_experiment("mislabeled_digits")
    positive = np.array([True, False, True, False])
    assert module.auc(np.array([4.0, 1.0, 3.0, 2.0]), positive) == 1.0
    assert module.auc(np.array([1.0, 4.0, 2.0, 3.0]), positive) == 0.0
    assert module.auc(np.array([1.0, 1.0, 1.0, 1.0]), positive) == 0.5
    np.testing.assert_allclose(module.found_curve(np.array([4.0, 1.0, 3.0, 2.0]), positive), [0.5, 1, 1, 1])
    labels, flipped = module.flip_labels(np.arange(100) % 10, 0.1, 10, np.random.default_rng(0))
    assert flipped.sum() == 10 and np.all((labels != np.arange(100) % 10) == flipped)


def test_influence_lds_quick(tmp_path):
    module = load_experiment("influence_lds")
    results = module.main(["--quick", "--out", str(tmp_path)])
    assert set(results["lds"]) == {"ekfac", "kfac", "diag", "identity", "ggn"}
    for entry in results["lds"].values():
        assert np.all(np.abs(entry["per_query"]) <= 1 + 1e-12) and entry["predicted"].shape == (6, 8)
    assert results["measured"].shape == (6, 8) and np.all(np.isfinite(results["measured"]))
    np.testing.assert_allclose(module.spearman(np.array([[1.0, 2, 3, 4]]), np.array([[10.0, 20, 30, 40]])), [1.0])
    np.testing.assert_allclose(module.spearman(np.array([[1.0, 2, 3, 4]]), np.array([[4.0, 3, 2, 1]])), [-1.0])
    assert (tmp_path / "influence_lds.png").stat().st_size > 10_000


def test_spectrum_quick(tmp_path):
    results = load_experiment("spectrum").main(["--quick", "--out", str(tmp_path)])
    assert set(results) == {"MLP 64-64-10", "CNN"}
    for snapshots in results.values():
        assert sorted(snapshots) == [0, 1, 2]
        for found in snapshots.values():
            for r in found.values():
                density = r["density"]
                np.testing.assert_allclose(jnp.trapezoid(density.density, density.grid), 1.0, rtol=1e-4)
                assert np.all(np.diff(r["top"]) <= 0) and np.isfinite(r["trace"])
    assert (tmp_path / "spectrum.png").stat().st_size > 10_000
