"""The on-disk format every source is converted to, and the readers every later stage uses.

A prepared dataset is a directory::

    dataset.json          what it holds: source, split, counts, shard lists, fingerprint, answer counts
    instances-000000.tar  WebDataset shards of instance samples (``<key>.json``)
    images-000000.tar     WebDataset shards of image samples, one per unique image (``<key>.json`` + ``<key>.<ext>``)
    images.index.json     image id -> [shard, byte offset, size, ext, sha1]: random access into the image tars
    skipped.json          the skip report (empty under the fail policy)

Images are stored once however many instances use them; readers join an instance to its image by a
seek into the image tar (no scan), which is what lets the training stream and the teacher read images in
any order.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import webdataset as wds

from .errors import DataError, SkipReport
from .schema import IMAGE_EXTS, Instance, SchemaError, image_key

FORMAT_VERSION = 1
INFO_FILE = "dataset.json"
INDEX_FILE = "images.index.json"
REPORT_FILE = "skipped.json"


class DatasetWriter:
    """Writes a prepared dataset. Use as a context manager; ``close`` writes the index and dataset.json."""

    def __init__(
        self,
        out: str | Path,
        *,
        source: str,
        split: str,
        shard_size: int = 1000,
        image_shard_size: int = 1000,
        report: SkipReport | None = None,
        extra_info: dict | None = None,
    ):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        # A rerun must not leave shards of an earlier, larger run behind for readers to glob up.
        for old in [*self.out.glob("instances-*.tar"), *self.out.glob("images-*.tar")]:
            old.unlink()
        self.source, self.split = source, split
        self.report = report or SkipReport()
        self.extra_info = extra_info or {}
        self._inst = wds.ShardWriter(str(self.out / "instances-%06d.tar"), maxcount=shard_size, verbose=0)
        self._img = wds.ShardWriter(str(self.out / "images-%06d.tar"), maxcount=image_shard_size, verbose=0)
        self._images: dict[str, tuple[str, str]] = {}  # image id -> (sha1, ext)
        self._keys: set[str] = set()
        self._hash = hashlib.sha1()
        self.counts: Counter = Counter()
        self.domains: Counter = Counter()
        self.answer_counts: Counter = Counter()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def has_image(self, image_id: str) -> bool:
        return image_id in self._images

    def add_image(self, image_id: str, data: bytes, ext: str, domain: str = "") -> None:
        """Store an image once; a second add of the same id is a no-op if the bytes are identical."""
        ext = ext.lower().lstrip(".")
        if ext not in IMAGE_EXTS:
            raise ValueError(f"image '{image_id}': unsupported extension {ext!r} (allowed {IMAGE_EXTS})")
        sha = hashlib.sha1(data).hexdigest()
        if image_id in self._images:
            if self._images[image_id][0] != sha:
                raise ValueError(f"image '{image_id}' added twice with different bytes")
            return
        self._images[image_id] = (sha, ext)
        meta = {"image_id": image_id, "sha1": sha, "domain": domain}
        self._img.write({"__key__": image_key(image_id), "json": json.dumps(meta).encode(), ext: data})
        self._hash.update(f"img\0{image_id}\0{sha}\n".encode())

    def add_instance(self, inst: Instance) -> None:
        inst.validate()
        if inst.image_id not in self._images:
            raise SchemaError(
                f"instance '{inst.key}': image '{inst.image_id}' was not added before the instance"
            )
        if inst.key in self._keys:
            raise SchemaError(f"instance '{inst.key}': duplicate key")
        self._keys.add(inst.key)
        payload = json.dumps(inst.to_json(), sort_keys=True)
        self._inst.write({"__key__": inst.key, "json": payload.encode()})
        self._hash.update(payload.encode() + b"\n")
        self.counts[inst.task] += 1
        self.domains[inst.domain] += 1
        if inst.task == "vqa":
            self.answer_counts.update(inst.human_answers or [inst.answer])

    def skip(self, err: DataError) -> None:
        self.report.handle(err)

    def close(self) -> dict:
        self._inst.close()
        self._img.close()
        index = _index_image_tars(self.out)
        (self.out / INDEX_FILE).write_text(json.dumps(index))
        self.report.write(self.out / REPORT_FILE)
        info = {
            "format_version": FORMAT_VERSION,
            "source": self.source,
            "split": self.split,
            "instances": sum(self.counts.values()),
            "tasks": dict(self.counts),
            "domains": dict(self.domains),
            "images": len(self._images),
            "instance_shards": sorted(p.name for p in self.out.glob("instances-*.tar")),
            "image_shards": sorted(p.name for p in self.out.glob("images-*.tar")),
            "answer_counts": dict(self.answer_counts.most_common()),
            "skipped": self.report.count,
            "fingerprint": self._hash.hexdigest(),
            **self.extra_info,
        }
        if info["instances"] == 0:
            raise DataError(
                self.out, "dataset", "no instances were written (empty input, or every item skipped)"
            )
        (self.out / INFO_FILE).write_text(json.dumps(info, indent=1))
        return info


def _index_image_tars(out: Path) -> dict[str, list]:
    index: dict[str, list] = {}
    for shard_no, path in enumerate(sorted(out.glob("images-*.tar"))):
        with tarfile.open(path) as tf:
            members = {m.name: m for m in tf.getmembers()}
            for name, m in members.items():
                if not name.endswith(".json"):
                    continue
                meta = json.loads(tf.extractfile(m).read())
                stem = name[: -len(".json")]
                for ext in IMAGE_EXTS:
                    blob = members.get(f"{stem}.{ext}")
                    if blob is not None:
                        index[meta["image_id"]] = [shard_no, blob.offset_data, blob.size, ext, meta["sha1"]]
                        break
    return index


class PreparedDataset:
    """Read access to a prepared dataset directory: instances in order, images by id."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        info_path = self.path / INFO_FILE
        if not info_path.exists():
            raise DataError(
                info_path, "dataset", "not a prepared dataset (run `python -m stages.prepare_data` first)"
            )
        self.info: dict = json.loads(info_path.read_text())
        if self.info.get("format_version") != FORMAT_VERSION:
            raise DataError(
                info_path, "format_version", f"{self.info.get('format_version')} != {FORMAT_VERSION}"
            )
        self.index: dict[str, list] = json.loads((self.path / INDEX_FILE).read_text())
        self.instance_urls = [str(self.path / n) for n in self.info["instance_shards"]]
        self.image_urls = [str(self.path / n) for n in self.info["image_shards"]]
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()

    @property
    def fingerprint(self) -> str:
        return self.info["fingerprint"]

    def __len__(self) -> int:
        return int(self.info["instances"])

    def image_ids(self) -> list[str]:
        """Unique image ids in image-shard order (the row order of the teacher cache)."""
        return list(self.index)

    def image_sha1(self, image_id: str) -> str:
        return self.index[image_id][4]

    def image_bytes(self, image_id: str) -> bytes:
        try:
            shard, offset, size, _ext, _sha = self.index[image_id]
        except KeyError:
            raise DataError(self.path / INDEX_FILE, image_id, "image id not in this dataset") from None
        if os.getpid() != self._pid:  # file handles must not be shared across forked DataLoader workers
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.image_urls[shard], "rb")  # noqa: SIM115 - kept open for reuse
        # pread: no shared file position, so a prefetch thread and the main thread can read side by side.
        data = os.pread(f.fileno(), size, offset)
        if len(data) != size:
            raise DataError(
                self.image_urls[shard], image_id, f"truncated image: read {len(data)} of {size} bytes"
            )
        return data

    def iter_instances(self) -> Iterator[Instance]:
        """Every instance exactly once, in shard order (no workers, no shuffling)."""
        for url in self.instance_urls:
            yield from (_instance(url, s) for s in _read_tar_samples(url))

    def iter_images(self) -> Iterator[tuple[str, bytes]]:
        for image_id in self.index:
            yield image_id, self.image_bytes(image_id)

    def answer_vocab(self, size: int | None = None) -> list[str]:
        """VQA answers by frequency (most frequent first); the train split's list is the answer vocabulary."""
        answers = list(self.info.get("answer_counts", {}))
        return answers[:size] if size else answers


def _read_tar_samples(url: str) -> Iterator[dict]:
    try:
        for sample in wds.tarfile_samples([{"url": url}]):
            try:
                obj = json.loads(sample["json"])
            except (KeyError, ValueError) as e:
                raise DataError(
                    url, sample.get("__key__", "?"), f"instance sample without valid JSON: {e}"
                ) from e
            yield {"__key__": sample["__key__"], "json": obj}
        _check_tar_complete(url)
    except (tarfile.TarError, OSError) as e:
        raise DataError(url, "tar", f"unreadable shard: {e}") from e


def _check_tar_complete(url: str) -> None:
    """Python's tarfile (and so webdataset) treats a file cut at a member boundary as a shorter archive and
    silently drops the rest; a complete archive ends with two zero blocks (then zero padding to a record).
    Only the file's tail is read: walking every header again doubled the cost of parsing a shard, and a
    member's own data cannot end a file in two whole zero blocks (its padding is under one block, and the JSON
    of an instance holds no NUL bytes)."""
    size = os.path.getsize(url)
    with open(url, "rb") as f:
        f.seek(max(0, size - 2 * tarfile.BLOCKSIZE))
        tail = f.read(2 * tarfile.BLOCKSIZE)
    if size % tarfile.BLOCKSIZE or len(tail) < 2 * tarfile.BLOCKSIZE or tail.strip(b"\0"):
        raise DataError(
            url,
            "tar",
            f"truncated shard: no end-of-archive marker at the end of its {size} bytes (re-run prepare-data)",
        )


def _instance(url: str, sample: dict) -> Instance:
    """A schema-checked instance; the prepared data is written through ``DatasetWriter`` (which validates), so
    a violation here means a shard was altered or written by something else: name the shard and the key."""
    key = sample.get("__key__", "?")
    try:
        return Instance.from_json(sample["json"]).validate()
    except (SchemaError, TypeError) as e:
        raise DataError(url, key, f"invalid instance: {e}") from e


def _parse(sample: dict) -> Instance:
    return Instance.from_json(json.loads(sample["json"]))


def node_info() -> tuple[int, int]:
    """(rank, world size) of this process, read as webdataset reads them: RANK and WORLD_SIZE from the
    environment (torchrun sets both, and DataLoader workers inherit them), else an initialised
    torch.distributed group, else (0, 1)."""
    rank, world, _worker, _workers = wds.utils.pytorch_worker_info()
    return rank, world


def node_shards(ds: PreparedDataset) -> list[str]:
    """This rank's instance shards: every ``world``-th shard starting at ``rank``, disjoint across ranks."""
    rank, world = node_info()
    if world <= 1:
        return list(ds.instance_urls)
    if len(ds.instance_urls) < world:
        raise DataError(
            ds.path / INFO_FILE,
            "instance_shards",
            f"{len(ds.instance_urls)} instance shards cannot give each of {world} ranks its own; "
            "prepare the data with a smaller data.shard_size or train on fewer ranks",
        )
    return ds.instance_urls[rank::world]


def instance_pipeline(
    ds: PreparedDataset,
    *,
    training: bool,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    select: Callable[[Instance], bool] | None = None,
    join_images: bool = True,
    resampled: bool = True,
) -> wds.DataPipeline:
    """A WebDataset pipeline yielding ``{"instance": Instance, "image": bytes}``.

    ``training=True``: each DDP rank takes its own shards (``node_shards``), resampled endlessly with a seed
    and split by DataLoader worker, samples shuffled in a buffer. ``training=False`` (exact mode): every shard
    in order, split by worker only, so that every instance is produced exactly once per pass on every rank.
    """
    stages: list = []
    # The shard list is split by rank *before* resampling: wds.split_by_node after ResampledShards would only
    # deal out the draws of one shared resampled stream, so every rank would still read every shard.
    urls = node_shards(ds) if training else ds.instance_urls
    if training and resampled:
        stages += [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        stages += [wds.SimpleShardList(urls)]
    stages += [wds.split_by_worker, wds.tarfile_to_samples()]
    if training:
        stages += [wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=_Rng(seed))]
    stages += [wds.map(_parse)]
    if select is not None:
        stages += [wds.select(select)]

    def join(inst: Instance) -> dict:
        return {"instance": inst, "image": ds.image_bytes(inst.image_id) if join_images else None}

    stages += [wds.map(join)]
    return wds.DataPipeline(*stages)


class _Rng:
    """A picklable seeded RNG factory for wds.shuffle (it calls rng.random / rng.randint)."""

    def __init__(self, seed: int):
        import random

        self._r = random.Random(seed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._r, name)


def find_datasets(root: str | Path) -> list[Path]:
    """Every prepared dataset directory under root (those holding a dataset.json)."""
    return sorted(Path(p).parent for p in glob.glob(str(Path(root) / "**" / INFO_FILE), recursive=True))


def write_instances(
    writer: DatasetWriter, items: Iterable[tuple[Instance, Callable[[], tuple[bytes, str]]]]
) -> None:
    """Helper for converters: add each instance's image (loaded lazily, once) then the instance."""
    for inst, load_image in items:
        if not writer.has_image(inst.image_id):
            data, ext = load_image()
            writer.add_image(inst.image_id, data, ext, inst.domain)
        writer.add_instance(inst)


def decode_image(data: bytes):
    """Original bytes -> RGB PIL image."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy an RGB image
