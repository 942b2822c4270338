// Small-batch float32 matmul for XLA:CPU, called through the XLA FFI (jax.ffi.ffi_call).
//
//   y[M, N] = x[M, K] @ W[K, N]      with W given pre-packed as wp[ceil(N / 48), K, 48]
//
// Why: a decode step multiplies a handful of rows (the batch) by every weight matrix of the
// model. At M = 8, XLA:CPU's GEMMs read the weights at about a third of the bandwidth its
// matrix-vector product reaches (measured on Zen 4: ~8-9 GB/s vs ~22-25 GB/s), and the weights
// are most of the step. Here each 48-column panel of W is one contiguous stream
// (K x 192 bytes), read once for up to 8 rows of x held as 8 x 3 zmm accumulators: the
// weights stream near memory bandwidth and the FMA units stay busy. Larger M is processed
// 8 rows at a time over the same panel, which is then in L2.
//
// The panel layout is made by mllm_jax.kernels.cpu_matmul.pack (jnp: pad N to a multiple of
// 48, [K, P, 48] -> [P, K, 48]); padded columns are computed and never stored.
//
// Threads: panels are handed out in chunks through an atomic counter to the calling thread
// and to tasks scheduled on XLA's intra-op thread pool (ffi::ThreadPool). The caller waits
// only for chunks that some thread has already taken, so a task that starts late (pool busy)
// finds nothing to do and cannot deadlock the call; the shared state is reference-counted so
// it outlives such a task.
//
// Built by mllm_jax/kernels/cpu_matmul.py with -O3 -march=native. With AVX-512 a register
// block is up to 8 rows x 3 zmm; on AVX2 + FMA CPUs (16 ymm registers) up to 2 rows x 6 ymm,
// so a larger M passes over the panel M / 2 times (after the first pass from L2 while
// K x 192 bytes fit there). With neither, the library reports itself unavailable
// (mllm_jax_cpu_matmul_isa() == 0) and callers keep XLA's dot.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#define MLLM_JAX_ISA 1
#elif defined(__AVX2__) && defined(__FMA__)
#define MLLM_JAX_ISA 2
#else
#define MLLM_JAX_ISA 0
#endif

#if MLLM_JAX_ISA
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 48;  // columns per packed panel: 3 zmm / 6 ymm registers

#if MLLM_JAX_ISA == 1
constexpr int64_t kRows = 8;    // rows of x per register block: 8 x 3 accumulators

// y[0:MB, 0:ncols] = x[0:MB, :] @ panel, panel = [K, 48] contiguous.
template <int MB>
inline void PanelBlock(const float* x, int64_t K, const float* panel, float* y,
                       int64_t ldy, int64_t ncols) {
  __m512 acc[MB][3];
  for (int m = 0; m < MB; ++m) {
    acc[m][0] = acc[m][1] = acc[m][2] = _mm512_setzero_ps();
  }
  const float* w = panel;
  for (int64_t k = 0; k < K; ++k, w += kPanel) {
    _mm_prefetch(reinterpret_cast<const char*>(w + 1024), _MM_HINT_T0);
    const __m512 w0 = _mm512_loadu_ps(w);
    const __m512 w1 = _mm512_loadu_ps(w + 16);
    const __m512 w2 = _mm512_loadu_ps(w + 32);
    for (int m = 0; m < MB; ++m) {
      const __m512 b = _mm512_set1_ps(x[m * K + k]);
      acc[m][0] = _mm512_fmadd_ps(b, w0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(b, w1, acc[m][1]);
      acc[m][2] = _mm512_fmadd_ps(b, w2, acc[m][2]);
    }
  }
  if (ncols == kPanel) {
    for (int m = 0; m < MB; ++m) {
      for (int j = 0; j < 3; ++j) _mm512_storeu_ps(y + m * ldy + 16 * j, acc[m][j]);
    }
  } else {
    for (int j = 0; j < 3; ++j) {
      const int64_t left = std::clamp<int64_t>(ncols - 16 * j, 0, 16);
      if (left == 0) break;
      const __mmask16 mask = static_cast<__mmask16>((1u << left) - 1u);
      for (int m = 0; m < MB; ++m) _mm512_mask_storeu_ps(y + m * ldy + 16 * j, mask, acc[m][j]);
    }
  }
}

#elif MLLM_JAX_ISA == 2
constexpr int64_t kRows = 2;    // rows of x per register block: 2 x 6 accumulators (of 16 ymm)

// y[0:MB, 0:ncols] = x[0:MB, :] @ panel, panel = [K, 48] contiguous (AVX2 + FMA).
template <int MB>
inline void PanelBlock(const float* x, int64_t K, const float* panel, float* y,
                       int64_t ldy, int64_t ncols) {
  __m256 acc[MB][6];
  for (int m = 0; m < MB; ++m) {
    for (int j = 0; j < 6; ++j) acc[m][j] = _mm256_setzero_ps();
  }
  const float* w = panel;
  for (int64_t k = 0; k < K; ++k, w += kPanel) {
    _mm_prefetch(reinterpret_cast<const char*>(w + 1024), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + 1024 + 16), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + 1024 + 32), _MM_HINT_T0);
    __m256 b[MB];
    for (int m = 0; m < MB; ++m) b[m] = _mm256_broadcast_ss(x + m * K + k);
    for (int j = 0; j < 6; ++j) {
      const __m256 wj = _mm256_loadu_ps(w + 8 * j);
      for (int m = 0; m < MB; ++m) acc[m][j] = _mm256_fmadd_ps(b[m], wj, acc[m][j]);
    }
  }
  if (ncols == kPanel) {
    for (int m = 0; m < MB; ++m) {
      for (int j = 0; j < 6; ++j) _mm256_storeu_ps(y + m * ldy + 8 * j, acc[m][j]);
    }
  } else {
    alignas(32) float row[kPanel];
    for (int m = 0; m < MB; ++m) {
      for (int j = 0; j < 6; ++j) _mm256_store_ps(row + 8 * j, acc[m][j]);
      std::copy(row, row + ncols, y + m * ldy);
    }
  }
}
#endif

#if MLLM_JAX_ISA
void PanelRows(const float* x, int64_t M, int64_t K, const float* panel, float* y,
               int64_t N, int64_t ncols) {
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    const float* xm = x + m0 * K;
    float* ym = y + m0 * N;
#if MLLM_JAX_ISA == 2
    if (M - m0 == 1) {
      PanelBlock<1>(xm, K, panel, ym, N, ncols);
    } else {
      PanelBlock<2>(xm, K, panel, ym, N, ncols);
    }
#else
    switch (std::min(kRows, M - m0)) {
      case 1: PanelBlock<1>(xm, K, panel, ym, N, ncols); break;
      case 2: PanelBlock<2>(xm, K, panel, ym, N, ncols); break;
      case 3: PanelBlock<3>(xm, K, panel, ym, N, ncols); break;
      case 4: PanelBlock<4>(xm, K, panel, ym, N, ncols); break;
      case 5: PanelBlock<5>(xm, K, panel, ym, N, ncols); break;
      case 6: PanelBlock<6>(xm, K, panel, ym, N, ncols); break;
      case 7: PanelBlock<7>(xm, K, panel, ym, N, ncols); break;
      default: PanelBlock<8>(xm, K, panel, ym, N, ncols); break;
    }
#endif
  }
}

struct Job {
  const float* x;
  const float* wp;
  float* y;
  int64_t M, K, N, panels, chunk, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void RunChunk(int64_t c) const {
    const int64_t p1 = std::min(panels, (c + 1) * chunk);
    for (int64_t p = c * chunk; p < p1; ++p) {
      const int64_t n0 = p * kPanel;
      PanelRows(x, M, K, wp + p * K * kPanel, y + n0, N, std::min(kPanel, N - n0));
    }
  }

  // Takes chunks until none are left.
  void Work() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      RunChunk(c);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

#endif  // MLLM_JAX_ISA

ffi::Error SmallMMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> wp, ffi::ResultBuffer<ffi::F32> y) {
#if MLLM_JAX_ISA
  const auto xd = x.dimensions();
  const auto wd = wp.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2) {
    return ffi::Error::InvalidArgument(
        "mllm_jax_cpu_small_m_matmul: expected x[M, K], wp[P, K, 48], y[M, N]");
  }
  const int64_t M = xd[0], K = xd[1], N = yd[1];
  const int64_t panels = (N + kPanel - 1) / kPanel;
  if (yd[0] != M || wd[0] != panels || wd[1] != K || wd[2] != kPanel) {
    return ffi::Error::InvalidArgument(
        "mllm_jax_cpu_small_m_matmul: shapes do not match x[M, K], wp[ceil(N/48), K, 48], y[M, N]");
  }
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(y->typed_data(), y->typed_data() + M * N, 0.0f);
    return ffi::Error::Success();
  }
  auto job = std::make_shared<Job>();
  job->x = x.typed_data();
  job->wp = wp.typed_data();
  job->y = y->typed_data();
  job->M = M;
  job->K = K;
  job->N = N;
  job->panels = panels;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // ~4 chunks per thread balance uneven progress; below ~256 KB of weights, one thread.
  const bool parallel = threads > 1 && panels > 1 && K * N >= (int64_t{1} << 16);
  job->chunk = parallel ? std::max<int64_t>(1, panels / (4 * threads)) : panels;
  job->chunks = (panels + job->chunk - 1) / job->chunk;
  if (parallel) {
    const int64_t helpers = std::min(threads, job->chunks) - 1;
    for (int64_t t = 0; t < helpers; ++t) pool.Schedule([job] { job->Work(); });
  }
  job->Work();
  // Only chunks another thread has taken (and is running) are left: spin briefly, then yield
  // the core in case that thread shares it.
  for (int spins = 0; job->done.load(std::memory_order_acquire) < job->chunks; ++spins) {
    if (spins < 4096) {
      _mm_pause();
    } else {
      std::this_thread::yield();
    }
  }
  return ffi::Error::Success();
#else
  return ffi::Error(ffi::ErrorCode::kUnimplemented,
                    "mllm_jax_cpu_small_m_matmul was built without AVX-512 or AVX2 + FMA");
#endif
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MllmJaxCpuSmallMMatmul, SmallMMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// 1 when the kernel was compiled for AVX-512, 2 for AVX2 + FMA, else 0 (no path).
extern "C" int mllm_jax_cpu_matmul_isa() { return MLLM_JAX_ISA; }
