"""Centroid privacy math (semla.registry.privacy): Gaussian calibration, noise, composition, floor."""

from __future__ import annotations

import math

import numpy as np
import pytest

from semla.registry import privacy
from semla.schemas.errors import InvalidInputError, TooFewSamplesError


# -- calibration ----------------------------------------------------------------------------------
@pytest.mark.parametrize("epsilon", [0.1, 0.5, 1.0, 4.0, 8.0, 30.0])
@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-9])
def test_analytic_sigma_is_the_tight_solution(epsilon, delta):
    sigma = privacy.analytic_gaussian_sigma(epsilon, delta)
    assert privacy.gaussian_delta(sigma, epsilon) <= delta  # private
    assert privacy.gaussian_delta(sigma * 0.999, epsilon) > delta  # and no more noise than needed


def test_analytic_sigma_known_value_and_scaling():
    # Balle & Wang (2018): for eps = 1, delta = 1e-5 the analytic mechanism needs sigma ~ 3.73
    # where the classic bound would use 4.84 (and the classic bound is not even valid at eps = 1).
    assert privacy.analytic_gaussian_sigma(1.0, 1e-5) == pytest.approx(3.7306, abs=1e-3)
    one = privacy.analytic_gaussian_sigma(2.0, 1e-6)
    assert privacy.analytic_gaussian_sigma(2.0, 1e-6, sensitivity=3.0) == pytest.approx(3 * one, rel=1e-9)
    assert privacy.analytic_gaussian_sigma(math.inf, 1e-5) == 0.0


@pytest.mark.parametrize("epsilon", [0.05, 0.3, 0.9])
def test_analytic_beats_the_classic_bound_where_that_holds(epsilon):
    classic = privacy.classic_gaussian_sigma(epsilon, 1e-5)
    assert classic == pytest.approx(math.sqrt(2 * math.log(1.25e5)) / epsilon)
    assert privacy.gaussian_delta(classic, epsilon) <= 1e-5  # the classic bound is private
    assert privacy.analytic_gaussian_sigma(epsilon, 1e-5) < classic


@pytest.mark.parametrize(("call", "fragment"), [
    (lambda: privacy.classic_gaussian_sigma(1.0, 1e-5), "epsilon < 1"),
    (lambda: privacy.analytic_gaussian_sigma(0.0, 1e-5), "epsilon"),
    (lambda: privacy.analytic_gaussian_sigma(-1.0, 1e-5), "epsilon"),
    (lambda: privacy.analytic_gaussian_sigma(1.0, 0.0), "delta"),
    (lambda: privacy.analytic_gaussian_sigma(1.0, 1.0), "delta"),
    (lambda: privacy.split_budget(1.0, 1e-5, sum_share=1.0), "sum_share"),
    (lambda: privacy.noisy_sum_count(np.ones(3), 3, 1.0, clip_norm=0.0), "clip_norm"),
    (lambda: privacy.dp_centroid(np.zeros((0, 4)), 1.0), "non-empty"),
])
def test_bad_budgets_are_refused(call, fragment):
    with pytest.raises(InvalidInputError, match=fragment):
        call()


# -- the release ----------------------------------------------------------------------------------
def test_noise_has_the_calibrated_scale():
    dim = 20_000
    release = privacy.noisy_sum_count(np.zeros(dim), 100, epsilon=2.0, delta=1e-5, rng=0)
    for_sum, for_count = privacy.split_budget(2.0, 1e-5)
    assert release.sigma_sum == privacy.analytic_gaussian_sigma(for_sum.epsilon, for_sum.delta, 1.0)
    assert release.sigma_count == privacy.analytic_gaussian_sigma(for_count.epsilon, for_count.delta, 1.0)
    assert np.std(release.sum) == pytest.approx(release.sigma_sum, rel=0.03)
    assert abs(np.mean(release.sum)) < 4 * release.sigma_sum / math.sqrt(dim)
    counts = [privacy.noisy_sum_count(np.zeros(1), 100, 2.0, rng=s).count for s in range(2000)]
    assert np.std(counts) == pytest.approx(release.sigma_count, rel=0.06)
    assert np.mean(counts) == pytest.approx(100, abs=4 * release.sigma_count / math.sqrt(2000))


def test_sum_noise_scales_with_the_clip_norm():
    small = privacy.noisy_sum_count(np.zeros(4), 10, 1.0, clip_norm=1.0, rng=0)
    large = privacy.noisy_sum_count(np.zeros(4), 10, 1.0, clip_norm=2.5, rng=0)
    assert large.sigma_sum == pytest.approx(2.5 * small.sigma_sum)
    assert large.sigma_count == small.sigma_count  # the count's sensitivity stays 1


def test_same_seed_same_release_other_seed_other_release():
    x = np.random.default_rng(5).standard_normal((60, 32))
    a, b = privacy.dp_centroid(x, 4.0, rng=11), privacy.dp_centroid(x, 4.0, rng=11)
    assert np.array_equal(a.sum, b.sum) and a.count == b.count
    c = privacy.dp_centroid(x, 4.0, rng=12)
    assert not np.array_equal(a.sum, c.sum)
    gen = np.random.default_rng(11)  # a Generator works too, and advances
    first, second = privacy.dp_centroid(x, 4.0, rng=gen), privacy.dp_centroid(x, 4.0, rng=gen)
    assert np.array_equal(first.sum, a.sum) and not np.array_equal(second.sum, a.sum)


def test_the_two_releases_compose_to_the_requested_budget():
    epsilon, delta = 3.0, 1e-6
    for_sum, for_count = privacy.split_budget(epsilon, delta, sum_share=0.7)
    assert privacy.compose(for_sum, for_count) == pytest.approx(privacy.Budget(epsilon, delta))
    release = privacy.noisy_sum_count(np.zeros(8), 70, epsilon, delta, sum_share=0.7, rng=1)
    assert (release.epsilon, release.delta) == (epsilon, delta)
    # each release is private at its own share (its privacy profile stays under its delta) ...
    assert privacy.gaussian_delta(release.sigma_sum, for_sum.epsilon) <= for_sum.delta
    assert privacy.gaussian_delta(release.sigma_count, for_count.epsilon) <= for_count.delta
    # ... so the pair is (eps, delta)-DP; spending the whole budget on one part would need less noise
    assert release.sigma_sum > privacy.analytic_gaussian_sigma(epsilon, delta)


def test_rows_are_clipped_to_the_norm_bound():
    x = np.array([[3.0, 4.0], [0.6, 0.8], [0.0, 0.5]])
    clipped = privacy.clip_rows(x, 1.0)
    assert np.linalg.norm(clipped, axis=1) == pytest.approx([1.0, 1.0, 0.5])
    assert clipped[0] == pytest.approx([0.6, 0.8])
    # an oversized row cannot move the released sum by more than the clip norm
    exact = privacy.dp_centroid(x, math.inf)
    assert exact.sum == pytest.approx([1.2, 2.1]) and exact.count == 3


def test_infinite_epsilon_is_the_exact_normalised_mean():
    x = np.random.default_rng(2).standard_normal((50, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    release = privacy.dp_centroid(x, math.inf)
    mean = x.mean(0) / np.linalg.norm(x.mean(0))
    assert release.centroid == pytest.approx(mean, abs=1e-6)
    assert (release.sigma_sum, release.sigma_count, release.count) == (0.0, 0.0, 50.0)


def test_more_samples_give_a_closer_centroid_at_the_same_epsilon():
    rng = np.random.default_rng(3)
    direction = rng.standard_normal(64)
    direction /= np.linalg.norm(direction)

    def cosine(n: int) -> float:
        x = direction + 0.3 * rng.standard_normal((n, 64))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        exact = privacy.dp_centroid(x, math.inf).centroid
        return float(np.mean([privacy.dp_centroid(x, 1.0, rng=s).centroid @ exact for s in range(20)]))

    assert cosine(50) < cosine(1000) and cosine(1000) > 0.99


def test_published_count_and_the_floor():
    assert privacy.published_count(63.4, 50) == 63
    assert privacy.published_count(41.0, 50) == 50
    privacy.check_min_samples(50, 50)
    with pytest.raises(TooFewSamplesError, match="49 samples; at least 50") as info:
        privacy.check_min_samples(49, 50)
    assert info.value.code == "too_few_samples"


# -- where the rules apply: training and signing --------------------------------------------------
def test_training_with_dp_records_the_mechanism_and_noises_the_centroid(fog_data, tiny_base, tmp_path):
    from semla.registry.train import TrainConfig, train_adapter
    from semla.schemas import Privacy

    def train(out: str, **dp):
        return train_adapter(fog_data, tmp_path / out, "fog", TrainConfig(steps=1, **dp), base=tiny_base,
                             progress=False)

    plain, noisy, again = train("plain"), train("dp", dp_epsilon=4.0, dp_seed=1), train("again", dp_epsilon=4.0, dp_seed=1)

    assert plain.privacy == Privacy(mechanism="none", min_samples=50) and plain.sample_count == 50
    assert noisy.privacy == Privacy(mechanism="gaussian", epsilon=4.0, delta=1e-5, clip_norm=1.0, min_samples=50)
    assert noisy.sample_count >= 50  # the noisy count, never below the minimum
    exact, private = np.asarray(plain.centroids.vectors[0]), np.asarray(noisy.centroids.vectors[0])
    assert np.linalg.norm(private) == pytest.approx(1.0, abs=1e-5)
    assert 0.3 < float(exact @ private) < 0.999999  # near the true centroid, but not it
    assert again.centroids == noisy.centroids and again.sample_count == noisy.sample_count
    assert noisy.training.seed == 0  # the published seed is not the noise seed


@pytest.mark.parametrize(("settings", "fragment"), [
    ({"dp_epsilon": 1.0, "centroids": 2}, "k-means"),
    ({"dp_epsilon": 0.0}, "dp_epsilon"),
    ({"dp_epsilon": math.inf}, "dp_epsilon"),
    ({"dp_epsilon": 1.0, "dp_delta": 1.5}, "dp_delta"),
])
def test_bad_dp_training_settings_are_refused(settings, fragment):
    from semla.registry.train import TrainConfig

    with pytest.raises(InvalidInputError, match=fragment):
        TrainConfig(**settings)


def test_training_refuses_fewer_images_than_the_minimum(fog_data, tiny_base, tmp_path):
    from semla.registry.train import TrainConfig, train_adapter

    with pytest.raises(InvalidInputError, match="holds 50 images; at least 60 are required"):
        train_adapter(fog_data, tmp_path / "b", "fog", TrainConfig(steps=1, min_samples=60), base=tiny_base,
                      progress=False)
    assert not (tmp_path / "b").exists()


def test_signing_refuses_a_centroid_below_the_floor(tmp_path):
    import bundle_factory

    from semla.registry import keys
    from semla.registry.bundle import sign_bundle, write_bundle
    from semla.schemas import SIGNATURE_FILE

    out = tmp_path / "small"
    write_bundle(out, weights=bundle_factory.lora_weights(), adapter_config=bundle_factory.adapter_config(),
                 manifest_fields=bundle_factory.manifest_fields(
                     sample_count=20, privacy={"mechanism": "none", "min_samples": 10}))
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    with pytest.raises(TooFewSamplesError, match="20 samples; at least 50"):
        sign_bundle(out, keys.generate_key(), min_samples=50)
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before
    assert not (out / SIGNATURE_FILE).exists()
    assert sign_bundle(out, keys.generate_key(), min_samples=10).sample_count == 20  # a lower floor, on purpose
