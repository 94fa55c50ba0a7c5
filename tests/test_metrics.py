"""FID, IS and KID (torchmetrics) and the CLIP score against reference computations, with tiny models from config."""

import numpy as np
import pytest
import torch
from PIL import Image

from bksdm_lab.evaluation import metrics
from bksdm_lab.evaluation.evaluate import compute_stats, score_images


# ---- reference implementations: the previous hand-written FID and IS (scipy is not installed: no sqrtm) --------
def reference_frechet(features_1, features_2) -> float:
    """pytorch-fid's formula from ``np.mean`` / ``np.cov``; ``tr sqrt(s1 s2)`` as ``tr sqrt(sqrt(s1) s2 sqrt(s1))``
    (same eigenvalues, but of a symmetric PSD matrix) by symmetric eigendecompositions, all in float64."""
    a, b = np.asarray(features_1, np.float64), np.asarray(features_2, np.float64)
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    vals, vecs = np.linalg.eigh(s1)
    root1 = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    inner = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def reference_inception_score(logits, splits: int) -> tuple[float, float]:
    """torch-fidelity's IS: rows shuffled with RandomState(2020), splits at i * N // splits, np.std over splits."""
    p = torch.as_tensor(logits, dtype=torch.float64).softmax(1).numpy()
    p = p[np.random.RandomState(2020).permutation(len(p))]
    scores = []
    for i in range(splits):
        chunk = p[i * len(p) // splits : (i + 1) * len(p) // splits]
        q = chunk.mean(0, keepdims=True)
        scores.append(np.exp((chunk * (np.log(chunk) - np.log(q))).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ---- data ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def feature_sets():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 24)) @ rng.normal(size=(24, 24))
    b = rng.normal(loc=0.3, size=(300, 24)) @ rng.normal(size=(24, 24)) * 0.8
    return a, b


def image_set(n: int, seed: int, lo: int, hi: int, size: int = 32) -> torch.Tensor:
    """``n`` uint8 images: a random colour in ``lo..hi`` per image and channel, a random stripe pattern, noise."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.randint(lo, hi, (n, 3, 1, 1), generator=g).float()
    freq = torch.randint(1, 6, (n, 1, 1, 1), generator=g).float()
    stripes = torch.sin(torch.arange(size).float().view(1, 1, 1, size) * freq) * 60
    noise = torch.randn(n, 3, size, size, generator=g) * 20
    return (colour + stripes + noise).clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def extractor():
    return metrics.demo_extractor()  # 32-d pool features, 10 logits


@pytest.fixture(scope="module")
def images():
    """Two sets of 96 images (more than the 32 feature dimensions, so the covariances are full rank), dark and light
    (the random demo extractor tells them apart only a little: FID ~4e-3 for a feature covariance trace ~1e-3)."""
    return image_set(96, seed=1, lo=0, hi=120), image_set(96, seed=2, lo=130, hi=256)


def features_of(extractor, images) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        feats, logits = extractor(images)
    return feats.double().numpy(), logits.double().numpy()


# ---- FID ---------------------------------------------------------------------------------------------------
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


def test_torchmetrics_fid_of_images_against_themselves_is_zero(extractor, images):
    real, _ = images
    image_metrics = metrics.ImageMetrics(extractor)
    assert isinstance(image_metrics.fid, metrics.FrechetInceptionDistance)
    assert image_metrics.fid.inception.num_features == 32 and not image_metrics.fid.sync_on_compute
    for batch in real.split(40):  # uneven batches
        image_metrics.update(batch, real=True)
    for batch in real.split(25):
        image_metrics.update(batch, real=False)
    scores = image_metrics.compute()
    assert image_metrics.num_real == image_metrics.num_generated == 96
    assert abs(scores["fid"]) < 1e-3
    stats = image_metrics.generated_stats()
    assert abs(scores["fid"]) < 1e-9 * np.trace(stats.sigma)  # zero up to float64 round-off


def test_torchmetrics_fid_equals_the_previous_implementation(extractor, images):
    real, fake = images
    image_metrics = metrics.ImageMetrics(extractor)
    image_metrics.update(real, real=True)
    for batch in fake.split(30):
        image_metrics.update(batch, real=False)
    ours = image_metrics.compute()["fid"]
    ref = reference_frechet(features_of(extractor, fake)[0], features_of(extractor, real)[0])
    assert ref > np.trace(image_metrics.real_stats().sigma)  # the two sets differ: not a comparison of round-off
    assert ours == pytest.approx(ref, rel=1e-6)
    # the same on plain features, and symmetric
    a, b = features_of(extractor, real)[0], features_of(extractor, fake)[0]
    sa, sb = metrics.FeatureStats.from_features(a), metrics.FeatureStats.from_features(b)
    assert metrics.frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma) == pytest.approx(ref, rel=1e-6)
    assert metrics.frechet_distance(sb.mu, sb.sigma, sa.mu, sa.sigma) == pytest.approx(ref, rel=1e-6)


def test_fid_between_feature_sets_matches_the_reference(feature_sets):
    a, b = feature_sets
    sa, sb = metrics.FeatureStats.from_features(a), metrics.FeatureStats.from_features(b)
    ours = metrics.frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    assert ours > 1
    assert ours == pytest.approx(reference_frechet(a, b), rel=1e-6)
    assert abs(metrics.frechet_distance(sa.mu, sa.sigma, sa.mu, sa.sigma)) < 1e-6 * np.trace(sa.sigma)


def test_fid_with_singular_covariances_is_finite():
    rng = np.random.default_rng(1)
    few = metrics.FeatureStats.from_features(rng.normal(size=(5, 32)))  # rank 4 < 32
    other = metrics.FeatureStats.from_features(rng.normal(size=(6, 32)))
    fid = metrics.frechet_distance(few.mu, few.sigma, other.mu, other.sigma)
    assert np.isfinite(fid) and fid > 0
    # torchmetrics takes sqrt of the eigenvalues of s1 s2 (not symmetric): round-off of the 28 zero ones remains
    assert abs(metrics.frechet_distance(few.mu, few.sigma, few.mu, few.sigma)) < 1e-5 * np.trace(few.sigma)


def test_reference_stats_from_an_npz_give_the_fid_of_the_real_images(extractor, images, tmp_path):
    real, fake = images
    direct = metrics.ImageMetrics(extractor)
    direct.update(real, real=True)
    direct.update(fake, real=False)
    fid = direct.compute()["fid"]

    stats = direct.real_stats()
    path = stats.save(tmp_path / "ref.npz")
    with np.load(path) as data:  # the pytorch-fid layout, plus n
        assert sorted(data.files) == ["mu", "n", "sigma"] and int(data["n"]) == 96
        assert data["mu"].shape == (32,) and data["sigma"].shape == (32, 32)
    loaded = metrics.FeatureStats.load(path)
    assert loaded.n == 96
    from_npz = metrics.ImageMetrics(extractor)
    from_npz.load_reference(path)
    assert int(from_npz.fid.real_features_num_samples) == 96
    torch.testing.assert_close(from_npz.fid.real_features_sum, direct.fid.real_features_sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(from_npz.fid.real_features_cov_sum, direct.fid.real_features_cov_sum)
    from_npz.update(fake, real=False)
    assert from_npz.compute()["fid"] == pytest.approx(fid, rel=1e-9)

    # a pytorch-fid npz has no n: FID depends on mu and sigma only
    no_n = metrics.save_stats(tmp_path / "pytorch_fid.npz", stats.mu, stats.sigma)
    with np.load(no_n) as data:
        assert sorted(data.files) == ["mu", "sigma"]
    assert metrics.FeatureStats.load(no_n).n is None
    assert [a.shape for a in metrics.load_stats(no_n)] == [(32,), (32, 32)]
    without_n = metrics.ImageMetrics(extractor)
    without_n.load_reference(no_n)
    without_n.update(fake, real=False)
    assert without_n.compute()["fid"] == pytest.approx(fid, rel=1e-9)
    # generated images added after a compute() count
    without_n.update(real, real=False)
    assert without_n.compute()["fid"] != pytest.approx(fid, rel=1e-3)

    with pytest.raises(ValueError, match="16-d features but the feature extractor gives 32-d"):
        metrics.ImageMetrics(extractor).load_reference((np.zeros(16), np.eye(16)))
    odd = metrics.save_stats(tmp_path / "stats.bin", stats.mu, stats.sigma)
    assert odd.is_file() and not (tmp_path / "stats.bin.npz").exists()
    np.savez(tmp_path / "bad.npz", m=stats.mu)
    with pytest.raises(ValueError, match="not FID statistics"):
        metrics.load_stats(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        metrics.FeatureStats.load(tmp_path / "none.npz")


def test_a_file_that_is_no_statistics_npz_is_named_in_one_line_never_with_unsafe_advice(tmp_path):
    """Read with allow_pickle=False: a pickle, a text file, a bare array, object arrays, an empty file (all named
    .npz) are each "not a statistics file", and no message suggests loading them unsafely (numpy's would)."""
    import pickle

    files = {"pickled": pickle.dumps({"mu": [0.0], "sigma": [[1.0]]}), "text": b"mu sigma\n", "empty": b""}
    for name, data in files.items():
        (tmp_path / f"{name}.npz").write_bytes(data)
    with (tmp_path / "array.npz").open("wb") as f:
        np.save(f, np.zeros(3))
    np.savez(tmp_path / "objects.npz", mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(1))
    for name in (*files, "array", "objects"):
        path = tmp_path / f"{name}.npz"
        with pytest.raises(ValueError) as err:
            metrics.FeatureStats.load(path)
        assert str(err.value) == (
            f"{path} is not a statistics file written by `python -m bksdm_lab.evaluate stats` (an .npz of mu and sigma)"
        ), name


# ---- KID ---------------------------------------------------------------------------------------------------
def test_kid_of_a_set_against_itself_is_about_zero(extractor, images):
    real, fake = images
    image_metrics = metrics.ImageMetrics(extractor, kid=True, kid_subsets=20, kid_subset_size=64)
    assert isinstance(image_metrics.kid, metrics.KernelInceptionDistance)
    image_metrics.update(real, real=True)
    image_metrics.update(fake, real=False)
    between = image_metrics.compute()
    assert between["kid_subset_size"] == 64 and between["kid"] > 0

    same = metrics.ImageMetrics(extractor, kid=True, kid_subsets=20, kid_subset_size=64)
    same.update(real, real=True)
    same.update(real, real=False)
    itself = same.compute()
    assert abs(itself["kid"]) < 0.02 * between["kid"]  # an unbiased MMD^2 estimate: ~0, either sign
    assert same.compute()["kid"] == itself["kid"]  # subsets drawn from a fixed seed
    feats_real, feats_fake = features_of(extractor, real)[0], features_of(extractor, fake)[0]
    kid, _ = metrics.kernel_inception_distance(feats_real, feats_fake, subsets=20, subset_size=64)
    assert kid == pytest.approx(between["kid"], rel=1e-9)
    # no real images, no KID (mean and covariance are not enough for it)
    assert metrics.ImageMetrics(extractor).compute()["kid"] is None


# ---- IS ----------------------------------------------------------------------------------------------------
def test_inception_score_equals_the_previous_implementation(extractor, images):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 10)) * 3
    assert metrics.inception_score(logits, splits=5) == pytest.approx(reference_inception_score(logits, 5), rel=1e-9)
    assert metrics.inception_score(torch.zeros(20, 7)) == pytest.approx((1.0, 0.0))  # uniform logits
    assert metrics.inception_score(torch.full((20, 7), 1 / 7))[0] == pytest.approx(1.0)  # uniform probabilities
    one_hot = torch.eye(8)  # confident and all different: IS = the number of classes (within a split)
    assert metrics.inception_score(one_hot, splits=1) == pytest.approx((8.0, 0.0))
    assert metrics.inception_score(one_hot * 1e4, splits=1)[0] == pytest.approx(8.0)  # logits

    # through torchmetrics' InceptionScore fed by the extractor's logits, 10 splits
    real, fake = images
    both = torch.cat([real[:45], fake[:45]])
    image_metrics = metrics.ImageMetrics(extractor)
    assert isinstance(image_metrics.inception, metrics.InceptionScore)
    for batch in both.split(32):
        image_metrics.update(batch, real=False)
    scores = image_metrics.compute()
    logits = features_of(extractor, both)[1]
    expected_is, expected_std = reference_inception_score(logits, 10)
    assert scores["is_splits"] == 10
    # the random demo net puts every image in one class: IS ~1.0035; another shuffle seed moves IS - 1 by 6.5 %
    assert scores["is"] - 1 == pytest.approx(expected_is - 1, rel=1e-6) and expected_is - 1 > 1e-3
    assert scores["is_std"] == pytest.approx(expected_std, rel=1e-6)
    torch.testing.assert_close(image_metrics.logits(), torch.from_numpy(logits))


# ---- the evaluation functions ------------------------------------------------------------------------------
def test_score_images_and_compute_stats(extractor, images, tmp_path):
    real, fake = images
    real_dir, fake_dir = tmp_path / "real", tmp_path / "fake"
    for folder, batch in ((real_dir, real[:40]), (fake_dir, fake[:36])):
        folder.mkdir()
        for i, image in enumerate(batch):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
    fake_paths = sorted(fake_dir.glob("*.png"))

    stats, skipped = compute_stats(real_dir, extractor, resize=None, batch_size=16)
    assert stats.n == 40 and stats.mu.shape == (32,) and skipped == []
    with_real = score_images(fake_paths, feature_extractor=extractor, resize=None, batch_size=16, real_images=real_dir)
    assert with_real["kid"] is not None and with_real["is"] is not None and with_real["stats"].n == 36
    assert with_real["fid"] == pytest.approx(
        reference_frechet(features_of(extractor, fake[:36])[0], features_of(extractor, real[:40])[0]), rel=1e-6
    )
    npz = stats.save(tmp_path / "ref.npz")
    with_ref = score_images(fake_paths, feature_extractor=extractor, resize=None, ref_stats=npz)
    assert with_ref["fid"] == pytest.approx(with_real["fid"], rel=1e-9)
    assert with_ref["kid"] is None  # reference statistics do not give KID
    assert with_ref["is"] == pytest.approx(with_real["is"], rel=1e-12)
    alone = score_images(fake_paths, feature_extractor=extractor, resize=None)
    assert alone["fid"] is None and alone["logits"].shape == (36, 10)


def test_background_scorer_fed_out_of_order_equals_scoring_from_disk(extractor, images, tmp_path):
    """Issue 10, point 3: images handed over as they are generated (PIL images or paths of images already on disk,
    batches out of order) are scored in prompt order in the same batches as score_images reading the folder: the
    same FID, IS and CLIP score to the last bit. A missing image is an error, not a silently smaller set."""
    from bksdm_lab.evaluation.evaluate import BackgroundScorer, EvaluationError, Scorer

    fake = images[1][:20]
    pils = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in fake]
    paths = [tmp_path / f"{i:05d}.png" for i in range(20)]
    for image, path in zip(pils, paths):
        image.save(path)
    prompts = [f"prompt {i}" for i in range(20)]
    real = features_of(extractor, images[0])[0]
    kw = {"feature_extractor": extractor, "clip_model": metrics.demo_clip(), "resize": 24, "batch_size": 6}
    ref = (real.mean(0), np.cov(real, rowvar=False))
    sequential = score_images(paths, prompts, ref_stats=ref, **kw)

    scorer = BackgroundScorer(Scorer(prompts, ref_stats=ref, **kw), 20)
    for lo, hi, kind in (
        (4, 7, "pil"),
        (0, 2, "path"),
        (2, 4, "pil"),
        (7, 12, "path"),
        (15, 20, "pil"),
        (12, 15, "pil"),
    ):
        scorer(list(range(lo, hi)), pils[lo:hi] if kind == "pil" else paths[lo:hi])
    streamed = scorer.close()
    for key in ("fid", "is", "is_std"):
        assert streamed[key] == sequential[key], key
    assert torch.equal(streamed["clip"], sequential["clip"])
    assert streamed["scored"] == 20 and streamed["seconds"] > 0

    short = BackgroundScorer(Scorer(prompts, **kw), 20)
    short(list(range(3)), pils[:3])
    short(list(range(4, 20)), pils[4:])
    with pytest.raises(EvaluationError, match="1 of 20 images never came, e.g. prompt 3"):
        short.close()


# ---- CLIP score and models ---------------------------------------------------------------------------------
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
    assert metrics.feature_widths(metrics.demo_extractor()) == (32, 10)

    class NoAttributes(torch.nn.Module):  # widths found by one probe
        def forward(self, x):
            return x.float().mean((2, 3)).repeat(1, 4)

    assert metrics.feature_widths(NoAttributes()) == (12, None)
    image_metrics = metrics.ImageMetrics(NoAttributes())
    assert image_metrics.inception is None and image_metrics.fid.inception.num_features == 12
    with pytest.raises(ValueError, match="needs a feature extractor that returns"):
        metrics.ClassLogits(metrics.ExtractorOutputs(NoAttributes()))


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
