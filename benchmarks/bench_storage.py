"""Storage per codec: bytes on disk per cached token and reconstruction cosine.

The student world (bench_train's: synthetic train/val/test, the embedded teacher) is extracted twice, with
``cache.dtype=float16`` (lossless float16 of the float32 teacher output, Blosc zstd + byte shuffle) and
``cache.dtype=int8`` (per-token symmetric int8 + a float16 scale per token, the same compressor). Bytes per
token = the files of the token arrays (values + scales, shard indexes included) ÷ the tokens they hold:
image patch tokens (N × P) and real text token rows (Σ lengths; a unit's unused slack rows are not stored).

Cosine: the extraction's own figure (each stored token against the float32 teacher output it encodes; mean
and minimum over every token), and, for int8, every token against the float16 store's (quantiles).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.common import Result, Scratch, log, parser
from benchmarks.world import build

DTYPES = ("float16", "int8")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    ok = (na > 0) & (nb > 0)
    return (a[ok] * b[ok]).sum(1) / (na[ok] * nb[ok])


def measure(world) -> dict:
    import json

    from pipeline.cache import TeacherCache, decode_tokens

    out: dict = {}
    tokens: dict[str, dict[str, np.ndarray]] = {}
    for dtype in DTYPES:
        url = world.store(dtype)
        cache = TeacherCache(url)
        g = cache.group
        n_img, p, e = g["image/tokens"].shape
        n_text_tok = int(cache._lengths.sum())
        root = Path(url)
        sizes = {
            part: folder_bytes(root / part)
            for part in ("image/tokens", "image/tokens_scale", "text/tokens", "text/tokens_scale")
            if (root / part).exists()
        }
        img_bytes = sizes["image/tokens"] + sizes.get("image/tokens_scale", 0)
        txt_bytes = sizes["text/tokens"] + sizes.get("text/tokens_scale", 0)
        metrics = json.loads((root.parent / f"extract-{dtype}.json").read_text())
        rc = metrics["reconstruction_cosine"]
        out[dtype] = {
            "embed_dim": e,
            "image_tokens": n_img * p,
            "text_tokens": n_text_tok,
            "array_bytes_on_disk": sizes,
            "image_bytes_per_token": round(img_bytes / (n_img * p), 2),
            "text_bytes_per_token": round(txt_bytes / n_text_tok, 2),
            "bytes_per_token": round((img_bytes + txt_bytes) / (n_img * p + n_text_tok), 2),
            "bytes_per_token_over_E": round((img_bytes + txt_bytes) / (n_img * p + n_text_tok) / e, 4),
            "uncompressed_bytes_per_token": (e * (1 if dtype == "int8" else 2))
            + (2 if dtype == "int8" else 0),
            "reconstruction_cosine_vs_float32": {
                "mean": rc["mean"],
                "min": rc["min"],
                "tokens": rc["tokens"],
            },
            "store_bytes_on_disk": metrics["bytes_on_disk"],
            "compression_ratio": metrics["compression_ratio"],
        }
        scale = g["image/tokens_scale"][:] if dtype == "int8" else None
        tok = decode_tokens(g["image/tokens"][:], scale)
        # Real token rows only, by each store's own offsets: a unit's shard ends in slack rows whose count
        # depends on the dtype (shards are whole inner chunks), so row positions differ between the stores.
        real = np.concatenate(
            [np.arange(o, o + n) for o, n in zip(cache._offsets[:-1], cache._lengths, strict=True)]
        )
        text_vals = g["text/tokens"][:][real]
        text_scale = g["text/tokens_scale"][:][real] if dtype == "int8" else None
        tokens[dtype] = {"image": tok, "text": decode_tokens(text_vals, text_scale)}
    if "float16" in tokens and "int8" in tokens:
        cos = np.concatenate(
            [cosines(tokens["int8"][k], tokens["float16"][k]).astype(np.float64) for k in ("image", "text")]
        )
        out["int8"]["cosine_vs_float16_store"] = {
            "mean": float(cos.mean()),
            "min": float(cos.min()),
            "p0.1": float(np.quantile(cos, 0.001)),
            "p1": float(np.quantile(cos, 0.01)),
            "tokens": int(len(cos)),
        }
    for dtype, m in out.items():
        log(
            f"{dtype}: {m['bytes_per_token']} bytes/token ({m['bytes_per_token_over_E']}·E; image "
            f"{m['image_bytes_per_token']}, text {m['text_bytes_per_token']}), cosine mean "
            f"{m['reconstruction_cosine_vs_float32']['mean']:.6f} min {m['reconstruction_cosine_vs_float32']['min']:.6f}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    args = p.parse_args(argv)
    res = Result("storage")
    with Scratch(args.work) as work:
        world = build(work, args.quick, dtypes=DTYPES)
        res.settings = {
            "teacher": Path(world.teacher_model).stem,
            "teacher_weights": "trained" if world.trained_teacher else "random init",
            "compressor": "blosc zstd clevel 3, byte shuffle (cache defaults)",
            "quick": args.quick,
        }
        res.measurements = m = measure(world)
        e = m["int8"]["embed_dim"]
        rc = m["int8"]["reconstruction_cosine_vs_float32"]
        worst = max(m["int8"]["image_bytes_per_token"], m["int8"]["text_bytes_per_token"]) / e
        res.target(
            "int8 bytes per token / E (image and text, the larger)",
            worst,
            "<=",
            1.0,
            f"E = {e}; all tokens together {m['int8']['bytes_per_token_over_E']}·E",
        )
        res.target("int8 reconstruction cosine (mean)", rc["mean"], ">=", 0.999, f"min {rc['min']:.6f}")
        res.target(
            "float16 reconstruction cosine (min)",
            m["float16"]["reconstruction_cosine_vs_float32"]["min"],
            ">=",
            0.999,
            f"{m['float16']['bytes_per_token']} bytes/token",
        )
    res.write(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
