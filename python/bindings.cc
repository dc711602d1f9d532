// pybind11 bindings of the C++ core: convert, check shape, release the GIL,
// call the core. No math and no policy here; the Python wrappers in
// logitparity/metrics.py handle torch tensors, reshaping and messages.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "logitparity/activation_stats.h"
#include "logitparity/cuda.h"
#include "logitparity/dlpack.h"
#include "logitparity/log_softmax.h"
#include "logitparity/row_metrics.h"
#include "logitparity/topk.h"
#include "logitparity/rows.h"

namespace py = pybind11;
using logitparity::Dtype;
using logitparity::RowsView;

namespace {

// A 2-D float32 / float16 / uint16 (bf16 bits) array whose last dimension is
// contiguous -> a view. Row strides may be anything non-negative.
RowsView AsRows(const py::array& arr, bool bf16, const char* name) {
  if (arr.ndim() != 2) {
    throw py::value_error(std::string(name) + " must be 2-D [rows, vocab], got " +
                          std::to_string(arr.ndim()) + "-D");
  }
  const py::dtype dt = arr.dtype();
  RowsView v;
  if (dt.kind() == 'f' && dt.itemsize() == 4) {
    v.dtype = Dtype::kF32;
  } else if (dt.kind() == 'f' && dt.itemsize() == 2) {
    v.dtype = Dtype::kF16;
  } else if (dt.kind() == 'u' && dt.itemsize() == 2 && bf16) {
    v.dtype = Dtype::kBF16;
  } else {
    throw py::type_error(std::string(name) +
                         " must be float32, float16 or bfloat16 (uint16 bits), got " +
                         std::string(py::str(dt)));
  }
  const ssize_t item = dt.itemsize();
  if (arr.strides(1) != item || arr.strides(0) < 0 || arr.strides(0) % item != 0) {
    throw py::value_error(std::string(name) + " must have a contiguous last dimension");
  }
  v.data = arr.data();
  v.rows = static_cast<size_t>(arr.shape(0));
  v.vocab = static_cast<size_t>(arr.shape(1));
  v.row_stride = arr.shape(0) > 1 ? static_cast<size_t>(arr.strides(0) / item) : v.vocab;
  return v;
}

using I64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// The field names, one tuple made at import and returned by every call.
PyObject* g_field_names = nullptr;  // a strong reference, kept for the process

py::tuple FieldNames() { return py::reinterpret_borrow<py::tuple>(g_field_names); }

// A queued CUDA comparison and the arrays its finish() fills.
struct PyCompareJob {
  std::unique_ptr<logitparity::CompareRowsCudaJob> job;
  py::array_t<double> fields;
  py::array_t<int32_t> overlap;
  py::array_t<int64_t> ints;  // the integer fields, field-major
};

// compare_rows_cuda (kWait: both halves, -> (fields, names, overlap)) and
// compare_rows_cuda_start (the kernel queued, -> (job, fields, names,
// overlap, ints) at once, the arrays filled by job.finish()): one body.
template <bool kWait>
py::tuple CompareRowsCudaPy(uintptr_t ref_ptr, int ref_dtype, size_t ref_stride,
                            uintptr_t cand_ptr, int cand_dtype, size_t cand_stride, size_t rows,
                            size_t vocab, std::optional<I64> targets, std::vector<int> topk,
                            bool js, uintptr_t stream, uintptr_t targets_ptr) {
  auto dtype = [](int code, const char* name) {
    if (code < 0 || code > 2) {
      throw py::value_error(std::string(name) +
                            "_dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                            std::to_string(code));
    }
    return static_cast<Dtype>(code);
  };
  const RowsView a{reinterpret_cast<const void*>(ref_ptr), dtype(ref_dtype, "ref"), rows, vocab,
                   ref_stride};
  const RowsView b{reinterpret_cast<const void*>(cand_ptr), dtype(cand_dtype, "cand"), rows,
                   vocab, cand_stride};
  logitparity::RowMetricsOptions opt;
  opt.topk = std::move(topk);
  opt.js = js;
  if (targets) {
    if (static_cast<size_t>(targets->size()) != rows) {
      throw py::value_error("targets must hold one id per row (" + std::to_string(rows) +
                            "), got " + std::to_string(targets->size()));
    }
    opt.targets = targets->data();
  }
  PyCompareJob j;
  {
    py::gil_scoped_release release;
    j.job = std::make_unique<logitparity::CompareRowsCudaJob>(
        a, b, opt, stream, reinterpret_cast<const int64_t*>(targets_ptr));
  }
  j.fields = py::array_t<double>({rows, static_cast<size_t>(logitparity::kNumRowFields)});
  j.overlap = py::array_t<int32_t>({rows, opt.topk.size()});
  if constexpr (kWait) {
    double* f = j.fields.mutable_data();
    int32_t* o = j.overlap.mutable_data();
    {
      py::gil_scoped_release release;
      j.job->Finish(f, o);
    }
    return py::make_tuple(j.fields, FieldNames(), j.overlap);
  } else {
    j.ints = py::array_t<int64_t>(
        {static_cast<size_t>(logitparity::kNumRowFields - logitparity::kFirstIntField), rows});
    py::array fields = j.fields, overlap = j.overlap, ints = j.ints;
    return py::make_tuple(py::cast(std::move(j)), fields, FieldNames(), overlap, ints);
  }
}

// Registers one of the CompareRowsCudaPy entry points with its arguments.
template <typename F>
void DefCompareRowsCuda(py::module_& m, const char* name, F f, const char* doc) {
  m.def(name, f, py::arg("ref_ptr"), py::arg("ref_dtype"), py::arg("ref_stride"),
        py::arg("cand_ptr"), py::arg("cand_dtype"), py::arg("cand_stride"), py::arg("rows"),
        py::arg("vocab"), py::arg("targets"), py::arg("topk"), py::arg("js"), py::arg("stream"),
        py::arg("targets_ptr") = 0, doc);
}

// (fields [rows, F] float64, field names, topk overlap [rows, len(topk)] int32).
py::tuple ResultTuple(const logitparity::RowMetricsResult& res) {
  py::array_t<double> fields({res.rows, static_cast<size_t>(logitparity::kNumRowFields)});
  std::copy(res.fields.begin(), res.fields.end(), fields.mutable_data());
  py::array_t<int32_t> overlap({res.rows, res.topk.size()});
  std::copy(res.topk_common.begin(), res.topk_common.end(), overlap.mutable_data());
  return py::make_tuple(fields, FieldNames(), overlap);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "logitparity C++ core: Highway SIMD row kernels (dynamic dispatch).";

  py::list names;
  for (int f = 0; f < logitparity::kNumRowFields; ++f) names.append(logitparity::RowFieldName(f));
  m.attr("ROW_FIELDS") = names;
  g_field_names = py::tuple(names).release().ptr();
  m.attr("MAX_TOPK") = logitparity::kMaxTopK;
  m.def("max_threads", &logitparity::MaxThreads, "Largest accepted thread count.");

  m.def(
      "compare_rows",
      [](const py::array& ref, bool ref_bf16, const py::array& cand, bool cand_bf16,
         std::optional<I64> targets, std::vector<int> topk, bool js, int threads) {
        const RowsView a = AsRows(ref, ref_bf16, "ref");
        const RowsView b = AsRows(cand, cand_bf16, "cand");
        logitparity::RowMetricsOptions opt;
        opt.topk = std::move(topk);
        opt.js = js;
        opt.threads = threads;
        if (targets) {
          if (static_cast<size_t>(targets->size()) != a.rows) {
            throw py::value_error("targets must hold one id per row (" +
                                  std::to_string(a.rows) + "), got " +
                                  std::to_string(targets->size()));
          }
          opt.targets = targets->data();
        }
        logitparity::RowMetricsResult res;
        {
          py::gil_scoped_release release;
          res = logitparity::CompareRows(a, b, opt);
        }
        return ResultTuple(res);
      },
      py::arg("ref"), py::arg("ref_bf16"), py::arg("cand"), py::arg("cand_bf16"),
      py::arg("targets"), py::arg("topk"), py::arg("js"), py::arg("threads"),
      "Fused row comparison -> (fields [rows, F] float64, field names, topk overlap "
      "[rows, len(topk)] int32).");

  m.def(
      "log_softmax",
      [](const py::array& x, bool bf16, int threads) {
        const RowsView v = AsRows(x, bf16, "x");
        py::array_t<float> out({v.rows, v.vocab});
        float* o = out.mutable_data();
        {
          py::gil_scoped_release release;
          logitparity::LogSoftmax(v, o, threads);
        }
        return out;
      },
      py::arg("x"), py::arg("bf16"), py::arg("threads"));

  m.def(
      "log_softmax_",
      [](py::array_t<float> x, int threads) {
        if (!(x.flags() & py::array::c_style) || !x.writeable()) {
          throw py::value_error("x must be a writeable C-contiguous float32 array for in-place log_softmax_");
        }
        const RowsView v = AsRows(x, false, "x");
        float* o = x.mutable_data();
        {
          py::gil_scoped_release release;
          logitparity::LogSoftmax(v, o, threads);
        }
      },
      py::arg("x").noconvert(), py::arg("threads"), "In-place log-softmax of float32 rows.");

  m.def(
      "logsumexp",
      [](const py::array& x, bool bf16, int threads) {
        const RowsView v = AsRows(x, bf16, "x");
        py::array_t<double> out(v.rows);
        double* o = out.mutable_data();
        {
          py::gil_scoped_release release;
          logitparity::LogSumExp(v, o, threads);
        }
        return out;
      },
      py::arg("x"), py::arg("bf16"), py::arg("threads"));

  m.def(
      "nll",
      [](const py::array& x, bool bf16, I64 targets, int threads) {
        const RowsView v = AsRows(x, bf16, "x");
        if (static_cast<size_t>(targets.size()) != v.rows) {
          throw py::value_error("targets must hold one id per row");
        }
        py::array_t<double> out(v.rows);
        double* o = out.mutable_data();
        const int64_t* t = targets.data();
        {
          py::gil_scoped_release release;
          logitparity::Nll(v, t, o, threads);
        }
        return out;
      },
      py::arg("x"), py::arg("bf16"), py::arg("targets"), py::arg("threads"));

  m.def(
      "topk",
      [](const py::array& x, bool bf16, size_t k, int threads) {
        const RowsView v = AsRows(x, bf16, "x");
        py::array_t<float> values({v.rows, k});
        py::array_t<int64_t> indices({v.rows, k});
        float* pv = values.mutable_data();
        int64_t* pi = indices.mutable_data();
        {
          py::gil_scoped_release release;
          logitparity::TopK(v, k, pv, pi, threads);
        }
        return py::make_tuple(values, indices);
      },
      py::arg("x"), py::arg("bf16"), py::arg("k"), py::arg("threads"));

  // --- CUDA kernels (rows in device memory, in place) ----------------------
  // The Python side (metrics.py) reads pointer, dtype and strides off a torch
  // tensor or a __cuda_array_interface__ and passes them here as integers.
  m.def("cuda_built", &logitparity::CudaBuilt, "True if the core has its CUDA kernels.");
  m.def("cuda_device_count", &logitparity::CudaDeviceCount,
        "CUDA devices usable now (0 without kernels, driver or GPU).");
  // compare_rows_cuda_start queues the kernel and returns its result arrays
  // at once, so the caller builds its result objects while the kernel runs;
  // job.finish() waits and fills them.
  py::class_<PyCompareJob>(m, "CompareRowsCudaJob")
      .def(
          "finish",
          [](PyCompareJob& j) {
            if (!j.job) throw py::value_error("this comparison was already finished");
            double* f = j.fields.mutable_data();
            int32_t* o = j.overlap.mutable_data();
            int64_t* i = j.ints.mutable_data();
            std::unique_ptr<logitparity::CompareRowsCudaJob> job = std::move(j.job);
            py::gil_scoped_release release;
            job->Finish(f, o, i);
          },
          "Waits for the kernel and fills the arrays returned with this job; raises "
          "ValueError for a device target out of range (the arrays are then not written).");
  DefCompareRowsCuda(
      m, "compare_rows_cuda_start", &CompareRowsCudaPy<false>,
      "compare_rows_cuda's first half: checks, queues the kernel on `stream` and returns "
      "(job, fields, field names, overlap, ints) at once; the arrays hold the results after "
      "job.finish(). ints: the last ints.shape[0] fields (the integer ones) as int64, one row "
      "per field.");
  DefCompareRowsCuda(
      m, "compare_rows_cuda", &CompareRowsCudaPy<true>,
      "Fused row comparison of rows in CUDA device memory (pointers as integers, strides in "
      "elements), queued on `stream`; same result tuple as compare_rows. targets_ptr: instead "
      "of host targets, one int64 id per row in device memory (checked on the device).");
  m.attr("MAX_TOPK_CUDA") = logitparity::kMaxTopKCuda;
  // The single-row kernels on device rows: (ptr, dtype code, row stride in
  // elements, rows, vocab) as for compare_rows_cuda; results are host arrays,
  // except log_softmax_cuda, which writes device memory at out_ptr.
  auto device_rows = [](uintptr_t ptr, int dtype, size_t stride, size_t rows, size_t vocab) {
    if (dtype < 0 || dtype > 2) {
      throw py::value_error("dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                            std::to_string(dtype));
    }
    return RowsView{reinterpret_cast<const void*>(ptr), static_cast<Dtype>(dtype), rows, vocab,
                    stride};
  };
  m.def(
      "logsumexp_cuda",
      [device_rows](uintptr_t ptr, int dtype, size_t stride, size_t rows, size_t vocab,
                    uintptr_t stream) {
        const RowsView v = device_rows(ptr, dtype, stride, rows, vocab);
        py::array_t<double> out(rows);
        double* o = out.mutable_data();
        {
          py::gil_scoped_release release;
          logitparity::LogSumExpCuda(v, o, stream);
        }
        return out;
      },
      py::arg("ptr"), py::arg("dtype"), py::arg("stride"), py::arg("rows"), py::arg("vocab"),
      py::arg("stream"));
  m.def(
      "nll_cuda",
      [device_rows](uintptr_t ptr, int dtype, size_t stride, size_t rows, size_t vocab,
                    I64 targets, uintptr_t stream) {
        const RowsView v = device_rows(ptr, dtype, stride, rows, vocab);
        if (static_cast<size_t>(targets.size()) != rows) {
          throw py::value_error("targets must hold one id per row");
        }
        py::array_t<double> out(rows);
        double* o = out.mutable_data();
        const int64_t* t = targets.data();
        {
          py::gil_scoped_release release;
          logitparity::NllCuda(v, t, o, stream);
        }
        return out;
      },
      py::arg("ptr"), py::arg("dtype"), py::arg("stride"), py::arg("rows"), py::arg("vocab"),
      py::arg("targets"), py::arg("stream"));
  m.def(
      "topk_cuda",
      [device_rows](uintptr_t ptr, int dtype, size_t stride, size_t rows, size_t vocab, size_t k,
                    uintptr_t stream) {
        const RowsView v = device_rows(ptr, dtype, stride, rows, vocab);
        py::array_t<float> values({rows, k});
        py::array_t<int64_t> indices({rows, k});
        py::array_t<double> lse(rows);
        float* pv = values.mutable_data();
        int64_t* pi = indices.mutable_data();
        double* pl = lse.mutable_data();
        {
          py::gil_scoped_release release;
          logitparity::TopKCuda(v, k, pv, pi, pl, stream);
        }
        return py::make_tuple(values, indices, lse);
      },
      py::arg("ptr"), py::arg("dtype"), py::arg("stride"), py::arg("rows"), py::arg("vocab"),
      py::arg("k"), py::arg("stream"),
      "Top-k values [rows, k] float32, indices [rows, k] int64 and each row's log-sum-exp "
      "(float64, exact) of device rows, in one sweep.");
  m.def(
      "log_softmax_cuda",
      [device_rows](uintptr_t ptr, int dtype, size_t stride, size_t rows, size_t vocab,
                    uintptr_t out_ptr, uintptr_t stream) {
        const RowsView v = device_rows(ptr, dtype, stride, rows, vocab);
        py::gil_scoped_release release;
        logitparity::LogSoftmaxCuda(v, reinterpret_cast<float*>(out_ptr), stream);
      },
      py::arg("ptr"), py::arg("dtype"), py::arg("stride"), py::arg("rows"), py::arg("vocab"),
      py::arg("out_ptr"), py::arg("stream"),
      "Log-softmax of device rows into contiguous float32 device memory at out_ptr (queued on "
      "`stream`, not waited for).");
  // --- end CUDA kernels -----------------------------------------------------

  // DLPack: reads a capsule from x.__dlpack__() without taking it over (the
  // capsule keeps ownership; the caller keeps it alive while the data are
  // used) -> (data pointer with byte_offset applied, device_type, device_id,
  // (dtype code, bits, lanes), shape, strides in elements or None).
  m.def(
      "dlpack_info",
      [](py::capsule capsule) {
        const char* name = capsule.name();
        const logitparity::DLTensor* t = nullptr;
        if (name != nullptr && std::string(name) == "dltensor") {
          t = &static_cast<const logitparity::DLManagedTensor*>(capsule.get_pointer())->dl_tensor;
        } else if (name != nullptr && std::string(name) == "dltensor_versioned") {
          const auto* v = static_cast<const logitparity::DLManagedTensorVersioned*>(
              capsule.get_pointer());
          if (v->version.major != 1) {
            throw py::value_error("DLPack version " + std::to_string(v->version.major) + "." +
                                  std::to_string(v->version.minor) +
                                  " is not supported (major version 1 is)");
          }
          t = &v->dl_tensor;
        } else {
          throw py::value_error(std::string("expected a DLPack capsule named 'dltensor' or "
                                            "'dltensor_versioned', got '") +
                                (name ? name : "(null)") + "' (already consumed?)");
        }
        py::tuple shape(t->ndim);
        for (int i = 0; i < t->ndim; ++i) shape[i] = t->shape[i];
        py::object strides = py::none();
        if (t->strides != nullptr) {
          py::tuple st(t->ndim);
          for (int i = 0; i < t->ndim; ++i) st[i] = t->strides[i];
          strides = st;
        }
        const uintptr_t data = reinterpret_cast<uintptr_t>(t->data) + t->byte_offset;
        return py::make_tuple(data, t->device.device_type, t->device.device_id,
                              py::make_tuple(t->dtype.code, t->dtype.bits, t->dtype.lanes), shape,
                              strides);
      },
      py::arg("capsule"));
  // ---------------------------------------------------------------------
  // Activation statistics (logitparity.layers / logitparity.activations):
  // difference sums of two activation tensors and the distribution
  // accumulator. Derived figures come from the core's DiffSums methods.
  {
    static const char* kDiffFields[] = {"cosine", "rel_l2", "max_abs", "sqnr_db", "nonfinite_ref",
                                        "nonfinite_cand", "count", "dot", "ref_sq", "cand_sq",
                                        "diff_sq"};
    constexpr size_t kNumDiff = sizeof(kDiffFields) / sizeof(kDiffFields[0]);
    py::list diff_names;
    for (const char* f : kDiffFields) diff_names.append(f);
    m.attr("DIFF_FIELDS") = diff_names;
    m.attr("ABS_HIST_MANTISSA_BITS") = logitparity::kAbsHistMantissaBits;

    const auto put = [](const logitparity::DiffSums& s, double* o) {
      const double v[] = {s.Cosine(), s.RelL2(), s.max_abs, s.SqnrDb(),
                          static_cast<double>(s.nonfinite_ref),
                          static_cast<double>(s.nonfinite_cand), static_cast<double>(s.count),
                          s.dot, s.ref_sq, s.cand_sq, s.diff_sq};
      std::copy(v, v + kNumDiff, o);
    };

    // (per row [rows, F], merged [F]) of the host and CUDA entry points.
    const auto diff_result = [put](const std::vector<logitparity::DiffSums>& rows,
                                   const logitparity::DiffSums& merged) {
      py::array_t<double> per_row({rows.size(), kNumDiff});
      for (size_t r = 0; r < rows.size(); ++r) put(rows[r], per_row.mutable_data(r, 0));
      py::array_t<double> total(kNumDiff);
      put(merged, total.mutable_data());
      return py::make_tuple(per_row, total);
    };

    m.def(
        "activation_diff",
        [diff_result](const py::array& ref, bool ref_bf16, const py::array& cand, bool cand_bf16,
                      int threads) {
          const RowsView a = AsRows(ref, ref_bf16, "reference");
          const RowsView b = AsRows(cand, cand_bf16, "candidate");
          std::vector<logitparity::DiffSums> rows(a.rows);
          logitparity::DiffSums merged;
          {
            py::gil_scoped_release release;
            merged = logitparity::CompareActivations(a, b, rows.data(), threads);
          }
          return diff_result(rows, merged);
        },
        py::arg("ref"), py::arg("ref_bf16"), py::arg("cand"), py::arg("cand_bf16"),
        py::arg("threads"),
        "Difference statistics of two [rows, width] activation tensors -> (per row [rows, F], "
        "merged [F]) float64, F = DIFF_FIELDS.");

    m.def(
        "activation_diff_cuda",
        [diff_result, device_rows](uintptr_t ref_ptr, int ref_dtype, size_t ref_stride,
                                   uintptr_t cand_ptr, int cand_dtype, size_t cand_stride,
                                   size_t rows, size_t width, uintptr_t stream) {
          const RowsView a = device_rows(ref_ptr, ref_dtype, ref_stride, rows, width);
          const RowsView b = device_rows(cand_ptr, cand_dtype, cand_stride, rows, width);
          std::vector<logitparity::DiffSums> per(rows);
          logitparity::DiffSums merged;
          {
            py::gil_scoped_release release;
            merged = logitparity::CompareActivationsCuda(a, b, per.data(), stream);
          }
          return diff_result(per, merged);
        },
        py::arg("ref_ptr"), py::arg("ref_dtype"), py::arg("ref_stride"), py::arg("cand_ptr"),
        py::arg("cand_dtype"), py::arg("cand_stride"), py::arg("rows"), py::arg("width"),
        py::arg("stream"),
        "activation_diff for two [rows, width] tensors in CUDA device memory (pointers as "
        "integers, dtype codes and row strides in elements as for compare_rows_cuda), on "
        "`stream`.");

    m.def(
        "merge_diff",
        [put](py::array_t<double, py::array::c_style | py::array::forcecast> parts) {
          if (parts.ndim() != 2 || static_cast<size_t>(parts.shape(1)) != kNumDiff) {
            throw py::value_error("parts must be [k, " + std::to_string(kNumDiff) +
                                  "] rows of DIFF_FIELDS (as activation_diff returns them)");
          }
          logitparity::DiffSums merged;
          for (ssize_t i = 0; i < parts.shape(0); ++i) {
            const double* p = parts.data(i, 0);
            logitparity::DiffSums s;
            s.max_abs = p[2];
            s.nonfinite_ref = static_cast<uint64_t>(p[4]);
            s.nonfinite_cand = static_cast<uint64_t>(p[5]);
            s.count = static_cast<uint64_t>(p[6]);
            s.dot = p[7];
            s.ref_sq = p[8];
            s.cand_sq = p[9];
            s.diff_sq = p[10];
            merged.Merge(s);
          }
          py::array_t<double> total(kNumDiff);
          put(merged, total.mutable_data());
          return total;
        },
        py::arg("parts"), "Merge rows of DIFF_FIELDS (in order) -> [F] with the figures re-derived.");

    using logitparity::DistributionAccumulator;
    py::class_<DistributionAccumulator>(m, "DistributionAccumulator")
        .def(py::init<size_t>(), py::arg("channels"))
        .def(
            "add",
            [](DistributionAccumulator& acc, const py::array& block, bool bf16) {
              const RowsView v = AsRows(block, bf16, "block");
              py::gil_scoped_release release;
              acc.Add(v);
            },
            py::arg("block"), py::arg("bf16"))
        .def(
            "add_cuda",
            [device_rows](DistributionAccumulator& acc, uintptr_t ptr, int dtype, size_t stride,
                          size_t rows, size_t width, uintptr_t stream) {
              const RowsView v = device_rows(ptr, dtype, stride, rows, width);
              py::gil_scoped_release release;
              acc.AddCuda(v, stream);
            },
            py::arg("ptr"), py::arg("dtype"), py::arg("stride"), py::arg("rows"),
            py::arg("width"), py::arg("stream"),
            "add for a [rows, width] block in CUDA device memory (as activation_diff_cuda), on "
            "`stream`.")
        .def("merge", &DistributionAccumulator::Merge, py::arg("other"))
        .def_property_readonly("channels", &DistributionAccumulator::channels)
        .def_property_readonly("count", &DistributionAccumulator::count)
        .def_property_readonly("finite", &DistributionAccumulator::finite)
        .def_property_readonly("zeros", &DistributionAccumulator::zeros)
        .def_property_readonly("nans", &DistributionAccumulator::nans)
        .def_property_readonly("infs", &DistributionAccumulator::infs)
        .def_property_readonly("mean", &DistributionAccumulator::mean)
        .def_property_readonly("variance", &DistributionAccumulator::variance)
        .def_property_readonly("skewness", &DistributionAccumulator::skewness)
        .def_property_readonly("kurtosis", &DistributionAccumulator::kurtosis)
        .def_property_readonly("min", &DistributionAccumulator::min)
        .def_property_readonly("max", &DistributionAccumulator::max)
        .def_property_readonly("channel_max_abs",
                               [](const DistributionAccumulator& acc) {
                                 const std::vector<float> v = acc.channel_max_abs();
                                 return py::array_t<float>(v.size(), v.data());
                               })
        .def_property_readonly("abs_histogram",
                               [](const DistributionAccumulator& acc) {
                                 const auto& h = acc.abs_histogram();
                                 return py::array_t<uint64_t>(h.size(), h.data());
                               })
        .def("abs_quantile", &DistributionAccumulator::AbsQuantile, py::arg("q"));

    m.def(
        "exact_abs_quantiles",
        [](const py::array& x, bool bf16, std::vector<double> qs) {
          const RowsView v = AsRows(x, bf16, "x");
          py::gil_scoped_release release;
          return logitparity::ExactAbsQuantiles(v, qs);
        },
        py::arg("x"), py::arg("bf16"), py::arg("qs"));
  }
}
