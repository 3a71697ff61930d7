"""Privacy accounting for DP-SGD: the ``(epsilon, delta)`` that a run of :func:`mnet.clipped_value_and_grad` and
:func:`mnet.dp_noise` spends, from Google's ``dp-accounting`` (the ``dp`` extra) rather than an accountant of
mnet's own.

One step of DP-SGD under Poisson sampling is the sampled Gaussian mechanism: each example joins the batch with
probability ``q`` (the sample rate, ``batch_size / examples``), and the sum of clipped gradients gets Gaussian noise
of standard deviation ``sigma * C``. A run is that event composed ``steps`` times. Two accountants bound its
epsilon at a given delta: ``"rdp"`` (Renyi DP, Mironov 2017; Abadi et al.'s moments accountant in its modern form)
and ``"pld"`` (privacy loss distributions, tighter, the default). Both assume the add-or-remove-one neighbouring
relation and Poisson sampling: shuffled fixed-size batches are not covered by this bound (train with
``fit(sampling="poisson")``).
"""

from __future__ import annotations

import math

from mnet.errors import SettingError

ACCOUNTANTS = ("pld", "rdp")

#: A Poisson-sampled batch holds at most this many standard deviations above its mean; beyond, a random subset is
#: kept (truncated Poisson sampling, which the PLD accountant accounts for exactly). Five standard deviations leave
#: about 3e-7 of the steps truncated.
CAPACITY_DEVIATIONS = 5


def poisson_capacity(examples: int, batch_size: int) -> int:
    """The fixed size of a Poisson-sampled batch's buffer: ``batch_size + 5 sqrt(batch_size)`` rounded up (at most
    ``examples``). Each step draws ``Binomial(examples, batch_size / examples)`` examples; the rare excess is cut to
    a random subset."""
    return min(examples, batch_size + math.ceil(CAPACITY_DEVIATIONS * math.sqrt(batch_size)))


def dp_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    *,
    accountant: str = "pld",
    examples: int | None = None,
) -> float:
    """The epsilon that ``steps`` steps of DP-SGD spend at ``delta``.

    ``examples`` given: the steps are those of ``fit(sampling="poisson")``, whose batches are truncated to
    :func:`poisson_capacity` (``batch_size = sample_rate * examples``), and the PLD accountant counts the truncation.
    Without it, untruncated Poisson sampling.

    Arguments:
        noise_multiplier: ``sigma``, the noise's standard deviation in units of the clip norm (as :func:`mnet.dp_noise`).
        sample_rate: ``q``, each example's probability of joining a batch (``batch_size / examples``), in (0, 1].
        steps: the number of noisy steps taken.
        delta: the delta of the ``(epsilon, delta)`` guarantee, in (0, 1).
        accountant: ``"pld"`` (privacy loss distributions; the tighter) or ``"rdp"`` (Renyi DP; not with
            ``examples``, which it cannot account for).
        examples: the training set's size, for the truncated batches of ``fit(sampling="poisson")``.

    Returns:
        epsilon (``inf`` for ``noise_multiplier=0``: no noise, no privacy; 0 for no steps).

    Raises:
        SettingError: an argument out of range, or the ``dp-accounting`` package missing (``pip install 'mnet[dp]'``).
    """
    _check(noise_multiplier, sample_rate, steps, delta, accountant)
    if examples is not None and not (isinstance(examples, int) and examples > 0):
        raise SettingError(f"dp_epsilon: examples must be a positive int, got {examples!r}")
    if examples is not None and accountant != "pld":
        raise SettingError('dp_epsilon: truncated Poisson sampling (examples=) is accounted by accountant="pld" only')
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    try:
        import dp_accounting  # deferred: the optional dp extra, and a second to import
    except ImportError:
        raise SettingError("dp_epsilon needs the dp-accounting package: pip install 'mnet[dp]'") from None
    if examples is None:
        step = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    else:
        capacity = poisson_capacity(examples, max(1, round(sample_rate * examples)))
        step = dp_accounting.TruncatedSubsampledGaussianDpEvent(examples, sample_rate, capacity, noise_multiplier)
    event = dp_accounting.SelfComposedDpEvent(step, steps)
    ledger = dp_accounting.pld.PLDAccountant() if accountant == "pld" else dp_accounting.rdp.RdpAccountant()
    ledger.compose(event)
    return float(ledger.get_epsilon(delta))


def _check(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> None:
    if not (isinstance(noise_multiplier, int | float) and 0 <= noise_multiplier < math.inf):
        raise SettingError(f"dp_epsilon: noise_multiplier must be a number >= 0, got {noise_multiplier!r}")
    if not (isinstance(sample_rate, int | float) and 0 < sample_rate <= 1):
        raise SettingError(f"dp_epsilon: sample_rate must be in (0, 1], got {sample_rate!r}")
    if not (isinstance(steps, int) and steps >= 0):
        raise SettingError(f"dp_epsilon: steps must be an int >= 0, got {steps!r}")
    if not (isinstance(delta, int | float) and 0 < delta < 1):
        raise SettingError(f"dp_epsilon: delta must be in (0, 1), got {delta!r}")
    if accountant not in ACCOUNTANTS:
        raise SettingError(f"dp_epsilon: accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
