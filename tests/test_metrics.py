"""FID, IS and CLIP score against reference computations, with tiny models built from config."""

import numpy as np
import pytest
import torch
from PIL import Image

from bksdm_lab.evaluation import metrics


def reference_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's formula: tr sqrt(s1 s2) from scipy's sqrtm if installed, else the eigenvalues of s1 s2."""
    diff = mu1 - mu2
    try:
        from scipy import linalg

        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        tr_covmean = np.trace(covmean.real if np.iscomplexobj(covmean) else covmean)
    except ImportError:
        eig = np.linalg.eigvals(sigma1 @ sigma2)  # s1 s2 is similar to a PSD matrix: real, >= 0 up to round-off
        tr_covmean = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


@pytest.fixture(scope="module")
def feature_sets():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 24)) @ rng.normal(size=(24, 24))
    b = rng.normal(loc=0.3, size=(300, 24)) @ rng.normal(size=(24, 24)) * 0.8
    return a, b


def test_feature_stats_are_numpys_mean_and_cov_in_any_batching(feature_sets):
    a, _ = feature_sets
    whole = metrics.FeatureStats.from_features(torch.from_numpy(a).float())
    batched = metrics.FeatureStats()
    for chunk in np.array_split(a.astype(np.float32), 7):
        batched.update(chunk)
    a32 = a.astype(np.float32).astype(np.float64)
    for stats in (whole, batched):
        assert stats.n == len(a)
        np.testing.assert_allclose(stats.mu, a32.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stats.sigma, np.cov(a32, rowvar=False), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="width"):
        batched.update(np.zeros((2, 5)))


def test_fid_of_a_set_against_itself_is_zero(feature_sets):
    a, _ = feature_sets
    stats = metrics.FeatureStats.from_features(a)
    fid = metrics.frechet_distance(stats.mu, stats.sigma, stats.mu, stats.sigma)
    assert abs(fid) < 1e-6 * np.trace(stats.sigma)


def test_fid_between_sets_matches_the_reference_computation(feature_sets):
    a, b = feature_sets
    sa, sb = metrics.FeatureStats.from_features(a), metrics.FeatureStats.from_features(b)
    ours = metrics.frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    ref = reference_frechet(np.mean(a, 0), np.cov(a, rowvar=False), np.mean(b, 0), np.cov(b, rowvar=False))
    assert ours > 1
    assert ours == pytest.approx(ref, rel=1e-6)
    assert metrics.frechet_distance(sb.mu, sb.sigma, sa.mu, sa.sigma) == pytest.approx(ours, rel=1e-9)


def test_fid_with_singular_covariances_is_finite():
    rng = np.random.default_rng(1)
    few = metrics.FeatureStats.from_features(rng.normal(size=(5, 32)))  # rank 4 < 32
    other = metrics.FeatureStats.from_features(rng.normal(size=(6, 32)))
    fid = metrics.frechet_distance(few.mu, few.sigma, other.mu, other.sigma)
    assert np.isfinite(fid) and fid > 0
    assert abs(metrics.frechet_distance(few.mu, few.sigma, few.mu, few.sigma)) < 1e-6 * np.trace(few.sigma)


def test_stats_npz_round_trip_gives_the_same_fid(feature_sets, tmp_path):
    a, b = feature_sets
    sa, sb = metrics.FeatureStats.from_features(a), metrics.FeatureStats.from_features(b)
    path = metrics.save_stats(tmp_path / "ref.npz", sb.mu, sb.sigma)
    with np.load(path) as data:  # the pytorch-fid layout
        assert sorted(data.files) == ["mu", "sigma"]
        assert data["mu"].shape == (24,) and data["sigma"].shape == (24, 24)
    mu, sigma = metrics.load_stats(path)
    assert metrics.frechet_distance(sa.mu, sa.sigma, mu, sigma) == metrics.frechet_distance(
        sa.mu, sa.sigma, sb.mu, sb.sigma
    )
    odd = metrics.save_stats(tmp_path / "stats.bin", sb.mu, sb.sigma)
    assert odd.is_file() and not (tmp_path / "stats.bin.npz").exists()
    np.savez(tmp_path / "bad.npz", m=sb.mu)
    with pytest.raises(ValueError, match="not FID statistics"):
        metrics.load_stats(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        metrics.load_stats(tmp_path / "none.npz")


def test_inception_score():
    assert metrics.inception_score(torch.zeros(20, 7)) == pytest.approx((1.0, 0.0))  # uniform logits
    assert metrics.inception_score(torch.full((20, 7), 1 / 7))[0] == pytest.approx(1.0)  # uniform probabilities
    # confident and all different: IS = the number of classes (within a split)
    one_hot = torch.eye(8)
    assert metrics.inception_score(one_hot, splits=1)[0] == pytest.approx(8.0)
    assert metrics.inception_score(one_hot * 1e4, splits=1)[0] == pytest.approx(8.0)  # logits
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 10)) * 3
    mean, std = metrics.inception_score(logits, splits=5)
    p = torch.tensor(logits).softmax(1).numpy()[np.random.RandomState(2020).permutation(50)]
    scores = []
    for chunk in np.array_split(p, 5):
        q = chunk.mean(0, keepdims=True)
        scores.append(np.exp((chunk * (np.log(chunk) - np.log(q))).sum(1).mean()))
    assert (mean, std) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-9)


def test_clip_score_is_the_mean_cosine_similarity():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(6, 16)), rng.normal(size=(6, 16))
    by_hand = np.mean([i @ t / np.linalg.norm(i) / np.linalg.norm(t) for i, t in zip(img, txt)])
    assert metrics.clip_score(img, txt) == pytest.approx(by_hand, rel=1e-12)
    assert metrics.clip_score(img, 3 * img) == pytest.approx(1.0)


def _features(output) -> torch.Tensor:
    """get_*_features: a tensor in transformers 4, an output object (pooler_output) in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def test_clip_score_of_the_tiny_clip_model_matches_get_features_by_hand():
    clip = metrics.demo_clip()
    images = [
        Image.new("RGB", (48, 40), (200, 30, 30)),
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)),
        Image.new("RGB", (32, 32), (20, 20, 220)),
    ]
    texts = ["a red square", "noise", "a blue background"]
    score = metrics.clip_score(clip.encode_images(images), clip.encode_texts(texts))

    model, tokenizer = clip.model, clip.tokenizer
    pixels = metrics.clip_preprocess(images, model.config.vision_config.image_size)
    assert pixels.shape == (3, 3, 32, 32)
    tokens = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        img = _features(model.get_image_features(pixel_values=pixels)).numpy().astype(np.float64)
        txt = _features(
            model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        ).numpy()
    assert img.shape == txt.shape == (3, model.config.projection_dim)
    cos = [i @ t / (np.linalg.norm(i) * np.linalg.norm(t)) for i, t in zip(img, txt)]
    assert score == pytest.approx(float(np.mean(cos)), rel=1e-5)
    assert metrics.demo_clip().encode_texts(texts).equal(clip.encode_texts(texts))  # built deterministically


def test_demo_extractor_is_deterministic_and_takes_any_size():
    images = torch.randint(0, 256, (3, 3, 40, 56), dtype=torch.uint8)
    feats, logits = metrics.extract_features(metrics.demo_extractor(), images)
    feats2, logits2 = metrics.extract_features(metrics.demo_extractor(), images)
    assert feats.shape == (3, 32) and logits.shape == (3, 10)
    assert torch.equal(feats, feats2) and torch.equal(logits, logits2)
    assert metrics.split_features(feats) == (feats, None)


def test_paper_models_need_the_eval_extra():
    for module, build in (("torch_fidelity", metrics.inception_extractor), ("open_clip", metrics.open_clip_model)):
        try:
            __import__(module)
        except ImportError:
            with pytest.raises(metrics.MissingEvalDependency, match=r'pip install -e "\.\[eval\]"'):
                build()
    with pytest.raises(ValueError, match="unknown feature extractor"):
        metrics.check_available("resnet")
    with pytest.raises(ValueError, match="unknown CLIP"):
        metrics.check_available(clip="siglip")
    metrics.check_available("demo", "demo")
