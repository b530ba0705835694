"""Each loss component against a small example whose expected numbers are worked out by hand in comments."""

import dataclasses
import math

import pytest
import torch

from pipeline.config import DistillParams, StudentParams
from student.losses import (
    METHODS,
    DistillHeads,
    alpha_schedule,
    balance_lambda,
    candidate_confidence,
    check_finite,
    clip_td_loss,
    confidence_weights,
    distill_loss,
    distillable_text_mask,
    method_config,
    naive_kd_loss,
    normalise_weights,
    pooled_fd_loss,
    prepare_teacher,
    resize_teacher_grid,
    select_mass,
    select_topk,
    snli_confidence,
    token_distance,
)
from student.model import StudentOutput, create_student

torch.set_num_threads(1)
T = torch.tensor
R2 = math.sqrt(2.0)


def identity_heads(d: int = 2) -> DistillHeads:
    """Projection heads that are the identity, so distances can be computed by hand on the student tokens."""
    h = DistillHeads(d, d)
    with torch.no_grad():
        for lin in (h.h_v, h.h_t, h.h_p):
            lin.weight.copy_(torch.eye(d))
            lin.bias.zero_()
    return h


def settings(method: str = "clip_td", **kw):
    # The hand values below are worked out for α decaying from 1 to 0.1 (the method file's schedule), pinned
    # here so that tuning the shipped default does not change what these tests check.
    return dataclasses.replace(method_config(method, DistillParams(alpha0=1.0, alpha_min=0.1)), **kw)


# ---------------------------------------------------------------------------------------------- grid resize


def test_resize_2x2_to_1x1_is_mean():
    t = T([[[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]]])
    torch.testing.assert_close(resize_teacher_grid(t, 2, 1), T([[[2.5, 25.0]]]))


def test_resize_identity_and_row_major_upsample():
    t = torch.randn(2, 4, 3)
    assert resize_teacher_grid(t, 2, 2) is t
    # Grid [[0, 1], [2, 3]] -> 4x4. Output cell (r, c) samples source (r/2 - 0.25, c/2 - 0.25), clamped:
    # (0, 1) -> col 0.25: 0.75*0 + 0.25*1 = 0.25; (1, 0) -> row 0.25: 0.25*2 = 0.5;
    # (1, 1) -> 0.25*1*0.75 + 0.25*2*0.75 + 0.0625*3 = 0.75; (3, 3) -> corner = 3.
    out = resize_teacher_grid(T([[[0.0], [1.0], [2.0], [3.0]]]), 2, 4)[0, :, 0]
    assert out.shape == (16,)
    torch.testing.assert_close(out[[0, 1, 4, 5, 15]], T([0.0, 0.25, 0.5, 0.75, 3.0]))
    with pytest.raises(ValueError, match="3x3 grid"):
        resize_teacher_grid(t, 3, 2)


# ---------------------------------------------------------------------------------------------- distance


def test_token_distance_known_vectors():
    a = T([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0]])
    b = T([[0.0, 1.0], [1.0, 1.0], [5.0, 0.0]])
    # orthogonal; 45 degrees (cos = 1/sqrt2, normalised b = [.7071, .7071]); parallel.
    torch.testing.assert_close(token_distance(a, b, "cosine"), T([1.0, 1 - 1 / R2, 0.0]))
    torch.testing.assert_close(token_distance(a, b, "mse"), T([2.0, 2 - R2, 0.0]))  # = 2 (1 - cos)
    torch.testing.assert_close(token_distance(a, b, "l1"), T([2.0, (1 - 1 / R2) + 1 / R2, 0.0]))
    with pytest.raises(ValueError, match="unknown distance"):
        token_distance(a, b, "dot")


# ---------------------------------------------------------------------------------------------- selection


def test_select_topk_hand_cases():
    r = T([[0.1, 0.9, 0.5, 0.3]])
    ok = torch.ones(1, 4, dtype=torch.bool)
    assert select_topk(r, ok, 0.25).tolist() == [[False, True, False, False]]  # ceil(1) = 1
    assert select_topk(r, ok, 0.5).tolist() == [[False, True, True, False]]  # ceil(2) = 2
    assert select_topk(r, ok, 0.6).tolist() == [[False, True, True, True]]  # ceil(2.4) = 3
    assert select_topk(r, ok, 0.0).tolist() == [[False, True, False, False]]  # at least one
    # Index 2 invalid: n_valid = 3, ceil(1.5) = 2 among {0: .1, 1: .9, 3: .3} -> {1, 3}.
    valid = T([[True, True, False, True]])
    assert select_topk(r, valid, 0.5).tolist() == [[False, True, False, True]]
    # No valid token: nothing kept.
    assert not select_topk(r, torch.zeros(1, 4, dtype=torch.bool), 0.5).any()
    # 0.1 * 30 = 3.0000000000000004 in floating point; still 3 tokens.
    assert select_topk(torch.randn(1, 30), torch.ones(1, 30, dtype=torch.bool), 0.1).sum() == 3


def test_select_mass_hand_cases():
    # softmax(log([1, 2, 3, 4]) / tau * tau) = [.1, .2, .3, .4]; taken in order .4, .3, .2, .1.
    tau = 0.1
    r = torch.log(T([[1.0, 2.0, 3.0, 4.0]])) * tau
    ok = torch.ones(1, 4, dtype=torch.bool)
    assert select_mass(r, ok, 0.35, tau).tolist() == [[False, False, False, True]]  # .4 >= .35
    assert select_mass(r, ok, 0.5, tau).tolist() == [[False, False, True, True]]  # .7
    assert select_mass(r, ok, 0.75, tau).tolist() == [[False, True, True, True]]  # .9
    assert select_mass(r, ok, 1.0, tau).all()
    assert select_mass(r, ok, 0.0, tau).sum() == 1  # at least one
    # Index 3 invalid: mass over {0, 1, 2} = [1/6, 1/3, 1/2]; p = .6 needs 1/2 + 1/3.
    valid = T([[True, True, True, False]])
    assert select_mass(r, valid, 0.6, tau).tolist() == [[False, True, True, False]]
    assert not select_mass(r, torch.zeros(1, 4, dtype=torch.bool), 0.5, tau).any()


def test_distillable_text_mask_excludes_sot_eot_padding():
    # L = 5 -> 1..3; L = 3 -> 1; L = 2 (SOT, EOT only) -> none; L = 0 (no text) -> none.
    m = distillable_text_mask(T([5, 3, 2, 0]), 6)
    assert m.tolist() == [
        [False, True, True, True, False, False],
        [False, True, False, False, False, False],
        [False] * 6,
        [False] * 6,
    ]


# ---------------------------------------------------------------------------------------------- weights


def test_candidate_confidence_and_normalisation():
    # cos(e_img, c) = [1, 0, -1], tau = 2 -> logits [2, 0, -2]; denominator e^2 + 1 + e^-2 = 8.524391.
    e_img = T([[1.0, 0.0], [1.0, 0.0]])
    cand = T([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]]).expand(2, 3, 2)
    gold = T([0, 1])
    p = candidate_confidence(e_img, cand, gold, 2.0)
    torch.testing.assert_close(p, T([0.866813, 0.117310]), atol=1e-5, rtol=0)
    # Normalised to mean 1 (mean 0.4920615): [1.761594, 0.238406]; inside the clip range.
    w = confidence_weights(e_img, 2.0, cand=cand, gold=gold)
    torch.testing.assert_close(w, T([1.761594, 0.238406]), atol=1e-5, rtol=0)
    assert not w.requires_grad
    # Clip: raw mean 0.25 -> [3.6, .04, .04, .32] -> [3, .1, .1, .32].
    torch.testing.assert_close(normalise_weights(T([0.9, 0.01, 0.01, 0.08])), T([3.0, 0.1, 0.1, 0.32]))
    torch.testing.assert_close(
        normalise_weights(T([0.9, 0.01, 0.01, 0.08]), [0.0, 10.0]), T([3.6, 0.04, 0.04, 0.32])
    )
    torch.testing.assert_close(normalise_weights(torch.zeros(3)), torch.ones(3))


def test_candidate_weights_are_the_lift_over_a_uniform_pick_whatever_the_count():
    """VQA's same-type distractors give 2 to 4 candidates: a teacher that knows nothing (every candidate
    equally close) must weigh every question alike, not a yes/no one (p_gold 1/2) twice a colour one (1/4).
    The weight is C_n · p_gold; with equal counts it is p_gold after the batch normalisation."""
    e_img = T([[1.0, 0.0]] * 3)
    cand = torch.zeros(3, 4, 2)
    cand[..., 1] = 1.0  # every candidate orthogonal to the image: uniform p over the real ones
    mask = T([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    w = confidence_weights(e_img, 2.0, cand=cand, gold=T([0, 1, 2]), cand_mask=mask)
    torch.testing.assert_close(w, torch.ones(3))
    # The gold twice as likely as a uniform pick: weight 2 against the blind rows' 1, whatever its count.
    cand[0, 0] = T([1.0, 0.0])  # row 0 (2 candidates): p_gold = e^2 / (e^2 + 1)
    raw = T([2 * math.exp(2) / (math.exp(2) + 1), 1.0, 1.0])
    w = confidence_weights(e_img, 2.0, cand=cand, gold=T([0, 1, 2]), cand_mask=mask, clip=(0.0, 10.0))
    torch.testing.assert_close(w, raw / raw.mean())


# e_img rows [1,0], [1,0], [0,1]; texts [1,0], [0,1], [0,1]. cos rows: [1,0,0], [1,0,0], [0,1,1].
# tau = ln 2 -> exp(logits) rows [2,1,1], [2,1,1], [1,2,2] -> q_00 = 2/4, q_11 = 1/4, q_22 = 2/5.
E_IMG = T([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
E_TXT = T([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
LN2 = math.log(2.0)


def test_snli_inbatch_weights():
    # entailment -> q_00 = .5; contradiction -> 1 - q_11 = .75; neutral -> mean(.5, .75) = .625.
    raw = snli_confidence(E_IMG, E_TXT, T([0, 2, 1]), LN2)
    torch.testing.assert_close(raw, T([0.5, 0.75, 0.625]))
    # Mean .625 -> [.8, 1.2, 1.0].
    w = confidence_weights(E_IMG, LN2, snli_labels=T([0, 2, 1]), e_txt=E_TXT)
    torch.testing.assert_close(w, T([0.8, 1.2, 1.0]))
    # All neutral: a constant, so all ones after normalisation.
    torch.testing.assert_close(
        confidence_weights(E_IMG, LN2, snli_labels=T([1, 1, 1]), e_txt=E_TXT), torch.ones(3)
    )


def test_unlabeled_inbatch_weights():
    # Row 2 has no text, so it is no column: rows 0, 1 see exp rows [2, 1] -> q_00 = 2/3, q_11 = 1/3; row 2 -> 1.
    # Raw [2/3, 1/3, 1], mean 2/3 -> [1, .5, 1.5].
    has_text = T([True, True, False])
    w = confidence_weights(E_IMG, LN2, e_txt=E_TXT, has_text=has_text)
    torch.testing.assert_close(w, T([1.0, 0.5, 1.5]))
    # A VQA batch whose row 1 is unlabeled (gold -1) falls back to the in-batch probability for that row.
    cand = T([[[1.0, 0.0], [0.0, 1.0]]]).expand(3, 2, 2)
    w = confidence_weights(E_IMG, LN2, cand=cand, gold=T([0, -1, 1]), e_txt=E_TXT)
    # gold rows: row 0 p = 2/3 (exp [2, 1]); row 2 cos [0, 1] -> p_gold = 2/3, each times its 2 candidates;
    # row 1: q_11 = 1/4.
    raw = T([4 / 3, 0.25, 4 / 3])
    torch.testing.assert_close(w, raw / raw.mean())


# ---------------------------------------------------------------------------------------------- balance


def test_lambda_schedule():
    assert alpha_schedule(0, 100, 1.0, 0.1) == pytest.approx(1.0)
    assert alpha_schedule(50, 100, 1.0, 0.1) == pytest.approx(0.55)
    assert alpha_schedule(100, 100, 1.0, 0.1) == pytest.approx(0.1)
    assert alpha_schedule(500, 100, 1.0, 0.1) == pytest.approx(0.1)
    l_task = T(2.0, requires_grad=True)
    kd = T(0.5, requires_grad=True)
    lam = balance_lambda(l_task, kd, 0, 100, 1.0, 0.1)
    assert lam.item() == pytest.approx(4.0) and not lam.requires_grad  # 1 * 2 / .5
    assert balance_lambda(l_task, kd, 100, 100, 1.0, 0.1).item() == pytest.approx(0.4)
    assert balance_lambda(l_task, kd, 0, 100, mode="constant", lambda_const=0.3).item() == pytest.approx(0.3)


# ---------------------------------------------------------------------------------------------- losses


def hand_batch(img_s, img_t, txt_s, txt_t, lengths, text_mask=None, e_img=None, e_txt=None):
    """A StudentOutput with leaf tensors (gradients show which tokens were distilled) and a teacher batch."""
    img_s = T(img_s, requires_grad=True)
    txt_s = T(txt_s, requires_grad=True)
    lengths = T(lengths)
    b, m = txt_s.shape[:2]
    if text_mask is None:
        text_mask = torch.arange(m)[None, :] < lengths.clamp(max=m)[:, None]
    out = StudentOutput(torch.zeros(b, 2, requires_grad=True), img_s, txt_s, text_mask)
    teacher = {
        "img_tokens": T(img_t),
        "img_pooled": T(e_img) if e_img is not None else torch.ones(b, 2),
        "txt_tokens": T(txt_t),
        "txt_lengths": lengths,
        "txt_pooled": T(e_txt) if e_txt is not None else torch.ones(b, 2),
    }
    return out, teacher


def test_clip_td_loss_hand_value():
    # One image token: s = [1, 0], t = [0, 1] -> d = 1. Text L = 3 -> one distillable token (position 1):
    # s = [1, 0], t = [1, 1] -> d = 1 - 1/sqrt2. L_KD = 2 - 1/sqrt2 = 1.292893.
    out, teacher = hand_batch(
        [[[1.0, 0.0]]],
        [[[0.0, 1.0]]],
        [[[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]],
        [[[5.0, 5.0], [1.0, 1.0], [5.0, 5.0]]],
        [3],
    )
    heads, l_task = identity_heads(), T(2.0)
    # Adaptive: λ L_KD = α L_task, so total = (1 + α) L_task: 4 at step 0, 2.2 at the end.
    total, logs = clip_td_loss(out, heads, teacher, T([1.0]), l_task, 0, 10, settings(), 1)
    assert total.item() == pytest.approx(4.0)
    assert logs["kd"].item() == pytest.approx(2 - 1 / R2, abs=1e-6)
    assert logs["lambda"].item() == pytest.approx(2 / (2 - 1 / R2), abs=1e-5)
    total, _ = clip_td_loss(out, heads, teacher, T([1.0]), l_task, 10, 10, settings(), 1)
    assert total.item() == pytest.approx(2.2)
    total, _ = clip_td_loss(out, heads, teacher, T([1.0]), l_task, 0, 10, settings("clip_td_const_lambda"), 1)
    assert total.item() == pytest.approx(2 + 2 - 1 / R2, abs=1e-6)
    total, _ = naive_kd_loss(out, heads, teacher, l_task, DistillParams(), 1)
    assert total.item() == pytest.approx(2 + 2 - 1 / R2, abs=1e-6)


def test_weighting_switch():
    # Two instances with image distances 1 (orthogonal) and 2 (opposite); no text.
    out, teacher = hand_batch(
        [[[1.0, 0.0]], [[1.0, 0.0]]], [[[0.0, 1.0]], [[-1.0, 0.0]]], torch.zeros(2, 2, 2).tolist(),
        torch.zeros(2, 2, 2).tolist(), [0, 0],
    )  # fmt: skip
    w = T([0.5, 1.5])
    s = settings(balance="constant")
    _, logs = clip_td_loss(out, identity_heads(), teacher, w, T(0.0), 0, 1, s, 1)
    assert logs["kd"].item() == pytest.approx((0.5 * 1 + 1.5 * 2) / 2)
    _, logs = clip_td_loss(
        out, identity_heads(), teacher, w, T(0.0), 0, 1, settings("clip_td_no_weight", balance="constant"), 1
    )
    assert logs["kd"].item() == pytest.approx(1.5)


def test_text_selection_skips_sot_eot_padding_ragged():
    # e_img = [1, 0]; relevance = cos(t_i, e_img). SOT, EOT and padding get the highest relevance (1) and
    # must still never be distilled. Row 0 (L = 5): positions 1..3 have relevance 0, .707, -1;
    # rho_t = .5 -> ceil(1.5) = 2 -> {2, 1}. Row 1 (L = 4): positions 1, 2 have relevance .995, 0 -> ceil(1) = 1 -> {1}.
    hi = [1.0, 0.0]
    txt_t = [
        [hi, [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], hi],
        [hi, [1.0, 0.1], [0.0, 1.0], hi, hi],
    ]
    out, teacher = hand_batch(
        torch.ones(2, 1, 2).tolist(),
        torch.ones(2, 1, 2).tolist(),
        torch.randn(2, 6, 2).tolist(),  # student longer than the teacher's 5 positions
        txt_t,
        [5, 4],
        e_img=[[1.0, 0.0], [1.0, 0.0]],
    )
    total, _ = clip_td_loss(out, identity_heads(), teacher, None, T(1.0), 0, 1, settings(), 1)
    total.backward()
    touched = out.text_tokens.grad.abs().sum(-1) > 0
    assert touched.tolist() == [
        [False, True, True, False, False, False],
        [False, True, False, False, False, False],
    ]
    # Without selection every distillable position, and still no SOT / EOT / padding.
    out.text_tokens.grad = None
    total, _ = clip_td_loss(
        out, identity_heads(), teacher, None, T(1.0), 0, 1, settings("clip_td_no_select"), 1
    )
    total.backward()
    touched = out.text_tokens.grad.abs().sum(-1) > 0
    assert touched.tolist() == [
        [False, True, True, True, False, False],
        [False, True, True, False, False, False],
    ]


def test_text_truncated_student_and_mismatch():
    # Student reads 3 positions (cut, no EOT): positions 1, 2 are real words and distillable in both rows.
    txt_t = [[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [1.0, 0.0]]] * 2
    out, teacher = hand_batch(
        torch.ones(2, 1, 2).tolist(), torch.ones(2, 1, 2).tolist(), torch.randn(2, 3, 2).tolist(), txt_t, [5, 4],
        e_img=[[1.0, 0.0]] * 2,
    )  # fmt: skip
    total, _ = clip_td_loss(
        out, identity_heads(), teacher, None, T(1.0), 0, 1, settings("clip_td_no_select"), 1
    )
    total.backward()
    assert (out.text_tokens.grad.abs().sum(-1) > 0).tolist() == [[False, True, True]] * 2
    # A student mask of 3 tokens against a cached length of 2 that fits: different tokenizations.
    out, teacher = hand_batch(
        torch.ones(1, 1, 2).tolist(), torch.ones(1, 1, 2).tolist(), torch.randn(1, 4, 2).tolist(),
        torch.ones(1, 4, 2).tolist(), [2], text_mask=T([[True, True, True, False]]),
    )  # fmt: skip
    with pytest.raises(ValueError, match="disagree"):
        clip_td_loss(out, identity_heads(), teacher, None, T(1.0), 0, 1, settings(), 1)


def test_image_selection_uses_text_or_image_query():
    # 2x2 grid, rho_v = .25 -> one token. Row 0 has text e_txt = [0, 1] -> token 2 ([0, 1]) is chosen.
    # Row 1 has no text -> its own pooled image [1, 0] scores relevance -> token 0 ([1, 0]).
    grid = [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [-1.0, 0.0]]
    out, teacher = hand_batch(
        torch.randn(2, 4, 2).tolist(), [grid, grid], torch.randn(2, 3, 2).tolist(), torch.ones(2, 3, 2).tolist(),
        [3, 0], e_img=[[1.0, 0.0], [1.0, 0.0]], e_txt=[[0.0, 1.0], [0.0, 1.0]],
    )  # fmt: skip
    total, _ = clip_td_loss(out, identity_heads(), teacher, None, T(1.0), 0, 1, settings(), 2)
    total.backward()
    assert (out.image_tokens.grad.abs().sum(-1) > 0).tolist() == [
        [False, False, True, False],
        [True, False, False, False],
    ]
    # A separate relevance source overrides which token scores highest: row 0 now picks token 3.
    out.image_tokens.grad = None
    teacher["rel_img_tokens"] = T([[[0.0, -1.0]] * 3 + [[0.0, 1.0]], grid])
    total, _ = clip_td_loss(out, identity_heads(), teacher, None, T(1.0), 0, 1, settings(), 2)
    total.backward()
    assert (out.image_tokens.grad.abs().sum(-1) > 0).tolist()[0] == [False, False, False, True]


def test_pooled_fd_hand_value():
    out, teacher = hand_batch([[[0.0, 0.0]]], [[[0.0, 0.0]]], [[[0.0, 0.0]]], [[[0.0, 0.0]]], [3],
                              e_img=[[0.0, 1.0]], e_txt=[[1.0, 0.0]])  # fmt: skip
    out = dataclasses.replace(out, pooled=T([[2.0, 0.0]], requires_grad=True))
    # Normalised MSE summed over channels: to the image [0, 1] -> 2, to the text [1, 0] -> 0.
    total, logs = pooled_fd_loss(out, identity_heads(), teacher, T(1.0), DistillParams())
    assert total.item() == pytest.approx(3.0)
    teacher["txt_lengths"] = T([0])
    teacher["txt_pooled"] = T([[0.0, -1.0]])  # ignored: no text
    total, _ = distill_loss(
        out, identity_heads(), teacher, None, T(1.0), 0, 1, method_config("pooled_fd", DistillParams()), 1
    )
    assert total.item() == pytest.approx(3.0)


def test_gradients_reach_student_and_heads_only_as_used():
    torch.manual_seed(0)
    sp = StudentParams(
        width=16, layers=1, heads=2, mlp_ratio=2.0, patch_size=8, image_size=16, max_text_len=6, dropout=0.0
    )
    student = create_student("vilt", sp, vocab_size=100)
    heads = DistillHeads(16, 8)
    ids = T([[98, 5, 6, 7, 99], [98, 5, 99, 0, 0]])
    out = student(torch.randn(2, 3, 16, 16), ids)
    teacher = {
        "img_tokens": torch.randn(2, 9, 8),  # g_T = 3 -> resized to the student's 2x2
        "img_pooled": torch.randn(2, 8),
        "txt_tokens": torch.randn(2, 5, 8),
        "txt_lengths": T([5, 3]),
        "txt_pooled": torch.randn(2, 8),
    }
    l_task = out.pooled.pow(2).mean()
    total, logs = clip_td_loss(out, heads, teacher, T([0.5, 1.5]), l_task, 3, 10, DistillParams(), 3)
    total.backward()
    assert all(torch.isfinite(v) for v in logs.values())
    assert all(p.grad.abs().sum() > 0 for p in student.patch_embed.parameters())
    assert student.tok_embed.weight.grad.abs().sum() > 0
    assert heads.h_v.weight.grad.abs().sum() > 0
    assert heads.h_t.weight.grad.abs().sum() > 0
    assert heads.h_p.weight.grad is None


@pytest.mark.parametrize(
    "method, kw",
    [
        ("clip_td", {}),
        ("clip_td", {"selection": "mass"}),
        ("clip_td_no_select", {}),
        ("naive_kd", {}),
    ],
)
@pytest.mark.parametrize("relevance", [False, True])
def test_teacher_prepared_off_the_step_gives_the_same_loss_and_gradients(method, kw, relevance):
    """The trainer runs prepare_teacher on its prefetch thread; the loss must not change by a bit. Covers a
    grid resize (3x3 -> 2x2), ragged texts, a row without text, and a teacher text longer than the student's."""
    torch.manual_seed(0)
    sp = StudentParams(
        width=16, layers=1, heads=2, mlp_ratio=2.0, patch_size=8, image_size=16, max_text_len=4, dropout=0.0
    )
    student = create_student("vilt", sp, vocab_size=100)
    heads = DistillHeads(16, 8)
    pixels, ids = torch.randn(3, 3, 16, 16), T([[98, 5, 6, 99, 0, 0], [98, 5, 99, 0, 0, 0], [0] * 6])
    teacher = {
        "img_tokens": torch.randn(3, 9, 8).half(),  # the cache's float16, as the trainer reads it
        "img_pooled": torch.randn(3, 8).half(),
        "txt_tokens": torch.randn(3, 6, 8).half(),
        "txt_lengths": T([4, 3, 0]),
        "txt_pooled": torch.randn(3, 8).half(),
    }
    if relevance:
        teacher["rel_img_tokens"] = torch.randn(3, 9, 8).half()
    s = settings(method, **kw)
    results = []
    for prepared in (False, True):
        student.zero_grad(set_to_none=True)
        heads.zero_grad(set_to_none=True)
        tb = prepare_teacher(teacher, 3, student.grid, s) if prepared else teacher
        out = student(pixels, ids)
        total, logs = distill_loss(out, heads, tb, T([0.5, 1.0, 1.5]), out.pooled.pow(2).mean(), 3, 10, s, 3)
        total.backward()
        grads = [q.grad.clone() for q in [*student.parameters(), *heads.parameters()] if q.grad is not None]
        results.append((total.detach(), {k: v.clone() for k, v in logs.items()}, grads))
    (t0, l0, g0), (t1, l1, g1) = results
    assert torch.equal(t0, t1)
    assert l0.keys() == l1.keys() and all(torch.equal(l0[k], l1[k]) for k in l0)
    assert len(g0) == len(g1) > 0 and all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))
    assert "img_target" not in teacher  # the caller's batch is left as it was
    assert prepare_teacher(tb, 3, student.grid, s) is tb  # a prepared batch is not prepared twice
    assert not {"img_tokens", "rel_img_tokens", "txt_tokens"} & set(tb)  # replaced, not copied
    f = {k: v.float() for k, v in teacher.items() if v.is_floating_point()}
    assert torch.equal(tb["img_target"], resize_teacher_grid(f["img_tokens"], 3, 2))
    if s.select:  # §3 by hand: text tokens score against their own image; image tokens against the text,
        # or the image itself for the row without text
        cos = torch.nn.functional.cosine_similarity
        assert torch.equal(
            tb["txt_relevance"], cos(f["txt_tokens"], f["img_pooled"][:, None], dim=-1, eps=1e-8)
        )
        rel = resize_teacher_grid(f.get("rel_img_tokens", f["img_tokens"]), 3, 2)
        query = torch.stack([f["txt_pooled"][0], f["txt_pooled"][1], f["img_pooled"][2]])
        scores = cos(rel, query[:, None], dim=-1, eps=1e-8)
        if s.selection == "topk":  # rho_v = 0.25 of 4 tokens: the best one
            want = torch.nn.functional.one_hot(scores.argmax(1), 4).bool()
            assert torch.equal(tb["img_select"], want)


def test_teacher_prepared_for_another_grid_is_refused():
    sp = StudentParams(
        width=16, layers=1, heads=2, mlp_ratio=2.0, patch_size=8, image_size=16, max_text_len=4, dropout=0.0
    )
    student = create_student("vilt", sp, vocab_size=100)
    teacher = {
        "img_tokens": torch.randn(1, 9, 8), "img_pooled": torch.randn(1, 8), "txt_tokens": torch.randn(1, 3, 8),
        "txt_lengths": T([3]), "txt_pooled": torch.randn(1, 8),
    }  # fmt: skip
    tb = prepare_teacher(teacher, 3, 3, settings())  # a 3x3 student grid; this student has 2x2
    out = student(torch.randn(1, 3, 16, 16), T([[98, 5, 99]]))
    with pytest.raises(ValueError, match="another student grid"):
        clip_td_loss(out, DistillHeads(16, 8), tb, None, T(1.0), 0, 1, settings(), 3)


def test_method_config_and_baseline():
    base = DistillParams(lambda_const=0.5, rho_v=0.3)
    expect = {
        "baseline": ("none", False, False, "constant", ""),
        "blind": ("none", False, False, "constant", ""),
        "naive_kd": ("tokens", False, False, "constant", ""),
        "pooled_fd": ("pooled", False, False, "constant", ""),
        "clip_td": ("tokens", True, True, "adaptive", ""),
        "clip_td_no_select": ("tokens", False, True, "adaptive", ""),
        "clip_td_no_weight": ("tokens", True, False, "adaptive", ""),
        "clip_td_const_lambda": ("tokens", True, True, "constant", ""),
        "clip_td_unlabeled": ("tokens", True, True, "adaptive", "dropped"),
        "clip_td_transductive": ("tokens", True, True, "adaptive", "target"),
    }
    assert set(METHODS) == set(expect)
    for name, want in expect.items():
        s = method_config(name, base)
        assert (s.kd, s.select, s.weight, s.balance, s.unlabeled) == want, name
        assert (s.lambda_const, s.rho_v, s.method) == (0.5, 0.3, name)
        assert s.blind == (name == "blind")  # only the floor blanks the image
    with pytest.raises(ValueError, match="unknown distillation method"):
        method_config("nope", base)
    out = StudentOutput(
        torch.zeros(1, 2), torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.bool)
    )
    total, logs = distill_loss(out, None, None, None, T(1.5), 0, 1, DistillParams(method="baseline"), 1)
    assert total.item() == 1.5 and set(logs) == {"task", "total"}


def test_check_finite_names_the_term():
    assert check_finite("ok", T([1.0])).item() == 1.0
    with pytest.raises(FloatingPointError, match="'kd_img'.*1 NaN, 1 Inf"):
        check_finite("kd_img", T([float("nan"), float("inf"), 0.0]))
    out, teacher = hand_batch(
        [[[1.0, 0.0]]], [[[float("nan"), 1.0]]], [[[0.0, 0.0]] * 3], [[[1.0, 0.0]] * 3], [3]
    )
    with pytest.raises(FloatingPointError, match="kd_per_instance"):
        clip_td_loss(out, identity_heads(), teacher, None, T(1.0), 0, 1, settings(), 1)


@pytest.mark.parametrize("kind", ["cosine", "l1", "mse"])
def test_only_selected_tokens_are_projected_and_their_mean_matches_the_dense_formula(kind):
    """clip_td projects and compares only the selected tokens. Against the dense formula (every token through
    the head, then a mean over the selection): the same values and gradients; a row with no selected token
    gives 0, and a non-finite teacher value at an unselected slot (e.g. padding) does not leak."""
    from student.losses import _selected_distance

    torch.manual_seed(0)
    b, n, d, e = 4, 7, 5, 3
    tokens = torch.randn(b, n, d, requires_grad=True)
    target = torch.randn(b, n, e)
    sel = torch.rand(b, n) < 0.4
    sel[2] = False  # nothing selected
    sel[0, 0] = True
    target[~sel] = float("nan")
    head = torch.nn.Linear(d, e)
    seen = []
    head.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    got = _selected_distance(tokens, head, target, sel, kind)
    assert seen == [int(sel.sum())]  # only the selected tokens reach the head
    (g_tok, g_w) = torch.autograd.grad(got.sum(), (tokens, head.weight))

    dense = token_distance(head(tokens).float(), target.nan_to_num(0.0), kind)
    want = torch.where(sel, dense, 0.0).sum(1) / sel.sum(1).clamp(min=1)
    (w_tok, w_w) = torch.autograd.grad(want.sum(), (tokens, head.weight))
    assert torch.isfinite(got).all() and got[2] == 0
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_tok, w_tok)
    torch.testing.assert_close(g_w, w_w)
    assert (g_tok[~sel] == 0).all()
