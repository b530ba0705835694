"""The teacher interface (docs/method.md §1, §3) and the embedded teacher's pretraining stage."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipeline.data.schema import Instance
from pipeline.data.shards import DatasetWriter
from pipeline.teacher import Teacher, TeacherError, create_teacher, sha256_file

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "pipeline" / "model_configs" / "clip-td-tiny.json")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny() -> Teacher:
    torch.manual_seed(0)
    return create_teacher(TINY)


def _pixels(teacher: Teacher, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, teacher.image_size, teacher.image_size, generator=g)


# ---------------------------------------------------------------------------------------------- images


def test_image_tokens_shape_and_pooled_is_encode_image(tiny):
    x = _pixels(tiny)
    out = tiny.encode_images(x)
    assert set(out) == {"tokens", "pooled"}
    assert (tiny.grid, tiny.num_patches, tiny.embed_dim, tiny.context_length) == (8, 64, 128, 32)
    assert out["tokens"].shape == (2, tiny.num_patches, tiny.embed_dim)
    assert out["tokens"].dtype == torch.float32
    torch.testing.assert_close(out["pooled"], tiny.model.encode_image(x), rtol=0, atol=1e-6)


def test_patch_tokens_share_the_pooled_head(tiny):
    # For pool_type 'tok' open_clip's pooled vector is proj(ln_post(CLS)): the patch tokens go through the same
    # head, and CLS itself is not among them.
    visual = tiny.model.visual
    assert visual.attn_pool is None and visual.pool_type == "tok" and not visual.final_ln_after_pool
    x = _pixels(tiny)
    out = tiny.encode_images(x)
    fi = tiny.model.forward_intermediates(
        image=x, image_indices=1, image_output_fmt="NLC", image_output_extra_tokens=True, normalize=False
    )
    cls = fi["image_intermediates_prefix"][-1][:, 0]
    torch.testing.assert_close(visual.ln_post(cls) @ visual.proj, out["pooled"], rtol=0, atol=1e-5)
    patches = fi["image_intermediates"][-1]
    torch.testing.assert_close(visual.ln_post(patches) @ visual.proj, out["tokens"], rtol=0, atol=1e-6)
    assert not torch.allclose(out["tokens"], out["pooled"][:, None].expand_as(out["tokens"]), atol=1e-3)


def test_avg_pool_variant_pools_the_tokens(tmp_path):
    # With pool_type 'avg', pooled = proj(mean ln_post(patches)) = mean of the patch tokens (proj is linear).
    cfg = json.loads(Path(TINY).read_text())
    cfg["vision_cfg"].update(layers=2, width=32, head_width=16, pool_type="avg")
    cfg["text_cfg"].update(layers=1, width=32, heads=2)
    cfg["embed_dim"] = 16
    path = tmp_path / "clip-td-test-avg.json"
    path.write_text(json.dumps(cfg))
    t = create_teacher(str(path))
    out = t.encode_images(_pixels(t), relevance=("value", "intermediate"))
    torch.testing.assert_close(out["tokens"].mean(1), out["pooled"], rtol=0, atol=1e-5)
    assert out["value"].shape == out["intermediate"].shape == (2, 64, 16)


def test_relevance_sources_are_maskclip_value_and_middle_layer(tiny):
    x = _pixels(tiny, seed=1)
    visual = tiny.model.visual
    blocks = visual.transformer.resblocks
    seen: dict[str, torch.Tensor] = {}

    # setdefault: the first call is the normal forward (the value path calls the last block again).
    def grab_input(module, args, kwargs):
        seen.setdefault("last_in", args[0])

    h1 = blocks[-1].register_forward_pre_hook(grab_input, with_kwargs=True)
    mid = len(blocks) // 2 - 1
    h2 = blocks[mid].register_forward_hook(lambda m, a, o: seen.__setitem__("mid_out", o))
    try:
        out = tiny.encode_images(x, relevance=("value", "intermediate"))
    finally:
        h1.remove()
        h2.remove()
    assert set(out) == {"tokens", "pooled", "value", "intermediate"}

    def head(z):
        return visual.ln_post(z) @ visual.proj

    # MaskCLIP, written out: v-projection of ln_1(x), out_proj, residual, MLP; then ln_post and proj.
    blk = blocks[-1]
    x_in = seen["last_in"][:, 1:]
    c = x_in.shape[-1]
    w, b = blk.attn.in_proj_weight[2 * c :], blk.attn.in_proj_bias[2 * c :]
    with torch.no_grad():
        v = blk.attn.out_proj(torch.nn.functional.linear(blk.ln_1(x_in), w, b))
        y = x_in + v
        y = y + blk.mlp(blk.ln_2(y))
        torch.testing.assert_close(out["value"], head(y), rtol=0, atol=1e-5)
        torch.testing.assert_close(out["intermediate"], head(seen["mid_out"][:, 1:]), rtol=0, atol=1e-6)
    assert not torch.allclose(out["value"], out["tokens"], atol=1e-3)
    with pytest.raises(ValueError, match="relevance"):
        tiny.encode_images(x, relevance=("attention",))


def test_preprocess_split_matches_open_clip_transform(tiny):
    rng = np.random.default_rng(0)
    for size in [(64, 64), (90, 70)]:
        img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        ref = tiny.preprocess(img)
        got = tiny.normalize_uint8(tiny.pil_to_uint8(img)[None])[0]
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_vit_b32_random_init_has_49_patches_of_512():
    torch.manual_seed(0)
    t = create_teacher("ViT-B-32")
    x = torch.randn(2, 3, 224, 224)
    out = t.encode_images(x)
    assert (t.grid, t.num_patches, t.embed_dim, t.context_length) == (7, 49, 512, 77)
    assert out["tokens"].shape == (2, 49, 512)
    torch.testing.assert_close(out["pooled"], t.model.encode_image(x), rtol=0, atol=1e-5)
    txt = t.encode_texts(t.tokenizer(["a photo of a cat", "a dog"]))
    assert txt["tokens"].shape == (2, 77, 512)
    torch.testing.assert_close(
        txt["tokens"][torch.arange(2), txt["lengths"] - 1], txt["pooled"], rtol=0, atol=1e-5
    )


# ---------------------------------------------------------------------------------------------- text


def test_text_tokens_lengths_and_pooled(tiny):
    texts = ["a red circle", "two small blue squares left of a green cross", ""]
    ids = tiny.tokenizer(texts)
    out = tiny.encode_texts(ids)
    assert out["tokens"].shape == (3, tiny.context_length, tiny.embed_dim)
    eot = tiny.tokenizer.eot_token_id
    expected = torch.tensor([row.tolist().index(eot) + 1 for row in ids])
    assert out["lengths"].tolist() == expected.tolist() == tiny.text_lengths(ids).tolist()
    assert out["lengths"][2] == 2  # SOT, EOT
    torch.testing.assert_close(out["pooled"], tiny.model.encode_text(ids), rtol=0, atol=1e-6)
    at_eot = out["tokens"][torch.arange(3), out["lengths"] - 1]
    torch.testing.assert_close(at_eot, out["pooled"], rtol=0, atol=1e-6)


def test_describe_is_json_and_names_the_checkpoint(tiny, tmp_path):
    d = tiny.describe()
    json.dumps(d)
    assert d["model"] == "clip-td-tiny" and d["model_config"]["embed_dim"] == 128
    assert (d["embed_dim"], d["num_patches"], d["grid"], d["context_length"]) == (128, 64, 8, 32)
    assert d["preprocess"]["image_size"] == [64, 64] and len(d["preprocess"]["mean"]) == 3
    assert d["pretrained_kind"] == "random" and d["open_clip_version"]
    ckpt = tmp_path / "t.pt"
    torch.save({"state_dict": tiny.model.state_dict()}, ckpt)
    t2 = create_teacher(TINY, pretrained=str(ckpt))
    d2 = t2.describe()
    assert d2["pretrained_kind"] == "file" and d2["pretrained_checksum"] == sha256_file(ckpt)
    x = _pixels(tiny)
    torch.testing.assert_close(t2.encode_images(x)["tokens"], tiny.encode_images(x)["tokens"], rtol=0, atol=0)


def test_errors_name_the_model_or_checkpoint(tmp_path):
    with pytest.raises(TeacherError, match="nope.json"):
        create_teacher(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TeacherError, match="bad.json"):
        create_teacher(str(bad))
    partial = tmp_path / "partial.json"
    partial.write_text('{"embed_dim": 8}')
    with pytest.raises(TeacherError, match="vision_cfg"):
        create_teacher(str(partial))
    with pytest.raises(TeacherError, match="No-Such-Model"):
        create_teacher("No-Such-Model")
    with pytest.raises(TeacherError, match="missing.pt"):
        create_teacher(TINY, pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(TeacherError, match="no_such_tag"):
        create_teacher(TINY, pretrained="no_such_tag")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherError, match="junk.pt"):
        create_teacher(TINY, pretrained=str(junk))


# ---------------------------------------------------------------------------------------------- pretraining

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220)}
SHAPES = ("circle", "square")
SIDES = ("left", "right")


def _draw(colour: str, shape: str, side: str, domain: str, rng: np.random.Generator) -> bytes:
    if domain == "plain":
        img = Image.new("RGB", (64, 64), (235, 235, 230))
    else:
        noise = rng.integers(20, 90, (64, 64, 3), dtype=np.uint8)
        img = Image.fromarray(noise)
    d = ImageDraw.Draw(img)
    x0 = 6 if side == "left" else 34
    box = (x0, 18, x0 + 24, 42)
    fill = COLOURS[colour] if domain == "plain" else None
    outline = COLOURS[colour]
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=fill, outline=outline, width=3)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_caption_dataset(out: Path, split: str, seed: int, copies: int = 1) -> Path:
    """A hand-made caption corpus: one shape per image, two visual domains, hard negatives by attribute."""
    rng = np.random.default_rng(seed)
    with DatasetWriter(out, source="test", split=split) as w:
        n = 0
        for domain in ("plain", "textured"):
            for colour in COLOURS:
                for shape in SHAPES:
                    for side in SIDES:
                        for c in range(copies):
                            image_id = f"{split}-{domain}-{colour}-{shape}-{side}-{c}"
                            w.add_image(image_id, _draw(colour, shape, side, domain, rng), "png", domain)
                            caption = f"a {colour} {shape} on the {side}"
                            hard = [f"a {o} {shape} on the {side}" for o in COLOURS if o != colour]
                            hard.append(
                                f"a {colour} {'square' if shape == 'circle' else 'circle'} on the {side}"
                            )
                            inst = Instance(
                                key=f"{split}-{n}",
                                task="caption",
                                image_id=image_id,
                                split=split,
                                domain=domain,
                                caption=caption,
                                meta={"hard_negatives": hard},
                            )
                            w.add_instance(inst)
                            n += 1
    return out


def test_a_shipped_config_named_as_exports_name_it_loads_from_any_folder(tmp_path, monkeypatch):
    """dvc.yaml and every export name the embedded teacher 'pipeline/model_configs/clip-td-tiny.json', relative
    to the checkout: predicting or evaluating from another folder still finds it (and its tokenizer)."""
    from pipeline.teacher import register_model
    from student.data import load_tokenizer

    monkeypatch.chdir(tmp_path)
    assert register_model("pipeline/model_configs/clip-td-tiny.json") == "clip-td-tiny"
    assert load_tokenizer("pipeline/model_configs/clip-td-tiny.json")(["a red circle"]).shape[0] == 1
    (tmp_path / "pipeline" / "model_configs").mkdir(parents=True)  # a file of the working folder comes first
    (tmp_path / "pipeline" / "model_configs" / "clip-td-tiny.json").write_text("{not json")
    with pytest.raises(TeacherError, match="not valid JSON"):
        register_model("pipeline/model_configs/clip-td-tiny.json")
    with pytest.raises(TeacherError, match="'pipeline/model_configs/nope.json': file not found"):
        register_model("pipeline/model_configs/nope.json")


def test_pair_sampler_never_repeats_image_or_text():
    from pipeline.pretrain import PairSampler, cosine_lr

    inst_image = np.array([0, 0, 1, 1, 2, 3, 4, 5, 6, 7])
    inst_text = np.array([0, 1, 1, 2, 3, 3, 4, 5, 6, 7])
    s = PairSampler(inst_image, inst_text, batch_size=5, seed=0)
    for _ in range(20):
        b = s.next()
        assert len(b) == 5
        assert len(set(inst_image[b])) == 5 and len(set(inst_text[b])) == 5
    with pytest.raises(ValueError, match="distinct"):
        PairSampler(inst_image, inst_text, batch_size=9, seed=0)
    lrs = [cosine_lr(i, 1.0, 2, 10) for i in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[2] == 1.0 and lrs[-1] < 0.05


def test_pretrain_stage_lowers_loss_and_writes_loadable_checkpoint(tmp_path):
    import open_clip
    from click.testing import CliRunner

    from pipeline.config import dump_defaults
    from stages.pretrain_teacher import main

    captions = make_caption_dataset(tmp_path / "captions", "captions", seed=0, copies=2)
    val = make_caption_dataset(tmp_path / "captions_val", "captions_val", seed=1)
    params = tmp_path / "params.yaml"
    params.write_text(dump_defaults())
    out, metrics_path = tmp_path / "teacher", tmp_path / "metrics" / "teacher.json"
    sets = [
        f"teacher.model={TINY}",
        "teacher.pretrain.steps=20",
        "teacher.pretrain.batch_size=12",
        "teacher.pretrain.warmup=2",
        "teacher.pretrain.threads=1",
    ]
    args = ["--params", str(params), "--captions", str(captions), "--val", str(val)]
    args += ["--out", str(out), "--metrics", str(metrics_path), "--device", "cpu", "--quiet"]
    for s in sets:
        args += ["--set", s]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output

    m = json.loads(metrics_path.read_text())
    assert m["steps"] == 20 and m["seconds"] > 0 and m["train_instances"] == 48
    assert m["final_loss"] < m["initial_loss"], m["loss_curve"]
    assert set(m["domains"]) == {"plain", "textured"}
    for r in m["domains"].values():
        assert r["n"] == 12 and r["n_hard"] == 12
        assert 0.0 <= r["random_top1"] <= 1.0 and 0.0 <= r["hard_top1"] <= 1.0
        # 11 other captions exist in this small corpus, so the random set has 12 candidates, not 32.
        assert r["random_chance"] == pytest.approx(1 / 12) and r["hard_chance"] == pytest.approx(1 / 4)
    assert m["chance"]["hard"] == pytest.approx(0.25)

    # The checkpoint loads through plain open_clip and through create_teacher, with the trained weights.
    ckpt = out / "teacher.pt"
    open_clip.add_model_config(TINY)
    plain, _, _ = open_clip.create_model_and_transforms("clip-td-tiny", pretrained=str(ckpt))
    teacher = create_teacher(TINY, pretrained=str(ckpt))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for k, v in teacher.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = _pixels(teacher, seed=3)
    ids = teacher.tokenizer(["a red circle on the left", "a blue square on the right"])
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(teacher.encode_images(x)["pooled"], plain.encode_image(x), rtol=0, atol=0)
        torch.testing.assert_close(
            teacher.encode_texts(ids)["pooled"], plain.encode_text(ids), rtol=0, atol=1e-5
        )
    torch.manual_seed(0)
    fresh = create_teacher(TINY)
    assert not torch.allclose(fresh.encode_images(x)["pooled"], teacher.encode_images(x)["pooled"])


@pytest.mark.parametrize("failing", ["teacher.pt", "teacher.json"])
def test_pretrain_stage_failing_to_write_leaves_the_previous_files(tmp_path, monkeypatch, failing):
    from click.testing import CliRunner

    from pipeline.config import dump_defaults
    from stages.pretrain_teacher import main

    captions = make_caption_dataset(tmp_path / "captions", "captions", seed=0)
    params = tmp_path / "params.yaml"
    params.write_text(dump_defaults())
    out, metrics = tmp_path / "teacher", tmp_path / "metrics" / "teacher.json"
    out.mkdir()
    metrics.parent.mkdir()
    (out / "teacher.pt").write_bytes(b"previous teacher")
    metrics.write_text('{"steps": 600}')
    real_write, real_save = Path.write_text, torch.save

    def disk_full(self, text, *a, **k):  # half the text lands, then the disk is full
        if failing == "teacher.json" and self.name.startswith((".teacher.json", "teacher.json")):
            real_write(self, text[: len(text) // 2], *a, **k)
            raise OSError(28, "No space left on device")
        return real_write(self, text, *a, **k)

    def save_fails(obj, f, *a, **k):
        if failing == "teacher.pt" and Path(f).name.startswith("teacher.pt"):
            Path(f).write_bytes(b"half")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(Path, "write_text", disk_full)
    monkeypatch.setattr(torch, "save", save_fails)
    args = ["--params", str(params), "--captions", str(captions), "--val", str(captions)]
    args += ["--out", str(out), "--metrics", str(metrics), "--device", "cpu", "--quiet"]
    for s in (f"teacher.model={TINY}", "teacher.pretrain.steps=2", "teacher.pretrain.batch_size=8"):
        args += ["--set", s]
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0 and isinstance(res.exception, OSError), res.output
    # Each file is the previous one or a complete new one (the teacher is saved before its metrics are
    # written), never a part, and no partial copy is left beside them.
    assert metrics.read_text() == '{"steps": 600}'
    if failing == "teacher.pt":
        assert (out / "teacher.pt").read_bytes() == b"previous teacher"
    else:
        assert "state_dict" in torch.load(out / "teacher.pt", map_location="cpu", weights_only=True)
    assert [p.name for p in out.iterdir()] == ["teacher.pt"]
    assert [p.name for p in metrics.parent.iterdir()] == ["teacher.json"]


class _OracleTeacher:
    """Scores an image by which texts are its captions: the metric must then give 1.0 (and 0.0 reversed)."""

    def __init__(self, corpus, texts: list[str], sign: float = 1.0):
        self.index = {t: i for i, t in enumerate(texts)}
        self.own: dict[int, list[int]] = {}
        for r, c in zip(corpus.inst_image, corpus.captions, strict=True):
            self.own.setdefault(int(r), []).append(self.index[c])
        self.sign, self.dim = sign, len(texts)

    def tokenizer(self, texts):
        return torch.tensor([[self.index[t]] for t in texts])

    def normalize_uint8(self, u8):
        return u8[:, 0, 0, 0].long()  # the row id, written into the first pixel below

    def encode_images(self, rows):
        emb = torch.zeros(len(rows), self.dim)
        for i, r in enumerate(rows.tolist()):
            emb[i, self.own[r]] = self.sign
        return {"pooled": emb}

    def encode_texts(self, ids):
        return {"pooled": torch.nn.functional.one_hot(ids[:, 0], self.dim).float()}


def test_retrieval_metric_with_an_oracle():
    from pipeline.pretrain import CaptionCorpus, evaluate_retrieval

    caps = ["a red circle", "a circle that is red", "a blue square", "a green cross", "a red square"]
    inst_image = np.array([0, 0, 1, 2, 3])
    corpus = CaptionCorpus(
        images=torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 2, 2).contiguous(),
        image_ids=["a", "b", "c", "d"],
        inst_image=inst_image,
        captions=caps,
        domains=["x", "x", "y", "y", "y"],
        hard_negatives=[["a blue circle"], ["a blue circle"], ["a red square"], [], ["a red circle"]],
        texts=caps,
        inst_text=np.arange(5),
    )
    texts = [*caps, "a blue circle"]
    good = evaluate_retrieval(_OracleTeacher(corpus, texts), corpus, n_captions=32)
    assert good["all"]["random_top1"] == 1.0 and good["all"]["hard_top1"] == 1.0
    assert good["x"]["n"] == 2 and good["y"]["n"] == 3 and good["y"]["n_hard"] == 2
    # Instance 0's own other caption is never a negative: 3 other captions remain -> chance 1/4.
    assert good["x"]["random_chance"] == pytest.approx(1 / 4)
    bad = evaluate_retrieval(_OracleTeacher(corpus, texts, sign=-1.0), corpus, n_captions=32)
    assert bad["all"]["random_top1"] == 0.0 and bad["all"]["hard_top1"] == 0.0


def test_the_store_check_refuses_a_checkpoint_path_loading_refuses(tmp_path):
    from pipeline.identity import teacher_identity

    # Training checks a store against teacher_identity(params): a mistyped path used to leave the checksum
    # out, so any store passed; it fails as loading the teacher does, with the same message.
    typo = str(tmp_path / "typo.pt")
    with pytest.raises(TeacherError, match=r"teacher checkpoint '.*typo\.pt' .*file not found") as loading:
        create_teacher(TINY, pretrained=typo)
    with pytest.raises(TeacherError) as checking:
        teacher_identity(TINY, typo)
    assert str(checking.value) == str(loading.value)
    with pytest.raises(TeacherError, match="no_such_tag"):
        teacher_identity(TINY, "no_such_tag")
    # A checkpoint that is there and a random init still give what they gave.
    ckpt = tmp_path / "teacher.pt"
    ckpt.write_bytes(b"weights")
    assert teacher_identity(TINY, str(ckpt))["pretrained_checksum"] == sha256_file(str(ckpt))
    assert "pretrained_checksum" not in teacher_identity(TINY, "")
