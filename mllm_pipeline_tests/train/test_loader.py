"""The worker loader: shards partitioned over ranks and workers, uint8 media HD-transformed in batch_to_device with
the thread loader's pixels, text-only and multi-turn samples through the model, hd_num per dataset, resume."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest
import torch

from mllm_pipeline.manifests.build import read_manifest_split
from mllm_pipeline.manifests.tokenization import TokenizeConfig, load_tokenizer, tokenize_turns
from mllm_pipeline.model import build_model, tiny_config
from mllm_pipeline.train import ManifestData
from mllm_pipeline.train.data import batch_to_device
from mllm_pipeline.train.loader import LOADER_COLUMNS, LoaderConfig, ShardedData
from mllm_pipeline.train.loop import manifest_info
from mllm_pipeline.train.types import DataConfig, DataError
from mllm_pipeline.vision.hd import hd_token_count


def _ids(storage):
    tok = load_tokenizer(manifest_info(storage).tokenizer)
    return tok, *tok.convert_tokens_to_ids(["<image>", "<video>"])


def _cfg(storage, tokens_per_batch=1024, **kw):
    _, image_id, video_id = _ids(storage)
    return DataConfig(tokens_per_batch=tokens_per_batch, hd_num=1, video_frames=2, video_hd_num=1,
                      image_token_id=image_id, video_token_id=video_id, **kw)


def _sharded(storage, table=None, rank=0, world=1, workers=0, tokens_per_batch=1024, hd_on_device=True, **kw):
    table = table if table is not None else read_manifest_split(storage, "train", columns=LOADER_COLUMNS)
    return ShardedData(storage, table, _cfg(storage, tokens_per_batch, **kw), rank, world,
                       loader=LoaderConfig(num_workers=workers, pin_memory=False, hd_on_device=hd_on_device))


def test_uint8_media_give_the_thread_loaders_pixels_and_token_counts(manifest_root):
    old = ManifestData(manifest_root, read_manifest_split(manifest_root, "train"), _cfg(manifest_root, 100000))
    new = _sharded(manifest_root, tokens_per_batch=100000)
    ref = {sid: m for b in [next(old.iterate()) for _ in range(old.batches_per_epoch())] for sid, m in zip(b.ids, b.media)}
    seen = 0
    it = new.iterate()
    for _ in range(new.batches_per_epoch()):
        batch = next(it)
        assert all(m.dtype == torch.uint8 for m in batch.media)  # what leaves the workers: decoded, not resized
        media = batch_to_device(batch, torch.device("cpu"))["media"]
        for sid, m, ids in zip(batch.ids, media, batch.input_ids):
            assert m.dtype == torch.float32 and torch.equal(m, ref[sid]), sid
            seen += 1
    assert seen == len(ref) == len(new)
    assert new.seq_len.tolist() == [int(x) for x in old.seq_len]
    # the CPU fallback (HD in the workers, two worker processes): the same float tensors
    cpu = _sharded(manifest_root, tokens_per_batch=100000, hd_on_device=False, workers=2)
    it = cpu.iterate()
    got = [next(it) for _ in range(cpu.batches_per_epoch())]
    it.close()
    assert sorted(sid for b in got for sid in b.ids) == sorted(ref)
    for b in got:
        assert b.hd is None
        for sid, m in zip(b.ids, batch_to_device(b, torch.device("cpu"))["media"]):
            assert torch.equal(m, ref[sid]), sid


def test_shards_are_partitioned_over_ranks_and_workers_and_resume(manifest_root):
    units = [_sharded(manifest_root, rank=r, world=2, tokens_per_batch=400) for r in range(2)]
    plan = units[0].plan(0)
    assert plan == units[1].plan(0) and len(plan) % 2 == 0
    tars = []
    for r, d in enumerate(units):
        mine = d.rank_batches(0)
        assert [b for b, _, _ in mine] == list(range(r, len(plan), 2))
        tars.append({d.tar_names[d.tar_code[i]] for _, rows, _ in mine for i in rows})
    assert tars[0] and tars[1] and not tars[0] & tars[1]  # no rank's batches hold the other's media
    for r, d in enumerate(units):  # and streaming an epoch opens only the rank's own tars
        opened = []
        read = d.read_tar
        d.read_tar = lambda rel, read=read, opened=opened: (opened.append(rel), read(rel))[1]
        it = d.iterate()
        for _ in range(len(plan) // 2):
            next(it)
        it.close()
        assert opened and set(opened) == tars[r], (r, opened)
    # two DataLoader worker processes on one rank: the batches come in plan order, each worker its own tars
    two = _sharded(manifest_root, workers=2, tokens_per_batch=400)
    assert two.workers == 2
    by_unit = {}
    for b, rows, unit in two.rank_batches(0):
        by_unit.setdefault(unit, set()).update(two.tar_names[two.tar_code[i]] for i in rows)
    assert len(by_unit) == 2 and not by_unit[0] & by_unit[1]
    n = two.batches_per_epoch()
    it = two.iterate()
    got = [next(it) for _ in range(n + 2)]  # into the next epoch
    assert [b.position for b in got[:n]] == [(0, k) for k in range(n)]
    assert [b.position for b in got[n:]] == [(1, 0), (1, 1)]
    assert [b.ids for b in got[:n]] == [[two.table["id"][i].as_py() for i in rows] for rows in two.plan(0)]
    it.close()
    # resuming at batch 1 with workers: the same batches as reading on
    it = two.iterate((0, 1))
    again = [next(it) for _ in range(n)]
    it.close()
    assert [b.ids for b in again] == [b.ids for b in got[1:n + 1]]
    assert torch.equal(again[0].media[0], got[1].media[0])


def _extra_rows(storage):
    """A text-only row and a multi-turn (3 question/answer turns about one image) row next to the train split."""
    tok, image_id, _ = _ids(storage)
    table = read_manifest_split(storage, "train", columns=LOADER_COLUMNS)
    img = [i for i, k in enumerate(table["media_kind"].to_pylist()) if k == "image"][0]
    src = table.slice(img, 1).to_pylist()[0]
    turns = tokenize_turns(tok, ["image"], [[("what is it", "a dog"), ("where", "the beach"), ("why", "to run")]],
                           pa.array([src["media_tokens"]]).to_numpy(), TokenizeConfig(max_seq_len=4096)).to_pylist()[0]
    multi = {**src, "id": "multi-0", "input_ids": turns["input_ids"], "label_mask": turns["label_mask"],
             "text_tokens": len(turns["input_ids"]), "seq_len": len(turns["input_ids"]) - 1 + src["media_tokens"]}
    text_ids = tok("a short text only sample")["input_ids"] + [tok.eos_token_id]
    text = {**src, "id": "text-0", "media_kind": None, "media_tar": None, "media_key": None, "media_ext": None,
            "width": None, "height": None, "input_ids": text_ids, "label_mask": [0, 0] + [1] * (len(text_ids) - 2),
            "text_tokens": len(text_ids), "media_tokens": 0, "seq_len": len(text_ids)}
    extra = pa.Table.from_pylist([multi, text], schema=table.schema)
    return pa.concat_tables([table, extra]), image_id, multi


def test_text_only_and_multi_turn_samples_through_the_model(manifest_root):
    table, image_id, multi = _extra_rows(manifest_root)
    assert sum(1 for m in multi["label_mask"] for _ in [0] if m) > 0
    d = _sharded(manifest_root, table, tokens_per_batch=100000, packing=True)
    rows = {d.table["id"][i].as_py(): i for i in range(len(d))}
    batch = d.batch([rows["text-0"], rows["multi-0"], 0], (0, 0), fetch=lambda i, tar, member: _member(d, tar, member))
    assert batch.media[0] is None and batch.media[1].dtype == torch.uint8
    spans = torch.diff(batch.label_mask[1].int()).eq(1).sum()
    assert int(spans) == 3  # three supervised answers
    _, _, video_id = _ids(manifest_root)
    tok, _, _ = _ids(manifest_root)
    cfg = tiny_config(hd_num=1, image_token_id=image_id, video_token_id=video_id, video_frames=2,
                      vocab_size=-(-len(tok) // 64) * 64)
    torch.manual_seed(0)
    model = build_model(cfg)
    out = model(**batch_to_device(batch, torch.device("cpu")))
    assert torch.isfinite(out.loss) and out.sample_loss.shape == (3,) and torch.isfinite(out.sample_loss).all()
    one = model(**batch_to_device(d.batch([rows["text-0"]], (0, 0), fetch=None), torch.device("cpu")))
    assert float(one.sample_loss[0]) == pytest.approx(float(out.sample_loss[0]), rel=1e-4)  # packed = alone
    # FLOPs count the HD-transformed media the model got, not the uint8 ones
    from mllm_pipeline.train.metrics import batch_flops

    inputs = batch_to_device(batch, torch.device("cpu"))
    with pytest.raises(ValueError, match="uint8 media"):
        batch_flops(model, batch, {})
    hd_batch = dataclasses.replace(batch, media=inputs["media"], hd=None)
    assert batch_flops(model, batch, {}, media=inputs["media"]) == batch_flops(model, hd_batch, {}) > 0
    # a placeholder in a text-only row is refused
    bad = table.to_pylist()
    bad[-1]["input_ids"] = [image_id] + bad[-1]["input_ids"]
    with pytest.raises(DataError, match="text sample must hold 0 <image>"):
        _sharded(manifest_root, pa.Table.from_pylist(bad, schema=table.schema))


def _member(d, tar, member):
    for name, data in d.read_tar(tar):
        if name == member:
            return data
    raise KeyError(member)


def test_hd_num_per_dataset_recomputes_token_counts(manifest_root):
    d1 = _sharded(manifest_root)
    d4 = _sharded(manifest_root, hd_num_by_dataset={"coco": 4})
    t = d4.table
    for i in range(len(d4)):
        if t["dataset"][i].as_py() == "coco":
            w, h = t["width"][i].as_py(), t["height"][i].as_py()
            assert d4.hd[i] == 4
            assert d4.seq_len[i] == t["text_tokens"][i].as_py() - 1 + hd_token_count(w, h, 4) > d1.seq_len[i]
        else:
            assert d4.seq_len[i] == d1.seq_len[i] and d4.hd[i] == 1
    it = d4.iterate()
    batch = next(it)
    for m, sid in zip(batch_to_device(batch, torch.device("cpu"))["media"], batch.ids):
        if sid.startswith("coco"):
            i = [d4.table["id"][k].as_py() for k in range(len(d4))].index(sid)
            rows, cols = m.shape[1] // 336, m.shape[2] // 336
            assert (rows * cols + 1) * 144 + 1 + (rows + 1) * 12 == d4.seq_len[i] - t["text_tokens"][i].as_py() + 1
    with pytest.raises(DataError, match="holds videos"):
        _sharded(manifest_root, hd_num_by_dataset={"webvid": 4})


def test_a_run_trains_with_workers_and_hd_num_per_dataset(manifest_root, tmp_path):
    from mllm_pipeline.train import TrainConfig, TrainError, read_metrics, train

    train(TrainConfig(max_steps=2, tokens_per_batch=3000, device="cpu", num_workers=2, hd_num_by_dataset={"coco": 2}),
          manifest_root.root, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    d = _sharded(manifest_root, workers=2, tokens_per_batch=3000, packing=True, hd_num_by_dataset={"coco": 2})
    plan = d.plan(0)
    assert [r["tokens"] for r in rows] == [int(sum(d.seq_len[i] for i in plan[k])) for k in range(2)]
    hd1 = _sharded(manifest_root, workers=2, tokens_per_batch=3000, packing=True)
    assert rows[0]["tokens"] > int(sum(hd1.seq_len[i] for i in plan[0]))  # the coco images at hd_num 2
    with pytest.raises(TrainError, match="needs loader='workers'"):
        TrainConfig(loader="thread", hd_num_by_dataset={"coco": 2})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_pinned_uint8_then_hd_on_the_gpu_matches_the_cpu_path(manifest_root):
    """The CUDA path: workers hand over pinned uint8, batch_to_device runs the float HD transform on the GPU; sizes
    equal the CPU path's and pixels agree to the float resize's rounding (at most 1 in 0..255 units)."""
    old = ManifestData(manifest_root, read_manifest_split(manifest_root, "train"), _cfg(manifest_root, 100000))
    ref = {sid: m for b in [next(old.iterate()) for _ in range(old.batches_per_epoch())] for sid, m in zip(b.ids, b.media)}
    table = read_manifest_split(manifest_root, "train", columns=LOADER_COLUMNS)
    d = ShardedData(manifest_root, table, _cfg(manifest_root, 100000), loader=LoaderConfig(num_workers=2))
    it = d.iterate()
    dev = torch.device("cuda")
    for _ in range(d.batches_per_epoch()):
        b = next(it)
        assert all(m.is_pinned() for m in b.media if m is not None)
        for sid, m in zip(b.ids, batch_to_device(b, dev)["media"]):
            assert m.device.type == "cuda" and m.shape == ref[sid].shape
            assert float((m.cpu() - ref[sid]).abs().max()) <= 1.01 / (255 * 0.2613)
    it.close()


def test_several_images_in_one_sample(manifest_root):
    from mllm_pipeline.train.loader import EXTRA_MEDIA

    tok, image_id, video_id = _ids(manifest_root)
    table = read_manifest_split(manifest_root, "train", columns=LOADER_COLUMNS)
    rows = table.to_pylist()
    imgs = [r for r in rows if r["media_kind"] == "image"]
    first, more = imgs[0], imgs[1:3]
    ids = list(first["input_ids"])
    at = ids.index(image_id)
    ids[at + 1:at + 1] = [image_id, image_id]  # three placeholders, in media order
    media_tokens = sum(hd_token_count(r["width"], r["height"], 1) for r in [first, *more])
    multi = {**first, "id": "three-images", "input_ids": ids,
             "label_mask": first["label_mask"][:at + 1] + [0, 0] + first["label_mask"][at + 1:],
             "text_tokens": len(ids), "media_tokens": media_tokens, "seq_len": len(ids) - 3 + media_tokens}
    for r in rows:
        r["extra_media"] = None
    multi["extra_media"] = [{k: r[k] for k in ("media_kind", "media_key", "media_ext", "width", "height")} for r in more]
    schema = table.schema.append(pa.field("extra_media", EXTRA_MEDIA))
    t = pa.Table.from_pylist(rows + [multi], schema=schema)
    d = _sharded(manifest_root, t, tokens_per_batch=100000, packing=True)
    it = d.iterate()
    got = {sid: (b, j) for b in [next(it) for _ in range(d.batches_per_epoch())] for j, sid in enumerate(b.ids)}
    batch, j = got["three-images"]
    assert isinstance(batch.media[j], list) and len(batch.media[j]) == 3
    media = batch_to_device(batch, torch.device("cpu"))["media"]
    for r, m in zip([first, *more], media[j]):  # each the pixels of that image's own row
        b2, j2 = got[r["id"]]
        assert torch.equal(m, batch_to_device(b2, torch.device("cpu"))["media"][j2])
    cfg = tiny_config(hd_num=1, image_token_id=image_id, video_token_id=video_id, video_frames=2,
                      vocab_size=-(-len(tok) // 64) * 64)
    torch.manual_seed(0)
    model = build_model(cfg)
    out = model(**batch_to_device(batch, torch.device("cpu")))
    assert torch.isfinite(out.loss) and torch.isfinite(out.sample_loss).all()
    inputs = model.prepare_inputs(**{k: v for k, v in batch_to_device(d.batch([len(d) - 1], (0, 0), fetch=lambda i, tar, m: _member(d, tar, m)), torch.device("cpu")).items()})
    assert int(inputs.attention_mask.sum()) == multi["seq_len"]  # the manifest's token count is what the model sees
    with pytest.raises(DataError, match="must hold 3 <image>"):
        bad = dict(multi, input_ids=first["input_ids"])
        _sharded(manifest_root, pa.Table.from_pylist(rows + [bad], schema=schema))
    with pytest.raises(DataError, match="several media"):
        _sharded(manifest_root, t, hd_num_by_dataset={"coco": 2})


def test_a_run_trains_on_text_only_multi_turn_and_multi_image_rows(tmp_path):
    """A manifests version holding a text-only, a three-turn and a three-image sample next to the caption rows: one
    epoch of a run goes through every row (forward, backward, step), counted in the metrics."""
    from mllm_pipeline.train import TrainConfig, read_metrics, train
    from mllm_pipeline.train.loader import EXTRA_MEDIA
    from mllm_pipeline_tests.train.conftest import build_manifest

    storage = build_manifest(tmp_path, video=False)
    cur = storage.read_manifest("manifests")
    table, image_id, multi = _extra_rows(storage)
    rows = table.to_pylist()
    imgs = [r for r in rows if r["media_kind"] == "image" and r["id"] != "multi-0"]
    ids = list(imgs[0]["input_ids"])
    at = ids.index(image_id)
    ids[at + 1:at + 1] = [image_id, image_id]
    media_tokens = sum(hd_token_count(r["width"], r["height"], 1) for r in imgs[:3])
    three = {**imgs[0], "id": "three-images", "input_ids": ids,
             "label_mask": imgs[0]["label_mask"][:at + 1] + [0, 0] + imgs[0]["label_mask"][at + 1:],
             "text_tokens": len(ids), "media_tokens": media_tokens, "seq_len": len(ids) - 3 + media_tokens,
             "extra_media": [{k: r[k] for k in ("media_kind", "media_key", "media_ext", "width", "height")}
                             for r in imgs[1:3]]}
    for r in rows:
        r["extra_media"] = None
    out = pa.Table.from_pylist(rows + [three], schema=table.schema.append(pa.field("extra_media", EXTRA_MEDIA)))
    with storage.new_version("manifests", inputs=cur["inputs"]) as version:
        import pyarrow.parquet as pq

        with storage.open(version.rel("train.parquet"), "wb") as f:
            pq.write_table(out, f)
        for name in storage.listdir(f"manifests/{cur['version']}/tokenizer"):
            storage.write_bytes(version.rel(f"tokenizer/{name}"),
                                storage.read_bytes(f"manifests/{cur['version']}/tokenizer/{name}"))
        version.commit({"kind": "manifests", "summary": cur["summary"]})
    d = _sharded(storage, read_manifest_split(storage, "train", columns=LOADER_COLUMNS), tokens_per_batch=1500,
                 packing=True)
    n = d.batches_per_epoch()
    train(TrainConfig(max_steps=n, tokens_per_batch=1500, device="cpu", num_workers=0), storage.root, tmp_path / "run")
    metrics = read_metrics(tmp_path / "run")
    assert sum(m["samples"] for m in metrics) == out.num_rows == len(d)  # every row once, the special ones too
    assert sum(m["tokens"] for m in metrics) == sum(out["seq_len"].to_pylist())
    assert all(m["loss"] == m["loss"] for m in metrics)  # finite (not nan)
