import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import StudentParams
from student.losses import DistillHeads
from student.model import (
    StudentInterface,
    StudentOutput,
    TaskHeads,
    ViltStudent,
    attention,
    count_parameters,
    create_student,
    fit_text,
    gelu,
    list_students,
    register_student,
    text_vocabulary,
)

torch.set_num_threads(1)

VOCAB = 100  # SOT = 98, EOT = 99
SOT, EOT = VOCAB - 2, VOCAB - 1


def tiny_params(**kw) -> StudentParams:
    base = dict(
        width=16, layers=2, heads=2, mlp_ratio=2.0, patch_size=8, image_size=16, max_text_len=6, dropout=0.0
    )
    return StudentParams(**{**base, **kw})


def test_fit_text_mask_pad_and_cut():
    ids = torch.tensor(
        [
            [SOT, 5, 6, EOT, 0],  # short: EOT at 3 -> 4 real tokens
            [SOT, 5, 6, 7, 8],  # no EOT within the cut -> all real
            [0, 0, 0, 0, 0],  # no text
        ]
    )
    out, mask = fit_text(ids, 4, EOT)
    assert out.tolist()[1] == [SOT, 5, 6, 7]  # cut keeps ids, no EOT written in
    assert mask.tolist() == [[True] * 4, [True] * 4, [False] * 4]
    out, mask = fit_text(ids[:1], 7, EOT)
    assert out.tolist() == [[SOT, 5, 6, EOT, 0, 0, 0]]
    assert mask.tolist() == [[True, True, True, True, False, False, False]]
    # A token id 0 ("!" in CLIP's vocabulary) inside a text is real.
    _, mask = fit_text(torch.tensor([[SOT, 0, EOT, 0]]), 4, EOT)
    assert mask.tolist() == [[True, True, True, False]]


def test_vilt_shapes_and_mask():
    torch.manual_seed(0)
    m = create_student("vilt", tiny_params(), vocab_size=VOCAB)
    assert isinstance(m, StudentInterface)
    assert (m.width, m.grid, m.max_text_len) == (16, 2, 6)
    ids = torch.tensor([[SOT, 3, EOT, 0], [SOT, 3, 4, EOT]])
    out = m(torch.randn(2, 3, 16, 16), ids)
    assert isinstance(out, StudentOutput)
    assert out.pooled.shape == (2, 16)
    assert out.image_tokens.shape == (2, 4, 16)
    assert out.text_tokens.shape == (2, 6, 16)
    assert out.text_mask.tolist() == [[True] * 3 + [False] * 3, [True] * 4 + [False] * 2]
    with pytest.raises(ValueError, match="16px"):
        m(torch.randn(1, 3, 8, 8), ids[:1])


def test_padding_does_not_change_real_outputs():
    torch.manual_seed(0)
    m = create_student("vilt", tiny_params(), vocab_size=VOCAB).eval()
    px = torch.randn(1, 3, 16, 16)
    a = m(px, torch.tensor([[SOT, 3, EOT, 0]]))
    b = m(px, torch.tensor([[SOT, 3, EOT, 0, 0, 0]]))
    c = m(px, torch.tensor([[SOT, 3, EOT, 7, 7, 7]]))  # junk after EOT is masked out of attention
    torch.testing.assert_close(a.pooled, b.pooled)
    torch.testing.assert_close(a.pooled, c.pooled)


def test_registry_custom_student():
    name = "test_tiny_custom"

    @register_student(name)
    class Custom(nn.Module):
        def __init__(self, params, vocab_size):
            super().__init__()
            self.width, self.grid, self.max_text_len = params.width, 1, params.max_text_len
            self.lin = nn.Linear(3, params.width)

        def forward(self, pixels, text_ids):
            b = pixels.shape[0]
            pooled = self.lin(pixels.mean((2, 3)))
            t = torch.zeros(b, self.max_text_len, self.width)
            return StudentOutput(
                pooled, pooled[:, None], t, torch.ones(b, self.max_text_len, dtype=torch.bool)
            )

    assert name in list_students()
    m = create_student(name, tiny_params(), vocab_size=VOCAB)
    assert isinstance(m, Custom)
    assert m(torch.randn(2, 3, 16, 16), torch.zeros(2, 3, dtype=torch.long)).pooled.shape == (2, 16)
    with pytest.raises(ValueError, match="already registered"):
        register_student(name)(Custom)
    with pytest.raises(ValueError, match="unknown student"):
        create_student("nope", tiny_params())

    @register_student("test_broken")
    def broken(params, vocab_size):
        return nn.Linear(2, 2)

    with pytest.raises(TypeError, match="does not provide"):
        create_student("test_broken", tiny_params())


def test_task_heads_shapes_and_losses():
    torch.manual_seed(0)
    h = TaskHeads(16, num_answers=5)
    pooled = torch.randn(3, 16)
    assert h("vqa", pooled).shape == (3, 5)
    assert h("snli_ve", pooled).shape == (3, 3)
    assert h("vcr", torch.randn(3, 4, 16)).shape == (3, 4)
    loss, _ = h.loss("vqa", pooled, torch.rand(3, 5))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss, _ = h.loss("vcr", torch.randn(3, 4, 16), torch.tensor([0, 3, 1]))
    assert loss.ndim == 0
    with pytest.raises(ValueError, match="no head"):
        TaskHeads(16, tasks=("snli_ve",))("vqa", pooled)


def test_conv_stem_ends_on_the_patch_grid():
    # The conv stem is a drop-in for the patch embedding: same token grid, so teacher alignment is unchanged.
    torch.manual_seed(0)
    for patch, size in ((8, 16), (16, 64)):
        student = ViltStudent(tiny_params(stem="conv", patch_size=patch, image_size=size), VOCAB)
        out = student(torch.randn(2, 3, size, size), torch.tensor([[VOCAB - 2, 5, VOCAB - 1]] * 2))
        assert student.grid == size // patch and out.image_tokens.shape == (2, (size // patch) ** 2, 16)
    with pytest.raises(ValueError, match="power-of-two"):
        ViltStudent(tiny_params(stem="conv", patch_size=6, image_size=12), VOCAB)


def test_student_owns_no_distillation_parameters():
    params = tiny_params(stem="patch")
    torch.manual_seed(0)
    baseline = ViltStudent(params, VOCAB)
    distilled = ViltStudent(params, VOCAB)
    heads = DistillHeads(params.width, 8)
    ids = {id(p) for p in distilled.parameters()}
    assert not any(id(p) in ids for p in heads.parameters())
    assert count_parameters(distilled) == count_parameters(baseline)
    assert count_parameters(heads) == 3 * (16 * 8 + 8)
    assert not any(n.split(".")[0] in {"h_v", "h_t", "h_p"} for n, _ in distilled.named_parameters())
    # Hand count: patch conv 3*8*8*16+16, tokens 100*16, cls 16, positions (4+6)*16, types 2*16,
    # 2 blocks of (2 LN 64, qkv 816, proj 272, mlp 544+528), final LN 32.
    assert count_parameters(baseline) == 3088 + 1600 + 16 + 160 + 32 + 2 * 2224 + 32


# ---------------------------------------------------------------------------------------------- compact vocabulary


def _pair(**kw) -> tuple[ViltStudent, ViltStudent, torch.Tensor]:
    """A full-vocabulary student and the same weights with a compact vocabulary (rows copied from it)."""
    torch.manual_seed(0)
    full = ViltStudent(tiny_params(**kw), VOCAB).eval()
    compact = copy.deepcopy(full)
    vocab = text_vocabulary([torch.tensor([3, 5, 7, 40])], VOCAB)
    compact.set_vocabulary(vocab)
    return full, compact, vocab


def test_text_vocabulary_is_sorted_unique_with_pad_sot_eot_and_order_free():
    a = text_vocabulary([torch.tensor([[SOT, 7, 3, EOT, 0]]), torch.tensor([7, 50])], VOCAB)
    b = text_vocabulary([torch.tensor([50, 3]), torch.tensor([[7, 7]])], VOCAB)
    assert a.tolist() == b.tolist() == [0, 3, 7, 50, SOT, EOT]
    with pytest.raises(ValueError, match="outside"):
        text_vocabulary([torch.tensor([VOCAB])], VOCAB)


def test_compact_student_forward_and_gradients_equal_the_full_students():
    full, compact, vocab = _pair()
    assert compact.tok_embed.weight.shape == (len(vocab) + 1, 16)
    assert count_parameters(compact) == count_parameters(full) - (VOCAB - len(vocab) - 1) * 16
    px = torch.randn(2, 3, 16, 16)
    ids = torch.tensor([[SOT, 3, 40, 5, EOT, 0], [SOT, 7, EOT, 0, 0, 0]])
    a, b = full(px, ids), compact(px, ids)
    m = a.text_mask
    torch.testing.assert_close(b.pooled, a.pooled)
    torch.testing.assert_close(b.image_tokens, a.image_tokens)
    torch.testing.assert_close(b.text_tokens[m], a.text_tokens[m])
    assert torch.equal(b.text_mask, m)
    (a.pooled.sum() + a.text_tokens[m].sum()).backward()
    (b.pooled.sum() + b.text_tokens[m].sum()).backward()
    # Each kept row gets the gradient the full table's row of that id gets.
    torch.testing.assert_close(compact.tok_embed.weight.grad[:-1], full.tok_embed.weight.grad[vocab])


def test_remapping_keeps_student_position_i_on_teacher_token_i():
    full, compact, vocab = _pair()
    ids = torch.tensor([[SOT, 40, 3, 5, 7, EOT]])
    # Position i reads the row of teacher id ids[i] (ids are remapped, positions are not).
    rows = compact._rows(ids)
    assert torch.equal(compact.tok_embed.weight[rows], full.tok_embed.weight[ids])
    # Swapping two tokens swaps what those positions read and nothing else.
    swapped = ids.clone()
    swapped[0, [1, 2]] = ids[0, [2, 1]]
    assert torch.equal(
        compact.tok_embed.weight[compact._rows(swapped)][0, [1, 2]], full.tok_embed.weight[[3, 40]]
    )


def test_unknown_ids_read_the_unknown_row():
    _, compact, vocab = _pair()
    assert compact._rows(torch.tensor([11, 60, 3])).tolist() == [len(vocab), len(vocab), 1]
    assert not compact.tok_embed.weight[-1].any()  # starts at zero: an unseen id adds only its position
    px = torch.randn(1, 3, 16, 16)
    a = compact(px, torch.tensor([[SOT, 11, EOT]]))
    b = compact(px, torch.tensor([[SOT, 60, EOT]]))
    c = compact(px, torch.tensor([[SOT, 3, EOT]]))
    torch.testing.assert_close(a.pooled, b.pooled)
    assert not torch.allclose(a.pooled, c.pooled)


def test_exported_student_round_trips_its_vocabulary(tmp_path):
    _, compact, vocab = _pair()
    with torch.no_grad():
        compact.tok_embed.weight[-1] = 1.0  # a trained unknown row must come back too
    torch.save({"student": compact.state_dict()}, tmp_path / "student.pt")
    exported = torch.load(tmp_path / "student.pt", weights_only=True)
    # Evaluation builds the student from params alone and loads the export (strict).
    loaded = create_student("vilt", tiny_params(), vocab_size=VOCAB).eval()
    loaded.load_state_dict(exported["student"])
    assert torch.equal(loaded.token_ids, vocab)
    assert loaded._rows(torch.tensor([3, 11])).tolist() == [1, len(vocab)]
    px, ids = torch.randn(2, 3, 16, 16), torch.tensor([[SOT, 3, 11, EOT], [SOT, 40, EOT, 0]])
    torch.testing.assert_close(loaded(px, ids).pooled, compact(px, ids).pooled)
    # A full-vocabulary state (a student exported before compact vocabularies) loads as one.
    full_state = ViltStudent(tiny_params(), VOCAB).state_dict()
    loaded.load_state_dict(full_state)
    assert loaded.token_ids is None and loaded.tok_embed.weight.shape[0] == VOCAB


def test_setting_the_same_vocabulary_keeps_the_parameter_an_optimizer_holds():
    _, compact, vocab = _pair()
    table = compact.tok_embed.weight
    compact.set_vocabulary(vocab.clone())
    compact.load_state_dict(compact.state_dict())
    assert compact.tok_embed.weight is table
    with pytest.raises(ValueError, match="sorted unique"):
        compact.set_vocabulary([5, 3])


def test_create_student_takes_a_vocabulary_and_keeps_the_seeds_weights():
    torch.manual_seed(0)
    full = create_student("vilt", tiny_params(), vocab_size=VOCAB)
    torch.manual_seed(0)
    compact = create_student("vilt", tiny_params(), vocab_size=VOCAB, vocabulary=[0, 3, SOT, EOT])
    assert torch.equal(compact.tok_embed.weight[:-1], full.tok_embed.weight[[0, 3, SOT, EOT]])
    assert torch.equal(compact.blocks[1].mlp[2].weight, full.blocks[1].mlp[2].weight)  # same RNG stream after


def test_text_slots_after_the_batchs_longest_text_are_zero_and_change_nothing():
    torch.manual_seed(0)
    m = ViltStudent(tiny_params(max_text_len=8), VOCAB).eval()
    px = torch.randn(2, 3, 16, 16)
    out = m(px, torch.tensor([[SOT, 3, EOT, 0], [SOT, EOT, 0, 0]]))
    assert out.text_tokens.shape == (2, 8, 16)
    assert not out.text_tokens[:, 3:].any()  # beyond the longest text (3 tokens): padding in every row
    alone = m(px[:1], torch.tensor([[SOT, 3, EOT]]))
    torch.testing.assert_close(out.pooled[:1], alone.pooled)
    # No text at all (an unlabeled batch): image tokens only, the same as a row of padding would give.
    empty = m(px, torch.zeros(2, 8, dtype=torch.long))
    assert empty.text_mask.sum() == 0 and torch.isfinite(empty.pooled).all()


def test_student_vocabulary_reads_the_texts_the_student_reads_cut_to_max_text_len():
    class Inst:
        def __init__(self, text: str):
            self.text = text

        def student_text(self) -> str:
            return self.text

    def tokenizer(texts):  # word ids, SOT/EOT around, padded to 6 like open_clip's
        rows = [[SOT, *(int(w) for w in t.split()), EOT] for t in texts]
        return torch.tensor([r + [0] * (6 - len(r)) for r in rows])

    from student.data import TaskSpec, student_vocabulary

    spec = TaskSpec("snli_ve", tokenizer, 16, 4)
    vocab = student_vocabulary(spec, [Inst("5 9"), Inst("3 4 6 8")], vocab_size=VOCAB)
    # "8" sits past max_text_len = 4: the student never reads it, so it gets no row.
    assert vocab.tolist() == [0, 3, 4, 5, 6, 9, SOT, EOT]


def test_dropout_keeps_one_minus_p_unbiased_and_is_off_in_eval():
    from student.model import Dropout, inverted_dropout

    torch.manual_seed(0)
    x = torch.ones(200_000)
    y = inverted_dropout(x, 0.1, True)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.9) < 0.005
    assert abs(y.mean().item() - 1.0) < 0.01  # inverted dropout: the expectation is unchanged
    assert torch.unique(y).tolist() == [0.0, pytest.approx(1 / 0.9, rel=1e-4)]
    assert torch.equal(Dropout(0.1).eval()(x), x) and torch.equal(inverted_dropout(x, 0.0, True), x)
    assert not inverted_dropout(x, 1.0, True).any()


def test_one_image_for_k_texts_equals_the_image_repeated_k_times():
    # VCR reads each image with 8 texts: the stem runs once per image, the outputs and gradients are the same.
    torch.manual_seed(0)
    m = ViltStudent(tiny_params(), VOCAB).eval()
    px = torch.randn(2, 3, 16, 16)
    ids = torch.tensor([[SOT, 3, EOT], [SOT, 4, EOT], [SOT, 5, 6], [SOT, EOT, 0]])
    shared = m(px, ids)
    shared.pooled.sum().backward()
    grad = m.patch_embed[0].weight.grad.clone()
    m.zero_grad()
    repeated = m(px.repeat_interleave(2, 0), ids)
    repeated.pooled.sum().backward()
    torch.testing.assert_close(shared.pooled, repeated.pooled)
    torch.testing.assert_close(shared.image_tokens, repeated.image_tokens)
    torch.testing.assert_close(m.patch_embed[0].weight.grad, grad)
    with pytest.raises(ValueError, match="same number of texts"):
        m(px, ids[:3])


# ------------------------------------------------------------------------------------------ film student


def film_params(**kw) -> StudentParams:
    return tiny_params(**{"arch": "film", "image_size": 16, "patch_size": 4, **kw})


def test_film_shapes_mask_and_padding_invariance():
    torch.manual_seed(0)
    m = create_student("film", film_params(), vocab_size=VOCAB).eval()
    assert isinstance(m, StudentInterface)
    assert (m.width, m.grid, m.max_text_len) == (16, 4, 6)
    px = torch.randn(2, 3, 16, 16)
    out = m(px, torch.tensor([[SOT, 3, EOT, 0], [SOT, 3, 4, EOT]]))
    assert out.pooled.shape == (2, 16) and out.image_tokens.shape == (2, 16, 16)
    assert out.text_tokens.shape == (2, 6, 16)
    assert out.text_mask.tolist() == [[True] * 3 + [False] * 3, [True] * 4 + [False] * 2]
    assert not out.text_tokens[0, 3:].any()  # padding slots are zero: no loss may read them
    # Junk after EOT and extra padding change nothing real.
    a = m(px[:1], torch.tensor([[SOT, 3, EOT, 0]]))
    b = m(px[:1], torch.tensor([[SOT, 3, EOT, 7, 7, 7]]))
    torch.testing.assert_close(a.pooled, b.pooled)
    torch.testing.assert_close(a.image_tokens, b.image_tokens)
    # A row without text (an unlabeled image) stays finite.
    assert torch.isfinite(m(px[:1], torch.zeros(1, 4, dtype=torch.long)).pooled).all()
    with pytest.raises(ValueError, match="power-of-two"):
        create_student("film", film_params(patch_size=6), vocab_size=VOCAB)


def test_film_image_tokens_depend_on_the_text_and_the_image():
    # The text conditions every conv channel: the same image read with two texts gives two feature maps,
    # which is what lets token-level distillation reach the fusion.
    torch.manual_seed(0)
    m = create_student("film", film_params(), vocab_size=VOCAB).eval()
    px = torch.randn(1, 3, 16, 16)
    one = m(px, torch.tensor([[SOT, 3, EOT]]))
    other = m(px, torch.tensor([[SOT, 4, EOT]]))
    assert not torch.allclose(one.image_tokens, other.image_tokens)
    assert not torch.allclose(m(torch.randn(1, 3, 16, 16), torch.tensor([[SOT, 3, EOT]])).pooled, one.pooled)


def test_film_one_image_for_k_texts_equals_the_image_repeated():
    torch.manual_seed(0)
    m = create_student("film", film_params(), vocab_size=VOCAB).eval()
    px = torch.randn(2, 3, 16, 16)
    ids = torch.tensor([[SOT, 3, EOT], [SOT, 4, EOT], [SOT, 5, 6], [SOT, EOT, 0]])
    shared, repeated = m(px, ids), m(px.repeat_interleave(2, 0), ids)
    torch.testing.assert_close(shared.pooled, repeated.pooled)
    torch.testing.assert_close(shared.image_tokens, repeated.image_tokens)


def test_vcr_prediction_reads_each_image_once_and_predicts_as_with_repeated_images():
    # Scoring VCR reads each image with its 8 texts: a student that shares images runs its stem once per image.
    from student.data import Batch
    from student.evaluation import predict

    torch.manual_seed(0)
    m = create_student("film", film_params(), vocab_size=VOCAB).eval()
    heads = TaskHeads(m.width, 0, tasks=("vcr",))
    ids = torch.randint(3, 9, (3, 8, 4))
    ids[..., 0], ids[..., -1] = SOT, EOT
    batch = Batch([], torch.randn(3, 3, 16, 16), ids, torch.zeros(3, 2, dtype=torch.long), [])
    rows = []
    hook = m.stem.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    shared = predict(m, heads, "vcr", batch, [])
    m.shares_images = False  # as a student without the shortcut is fed: every image repeated per text
    repeated = predict(m, heads, "vcr", batch, [])
    hook.remove()
    assert rows == [3, 24] and shared == repeated and len(shared) == 3


def test_film_exported_student_round_trips_its_compact_vocabulary(tmp_path):
    torch.manual_seed(0)
    vocab = torch.tensor([0, 3, 4, SOT, EOT])
    m = create_student("film", film_params(), vocab_size=VOCAB, vocabulary=vocab).eval()
    torch.save({"student": m.state_dict()}, tmp_path / "student.pt")
    loaded = create_student("film", film_params(), vocab_size=VOCAB).eval()
    loaded.load_state_dict(torch.load(tmp_path / "student.pt", weights_only=True)["student"])
    assert torch.equal(loaded.token_ids, vocab) and loaded.tok_embed.weight.shape == (len(vocab) + 1, 16)
    px, ids = torch.randn(2, 3, 16, 16), torch.tensor([[SOT, 3, 11, EOT], [SOT, 4, EOT, 0]])
    torch.testing.assert_close(loaded(px, ids).pooled, m(px, ids).pooled)


def test_attention_keeps_float32_calls_and_computes_cpu_bfloat16_in_float32():
    """Float32 attention is torch's own call, bit for bit (recorded fp32 runs stay valid); under CPU bfloat16
    autocast the text block's attention runs in float32 on the bfloat16 inputs, returns bfloat16, and its
    gradients reach the inputs."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 2, 16, 32, generator=g) for _ in range(3))
    bias = torch.zeros(4, 1, 1, 16)
    bias[..., 12:] = -math.inf
    assert torch.equal(attention(q, k, v, bias), F.scaled_dot_product_attention(q, k, v, attn_mask=bias))

    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attention(qb, kb, vb, bias)
    assert y.dtype == torch.bfloat16
    want = F.scaled_dot_product_attention(qb.float(), kb.float(), vb.float(), attn_mask=bias)
    assert torch.equal(y, want.bfloat16())
    y.float().sum().backward()
    assert all(
        t.grad is not None and t.grad.dtype == torch.bfloat16 and t.grad.abs().sum() > 0 for t in (qb, kb, vb)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_gives_the_contiguous_kernels_values_and_gradients_in_either_memory_order(dtype):
    """``gelu`` reads a channels_last map as one NHWC tensor, so it runs torch's contiguous GELU kernel (the
    faster one; F.gelu on channels_last takes another, whose float32 values differ in the last bit): values
    and input gradients equal F.gelu's on the NCHW-contiguous map bit for bit, and come back in the input's
    memory order, which the FiLM trunk's next convolution reads."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 16, 8, 8, generator=g).to(dtype)
    up = torch.randn(32, 16, 8, 8, generator=g).to(dtype)
    ref = x.clone().requires_grad_()
    want = F.gelu(ref)
    want.backward(up)
    for layout in (torch.contiguous_format, torch.channels_last):
        a = x.clone().contiguous(memory_format=layout).requires_grad_()
        y = gelu(a)
        assert torch.equal(y, want)
        assert y.is_contiguous(memory_format=layout)
        y.backward(up.contiguous(memory_format=layout))
        assert torch.equal(a.grad, ref.grad)
