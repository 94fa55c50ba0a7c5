"""Data formats: img2dataset WebDataset shards (streamed) and Hugging Face datasets, at toy size, end to end."""

import csv
import functools
import http.server
import io
import json
import subprocess
import tarfile
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import PYTHON, run_app, subprocess_env
from PIL import Image

from bksdm_lab.common.checkpoint import read_checkpoint
from bksdm_lab.data.common import DataError
from bksdm_lab.data.webdataset import INDEX_STRIDE, WebDatasetDataModule, expand_braces, expand_shards
from bksdm_lab.models.demo import byte_level_tokenizer

SHARDS, PER_SHARD = 4, 6  # 24 samples: one corrupt image, one empty caption
TOTAL, GOOD = SHARDS * PER_SHARD, SHARDS * PER_SHARD - 2
RES = 64


def _jpeg(i: int, size: int = 80, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (37 * i % 256, 100, 255 - 5 * i)).save(buf, fmt)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(root, shards=SHARDS, per_shard=PER_SHARD):
    """img2dataset's layout: <shard>.tar of <key>.jpg/.txt/.json (+ <shard>.parquet and <shard>_stats.json)."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        successes = 0
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for j in range(per_shard):
                i, key = s * per_shard + j, f"{s:05d}{j:04d}"
                caption = "" if i == 7 else f"a picture number {i}"
                image = np.random.default_rng(i).bytes(900) if i == 13 else _jpeg(i)  # 13: corrupt
                ext = "png" if i == 5 else "jpg"
                if ext == "png":
                    image = _jpeg(i, fmt="PNG")
                meta = {"url": f"http://example.com/{i}.jpg", "key": key, "status": "success", "caption": caption}
                _add(tar, f"{key}.{ext}", image)
                if s != 3:  # the last shard has captions in its .json only
                    _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", json.dumps(meta).encode())
                successes += 1
        (root / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": successes}))
        (root / f"{s:05d}.parquet").write_bytes(b"PAR1")  # not read; the brace pattern names the tars only
    return root


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("wds"))


def pattern(root) -> str:
    return f"{root}/{{00000..{SHARDS - 1:05d}}}.tar"


def attach(dm, rank=0, world=1, epoch=0, position=None):
    """The loader as Lightning builds it; ``position`` ({"epoch", "batches"}) is what a checkpoint restores."""
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, current_epoch=epoch)
    loader = dm.train_dataloader()
    if position:
        loader.load_state_dict({"epoch": position["epoch"], "samples": position["batches"] * dm.batch_size})
    return loader


def run_epoch(loader) -> list[dict]:
    return [{**b, "index": b["index"].tolist() if "index" in b else [], "n": b["num_samples"]} for b in loader]


def test_brace_patterns_and_shard_lists(shard_dir):
    assert expand_braces("/d/{00000..00002}.tar") == ["/d/00000.tar", "/d/00001.tar", "/d/00002.tar"]
    assert expand_braces("s3/{a,b}-{8..10}") == ["s3/a-8", "s3/a-9", "s3/a-10", "s3/b-8", "s3/b-9", "s3/b-10"]
    assert expand_braces("x{1,{2..3}}") == ["x1", "x2", "x3"]
    assert expand_braces("http://h/{0..1}.tar") == ["http://h/0.tar", "http://h/1.tar"]
    with pytest.raises(DataError, match="unbalanced"):
        expand_braces("a{0..1")
    # braceexpand's (bash's) rules beyond the old hand-written expander: zero padding across widths, steps, escapes,
    # and a brace with neither a comma nor a range stays literal (the old expander dropped the braces of "{x}")
    assert expand_braces("{08..10}.tar") == ["08.tar", "09.tar", "10.tar"]
    assert expand_braces("{0..6..3}") == ["0", "3", "6"]
    assert expand_braces("{2..0}") == ["2", "1", "0"]
    assert expand_braces(r"a\{b,c\}{1,2}") == ["a{b,c}1", "a{b,c}2"]
    assert expand_braces("a{x}b") == ["a{x}b"]
    tars = [str(shard_dir / f"{s:05d}.tar") for s in range(SHARDS)]
    assert expand_shards(pattern(shard_dir)) == tars
    assert expand_shards([tars[0], f"{shard_dir}/0000{{1..3}}.tar"]) == tars
    assert expand_shards(f"{shard_dir}/*.tar") == tars
    with pytest.raises(DataError, match="1 of the 5 shards do not exist"):
        WebDatasetDataModule(f"{shard_dir}/{{00000..00004}}.tar", byte_level_tokenizer(), RES, batch_size=4)


def test_webdataset_batches_have_the_right_shapes_and_counts(shard_dir):
    tok = byte_level_tokenizer()
    dm = WebDatasetDataModule(pattern(shard_dir), tok, RES, batch_size=4, num_workers=0, shuffle_buffer=8)
    batches = run_epoch(attach(dm))
    assert sum(b["n"] for b in batches) == TOTAL
    assert sum(b["skipped"]["corrupt"] for b in batches) == 1 and sum(b["skipped"]["caption"] for b in batches) == 1
    good = [i for b in batches for i in b["index"]]
    assert len(good) == GOOD and len(set(good)) == GOOD
    assert {divmod(i, INDEX_STRIDE)[0] for i in good} == set(range(SHARDS))
    first = batches[0]
    assert first["pixel_values"].shape[1:] == (3, RES, RES) and first["pixel_values"].dtype == torch.float32
    assert first["input_ids"].shape == (first["pixel_values"].shape[0], tok.model_max_length)
    assert -1.0 <= first["pixel_values"].min() and first["pixel_values"].max() <= 1.0
    # the .json caption of the last shard is used when there is no .txt; the png sample is read too
    assert (3 * INDEX_STRIDE + 0) in good and (0 * INDEX_STRIDE + 5) in good
    # shuffled: the stream is not in shard order, and epoch 1 differs from epoch 0
    assert good != sorted(good)
    epoch1 = [i for b in run_epoch(attach(dm, epoch=1)) for i in b["index"]]
    assert epoch1 != good and sorted(epoch1) == sorted(good)


def test_persistent_workers_follow_the_trainer_epoch(shard_dir):
    """Lightning iterates one loader every epoch; its persistent workers must still reshuffle per epoch."""
    dm = WebDatasetDataModule(pattern(shard_dir), byte_level_tokenizer(), RES, batch_size=4, num_workers=2)
    loader = attach(dm)
    epochs = []
    for epoch in (0, 1, 0):
        dm.trainer.current_epoch = epoch
        epochs.append([i for b in run_epoch(loader) for i in b["index"]])
    assert epochs[0] != epochs[1] and epochs[0] == epochs[2] and sorted(epochs[0]) == sorted(epochs[1])
    fresh = WebDatasetDataModule(pattern(shard_dir), byte_level_tokenizer(), RES, batch_size=4, num_workers=2)
    assert [i for b in run_epoch(attach(fresh, epoch=1)) for i in b["index"]] == epochs[1]


def test_two_ranks_two_workers_see_each_webdataset_sample_exactly_once(shard_dir):
    dm = WebDatasetDataModule(pattern(shard_dir), byte_level_tokenizer(), RES, batch_size=2, num_workers=2)
    per_epoch = []
    for epoch in (0, 1):
        seen, total = [], 0
        for rank in (0, 1):
            for b in run_epoch(attach(dm, rank, 2, epoch)):
                seen += b["index"]
                total += b["n"]
        assert total == TOTAL and len(seen) == GOOD and len(set(seen)) == GOOD, epoch
        per_epoch.append(seen)
    assert per_epoch[0] != per_epoch[1]  # the shard order and the buffer are reshuffled each epoch


def test_too_few_shards_warns_and_samples_per_epoch_caps_every_rank(shard_dir, caplog):
    dm = WebDatasetDataModule(pattern(shard_dir), byte_level_tokenizer(), RES, batch_size=2, num_workers=3)
    with caplog.at_level("WARNING"):
        batches = run_epoch(attach(dm, 0, 2))
    assert "some workers get no shard" in caplog.text
    assert sum(b["n"] for b in batches) == TOTAL // 2  # 2 shards for 3 workers: still every sample once
    with pytest.raises(DataError, match="every rank needs at least one shard"):
        attach(WebDatasetDataModule(f"{shard_dir}/00000.tar", byte_level_tokenizer(), RES, batch_size=2), 0, 2)
    capped = WebDatasetDataModule(
        pattern(shard_dir), byte_level_tokenizer(), RES, batch_size=2, num_workers=2, samples_per_epoch=10
    )
    loader = attach(capped, 1, 2)
    assert len(loader) == 2 and len(run_epoch(loader)) == 2 and len(run_epoch(loader)) == 2


def test_resumed_webdataset_stream_continues_where_it_stopped(shard_dir):
    def stream(position=None):
        dm = WebDatasetDataModule(pattern(shard_dir), byte_level_tokenizer(), RES, batch_size=2, num_workers=2)
        batches = run_epoch(attach(dm, epoch=3, position=position))
        return [(b["index"], b["n"], float(b["pixel_values"].sum()) if "pixel_values" in b else 0.0) for b in batches]

    full = stream()
    assert sum(n for _, n, _ in full) == TOTAL
    assert stream({"epoch": 3, "batches": 5}) == full[5:]  # same samples, same flips
    assert stream({"epoch": 2, "batches": 5}) == full  # a position in another epoch changes nothing


def test_broken_shards_are_counted_not_fatal(shard_dir, tmp_path):
    whole = (shard_dir / "00000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[: len(whole) // 2])  # a shard cut short mid-member
    dm = WebDatasetDataModule(str(tmp_path / "cut.tar"), byte_level_tokenizer(), RES, batch_size=64, shuffle_buffer=1)
    (batch,) = run_epoch(attach(dm))
    assert batch["skipped"]["corrupt"] == 1 and 0 < len(batch["index"]) < PER_SHARD
    assert batch["index"] == sorted(batch["index"])  # shuffle_buffer=1: shard order


def cut_shards(root):
    """Shard 00000 (6 samples of .jpg + .txt, written by tarfile) ended early in every way a shard can end early,
    as ``{name: (path, samples complete before the cut)}``; ``whole`` is the intact shard."""
    buf, starts = io.BytesIO(), []  # the offset of each member's header
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(PER_SHARD):
            for ext, data in (("jpg", _jpeg(i)), ("txt", f"a picture number {i}".encode())):
                starts.append(buf.tell())
                _add(tar, f"{i:04d}.{ext}", data)
        end = buf.tell()  # where the end-of-archive blocks start
    whole, third = buf.getvalue(), starts[6]  # member 6: the third sample's image
    cuts = {
        "whole": (whole, PER_SHARD),
        "mid_header": (whole[: third + 100], 3),
        "mid_member": (whole[: third + 512 + 300], 3),
        "at_a_header_without_end_blocks": (whole[:third], 3),
        "without_end_blocks": (whole[:end], PER_SHARD),
        "zero_length": (b"", 0),
        "garbage": (np.random.default_rng(0).bytes(4000), 0),
        "garbage_for_a_header": (whole[:third] + np.random.default_rng(1).bytes(2000), 3),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, (data, _) in cuts.items():
        (root / f"{name}.tar").write_bytes(data)
    return {name: (root / f"{name}.tar", good) for name, (_, good) in cuts.items()}


@pytest.mark.parametrize(
    "cut",
    [
        "whole",
        "mid_header",
        "mid_member",
        "at_a_header_without_end_blocks",
        "without_end_blocks",
        "zero_length",
        "garbage",
        "garbage_for_a_header",
    ],
)
def test_a_shard_that_ends_early_is_logged_and_counted(tmp_path, caplog, cut):
    """Every sample complete before the cut is trained on; the cut is one skipped sample, logged with the shard."""
    path, good = cut_shards(tmp_path)[cut]
    dm = WebDatasetDataModule(str(path), byte_level_tokenizer(), RES, batch_size=64, shuffle_buffer=1)
    with caplog.at_level("ERROR"):
        (batch,) = run_epoch(attach(dm))
    broken = cut != "whole"
    assert len(batch["index"]) == good
    assert batch["skipped"] == {**dict.fromkeys(batch["skipped"], 0), "corrupt": int(broken)}
    assert batch["n"] == good + broken
    assert (f"shard {path} is broken after {good} samples" in caplog.text) == broken


def test_a_resumed_webdataset_run_continues_at_the_next_sample_and_keeps_counting(shard_dir, tmp_path):
    """4 shards + one cut mid-header (28 samples, 3 unusable) over 2 workers in micro-batches of 2: stopped at step
    3, resumed to 12, through Lightning's checkpoint (the data position and the DataQuality counts)."""
    from test_data import fit_in_two

    shards = [str(shard_dir / f"{s:05d}.tar") for s in range(SHARDS)] + [str(cut_shards(tmp_path)["mid_header"][0])]

    def make():
        return WebDatasetDataModule(shards, byte_level_tokenizer(), RES, batch_size=2, num_workers=2, shuffle_buffer=4)

    (whole, whole_counts), (resumed, resumed_counts) = fit_in_two(make, 3, 12, tmp_path)
    assert whole_counts["seen"] == 24 and len(whole) == 24 - sum(v for k, v in whole_counts.items() if "skipped" in k)
    assert resumed == whole and resumed_counts == whole_counts


@pytest.fixture()
def http_root(shard_dir):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shard_dir))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_webdataset_streams_shards_over_http(http_root):
    urls = [f"{http_root}/{{00000..{SHARDS - 1:05d}}}.tar", f"{http_root}/missing.tar"]
    dm = WebDatasetDataModule(urls, byte_level_tokenizer(), RES, batch_size=8, num_workers=2, retries=0)
    batches = run_epoch(attach(dm))
    assert sum(len(b["index"]) for b in batches) == GOOD
    assert sum(b["skipped"]["missing"] for b in batches) == 1  # the 404 shard: logged, counted, not fatal


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (
            ["data=webdataset", "data.shards='/nonexistent/{000..003}.tar'"],
            "data.shards: 4 of the 4 shards do not exist",
        ),
        (["data=webdataset", "data.shards=/nonexistent/*.tar"], "data.shards='/nonexistent/*.tar' matches no shard"),
        (["data=hf", "data.path=/nonexistent/set"], "data.path='/nonexistent/set' does not exist"),
        (["data=hf", "data.path=EMPTY"], "is an empty folder: no saved dataset or data files in it"),
    ],
)
def test_data_module_errors_are_one_line_before_the_teacher_loads(
    data, line, tmp_path, cache_dir, demo_teacher_dir, capsys, monkeypatch, no_hydra_state_left
):
    """`python -m bksdm_lab.train experiment=demo <data>` in-process: exit 2, one line, and no teacher loaded."""
    from bksdm_lab import train as train_app

    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("BKSDM_CACHE_DIR", str(cache_dir))
    monkeypatch.setattr(train_app, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    argv = [
        "experiment=demo",
        *(a.replace("EMPTY", str(tmp_path / "empty")) for a in data),
        f"hydra.run.dir={tmp_path}/run",
    ]
    code, _, err = run_app(train_app.main, argv, capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err, err
    (error,) = [row for row in err.splitlines() if row.startswith("bksdm_lab.train: error:")]
    assert line in error


# ---- Hugging Face datasets ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    datasets = pytest.importorskip("datasets")
    images = [{"bytes": _jpeg(i), "path": None} for i in range(TOTAL)]
    images[13] = {"bytes": np.random.default_rng(13).bytes(900), "path": None}  # corrupt
    captions = [f"a picture number {i}" for i in range(TOTAL)]
    captions[7] = ""
    ds = datasets.Dataset.from_dict({"image": images, "text": captions, "extra": list(range(TOTAL))})
    ds = ds.cast_column("image", datasets.Image())
    root = tmp_path_factory.mktemp("hf")
    ds.save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(4))}).save_to_disk(str(root / "dict"))
    ds.to_parquet(str(root / "parquet" / "train.parquet"))
    return root


def test_hf_batches_have_the_right_shapes_and_counts(hf_dir):
    from bksdm_lab.data.hf import HFDataModule

    dm = HFDataModule(str(hf_dir / "saved"), byte_level_tokenizer(), RES, batch_size=4)
    assert len(dm.dataset) == TOTAL
    batches = run_epoch(attach(dm))
    assert sum(b["n"] for b in batches) == TOTAL
    assert sum(b["skipped"]["corrupt"] for b in batches) == 1 and sum(b["skipped"]["caption"] for b in batches) == 1
    assert sorted(i for b in batches for i in b["index"]) == [i for i in range(TOTAL) if i not in (7, 13)]
    assert batches[0]["pixel_values"].shape == (4, 3, RES, RES) and batches[0]["input_ids"].shape == (4, 77)
    resumed = run_epoch(attach(dm, position={"epoch": 0, "batches": 2}))
    assert [b["index"] for b in resumed] == [b["index"] for b in batches[2:]]

    test_split = HFDataModule(str(hf_dir / "dict"), byte_level_tokenizer(), RES, batch_size=4, split="test")
    assert len(test_split.dataset) == 4
    with pytest.raises(DataError, match=r"no split 'validation' \(data.split\); splits: \['train', 'test'\]"):
        HFDataModule(str(hf_dir / "dict"), byte_level_tokenizer(), RES, batch_size=4, split="validation")
    with pytest.raises(DataError, match=r"no 'caption' column \(data.caption_column\); columns found: \['image',"):
        HFDataModule(str(hf_dir / "saved"), byte_level_tokenizer(), RES, batch_size=4, caption_column="caption")


def test_hf_load_dataset_path_and_exactly_once_sharding(hf_dir, tmp_path, monkeypatch):
    import datasets

    from bksdm_lab.data.hf import HFDataModule

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    dm = HFDataModule(str(hf_dir / "parquet"), byte_level_tokenizer(), RES, batch_size=2, num_workers=2)
    assert len(dm.dataset) == TOTAL
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            loader = attach(dm, rank, 2)
            loader.sampler.set_epoch(epoch)
            seen += [i for b in run_epoch(loader) for i in b["index"]]
        assert sorted(seen) == [i for i in range(TOTAL) if i not in (7, 13)], epoch
    with pytest.raises(DataError, match=r"data.path=.*nothing_here. does not exist"):
        HFDataModule(str(tmp_path / "nothing_here"), byte_level_tokenizer(), RES, batch_size=2)


# ---- the real training command from each format -----------------------------------------------


def train(cache_dir, tmp_path, *data_args):
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "bksdm_lab.train",
            "experiment=demo",
            *data_args,
            "data.batch_size=8",
            "data.global_batch_size=16",  # the demo's 8 x 2 accumulation (these formats default to the paper's 256)
            "data.num_workers=2",
            "data.max_skipped_fraction=0.5",
            "trainer.max_steps=2",
            "trainer.log_every_n_steps=1",
            "callbacks.samples.prompts=[]",
            f"hydra.run.dir={run}",
        ],
        env=subprocess_env(cache_dir),
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (run / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    last = {k: float(v) for k, v in rows[-1].items() if k.startswith("data/") and v}
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    return (run / ".hydra" / "config.yaml").read_text(), last, ckpt["callbacks"]["DataQuality"]["counts"]


@pytest.mark.slow
def test_demo_trains_from_webdataset_shards(shard_dir, demo_teacher_dir, cache_dir, tmp_path):
    """24 samples in 4 shards, micro-batch 8 over 2 workers (4 batches: 6+6 per worker) x 2 = one epoch."""
    config, last, counts = train(cache_dir, tmp_path, "data=webdataset", f"data.shards='{pattern(shard_dir)}'")
    assert "bksdm_lab.data.webdataset.WebDatasetDataModule" in config  # data=webdataset beat the demo's data
    assert last["data/skipped_corrupt"] == 1 and last["data/skipped_caption"] == 1
    assert counts["seen"] == TOTAL


@pytest.mark.slow
def test_demo_trains_from_a_hf_dataset(hf_dir, demo_teacher_dir, cache_dir, tmp_path):
    config, last, counts = train(cache_dir, tmp_path, "data=hf", f"data.path={hf_dir / 'saved'}")
    assert "bksdm_lab.data.hf.HFDataModule" in config
    # 3 full batches of 8 (drop_last): Lightning steps after batches 2 and 3 (the epoch's end flushes accumulation)
    assert counts["seen"] == TOTAL
    assert last["data/skipped_corrupt"] == 1 and last["data/skipped_caption"] == 1
