"""Which teacher is this? One answer for extraction (which records it in the store's fingerprint) and for
training (which checks a store against its params): the fields that change the teacher's numbers. Paths,
devices and library versions are left out (moving a checkpoint does not change its outputs; its checksum
does); the model config and preprocessing enter as hashes to keep the fingerprint small."""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Fields of ``Teacher.describe()`` the fingerprint keeps as they are.
TEACHER_FIELDS = (
    "model",
    "pretrained_kind",
    "pretrained_checksum",
    "precision",
    "embed_dim",
    "num_patches",
    "grid",
)


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def teacher_fingerprint(describe: dict, weights_sha256: str = "") -> dict:
    """The teacher fields that change the cached numbers, from ``Teacher.describe()``. ``weights_sha256`` is
    the hash of a randomly initialised teacher's weights, which no checkpoint checksum covers."""
    fp = {k: describe.get(k) for k in TEACHER_FIELDS}
    fp["config_sha256"] = sha256_json(describe.get("model_config"))
    fp["preprocess_sha256"] = sha256_json(describe.get("preprocess"))
    if weights_sha256:
        fp["weights_sha256"] = weights_sha256
    return fp


def weights_sha256(teacher: Any) -> str:
    h = hashlib.sha256()
    for name, p in sorted(teacher.model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def teacher_identity(model: str, pretrained: str = "", teacher: Any = None) -> dict:
    """The teacher's fingerprint fields. With a loaded ``teacher``: all of them, as extraction records them
    (``teacher_fingerprint`` of its description, the weights' hash for a random init, the dtype it computes
    in). Without: those the params alone fix without loading any weights, as training checks a store
    against them: the model config's hash (it fixes the architecture and preprocessing) and the checksum of
    a checkpoint file."""
    if teacher is not None:
        import torch

        from .teacher import autocast_dtype

        describe = teacher.describe()
        random_init = describe.get("pretrained_kind") == "random"
        fp = teacher_fingerprint(describe, weights_sha256(teacher) if random_init else "")
        fp["compute_dtype"] = str(autocast_dtype(teacher.device, teacher.precision) or torch.float32)
        return fp
    import open_clip

    from .teacher import pretrained_kind, register_model, sha256_file

    out: dict = {}
    name = register_model(model)
    # A mistyped checkpoint path fails here as loading the teacher fails on it (TeacherError), rather than
    # leaving the checksum out and so skipping the comparison with the store's teacher.
    kind = pretrained_kind(name, pretrained)
    if kind == "file":
        out["pretrained_checksum"] = sha256_file(pretrained)
    elif kind == "tag":
        out["pretrained_checksum"] = pretrained  # a tag names its weights (Teacher.describe records it so)
    config = open_clip.get_model_config(name)
    if config is not None:
        out["config_sha256"] = sha256_json(config)
    return out
