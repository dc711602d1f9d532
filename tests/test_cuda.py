"""compare_logits on CUDA tensors: the core's CUDA kernels, read in place,
against the same float64 references (and tolerances) as the CPU kernels in
test_metrics.py. Skipped where torch has no GPU or the core was built without
CUDA; the routing and error messages that need no GPU are tested always.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import logitparity as lp
from logitparity import _core
from test_metrics import NINF, adversarial_rows, assert_row_matches, lm_logits, ref_row

torch = pytest.importorskip("torch")

HAVE_GPU = bool(_core.cuda_built() and _core.cuda_device_count() > 0 and torch.cuda.is_available())
gpu = pytest.mark.skipif(not HAVE_GPU, reason="no CUDA device (or the core has no CUDA kernels)")


def _pair(rng, rows, vocab, sigma):
    a = lm_logits(rng, rows, vocab)
    b = (a + sigma * rng.normal(size=a.shape)).astype(np.float32)
    return a, b


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("vocab,sigma", [(1000, 0.05), (49152, 1e-3), (151936, 0.3)])
def test_every_field_matches_float64_reference_on_gpu(dtype, vocab, sigma):
    rng = np.random.default_rng(vocab)
    a, b = _pair(rng, 6, vocab, sigma)
    tdt = getattr(torch, dtype)
    ta, tb = torch.from_numpy(a).to("cuda", tdt), torch.from_numpy(b).to("cuda", tdt)
    targets = rng.integers(0, vocab, 6)
    m = lp.compare_logits(ta, tb, targets=torch.from_numpy(targets).cuda(), js=True, topk=(1, 5, 10, 64))
    av, bv = ta.float().cpu().numpy(), tb.float().cpu().numpy()
    for i in range(6):
        assert_row_matches(m, i, ref_row(av[i], bv[i], int(targets[i]), ks=(1, 5, 10, 64)))


@gpu
def test_adversarial_rows_on_gpu():
    a, b = adversarial_rows(np.random.default_rng(0), 5003, far=True)
    targets = np.array([0, 17, 1, 2, 4, 4, 8, 9])
    m = lp.compare_logits(torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda(), targets=targets,
                          js=True)
    for i in range(len(a)):
        assert_row_matches(m, i, ref_row(a[i], b[i], int(targets[i])))
    assert m.kl_ref_cand[3] == np.inf and math.isfinite(m.kl_cand_ref[3])
    assert m.nonfinite_cand[4] == 1 and m.nonfinite_ref[5] == 1
    assert np.isnan(m.kl_ref_cand[4]) and m.argmax_ref[4] == -1 and m.topk_overlap[5][4] == -1


@gpu
def test_gpu_agrees_with_cpu_kernel_and_keeps_shape():
    rng = np.random.default_rng(4)
    a, b = _pair(rng, 12, 32000, 0.1)
    ta = torch.from_numpy(a).cuda().reshape(3, 4, 32000)
    tb = torch.from_numpy(b).cuda().reshape(3, 4, 32000)
    g = lp.compare_logits(ta, tb, js=True)
    c = lp.compare_logits(a.reshape(3, 4, 32000), b.reshape(3, 4, 32000), js=True)
    assert g.shape == (3, 4) == c.shape
    for name in ("kl_ref_cand", "kl_cand_ref", "js", "lse_ref", "entropy_cand", "max_abs_logprob"):
        np.testing.assert_allclose(getattr(g, name), getattr(c, name), rtol=2e-5, atol=2e-6)
    for name in ("argmax_ref", "argmax_cand", "rank_of_ref_top1_in_cand", "margin_ref"):
        np.testing.assert_array_equal(getattr(g, name), getattr(c, name))
    for k in (1, 5, 10):
        np.testing.assert_array_equal(g.topk_overlap[k], c.topk_overlap[k])


@gpu
def test_gpu_strided_broadcast_and_non_contiguous_rows():
    rng = np.random.default_rng(5)
    big = torch.from_numpy(lm_logits(rng, 10, 900)).cuda()
    a = big[::2, :700]                 # row stride 1800 elements, read in place
    b = big[1::2, :700].t().contiguous().t()  # last dim strided: copied on the device
    one = big[:1, :700].expand(5, 700)  # stride-0 rows: copied on the device
    m = lp.compare_logits(a, b, js=True)
    m1 = lp.compare_logits(one, b)
    an, bn, on = a.cpu().numpy(), b.cpu().numpy(), one.cpu().numpy()
    for i in range(5):
        assert_row_matches(m, i, ref_row(an[i], bn[i], None))
        assert m1.kl_ref_cand[i] == pytest.approx(ref_row(on[i], bn[i], None)["kl_ref_cand"],
                                                  rel=1e-5, abs=1e-6)


@gpu
def test_gpu_results_are_deterministic_and_batch_invariant():
    rng = np.random.default_rng(9)
    a, b = _pair(rng, 40, 20011, 0.1)
    ta, tb = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
    full = lp.compare_logits(ta, tb, js=True)
    again = lp.compare_logits(ta, tb, js=True)
    part = lp.compare_logits(ta[10:20], tb[10:20], js=True)
    for name in ("kl_ref_cand", "js", "cosine", "entropy_ref", "lse_cand"):
        np.testing.assert_array_equal(getattr(full, name), getattr(again, name))
        np.testing.assert_array_equal(getattr(full, name)[10:20], getattr(part, name))


@gpu
def test_gpu_runs_on_the_current_stream():
    rng = np.random.default_rng(2)
    a, b = _pair(rng, 64, 49152, 0.05)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        ta = torch.from_numpy(a).cuda(non_blocking=False)
        tb = torch.from_numpy(b).cuda()
        tb = tb * 1.0  # queued on s: the kernel must see its result
        m = lp.compare_logits(ta, tb)
    want = lp.compare_logits(a, b)
    np.testing.assert_allclose(m.kl_ref_cand, want.kl_ref_cand, rtol=2e-5, atol=2e-6)


@gpu
def test_gpu_error_mixed_devices():
    a = torch.zeros(2, 8, device="cuda")
    with pytest.raises(ValueError, match=r"ref is on cuda:0 and cand on cpu; compare rows on one device"):
        lp.compare_logits(a, torch.zeros(2, 8))


@gpu
def test_gpu_error_dtype():
    a = torch.zeros(2, 8, device="cuda", dtype=torch.float64)
    with pytest.raises(TypeError, match=r"ref must be float32, float16 or bfloat16, got torch.float64"):
        lp.compare_logits(a, a)


@gpu
def test_gpu_error_leading_shapes():
    a = torch.zeros(2, 3, 8, device="cuda")
    with pytest.raises(ValueError, match=r"same leading shape .* got \(2, 3\) and \(3, 2\)"):
        lp.compare_logits(a, torch.zeros(3, 2, 8, device="cuda"))


def test_core_reports_its_cuda_build():
    assert isinstance(_core.cuda_built(), bool)
    assert _core.cuda_device_count() >= 0
    if not _core.cuda_built():
        assert _core.cuda_device_count() == 0


@pytest.mark.skipif(HAVE_GPU or not _core.cuda_built(), reason="needs a CUDA build without a GPU")
def test_cuda_kernel_without_gpu_says_so():
    with pytest.raises(RuntimeError, match="no CUDA device is usable"):
        _core.compare_rows_cuda(1 << 20, 0, 8, 1 << 20, 0, 8, 1, 8, None, [1], False, 0)
