"""Test-wide environment (no network, one torch thread: the test machine's cores are shared) and the small
builders many test modules share: a tiny teacher config, tiny prepared datasets, the tiny world (prepared
synthetic shards, a saved teacher and its cache), student params for it, and a hand-written store."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import torch  # noqa: E402  (imported after the environment is set)

torch.set_num_threads(1)

import ast  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from pipeline import cache as C  # noqa: E402
from pipeline.config import CacheParams, Params, SyntheticParams, load_params  # noqa: E402
from pipeline.data import synthetic  # noqa: E402
from pipeline.data.schema import Instance  # noqa: E402
from pipeline.data.shards import DatasetWriter, PreparedDataset  # noqa: E402
from pipeline.texts import text_hash  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test starts on one torch thread: the pretrainings set their own count (teacher.pretrain.threads,
    student.pretrain.threads: 2 by default) and leave it set, as they do in a stage's process."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _dvc_as_installed_before(monkeypatch):
    """pipeline.dvc_lockfile.install (the lock's cheap update and entry-wise read) patches DVC for the
    process; each test gets DVC back as it found it."""
    import dvc.dvcfile
    import dvc.utils.strictyaml

    monkeypatch.setattr(dvc.dvcfile, "modify_yaml", dvc.dvcfile.modify_yaml)
    monkeypatch.setattr(dvc.utils.strictyaml, "parse_yaml", dvc.utils.strictyaml.parse_yaml)


def docs_python_block(page: str, heading: str) -> str:
    """The first python block under ``## heading`` of docs/``page``: tests run the recipes the docs show."""
    import re

    section = (REPO / "docs" / page).read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


PACKAGES = ("pipeline", "stages", "student")


def repo_module_file(name: str) -> Path | None:
    """The file of a dotted module name inside the repository (module.py or package/__init__.py), if any."""
    base = REPO / Path(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def repo_imports(path: Path, module: str, top_level_only: bool = False) -> set[str]:
    """Modules of this repo that ``module`` (at ``path``) imports: anywhere in the file (inside functions too:
    they run) or, with ``top_level_only``, at import time. ``from pkg import name`` counts both ``pkg`` and
    ``pkg.name`` when that is a module."""
    tree = ast.parse(path.read_text())
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                stem = f"{base}.{node.module}" if node.module else base
            else:
                stem = node.module or ""
            names = [stem] + [f"{stem}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in PACKAGES and repo_module_file(n) is not None}
    return found


def tiny_teacher_config(context_length: int = 16) -> dict:
    """An open_clip model config small enough to run in a test: 32 px images, 2 layers of width 64."""
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": 49408,
            "width": 64,
            "heads": 2,
            "layers": 2,
        },
    }


TINY_CFG = tiny_teacher_config(16)
TINY_TEACHER = tiny_teacher_config(24)  # the tiny world's: its synthetic texts need 24 tokens


# ------------------------------------------------------------------------------------ tiny datasets


def tiny_teacher_files(root: Path, name: str = "tiny.json") -> tuple[Path, Path]:
    """The tiny teacher's config and a checkpoint of its seed-0 random init, under ``root``: what an
    extraction's ``TeacherSpec`` names."""
    from pipeline.teacher import create_teacher

    cfg = root / name
    cfg.write_text(json.dumps(TINY_CFG))
    torch.manual_seed(0)
    ckpt = root / "teacher.pt"
    torch.save(create_teacher(str(cfg), "").model.state_dict(), ckpt)
    return cfg, ckpt


def png_bytes(seed: int, size: tuple[int, int] = (40, 32)) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(3):
        x, y = rng.randrange(size[0] - 8), rng.randrange(size[1] - 8)
        d.rectangle([x, y, x + 8, y + 8], fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def vqa_instance(key, image_id, split, q, a):
    return Instance(
        key=key, task="vqa", image_id=image_id, split=split, question=q, answer=a, human_answers=[a] * 10
    )


def snli_instance(key, image_id, split, h, label=0):
    return Instance(key=key, task="snli_ve", image_id=image_id, split=split, hypothesis=h, label=label)


def vcr_instance(key, image_id, split, q):
    return Instance(
        key=key,
        task="vcr",
        image_id=image_id,
        split=split,
        question=q,
        answers=["a red cube", "a blue ball", "nothing at all", "two shapes"],
        rationales=["it is red", "it is round", "the table is empty", "I count two"],
        label=0,
        rationale_label=2,
    )


def build_dataset(path: Path, n_images: int, questions: dict[str, str] | None = None) -> PreparedDataset:
    """n_images images with a VQA, an SNLI-VE and a VCR instance each; ``questions`` overrides the question
    of VQA instances by key (one changed instance = another dataset)."""
    questions = questions or {}
    with DatasetWriter(path, source="synthetic", split="train", shard_size=7, image_shard_size=5) as w:
        for i in range(n_images):
            iid = f"img-{i}"
            w.add_image(iid, png_bytes(i), "png")
            key = f"vqa-{i}"
            w.add_instance(
                vqa_instance(key, iid, "train", questions.get(key, f"what colour is shape {i}?"), "red")
            )
            w.add_instance(snli_instance(f"snli-{i}", iid, "train", f"there are {i % 4} squares"))
            w.add_instance(vcr_instance(f"vcr-{i}", iid, "train", f"why is shape {i % 3} here?"))
    return PreparedDataset(path)


# -------------------------------------------------------------------------------------- tiny world


def prepare_synthetic(root, seed=0, scenes=(60, 12, 18)):
    sp = SyntheticParams(
        seed=seed, image_size=32, scenes=dict(zip(("train", "val", "test"), scenes, strict=True))
    )
    for split in ("train", "val", "test"):
        with DatasetWriter(
            root / split, source="synthetic", split=split, shard_size=40, image_shard_size=40
        ) as w:
            synthetic.generate(split, sp, w)


def build_world(root, views: int = 0, target_chunk_bytes: int = 1 << 20):
    """The tiny world: prepared shards, a saved random-init teacher (so the fingerprint holds a checkpoint
    checksum, as with a real one) and its cache extracted with ``views`` and ``target_chunk_bytes``."""
    prepare_synthetic(root / "shards")
    cfg = root / "tiny-teacher.json"
    cfg.write_text(json.dumps(TINY_TEACHER))
    from pipeline.extract import extract
    from pipeline.teacher import create_teacher

    torch.manual_seed(0)
    teacher = create_teacher(str(cfg), "")
    torch.save({"state_dict": teacher.model.state_dict()}, root / "teacher.pt")
    store = str(root / "cache.zarr")
    datasets = [PreparedDataset(root / "shards" / s) for s in ("train", "val", "test")]
    cp = CacheParams(
        image_rows_per_unit=64, text_rows_per_unit=512, batch_size=32, num_workers=0, views=views,
        target_chunk_bytes=target_chunk_bytes,
    )  # fmt: skip
    extract(
        datasets, store, (str(cfg), str(root / "teacher.pt"), "fp32"), cp, scheduler="sync", progress=False
    )
    return root, cfg, store


def tiny_student_params(
    teacher_cfg, checkpoint, *, text_len: int = 24, batch: int = 8, steps: int = 6, every: int = 3, **over
) -> Params:
    """Params of a one-layer student distilled from the tiny teacher (``over``: more dotted overrides)."""
    sets = [
        f"teacher.model={teacher_cfg}", f"teacher.pretrained={checkpoint}", "teacher.precision=fp32",
        "student.init=scratch", "student.width=32", "student.layers=1", "student.heads=2", "student.image_size=32",
        "student.patch_size=8", f"student.max_text_len={text_len}", "student.dropout=0.0",
        f"train.batch_size={batch}", f"train.steps={steps}", "train.warmup=2", f"train.eval_every={every}",
        f"train.checkpoint_every={every}",
    ]  # fmt: skip
    return load_params(None, sets + [f"{k}={v}" for k, v in over.items()])


def student_params(world, **over) -> Params:
    """``tiny_student_params`` for the tiny world's teacher."""
    root, cfg, _ = world
    return tiny_student_params(cfg, root / "teacher.pt", **over)


def run_spec(world, tmp_path, task="snli_ve", method="clip_td", condition="lowshot-0.5", seed=0, name="run"):
    from student.train import RunSpec

    root, _, store = world
    return RunSpec(task, condition, method, seed, str(root / "shards"), store, str(tmp_path / name))


# ------------------------------------------------------------------------------------ a hand store


def hand_layout(**kw) -> C.StoreLayout:
    base = dict(
        n_images=10, n_texts=5, embed_dim=8, num_patches=4, image_rows_per_unit=4, text_rows_per_unit=2
    )
    return C.StoreLayout(**{**base, **kw})


def hand_store(
    url: str,
    dtype: str = "float16",
    compressor: str = "zstd",
    logit_scale: float | None = None,
    alias_row: int = 9,
) -> dict:
    """A store written the way units write it: every image/text unit writes exactly its own shards. The
    training reader (CachedTargets) also needs the teacher's ``logit_scale``, which an extraction records.
    Its one alias, "alias9", shares ``alias_row``."""
    rng = np.random.default_rng(1)
    lay = hand_layout(dtype=dtype, target_chunk_bytes=4 * 8 * 2, compressor=compressor)
    texts = ["a cat", "two dogs on a mat", "x", "a long sentence of several words", "end"]
    lengths = [3, 6, 2, 8, 2]
    offsets, lay.text_shard_rows, lay.text_chunk_rows = C.text_token_layout(lengths, 2, 8 * 2, 4 * 8 * 2)
    ids = [f"im{i}" for i in range(10)]
    attrs = {
        "format": C.FORMAT,
        "format_version": C.FORMAT_VERSION,
        "embed_dim": 8,
        "grid": 2,
        "num_patches": 4,
    }
    attrs |= {"dtype": dtype, "views": 0, "fingerprint": {"data": {"hash": "h"}}, "units": {"total": 6}}
    g = C.create_store(
        url, lay, attrs, ids, [text_hash(t) for t in texts], lengths, offsets, ["alias9"], [alias_row]
    )
    img = rng.normal(size=(10, 4, 8)).astype(np.float32)
    pooled = rng.normal(size=(10, 8)).astype(np.float32)
    txt = [rng.normal(size=(n, 8)).astype(np.float32) for n in lengths]
    tpooled = rng.normal(size=(5, 8)).astype(np.float32)
    for u in range(lay.n_image_units):
        lo, hi = u * 4, min(10, u * 4 + 4)
        for suffix, a in C.encode_tokens(img[lo:hi], dtype).items():
            g[f"image/tokens{suffix}"][lo:hi] = a
        g["image/pooled"][lo:hi] = pooled[lo:hi].astype(np.float16)
        g["image/valid"][lo:hi] = 1
        C.commit_unit(url, f"image-{u:06d}", {"unit": f"image-{u:06d}", "items": hi - lo})
    s = lay.text_shard_rows
    for u in range(lay.n_text_units):
        buf = np.zeros((s, 8), np.float32)  # slack rows stay zero = fill value
        for i in range(u * 2, min(5, u * 2 + 2)):
            start = offsets[i] - u * s
            buf[start : start + lengths[i]] = txt[i]
        for suffix, a in C.encode_tokens(buf, dtype).items():
            g[f"text/tokens{suffix}"][u * s : (u + 1) * s] = a
        g["text/pooled"][u * 2 : u * 2 + 2] = tpooled[u * 2 : u * 2 + 2].astype(np.float16)
    if logit_scale is not None:
        g.attrs["logit_scale"] = logit_scale
    g.attrs["complete"] = True
    return {"img": img, "pooled": pooled, "txt": txt, "tpooled": tpooled, "texts": texts, "layout": lay}


# ------------------------------------------------------------------------------------------- files


def truncate_jpeg(path: Path) -> None:
    """Cut a JPEG inside its entropy-coded scan: the markers (all PIL's verify() looks at) stay intact."""
    data = path.read_bytes()
    sos = data.index(b"\xff\xda")
    scan = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    path.write_bytes(data[: (scan + len(data)) // 2])
