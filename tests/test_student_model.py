import pytest
import torch
from torch import nn

from pipeline.config import StudentParams
from student.losses import DistillHeads
from student.model import (
    StudentInterface,
    StudentOutput,
    TaskHeads,
    ViltStudent,
    count_parameters,
    create_student,
    fit_text,
    list_students,
    register_student,
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
