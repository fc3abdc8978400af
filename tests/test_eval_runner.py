"""The evaluation runner with a fake model whose answers are known, the real tiny model, checkpoints, torchrun."""

import json
import math

import pytest
import torch

from fineviti.eval import loaders
from fineviti.eval.checkpoint import CheckpointMismatchError, load_checkpoint
from fineviti.eval.runner import (
    EvalConfig,
    Evaluator,
    HardNegativeTask,
    RegionTask,
    ZeroShotTask,
    default_box_projection,
    evaluate,
    markdown_table,
    synthetic_tasks,
    task_for,
    write_report,
)
from tests import fixtures_eval as fx
from tests.test_eval_loaders import build_shards_with_bad_samples

# dcp.save / dcp.load without a process group warn that they assume one process: they do.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _evaluator(model=None, **cfg):
    model = model or fx.FakeModel()
    return model, Evaluator(model, fx.word_tokenizer(), EvalConfig(**cfg))


def test_retrieval_with_several_captions_and_packing(tmp_path):
    data = loaders.karpathy_captions(fx.build_karpathy(tmp_path, "coco"), tmp_path, "test")
    # 40x30 images become 56x84 (4 x 6 patches of 14, factor 28 and min_pixels 3136): two per 50-token batch.
    model, ev = _evaluator(token_budget=50)
    out = ev.run({"coco": task_for(data)})["coco"]
    for key in ("i2t_r1", "i2t_r5", "t2i_r1"):
        assert out[key] == 1.0, key
    for key in ("i2t_r10", "t2i_r5", "t2i_r10"):  # (k at or above the candidates: see fineviti.eval.metrics)
        assert math.isnan(out[key]), key
    assert out["n"] == 4 and out["n_texts"] == 8 and out["chance_r1"] == pytest.approx(0.25)
    assert model.image_calls == [2, 2] and model.text_calls == [8]
    assert out["caption_tokens_mean"] == pytest.approx((3 + 2) / 2) and out["truncated_tokens"] == 0


def test_a_nan_recall_is_null_in_report_json_and_n_a_in_the_table(tmp_path):
    """A recall whose k reaches every candidate is NaN, which JSON lacks (strict readers refuse the file)."""
    json_path, md_path = write_report({"zs": {"n": 3, "top1": 0.5, "top5": float("nan")}}, tmp_path)
    assert json.loads(json_path.read_text(), parse_constant=lambda name: pytest.fail(name))["zs"]["top5"] is None
    assert "| top5 | n/a |" in md_path.read_text() and "| top1 | 0.5000 |" in md_path.read_text()


def test_encode_images_is_independent_of_packing(tmp_path):
    data = loaders.karpathy_captions(fx.build_karpathy(tmp_path, "flickr30k"), tmp_path, "train")
    images = [r.image for r in data.records] * 3
    one = _evaluator(token_budget=16384)[1].encode_images(images)[0]
    many = _evaluator(token_budget=24)[1].encode_images(images)[0]
    torch.testing.assert_close(one, many, rtol=0, atol=0)
    assert one.shape == (6, 5)


def test_long_captions_are_cut_to_the_context(tmp_path):
    data = loaders.urban1k(fx.build_urban1k(tmp_path))
    full = _evaluator()[1].run({"urban1k": task_for(data)})["urban1k"]
    assert full["i2t_r1"] == 1.0 and full["t2i_r1"] == 1.0 and full["truncated_tokens"] == 0
    assert full["caption_tokens_max"] == 7  # "A long red caption about the photo."
    # Two tokens keep "a long": the colour word is cut, every caption embeds to zero, and ties count as misses.
    cut = _evaluator(context_length=2)[1].run({"urban1k": task_for(data)})["urban1k"]
    assert cut["truncated_tokens"] == 3 * 5 and cut["caption_tokens_max"] == 2
    assert cut["i2t_r1"] == 0.0 and cut["t2i_r1"] == 0.0


def test_zero_shot_on_a_tiny_image_folder(tmp_path):
    root, mapping = fx.build_image_folder(tmp_path)
    named = loaders.image_folder(root, mapping)
    model, ev = _evaluator()
    out = ev.run({"zs": ZeroShotTask(named.records, named.classnames, ("a photo of the {}.", "a {} picture"))})["zs"]
    assert out["top1"] == 1.0 and out["n"] == 6 and out["n_classes"] == 3 and out["templates"] == 2
    assert model.text_calls == [6]  # 3 classes x 2 templates in one batch
    # Folder names say nothing about colour: every class embeds to zero, all tie, and ties count as misses.
    out = ev.run({"zs": task_for(loaders.image_folder(root))})["zs"]
    assert out["top1"] == 0.0 and math.isnan(out["top5"])  # 3 classes: everything is in the top 5, no measure


def test_hard_negatives_on_shards(tmp_path):
    data = loaders.shard_hard_negatives(fx.build_shards(tmp_path / "heldout"))
    out = _evaluator()[1].run({"hn": task_for(data)})["hn"]
    # "red green" against "green red": a bag of words cannot tell them apart, so every pair ties: accuracy 0.
    assert out["accuracy"] == 0.0 and out["n"] == 6 and out["chance"] == pytest.approx(0.5)


def test_hard_negatives_when_the_negative_names_another_colour():
    records = [(fx.blocks((28, 28), [((0, 0, 28, 28), c)]), f"a {c} photo", [f"a {o} photo"])
               for c, o in (("red", "blue"), ("green", "red"), ("cyan", "cyan"))]
    out = _evaluator()[1].run({"hn": HardNegativeTask(records)})["hn"]
    assert out["accuracy"] == pytest.approx(2 / 3)  # the third negative equals its caption: a tie, a loss


def test_task_errors_name_the_record():
    """A hard-negative set without a single negative says so (it used to fail on the empty embeddings' shape); a
    region record whose boxes and labels differ in number is named by its index in the task's records (it used to
    be counted among the records with boxes only)."""
    image = fx.blocks((28, 28), [((0, 0, 28, 28), "red")])
    with pytest.raises(ValueError, match="no image of 2 has a hard negative"):
        _evaluator()[1].run({"hn": HardNegativeTask([(image, "a red photo", []), (image, "a red photo", [])])})
    records = [(image, [], []), (image, [], []), (image, [(0, 0, 10, 10)], [0, 1])]
    with pytest.raises(ValueError, match="region record 2: 1 boxes but 2 labels"):
        _evaluator()[1].run({"boxes": RegionTask(records, ["red", "blue"], project=fx.box_projection)})
    records = [(image, [], []), (image, [(0, 0, 10, 10), (9, 0, 4, 10)], [0, 1])]
    with pytest.raises(ValueError, match=r"region record 1, box 1 = \[9, 0, 4, 10\]: expected x0 < x1"):
        _evaluator()[1].run({"boxes": RegionTask(records, ["red", "blue"], project=fx.box_projection)})


def test_region_box_outside_its_image_is_named(tmp_path):
    """A box right of or below its image is named by its record and box with the image's size, in the original
    pixels (it used to pass this check, which only tested x1 > 0 and y1 > 0, and fail in pool_boxes with a
    batch-local index and rescaled coordinates); a box partly outside is clipped, as before."""
    image = fx.blocks((64, 48), [((0, 0, 32, 24), "red")])
    path = tmp_path / "image.png"
    image.save(path)
    for source in (image, str(path), path.read_bytes()):
        for box in ((70, 5, 90, 20), (5, 48, 20, 60), (-9, 5, 0, 20)):
            records = [(source, [(0, 0, 10, 10)], [0]), (source, [(0, 0, 10, 10), box], [0, 1])]
            task = RegionTask(records, ["red", "blue"], project=fx.box_projection)
            match = rf"region record 1, box 1 = \[{', '.join(map(str, box))}\] lies outside its 64x48 image"
            with pytest.raises(ValueError, match=match):
                _evaluator()[1].run({"r": task})
    partly = RegionTask([(str(path), [(16, 12, 80, 60)], [0])], ["red", "blue"], project=fx.box_projection)
    assert _evaluator()[1].run({"r": partly})["r"]["n"] == 1
    with pytest.raises(ValueError, match=r"region record 0 \(12 bytes\) is not a readable image"):
        _evaluator()[1].run({"r": RegionTask([(b"not an image", [(0, 0, 4, 4)], [0])], ["red"],
                                             project=fx.box_projection)})


def test_skipped_shard_samples_reach_the_report(tmp_path):
    """What the shard reader skipped goes from the loaded set's info into each task's report (report.json, and a
    line under report.md's table); the synthetic set's three tasks share one scan, so a truncated shard is counted
    in all three; a later scan counts it again (the index of a damaged shard never matches it: it lacks the samples
    after the cut, and an index that only matched its whole samples hid those of a tar fetched again whole)."""
    root = build_shards_with_bad_samples(tmp_path / "heldout", truncate=True)
    with pytest.warns(UserWarning, match="the shard reader kept 6 samples"):
        tasks = synthetic_tasks(root, project=fx.box_projection)
    skipped = {"bad_json": 1, "missing_caption": 1, "truncated_shard": 1, "unreadable_header": 1}
    report = evaluate(fx.FakeModel(), fx.word_tokenizer(), tasks, out_dir=tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    for name, n in (("retrieval", 6), ("hard_negatives", 4), ("regions", 8)):
        assert saved[name]["n"] == n and saved[name]["info"]["skipped"] == skipped, name
    table = (tmp_path / "out" / "report.md").read_text()
    assert table == markdown_table(report) and f"retrieval: the shard reader counted {skipped}" in table
    with pytest.warns(UserWarning, match="missing_caption"):
        shards = loaders.shard_captions(root)
    assert shards.info["skipped"]["truncated_shard"] == 1  # a scan of its own: the damage is counted again
    assert _evaluator()[1].run({"r": task_for(shards)})["r"]["info"] == shards.info


@pytest.mark.parametrize("method", ["mean", "roi_align"])
def test_region_classification_on_coco_instances(tmp_path, method):
    data = loaders.coco_instances(fx.build_coco_instances(tmp_path), tmp_path)
    task = RegionTask(data.records, data.classnames, ("a {} box",), method=method, project=fx.box_projection)
    out = _evaluator()[1].run({"boxes": task})["boxes"]
    assert out["top1"] == 1.0 and out["n"] == 3 and out["n_images"] == 2 and out["method"] == method


def test_region_boxes_are_scaled_to_the_resized_image():
    # A 200x50 image (resized to 196x56) with four 50 px wide colour columns; boxes in original pixels.
    colours = ["red", "green", "blue", "yellow"]
    image = fx.blocks((200, 50), [((50 * k, 0, 50 * k + 50, 50), c) for k, c in enumerate(colours)])
    boxes = [(50 * k + 6, 5, 50 * k + 44, 45) for k in range(4)]
    task = RegionTask([(image, boxes, [0, 1, 2, 3])], colours, ("{}",), project=fx.box_projection)
    assert _evaluator()[1].run({"r": task})["r"]["top1"] == 1.0
    shifted = RegionTask([(image, boxes, [1, 2, 3, 0])], colours, ("{}",), project=fx.box_projection)
    assert _evaluator()[1].run({"r": shifted})["r"]["top1"] == 0.0


def test_report_files(tmp_path):
    data = loaders.urban1k(fx.build_urban1k(tmp_path / "u"))
    report = evaluate(fx.FakeModel(), fx.word_tokenizer(), {"retrieval": task_for(data)}, out_dir=tmp_path / "out",
                      meta={"checkpoint": "none"})
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved == json.loads(json.dumps(report).replace("NaN", "null"))  # (the recalls k reaches: null)
    assert set(saved["retrieval"]) >= {"i2t_r1", "t2i_r1", "chance_r1", "n"} and saved["meta"]["checkpoint"] == "none"
    table = (tmp_path / "out" / "report.md").read_text()
    assert "| retrieval | 3 | i2t_r1 | 1.0000 |" in table and table == markdown_table(report)


def test_a_wrapped_model_is_unwrapped(tmp_path):
    class Wrapper(torch.nn.Module):  # as DistributedDataParallel holds the model in .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = fx.FakeModel()
    data = loaders.urban1k(fx.build_urban1k(tmp_path))
    out = Evaluator(Wrapper(model), fx.word_tokenizer()).run({"r": task_for(data)})["r"]
    assert out["i2t_r1"] == 1.0 and model.image_calls == [3]


def test_model_mode_is_restored(tmp_path):
    model = fx.FakeModel().train()
    data = loaders.urban1k(fx.build_urban1k(tmp_path))
    seen = []
    original = model.encode_image
    model.encode_image = lambda *a, **k: (seen.append(model.training), original(*a, **k))[1]
    Evaluator(model, fx.word_tokenizer()).run({"r": task_for(data)})
    assert seen == [False] and model.training


# ---- the real tiny model --------------------------------------------------------------------------------------


def _tiny_model(vocab_size: int = 64):
    from fineviti.model import create_model

    torch.manual_seed(0)
    return create_model("tiny", vision={"depth": 1, "width": 64, "heads": 2, "mlp_hidden": 128},
                        text={"depth": 1, "width": 64, "heads": 2, "mlp_hidden": 128, "vocab_size": vocab_size},
                        embed_dim=32, attn_backend="torch", rope_backend="torch")


def test_default_box_projection_is_uniform_attention_pooling():
    model = _tiny_model().eval()
    with torch.no_grad():
        model.visual.pool.query.zero_()  # uniform attention over each image's tokens
    side = 2 * 14
    patches = torch.randn(2 * 4 + 6 * 4, 3 * 14 * 14)
    grid = torch.tensor([[2, 4], [4, 6]], dtype=torch.int32)
    from fineviti.data.positions import build_positions_ref

    cu, pos = build_positions_ref(grid, 2)
    with torch.no_grad():
        emb, tokens = model.encode_image(patches, cu, pos, 24, [8, 24], return_tokens=True)
        from fineviti.eval.regions import pool_boxes

        whole = torch.tensor([[0.0, 0, 4 * 14, side], [0, 0, 6 * 14, 4 * 14]])
        pooled = pool_boxes(tokens, cu, grid, pos, whole, torch.tensor([0, 1]), 14, 2)
        torch.testing.assert_close(default_box_projection(model)(pooled), emb, rtol=1e-4, atol=1e-5)


def test_real_tiny_model_end_to_end(tmp_path):
    from fineviti.data.tokenizer import CaptionTokenizer, train_tokenizer

    data = loaders.karpathy_captions(fx.build_karpathy(tmp_path, "coco"), tmp_path, "test")
    texts = [c for r in data.records for c in r.captions]
    tokenizer = CaptionTokenizer(train_tokenizer(texts * 4, tmp_path / "tokenizer.json", vocab_size=300))
    model = _tiny_model(tokenizer.vocab_size)
    coco = loaders.coco_instances(fx.build_coco_instances(tmp_path), tmp_path)
    tasks = {"retrieval": task_for(data), "regions": task_for(coco)}
    report = evaluate(model, tokenizer, tasks, cfg=EvalConfig(token_budget=60), out_dir=tmp_path / "out")
    assert report["retrieval"]["n"] == 4 and 0.0 <= report["retrieval"]["i2t_r1"] <= 1.0
    assert report["regions"]["n"] == 3 and 0.0 <= report["regions"]["top1"] <= 1.0
    assert report["meta"]["merge"] == model.visual.merge and report["meta"]["context_length"] == 256
    assert (tmp_path / "out" / "report.md").is_file()


# ---- checkpoints ----------------------------------------------------------------------------------------------


def _perturbed(model):
    other = fx.FakeModel()
    with torch.no_grad():
        other.token_table.add_(torch.randn_like(other.token_table))
        other.visual.scale.fill_(3.0)
    assert not torch.equal(other.token_table, model.token_table)
    return other


@pytest.mark.parametrize("fmt", ["torch", "nested", "safetensors", "dcp"])
def test_load_checkpoint_formats(tmp_path, fmt):
    model = fx.FakeModel()
    source = _perturbed(model)
    if fmt == "torch":
        path = tmp_path / "model.pt"
        torch.save({"module." + k: v for k, v in source.state_dict().items()}, path)  # a DDP-wrapped save
    elif fmt == "nested":
        path = tmp_path / "ckpt.pt"
        torch.save({"model": source.state_dict(), "step": 3}, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        import torch.distributed.checkpoint as dcp

        path = tmp_path / "step_10"
        dcp.save({"model": source.state_dict(), "optim": {"lr": 0.1}}, checkpoint_id=str(path), no_dist=True)
    info = load_checkpoint(model, path)
    assert info["format"] == ("torch" if fmt == "nested" else fmt) and info["tensors"] == 3
    assert info["prefix"] == ("model." if fmt == "dcp" else "")
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_load_a_stage2_vision_tower_into_the_stage1_model(tmp_path):
    import torch.distributed.checkpoint as dcp

    stage2 = {"visual": fx.FakeVisual().state_dict(), "merger": {"w": torch.ones(3)}}
    with torch.no_grad():
        stage2["visual"]["scale"].fill_(7.0)
    dcp.save({"model": stage2}, checkpoint_id=str(tmp_path / "s2"), no_dist=True)
    model = fx.FakeModel()
    info = load_checkpoint(model.visual, tmp_path / "s2")
    assert info["prefix"] == "model.visual." and float(model.visual.scale.detach()) == 7.0


def test_checkpoint_mismatch_names_the_first_difference(tmp_path):
    model = fx.FakeModel()
    bigger = fx.FakeModel(vocab=fx.WORDS + ["extra"])
    torch.save(bigger.state_dict(), tmp_path / "bigger.pt")
    before = model.token_table.clone()
    with pytest.raises(CheckpointMismatchError, match=r"'token_table' has shape \(18, 5\) in checkpoint .*"
                                                      r"model's 'token_table' has shape \(17, 5\)"):
        load_checkpoint(model, tmp_path / "bigger.pt")
    assert torch.equal(model.token_table, before)  # nothing copied
    state = model.state_dict()
    del state["visual.scale"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(CheckpointMismatchError, match="has no tensor 'visual.scale'"):
        load_checkpoint(model, tmp_path / "missing.pt")
    state = dict(model.state_dict(), **{"visual.extra": torch.zeros(2)})
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(CheckpointMismatchError, match="has 'visual.extra', which the model does not have"):
        load_checkpoint(model, tmp_path / "extra.pt")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(model, tmp_path / "nothing.pt")


def test_vision_tower_of_another_depth_is_looked_for_under_its_own_prefix(tmp_path):
    """The vision tower loaded alone from a checkpoint whose text tower is deeper than its vision tower: the error
    names the vision blocks the checkpoint lacks, not the text tower's (whose blocks share the vision blocks' key
    names and once won the prefix detection)."""
    from fineviti.model import create_model

    saved = create_model("tiny", attn_backend="torch", **{"vision.depth": 2, "text.depth": 4})
    torch.save({"model": saved.state_dict(), "step": 1}, tmp_path / "ckpt.pt")
    model = create_model("tiny", attn_backend="torch", **{"vision.depth": 4})
    with pytest.raises(CheckpointMismatchError, match=r"has no tensor 'visual\.blocks\.2\."):
        load_checkpoint(model.visual, tmp_path / "ckpt.pt")


# ---- torchrun: 2 gloo processes ---------------------------------------------------------------------------------


def _worker(rank, world, root, out):
    import torch.distributed as dist

    # A file rendezvous: no TCP port to race for with other tests on the machine.
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        from pathlib import Path

        root = Path(root)
        data = loaders.karpathy_captions(root / "dataset_coco.json", root, "test")
        images, mapping = root / "folder" / "train", root / "folder" / "LOC_synset_mapping.txt"
        folder = loaders.image_folder(images, mapping)
        model = fx.FakeModel()
        tasks = {"coco": task_for(data), "zs": task_for(folder)}
        report = evaluate(model, fx.word_tokenizer(), tasks, cfg=EvalConfig(token_budget=24), out_dir=out)
        emb = Evaluator(model, fx.word_tokenizer()).encode_images([r.image for r in data.records])[0]
        # 3 images / captions, one per call: rank 0 has two, rank 1 one and must pad with a dummy call.
        uneven = fx.FakeModel()
        ev = Evaluator(uneven, fx.word_tokenizer(), EvalConfig(token_budget=24, text_token_budget=1))
        ev.encode_images([r.image for r in data.records[:3]])
        texts = ev.encode_texts(["red", "green", "blue"])
        torch.save({"report": report, "emb": emb, "texts": texts, "uneven": (uneven.image_calls, uneven.text_calls)},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    root = tmp_path / "data"
    root.mkdir()
    fx.build_karpathy(root, "coco")
    fx.build_image_folder(root / "folder")
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_worker, args=(2, str(root), str(out)), nprocs=2, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    data = loaders.karpathy_captions(root / "dataset_coco.json", root, "test")
    single = Evaluator(fx.FakeModel(), fx.word_tokenizer()).encode_images([r.image for r in data.records])[0]
    for rank in ranks:
        torch.testing.assert_close(rank["emb"], single, rtol=0, atol=0)  # every rank holds all, in order
        assert rank["report"]["coco"]["i2t_r1"] == 1.0 and rank["report"]["zs"]["top1"] == 1.0
        assert rank["report"]["meta"]["world_size"] == 2
    # Every rank made the same number of model calls: rank 1 padded its one real call with a dummy one.
    assert ranks[0]["uneven"] == ranks[1]["uneven"] == ([1, 1], [1, 1])
    torch.testing.assert_close(ranks[1]["texts"], fx.FakeModel().token_table[[9, 10, 11]].detach(), rtol=0, atol=0)
    assert (out / "report.json").is_file()


# ---- the command line ---------------------------------------------------------------------------------------------


def test_cli_eval_on_synthetic_heldout(tmp_path, capsys):
    import torch.distributed.checkpoint as dcp

    from fineviti.cli import main
    from fineviti.data import synth
    from fineviti.data.tokenizer import CaptionTokenizer
    from fineviti.model import create_model

    synth.generate(tmp_path / "data", images=6, heldout=8, processes=1, vocab_size=400)
    small = {"vision.depth": 1, "vision.width": 64, "vision.heads": 2, "vision.mlp_hidden": 96, "text.depth": 1,
             "text.width": 64, "text.heads": 2, "text.mlp_hidden": 96, "embed_dim": 32, "attn_backend": "torch"}
    vocab = CaptionTokenizer(tmp_path / "data" / "tokenizer.json").vocab_size
    model = create_model("tiny", **small, **{"text.vocab_size": vocab})
    dcp.save({"model": model.state_dict(), "step": 1}, checkpoint_id=str(tmp_path / "run" / "step_1"), no_dist=True)
    sets = [f"--set={k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in small.items()]
    args = ["eval", "--format", "synthetic", "--data", str(tmp_path / "data" / "heldout"), "--checkpoint",
            str(tmp_path / "run" / "step_1"), "--out", str(tmp_path / "eval"), "--max-pixels", str(28 * 28 * 16),
            "--region-method", "roi_align", *sets]
    assert main(args) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["retrieval"]["n"] == 8 and report["hard_negatives"]["n"] == 8
    assert report["regions"]["n_classes"] == len(synth.COLOURS) * len(synth.SHAPES)
    assert report["regions"]["method"] == "roi_align"
    assert report["meta"]["loaded"]["checkpoint"]["prefix"] == "model."
    assert "| retrieval | 8 | i2t_r1 |" in capsys.readouterr().out
    # A second evaluation into the same --out is refused before any work, the report left as it was.
    before = (tmp_path / "eval" / "report.json").read_bytes()
    assert main(args) == 2
    assert "already holds report.json and report.md; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "eval" / "report.json").read_bytes() == before
    args.append("--overwrite")
    # The same checkpoint against the model without the overrides: a clear error, exit code 2.
    assert main(args[: args.index("--region-method")] + ["--overwrite"]) == 2
    assert "checkpoint does not match the model config" in capsys.readouterr().err
    # An input the format does not use is an error, not ignored; only a vision tower loaded says what is random.
    for extra, flag in ((["--split", "val"], "--split"), (["--annotations", "x.json"], "--annotations"),
                        (["--class-names", "m.txt"], "--class-names")):
        assert main([*args, *extra]) == 2
        assert f"{flag} does not apply to --format synthetic" in capsys.readouterr().err
    assert report["regions"]["templates"] == 3  # the synthetic regions' own, without --templates
    vision_only = [a.replace("--checkpoint", "--vision-checkpoint") for a in args]
    assert main([*vision_only, "--templates", "default"]) == 0
    assert "the text tower and the logit scale keep random weights" in capsys.readouterr().err
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["meta"]["loaded"].keys() == {"vision_checkpoint"}
    assert report["regions"]["templates"] == 1  # --templates default: "a photo of a {}.", not ignored


# ---- on a GPU -----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_runner_matches_the_cpu(tmp_path):
    data = loaders.karpathy_captions(fx.build_karpathy(tmp_path, "coco"), tmp_path, "test")
    coco = loaders.coco_instances(fx.build_coco_instances(tmp_path), tmp_path)
    tasks = {"retrieval": task_for(data),
             "regions": RegionTask(coco.records, coco.classnames, ("a {} box",), method="roi_align",
                                   project=fx.box_projection)}
    cpu = Evaluator(fx.FakeModel(), fx.word_tokenizer()).run(tasks)
    gpu = Evaluator(fx.FakeModel().cuda(), fx.word_tokenizer()).run(tasks)
    for name in tasks:
        for key, value in cpu[name].items():
            if key != "seconds":
                assert gpu[name][key] == pytest.approx(value), (name, key)
    assert gpu["meta"]["device"].startswith("cuda") and gpu["retrieval"]["i2t_r1"] == 1.0


@pytest.mark.gpu
def test_gpu_tiny_model_embeddings_match_the_cpu(tmp_path):
    data = loaders.karpathy_captions(fx.build_karpathy(tmp_path, "coco"), tmp_path, "test")
    images = [r.image for r in data.records]
    model = _tiny_model()
    cpu = Evaluator(model, fx.word_tokenizer(), EvalConfig(token_budget=60)).encode_images(images)[0]
    gpu = Evaluator(model.cuda(), fx.word_tokenizer(), EvalConfig(token_budget=60)).encode_images(images)[0]
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)


class _OneShot:
    """A stream that gives its bytes once (a socket, a pipe, a response body)."""

    def __init__(self, data: bytes):
        self.data = data

    def read(self) -> bytes:
        if self.data is None:
            raise OSError("stream already read")
        data, self.data = self.data, None
        return data


def test_region_record_stream_is_read_once():
    """A region record whose image is a stream is read once: the box check and the encoding each took the image,
    and the second read failed (or got b"" and reported an unreadable image)."""
    import io

    image = fx.blocks((56, 28), [((0, 0, 28, 28), "red"), ((28, 0, 56, 28), "blue")])
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    data = buffer.getvalue()
    boxes, labels = [(0, 0, 28, 28), (28, 0, 56, 28)], [0, 1]
    want = _evaluator()[1].run({"r": RegionTask([(data, boxes, labels)], ["red", "blue"], project=fx.box_projection)})
    for record in ((_OneShot(data), boxes, labels), loaders.RegionRecord(_OneShot(data), boxes, labels, "k")):
        task = RegionTask([record], ["red", "blue"], project=fx.box_projection)
        got = _evaluator()[1].run({"r": task})
        assert got["r"]["n"] == 2 and got["r"]["top1"] == want["r"]["top1"] == 1.0


def test_encode_images_with_boxes_some_empty():
    images = [fx.blocks((56, 28), [((0, 0, 28, 28), "red"), ((28, 0, 56, 28), "blue")]), fx.blocks((28, 28), [])]
    emb, boxes = _evaluator()[1].encode_images(images, [[(0, 0, 28, 28), (28, 0, 56, 28)], []], fx.box_projection)
    assert emb.shape == (2, 5) and boxes[0].shape == (2, 5) and boxes[1].shape == (0, 5)
    assert boxes[0][:, :3].argmax(1).tolist() == [0, 2]  # the red box's strongest channel is red, the blue one's blue
    _, none = _evaluator()[1].encode_images(images[1:], [[]], fx.box_projection)
    assert none[0].shape == (0, 5)


@pytest.mark.parametrize("code", [3, 6, 8])
def test_encode_images_turns_tagged_images_and_their_boxes_upright(code):
    """A photo stored with an EXIF orientation tag gives the embeddings of its upright picture, as the training
    loader feeds it; its boxes (in the stored pixels) turn with it. With exif_orientation=False, the stored pixels'
    embeddings, as before."""
    import io

    import numpy as np
    from PIL import Image, ImageOps

    from fineviti.data.pixels import ORIENTATION_STEPS, orient_boxes

    stored = np.random.default_rng(code).integers(0, 255, (56, 112, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = code
    tagged, plain, upright = io.BytesIO(), io.BytesIO(), io.BytesIO()
    Image.fromarray(stored).save(tagged, "PNG", exif=exif.tobytes())
    Image.fromarray(stored).save(plain, "PNG")
    ImageOps.exif_transpose(Image.open(io.BytesIO(tagged.getvalue()))).save(upright, "PNG")
    boxes = [(14, 0, 42, 28), (56, 28, 112, 56)]
    turned = orient_boxes(boxes, 56, 112, ORIENTATION_STEPS[code])
    model = _tiny_model().eval()
    project = default_box_projection(model)
    with torch.no_grad():
        evaluator = Evaluator(model, fx.word_tokenizer(), EvalConfig())
        emb, box_emb = evaluator.encode_images([tagged.getvalue()], [boxes], project)
        want, want_boxes = evaluator.encode_images([upright.getvalue()], [turned], project)
        off = Evaluator(model, fx.word_tokenizer(), EvalConfig(exif_orientation=False))
        stored_emb, stored_boxes = off.encode_images([tagged.getvalue()], [boxes], project)
        plain_emb, plain_boxes = off.encode_images([plain.getvalue()], [boxes], project)
    torch.testing.assert_close(emb, want, rtol=0, atol=0)
    torch.testing.assert_close(box_emb[0], want_boxes[0], rtol=0, atol=0)
    torch.testing.assert_close(stored_emb, plain_emb, rtol=0, atol=0)
    torch.testing.assert_close(stored_boxes[0], plain_boxes[0], rtol=0, atol=0)
    assert (emb - stored_emb).abs().max() > 1e-3  # the turn reaches the model (positions and pixels)


def test_region_boxes_in_the_declared_upright_frame_and_pil_images_keep_their_tag():
    """Two things the training loader did and the evaluator did not: a record whose declared size (COCO's, a
    shard json's) is the upright one has its boxes upright too (the evaluator turned them again: the wrong region,
    and a box below the stored height was refused as outside its image); and a PIL image keeps its orientation tag
    (image_bytes re-encoded it without its EXIF block, so it was read as untagged)."""
    import io

    import numpy as np
    from PIL import Image, ImageOps

    stored = np.random.default_rng(5).integers(0, 200, (56, 112, 3), dtype=np.uint8)
    stored[0:28, 14:42] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, "PNG", exif=exif.tobytes())
    tagged = buffer.getvalue()
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(tagged))))
    white = (upright.min(-1) >= 250).nonzero()
    upright_box = (int(white[1].min()), int(white[0].min()), int(white[1].max()) + 1, int(white[0].max()) + 1)
    model = _tiny_model().eval()
    project = default_box_projection(model)
    evaluator = Evaluator(model, fx.word_tokenizer(), EvalConfig())
    with torch.no_grad():
        emb, as_stored = evaluator.encode_images([tagged], [[(14, 0, 42, 28)]], project)
        _, as_declared = evaluator.encode_images([tagged], [[upright_box]], project, sizes=[(112, 56)])
        pil_emb, _ = evaluator.encode_images([Image.open(io.BytesIO(tagged))])
        low = (0, 70, 28, 100)  # inside the upright 56 x 112 picture, below the stored image's 56 rows
        task = RegionTask([loaders.RegionRecord(tagged, [upright_box, low], [0, 1], "k", (112, 56))],
                          ["red", "blue"], ("{}",))
        assert evaluator.run({"r": task})["r"]["n"] == 2
    torch.testing.assert_close(as_declared[0], as_stored[0], rtol=0, atol=0)
    torch.testing.assert_close(pil_emb, emb, rtol=0, atol=0)
    broken = Image.new("RGB", (28, 28))
    broken.info["exif"] = b"Exif\0\0garbage"  # a malformed camera block: read as untagged, not an error
    assert evaluator.encode_images([broken])[0].shape == (1, emb.shape[1])
    with pytest.raises(ValueError, match=r"EvalConfig\.box_frame must be one of"):
        EvalConfig(box_frame="raw")
