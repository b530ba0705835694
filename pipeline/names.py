"""Names the whole project shares, each defined once: a leaf module that imports nothing of the project, so
any layer may use it. Where a params field's typing ``Literal`` lists the same names, a test asserts that it
does (tests/test_layering.py)."""

from __future__ import annotations

# The downstream tasks a student is trained and evaluated on.
TASKS = ("vqa", "snli_ve", "vcr")
# What a prepared instance may be: a task example, or an image–caption pair (the teachers' pretraining corpus).
SAMPLE_TASKS = (*TASKS, "caption")
# data.source: the built-in synthetic world or one of the official datasets, one per task.
DATA_SOURCES = ("synthetic", *TASKS)

# The compared methods (docs/method.md §7), in the order the report lists them (baseline first; the blind
# floor is always listed last); student.losses registers each one's switches under these names.
METHODS = (
    "baseline",
    "blind",
    "naive_kd",
    "pooled_fd",
    "clip_td",
    "clip_td_unlabeled",
    "clip_td_transductive",
    "clip_td_no_select",
    "clip_td_no_weight",
    "clip_td_const_lambda",
)

# The synthetic world's splits: task examples (data.synthetic.scenes gives each its size) and captions.
TASK_SPLITS = ("train", "val", "test")
CAPTION_SPLITS = ("captions", "captions_val")

# Every relevance source the teacher can return besides the last-layer tokens (docs/method.md §3); the cache
# stores one token array per source (``<src>_tokens``). distill.relevance_source picks "last" or one of them.
RELEVANCE_SOURCES = ("value", "intermediate")
