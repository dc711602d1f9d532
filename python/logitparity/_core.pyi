# Type stubs for the compiled module logitparity._core (written by hand; the
# bindings are in python/bindings.cc). Arrays are 2-D [rows, vocab] with a
# contiguous last dimension: float32, float16, or uint16 holding bfloat16 bits
# (with the matching *_bf16 / bf16 flag set).
import numpy as np
import numpy.typing as npt

ROW_FIELDS: list[str]
MAX_TOPK: int

def compare_rows(
    ref: npt.NDArray[np.generic],
    ref_bf16: bool,
    cand: npt.NDArray[np.generic],
    cand_bf16: bool,
    targets: npt.NDArray[np.int64] | None,
    topk: list[int],
    js: bool,
    threads: int,
) -> tuple[npt.NDArray[np.float64], tuple[str, ...], npt.NDArray[np.int32]]: ...
def log_softmax(x: npt.NDArray[np.generic], bf16: bool, threads: int) -> npt.NDArray[np.float32]: ...
def log_softmax_(x: npt.NDArray[np.float32], threads: int) -> None: ...
def logsumexp(x: npt.NDArray[np.generic], bf16: bool, threads: int) -> npt.NDArray[np.float64]: ...
def nll(
    x: npt.NDArray[np.generic], bf16: bool, targets: npt.NDArray[np.int64], threads: int
) -> npt.NDArray[np.float64]: ...
def topk(
    x: npt.NDArray[np.generic], bf16: bool, k: int, threads: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]: ...
def max_threads() -> int: ...

# --- CUDA kernels (rows in device memory; pointers as integers, strides in
# elements, dtype 0 float32 / 1 float16 / 2 bfloat16; queued on `stream`) ---
def cuda_built() -> bool: ...
def cuda_device_count() -> int: ...
def compare_rows_cuda(
    ref_ptr: int,
    ref_dtype: int,
    ref_stride: int,
    cand_ptr: int,
    cand_dtype: int,
    cand_stride: int,
    rows: int,
    vocab: int,
    targets: npt.NDArray[np.int64] | None,
    topk: list[int],
    js: bool,
    stream: int,
    targets_ptr: int = 0,
) -> tuple[npt.NDArray[np.float64], tuple[str, ...], npt.NDArray[np.int32]]: ...

class CompareRowsCudaJob:
    def finish(self) -> None: ...

def compare_rows_cuda_start(
    ref_ptr: int,
    ref_dtype: int,
    ref_stride: int,
    cand_ptr: int,
    cand_dtype: int,
    cand_stride: int,
    rows: int,
    vocab: int,
    targets: npt.NDArray[np.int64] | None,
    topk: list[int],
    js: bool,
    stream: int,
    targets_ptr: int = 0,
) -> tuple[
    CompareRowsCudaJob,
    npt.NDArray[np.float64],
    tuple[str, ...],
    npt.NDArray[np.int32],
    npt.NDArray[np.int64],
]: ...

# Activation statistics (the block at the end of bindings.cc).
DIFF_FIELDS: list[str]
ABS_HIST_MANTISSA_BITS: int

def activation_diff(
    ref: npt.NDArray[np.generic], ref_bf16: bool, cand: npt.NDArray[np.generic], cand_bf16: bool, threads: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def merge_diff(parts: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]: ...
def exact_abs_quantiles(x: npt.NDArray[np.generic], bf16: bool, qs: list[float]) -> list[float]: ...

class DistributionAccumulator:
    def __init__(self, channels: int) -> None: ...
    def add(self, block: npt.NDArray[np.generic], bf16: bool) -> None: ...
    def merge(self, other: DistributionAccumulator) -> None: ...
    def abs_quantile(self, q: float) -> float: ...
    @property
    def channels(self) -> int: ...
    @property
    def count(self) -> int: ...
    @property
    def finite(self) -> int: ...
    @property
    def zeros(self) -> int: ...
    @property
    def nans(self) -> int: ...
    @property
    def infs(self) -> int: ...
    @property
    def mean(self) -> float: ...
    @property
    def variance(self) -> float: ...
    @property
    def skewness(self) -> float: ...
    @property
    def kurtosis(self) -> float: ...
    @property
    def min(self) -> float: ...
    @property
    def max(self) -> float: ...
    @property
    def channel_max_abs(self) -> npt.NDArray[np.float32]: ...
    @property
    def abs_histogram(self) -> npt.NDArray[np.uint64]: ...
