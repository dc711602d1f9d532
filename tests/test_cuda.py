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
    assert np.isnan(m.kl_ref_cand[4]) and m.argmax_ref[4] == -1 and m.topk_common[5][4] == -1


@gpu
@pytest.mark.parametrize("tdtype", ["int64", "int32"])
def test_cuda_targets_are_read_in_place(tdtype):
    # Torch CUDA targets go to the kernel as device memory (no host copy):
    # the same fields, bitwise, as the same ids given on the host; -1 = none.
    rng = np.random.default_rng(7)
    a, b = _pair(rng, 12, 3001, 0.1)
    ta, tb = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
    ids = rng.integers(0, 3001, 12)
    ids[[2, 7]] = -1
    host = lp.compare_logits(ta, tb, targets=ids, js=True)
    dev = lp.compare_logits(ta, tb, targets=torch.from_numpy(ids).to("cuda", getattr(torch, tdtype)),
                            js=True)
    for name in ("nll_ref", "nll_cand", "delta_p", "kl_ref_cand", "argmax_cand"):
        np.testing.assert_array_equal(getattr(dev, name), getattr(host, name))
    assert np.isnan(dev.nll_ref[2]) and np.isnan(dev.delta_p[7])
    np.testing.assert_allclose(dev.nll_ref[0], ref_row(a[0], b[0], int(ids[0]))["nll_ref"], rtol=1e-7)


@gpu
def test_cuda_target_out_of_range_is_checked_on_the_device():
    ta = torch.zeros(4, 300, device="cuda")
    t = torch.tensor([0, 5, 300, -2], device="cuda")
    with pytest.raises(ValueError, match=r"targets must be in \[0, 300\) \(the vocab size\) or -1 "
                                         r"for none, got 300 at row 2"):
        lp.compare_logits(ta, ta, targets=t)


@gpu
def test_cuda_targets_of_the_wrong_count_or_dtype():
    ta = torch.zeros(4, 300, device="cuda")
    with pytest.raises(ValueError, match=r"one token id per row \(4 rows"):
        lp.compare_logits(ta, ta, targets=torch.zeros(5, dtype=torch.int64, device="cuda"))
    with pytest.raises(TypeError, match="integer token ids"):
        lp.compare_logits(ta, ta, targets=torch.zeros(4, device="cuda"))


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
        np.testing.assert_array_equal(g.topk_common[k], c.topk_common[k])


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
    # (Both calls stay at or below 2 x the GPU's multiprocessors of rows, so
    # both take 256-thread blocks: across the block sizes a row's last bits
    # may differ, docs/gpu.md.)
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
def test_gpu_calls_from_threads_overlap_and_agree():
    # Each call has its own pinned buffer (a pool): calls from several threads
    # run at once on their own streams and give each its own rows' bits.
    import threading

    rng = np.random.default_rng(12)
    pairs = [tuple(torch.from_numpy(x).cuda() for x in _pair(rng, 33, 5003 + 7 * i, 0.1))
             for i in range(4)]
    want = [lp.compare_logits(a, b, js=True, topk=(1, 3)) for a, b in pairs]
    got: dict[int, list] = {}

    def run(i):
        with torch.cuda.stream(torch.cuda.Stream()):
            got[i] = [lp.compare_logits(*pairs[i], js=True, topk=(1, 3)) for _ in range(5)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i in range(4):
        for m in got[i]:
            for name in ("kl_ref_cand", "js", "cosine", "argmax_cand", "nonfinite_ref"):
                np.testing.assert_array_equal(getattr(m, name), getattr(want[i], name))
            np.testing.assert_array_equal(m.topk_common[3], want[i].topk_common[3])


@gpu
def test_gpu_job_finish_once_and_dropped_jobs():
    # compare_rows_cuda_start queues the kernel and hands back the arrays that
    # finish() fills; a second finish is an error, and a job dropped unfinished
    # waits for its kernel (the next call gets its own results).
    rng = np.random.default_rng(13)
    a, b = (torch.from_numpy(x).cuda() for x in _pair(rng, 9, 4099, 0.1))
    st = torch.cuda.current_stream().cuda_stream
    args = (a.data_ptr(), 0, 4099, b.data_ptr(), 0, 4099, 9, 4099, None, [1, 5], False, st)
    job, fields, names, overlap, ints = _core.compare_rows_cuda_start(*args)
    assert fields.shape == (9, len(names)) and overlap.shape == (9, 2) and ints.shape == (5, 9)
    job.finish()
    want_f, _, want_o = _core.compare_rows_cuda(*args)
    np.testing.assert_array_equal(fields, want_f)
    np.testing.assert_array_equal(overlap, want_o)
    assert names[-5:] == lp.metrics.INT_FIELDS
    np.testing.assert_array_equal(ints, want_f[:, -5:].T.astype(np.int64))
    with pytest.raises(ValueError, match="this comparison was already finished"):
        job.finish()
    dropped = _core.compare_rows_cuda_start(*args)
    del dropped
    again, _, _ = _core.compare_rows_cuda(*args)
    np.testing.assert_array_equal(again, want_f)


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


# --- DLPack inputs ----------------------------------------------------------


class _DLPackOnly:
    """An array known only through the DLPack protocol (no torch type, no
    __cuda_array_interface__), as a JAX array or another framework's is."""

    def __init__(self, inner):
        self.inner = inner
        self.streams = []

    def __dlpack__(self, *, stream=None, max_version=None, **kw):
        self.streams.append(stream)
        if type(self.inner).__module__.startswith("torch") and self.inner.is_cuda:
            return self.inner.__dlpack__(stream=stream)
        return self.inner.__dlpack__()

    def __dlpack_device__(self):
        return self.inner.__dlpack_device__()


def test_dlpack_info_reads_a_capsule_without_taking_it():
    x = np.arange(24, dtype=np.float32).reshape(4, 6)[:, 1:5]
    ptr, dev_type, dev_id, dtype, shape, strides = _core.dlpack_info(x.__dlpack__())
    assert (dev_type, dev_id, dtype, shape, strides) == (1, 0, (2, 32, 1), (4, 4), (6, 1))
    assert ptr == x.__array_interface__["data"][0]
    t = torch.zeros(3, 5, dtype=torch.bfloat16)
    assert _core.dlpack_info(t.__dlpack__())[3] == (4, 16, 1)


def test_dlpack_info_error_consumed_capsule():
    cap = torch.zeros(2, 3).__dlpack__()
    torch.from_dlpack(cap)  # takes it over and renames it
    with pytest.raises(ValueError, match=r"expected a DLPack capsule named 'dltensor'.*already consumed"):
        _core.dlpack_info(cap)


def test_host_dlpack_array_is_compared_like_numpy():
    rng = np.random.default_rng(11)
    a, b = _pair(rng, 3, 700, 0.1)
    got = lp.compare_logits(_DLPackOnly(torch.from_numpy(a)), _DLPackOnly(torch.from_numpy(b)), js=True)
    want = lp.compare_logits(a, b, js=True)
    for name in ("kl_ref_cand", "js", "argmax_cand", "lse_ref"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_gpu_dlpack_array_is_read_in_place(dtype):
    rng = np.random.default_rng(12)
    a, b = _pair(rng, 9, 32000, 0.05)
    tdt = getattr(torch, dtype)
    ta, tb = torch.from_numpy(a).to("cuda", tdt), torch.from_numpy(b).to("cuda", tdt)
    da, db = _DLPackOnly(ta[1:]), _DLPackOnly(tb[1:])  # a view: byte offset and row stride
    got = lp.compare_logits(da, db, targets=np.arange(8), js=True)
    want = lp.compare_logits(ta[1:], tb[1:], targets=np.arange(8), js=True)
    assert da.streams == [1] and db.streams == [1]  # the legacy default stream, DLPack's 1
    for name in ("kl_ref_cand", "kl_cand_ref", "js", "cosine", "nll_cand", "argmax_ref"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))


@gpu
def test_gpu_dlpack_error_dtype():
    a = _DLPackOnly(torch.zeros(2, 8, device="cuda", dtype=torch.float64))
    with pytest.raises(TypeError, match=r"ref must be float32, float16 or bfloat16, got DLPack dtype \(code 2, 64 bits"):
        lp.compare_logits(a, a)


# --- log-softmax, NLL, log-sum-exp and top-k on the GPU ---------------------


def _ref_lse(x64: np.ndarray) -> np.ndarray:
    m = x64.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (m + np.log(np.exp(x64 - np.where(np.isfinite(m), m, 0)).sum(axis=1, keepdims=True)))[:, 0]


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_gpu_row_kernels_match_float64_reference(dtype):
    rng = np.random.default_rng(3)
    x = lm_logits(rng, 6, 4099)
    x[1, ::2] = NINF
    tx = torch.from_numpy(x).to("cuda", getattr(torch, dtype)).reshape(2, 3, 4099)
    x64 = tx.float().cpu().numpy().reshape(6, 4099).astype(np.float64)
    lse = _ref_lse(x64)
    got = lp.logsumexp(tx)
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got.reshape(-1), lse, rtol=1e-12, atol=1e-12)
    ls = lp.log_softmax(tx)
    assert isinstance(ls, torch.Tensor) and ls.is_cuda and ls.dtype == torch.float32 and ls.shape == tx.shape
    ls = ls.cpu().numpy().reshape(6, 4099)
    fin = np.isfinite(x64)
    np.testing.assert_allclose(ls[fin], (x64 - lse[:, None])[fin], rtol=6e-8, atol=1e-12)
    assert np.all(ls[~fin] == NINF)
    t = rng.integers(0, 4099, 6)
    t[1] = 2  # a masked token: NLL = +inf
    nll = lp.nll(tx, t.reshape(2, 3)).reshape(-1)
    assert nll[1] == np.inf
    keep = [0, 2, 3, 4, 5]
    np.testing.assert_allclose(nll[keep], (lse - x64[np.arange(6), t])[keep], rtol=1e-12, atol=1e-12)
    for k in (1, 7, 64, 256):
        v, i = lp.topk(tx, k)
        assert v.shape == (2, 3, k)
        order = np.lexsort((np.tile(np.arange(4099), (6, 1)), -x64), axis=1)[:, :k]
        np.testing.assert_array_equal(i.reshape(6, k), order)
        np.testing.assert_array_equal(v.reshape(6, k), np.take_along_axis(x64, order, 1))


@gpu
def test_gpu_row_kernels_nonfinite_rows_and_ties():
    x = np.zeros((4, 3000), np.float32)
    x[0, 5] = np.nan
    x[1, 2999] = np.inf
    x[2, :] = NINF
    tx = torch.from_numpy(x).cuda()
    lse = lp.logsumexp(tx)
    assert np.isnan(lse[0]) and np.isnan(lse[1]) and lse[2] == -np.inf
    assert lse[3] == pytest.approx(math.log(3000), rel=1e-15)
    assert np.isnan(lp.nll(tx, [0, 0, 0, 0])[:3]).all()
    v, i = lp.topk(tx, 3)
    assert np.isnan(v[0]).all() and (i[0] == -1).all()
    assert i[1].tolist() == [2999, 0, 1] and v[1, 0] == np.inf
    assert i[2].tolist() == [0, 1, 2] and i[3].tolist() == [0, 1, 2]  # ties to the lower index
    assert np.isnan(lp.log_softmax(tx)[0].cpu().numpy()).all()


@gpu
def test_gpu_log_softmax_in_place_and_large_k_on_host():
    rng = np.random.default_rng(8)
    x = lm_logits(rng, 5, 3001)
    tx = torch.from_numpy(x).cuda()
    want = lp.log_softmax(tx).cpu().numpy()
    assert lp.log_softmax(tx, inplace=True) is tx
    np.testing.assert_array_equal(tx.cpu().numpy(), want)
    v, i = lp.topk(torch.from_numpy(x).cuda(), 300)  # above MAX_TOPK_CUDA: computed on the host
    cv, ci = lp.topk(x, 300)
    np.testing.assert_array_equal(i, ci)
    np.testing.assert_array_equal(v, cv)


@gpu
def test_gpu_log_softmax_error_in_place_strided():
    x = torch.zeros(4, 16, device="cuda")[:, :8]
    with pytest.raises(TypeError, match=r"inplace=True needs a non-empty, contiguous float32 array"):
        lp.log_softmax(x, inplace=True)


@gpu
def test_gpu_topk_error_k():
    x = _DLPackOnly(torch.zeros(2, 300, device="cuda"))
    with pytest.raises(ValueError, match=r"k must be in \[1, 256\] on the GPU"):
        lp.topk(x, 257)


# --- capture and perplexity with the model on the GPU -----------------------


@gpu
@pytest.mark.parametrize("storage", ["topk:8", "full"])
def test_gpu_dump_rows_equal_host_computed_rows(tmp_path, storage):
    """The same logits written from the GPU (kernels read them there) and
    from the host give the same dump: top-K values and ids equal, lse and
    tail within float64 rounding, full rows bitwise."""
    from logitparity import load_dump
    from logitparity.dump import DumpWriter

    rng = np.random.default_rng(21)
    rows = lm_logits(rng, 7, 5003)
    rows[2, ::3] = NINF
    manifest = {"engine": {"name": "test"}, "model": {}, "tokenizer": {"vocab_size": 5003}, "decoding": {"mode": "score"}}
    dumps = []
    for name, logits in (("gpu", torch.from_numpy(rows).cuda()), ("cpu", torch.from_numpy(rows))):
        with DumpWriter(tmp_path / name, dict(manifest), storage=storage, logits_dtype="bf16" if storage == "full" else "fp32") as w:
            w.add({"id": "p", "category": "c", "prompt": "x", "chat_template": False, "prompt_token_ids": [1],
                   "generated_token_ids": list(range(7)), "stop_reason": "max_new_tokens"}, logits)
        dumps.append(load_dump(tmp_path / name))
    g, c = dumps
    if storage == "full":
        np.testing.assert_array_equal(g.logits("p"), c.logits("p"))
        return
    (gv, gi, gl, gt), (cv, ci, cl, ct) = g.topk("p"), c.topk("p")
    np.testing.assert_array_equal(gi, ci)
    np.testing.assert_array_equal(gv, cv)
    np.testing.assert_allclose(gl, cl, rtol=1e-14, atol=0)
    np.testing.assert_allclose(gt, ct, rtol=0, atol=1e-13)


@gpu
def test_gpu_capture_and_ppl_match_the_cpu_run(tiny_model_dir, tmp_path):
    """The tiny model captured on cuda (rows kept on the GPU, top-K computed
    there) against the same model captured on the CPU: the same tokens, top-K
    ids, and values / lse within the two devices' matmul rounding; perplexity
    on cuda equals the CPU's within the same tolerance."""
    from logitparity import load_dump
    from logitparity.capture import capture, load_model
    from logitparity.prompts import Prompt

    prompts = [Prompt("a", "x", "Hello there, how are you today?"), Prompt("b", "y", "def add(a, b):"),
               Prompt("c", "x", "Once upon a time, in a quiet village")]
    out = {}
    for device in ("cuda", "cpu"):
        lm = load_model(tiny_model_dir, device=device)
        out[device] = load_dump(capture(lm, prompts, tmp_path / device, max_new_tokens=10, storage="topk:16",
                                        batch_size=2, progress=False))
    g, c = out["cuda"], out["cpu"]
    for p in prompts:
        assert g.record(p.id)["generated_token_ids"] == c.record(p.id)["generated_token_ids"]
        (gv, gi, gl, gt), (cv, ci, cl, ct) = g.topk(p.id), c.topk(p.id)
        np.testing.assert_array_equal(gi[:, :4], ci[:, :4])
        np.testing.assert_allclose(gv, cv, rtol=0, atol=1e-4)
        np.testing.assert_allclose(gl, cl, rtol=0, atol=1e-4)
        np.testing.assert_allclose(gt, ct, rtol=0, atol=1e-4)

    # Perplexity with both models on cuda (rows kept there: NLL, KL and the
    # baseline cache's top-K from the GPU kernels) against the CPU run.
    text = "The quick brown fox jumps over the lazy dog. " * 12
    kw = dict(text=text, ctx=32, stride=16, batch_size=2, progress=False, bootstrap=50)
    rg = lp.perplexity(tiny_model_dir, candidate=tiny_model_dir, device="cuda", candidate_device="cuda",
                       save_baseline=tmp_path / "cache", storage="topk:8", **kw)
    rc = lp.perplexity(tiny_model_dir, candidate=tiny_model_dir, device="cpu", **kw)
    assert rg.ref.ppl == pytest.approx(rc.ref.ppl, rel=1e-5)
    assert rg.cand.ppl == pytest.approx(rc.cand.ppl, rel=1e-5)
    assert rg.pair.delta_ppl == 0.0  # the same model on one device: identical rows


def _activations(rng, rows, width):
    """Activations with a heavy channel, NaN, +-inf and zeros."""
    x = (rng.normal(0.5, 3.0, size=(rows, width)) * np.where(np.arange(width) % 17 == 0, 40.0, 1.0))
    x = x.astype(np.float32)
    odd = rng.integers(0, 200, size=x.shape)
    x[odd == 0], x[odd == 1], x[odd == 2], x[(odd > 2) & (odd < 6)] = np.nan, np.inf, -np.inf, 0.0
    return x


def _torch_rows(x, dtype):
    t = torch.from_numpy(x).to(getattr(torch, dtype))
    code = {"float32": 0, "float16": 1, "bfloat16": 2}[dtype]
    host = t.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else t.numpy()
    return t.cuda(), host, code, dtype == "bfloat16"


@gpu
@pytest.mark.parametrize("da,db", [("float32", "float32"), ("float16", "bfloat16"), ("bfloat16", "float32")])
@pytest.mark.parametrize("width", [1, 257, 2048, 4099])
def test_activation_diff_cuda_matches_the_cpu_kernel(da, db, width):
    rng = np.random.default_rng(width)
    xa = _activations(rng, 7, width)
    with np.errstate(invalid="ignore"):  # inf + -inf where both sides hold one: NaN, as wanted
        xb = (0.7 * _activations(rng, 7, width) + 0.3 * xa).astype(np.float32)
    ga, ha, ca, abf = _torch_rows(xa, da)
    gb, hb, cb, bbf = _torch_rows(xb, db)
    want_rows, want = _core.activation_diff(ha, abf, hb, bbf, 1)
    got_rows, got = _core.activation_diff_cuda(ga.data_ptr(), ca, width, gb.data_ptr(), cb, width, 7,
                                               width, torch.cuda.current_stream().cuda_stream)
    names = list(_core.DIFF_FIELDS)
    exact = [names.index(f) for f in ("max_abs", "nonfinite_ref", "nonfinite_cand", "count")]
    np.testing.assert_array_equal(got_rows[:, exact], want_rows[:, exact])
    np.testing.assert_allclose(got_rows, want_rows, rtol=1e-12, atol=0)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


@gpu
def test_layer_diff_of_cuda_outputs_runs_on_the_gpu_and_matches_the_host():
    from logitparity import layers as L

    rng = np.random.default_rng(3)
    xa = _activations(rng, 9, 576)
    xb = (xa + 0.01 * rng.normal(size=xa.shape)).astype(np.float32)
    ta, tb = torch.from_numpy(xa).cuda().bfloat16(), torch.from_numpy(xb).cuda().bfloat16()
    assert L._cuda_pair(ta, tb)
    got_rows, got = L._diff(_core, ta, tb, "model.layers.0")
    want_rows, want = L._diff(_core, ta.cpu(), tb.cpu(), "model.layers.0")
    np.testing.assert_allclose(got_rows, want_rows, rtol=1e-12, atol=0)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"reference output is \(9, 576\), candidate's \(9, 575\)"):
        L._diff(_core, ta, tb[:, :575], "model.layers.0")


@gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_distribution_accumulator_add_cuda_matches_add(dtype):
    rng = np.random.default_rng(11)
    want, got = _core.DistributionAccumulator(2100), _core.DistributionAccumulator(2100)
    for _ in range(2):
        g, h, code, bf16 = _torch_rows(_activations(rng, 5, 2100), dtype)
        want.add(h, bf16)
        got.add_cuda(g.data_ptr(), code, 2100, 5, 2100, torch.cuda.current_stream().cuda_stream)
    for name in ("count", "finite", "zeros", "nans", "infs", "min", "max"):
        assert getattr(got, name) == getattr(want, name), name
    np.testing.assert_array_equal(got.channel_max_abs, want.channel_max_abs)
    np.testing.assert_array_equal(got.abs_histogram, want.abs_histogram)
    for name in ("mean", "variance", "kurtosis"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-12)
    np.testing.assert_allclose(got.skewness, want.skewness, rtol=1e-10)


def test_layer_diff_of_host_outputs_stays_on_the_host():
    from logitparity import layers as L

    a = torch.ones(3, 4)
    assert not L._cuda_pair(a, a)
    assert not L._cuda_pair(a.numpy(), a.numpy())
    _, merged = L._diff(_core, a, 2 * a, "m")
    assert merged[list(_core.DIFF_FIELDS).index("max_abs")] == 1.0
    with pytest.raises(ValueError, match=r"module m: reference output is \(3, 4\), candidate's \(3, 5\); "
                                         r"do both models have the same architecture"):
        L._diff(_core, a, torch.ones(3, 5), "m")


def _writer_stats(tmp_path, name, rows_of_prompts, storage="stats"):
    from logitparity.activations import ActivationWriter, load_activations

    d = tmp_path / name
    d.mkdir()
    (d / "manifest.json").write_text("{}")
    w = ActivationWriter(d, ["model.layers.0"], storage=storage)
    for i, rows in enumerate(rows_of_prompts):
        w.add(f"p{i}", {"model.layers.0": rows})
    w.close()
    return load_activations(d)


def test_activation_writer_takes_host_tensors_as_numpy(tmp_path):
    rng = np.random.default_rng(5)
    xs = [_activations(rng, 6, 300) for _ in range(2)]
    from logitparity.capture.hooks import to_numpy_rows

    for dtype in ("float32", "bfloat16"):
        ts = [torch.from_numpy(x).to(getattr(torch, dtype)) for x in xs]
        got = _writer_stats(tmp_path, f"t-{dtype}", ts, storage="rows")
        want = _writer_stats(tmp_path, f"n-{dtype}", [to_numpy_rows(t) for t in ts], storage="rows")
        assert got.stats("model.layers.0") == want.stats("model.layers.0")
        np.testing.assert_array_equal(got.rows("p1", "model.layers.0")[0], want.rows("p1", "model.layers.0")[0])


@gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_activation_writer_adds_cuda_tensors_on_the_gpu(tmp_path, dtype):
    rng = np.random.default_rng(6)
    xs = [_activations(rng, 6, 2100) for _ in range(3)]
    got = _writer_stats(tmp_path, "gpu", [torch.from_numpy(x).to("cuda", getattr(torch, dtype)) for x in xs])
    want = _writer_stats(tmp_path, "host", [torch.from_numpy(x).to(getattr(torch, dtype)) for x in xs])
    g, w = got.stats("model.layers.0"), want.stats("model.layers.0")
    for k in ("count", "finite", "min", "max", "zero_fraction", "nan_fraction", "inf_fraction", "channel_max_abs",
              "abs_p99", "abs_p999", "abs_p9999"):
        assert g[k] == w[k], k
    for k in ("mean", "variance", "kurtosis"):
        np.testing.assert_allclose(g[k], w[k], rtol=1e-12)
    np.testing.assert_allclose(g["skewness"], w["skewness"], rtol=1e-10)
