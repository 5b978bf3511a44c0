// Small CPU building blocks for fmzoo's kernels: 8-lane fp32 vectors (GCC/Clang vector
// extensions, so the same source builds for AVX2, AVX-512 or NEON with -march=native), a
// vectorised exp, a register-tiled matmul for the small blocks attention works on, and a
// parallel loop over XLA's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace fmzoo_cpu {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4), may_alias));  // unaligned access

inline v8 load8(const float* p) { return *reinterpret_cast<const v8u*>(p); }
inline void store8(float* p, v8 v) { *reinterpret_cast<v8u*>(p) = v; }
inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }

// exp on 8 lanes: Cody-Waite range reduction to r in [-ln2/2, ln2/2], Cephes' degree-6
// polynomial, then 2^n through the exponent bits. Within 2 ulp of expf over the clamped range.
inline v8 exp8(v8 x) {
  x = x < splat(88.3762626647949f) ? x : splat(88.3762626647949f);
  x = x > splat(-87.3365478515625f) ? x : splat(-87.3365478515625f);
  const v8 magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  v8 t = x * splat(1.44269504088896341f) + magic;
  v8 n = t - magic;
  v8 r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  v8 p = splat(1.9875691500E-4f);
  p = p * r + splat(1.3981999507E-3f);
  p = p * r + splat(8.3334519073E-3f);
  p = p * r + splat(4.1665795894E-2f);
  p = p * r + splat(1.6666665459E-1f);
  p = p * r + splat(5.0000001201E-1f);
  v8 y = p * r * r + r + splat(1.0f);
  v8i ni = __builtin_convertvector(n, v8i);
  return reinterpret_cast<v8>(reinterpret_cast<v8i>(y) + (ni << 23));
}

// C[M, N] (+)= A[M, K] B[K, N]: B and C row-major with leading dims, A(r, k) at
// A[r * lda + k * ak] (so ak = ld, lda = 1 reads a transposed block in place); MR x 16
// register tiles.
template <int MR>
inline void tile16(int K, const float* A, int64_t lda, int64_t ak, const float* B, int64_t ldb,
                   float* C, int64_t ldc, bool acc) {
  v8 c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) {
    c0[r] = acc ? load8(C + r * ldc) : v8{};
    c1[r] = acc ? load8(C + r * ldc + 8) : v8{};
  }
  for (int k = 0; k < K; ++k) {
    v8 b0 = load8(B + k * ldb), b1 = load8(B + k * ldb + 8);
    for (int r = 0; r < MR; ++r) {
      v8 a = splat(A[r * lda + k * ak]);
      c0[r] += a * b0;
      c1[r] += a * b1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    store8(C + r * ldc, c0[r]);
    store8(C + r * ldc + 8, c1[r]);
  }
}

template <int MR>
inline void tile8(int K, const float* A, int64_t lda, int64_t ak, const float* B, int64_t ldb,
                  float* C, int64_t ldc, bool acc) {
  v8 c0[MR];
  for (int r = 0; r < MR; ++r) c0[r] = acc ? load8(C + r * ldc) : v8{};
  for (int k = 0; k < K; ++k) {
    v8 b0 = load8(B + k * ldb);
    for (int r = 0; r < MR; ++r) c0[r] += splat(A[r * lda + k * ak]) * b0;
  }
  for (int r = 0; r < MR; ++r) store8(C + r * ldc, c0[r]);
}

template <int MR>
inline void rows(int N, int K, const float* A, int64_t lda, int64_t ak, const float* B,
                 int64_t ldb, float* C, int64_t ldc, bool acc) {
  int j = 0;
  for (; j + 16 <= N; j += 16) tile16<MR>(K, A, lda, ak, B + j, ldb, C + j, ldc, acc);
  for (; j + 8 <= N; j += 8) tile8<MR>(K, A, lda, ak, B + j, ldb, C + j, ldc, acc);
  for (; j < N; ++j) {
    for (int r = 0; r < MR; ++r) {
      float s = acc ? C[r * ldc + j] : 0.0f;
      for (int k = 0; k < K; ++k) s += A[r * lda + k * ak] * B[k * ldb + j];
      C[r * ldc + j] = s;
    }
  }
}

inline void gemm(int M, int N, int K, const float* A, int64_t lda, int64_t ak, const float* B,
          int64_t ldb, float* C, int64_t ldc, bool acc) {
  int i = 0;
  for (; i + 6 <= M; i += 6) rows<6>(N, K, A + i * lda, lda, ak, B, ldb, C + i * ldc, ldc, acc);
  switch (M - i) {
    case 5: rows<5>(N, K, A + i * lda, lda, ak, B, ldb, C + i * ldc, ldc, acc); break;
    case 4: rows<4>(N, K, A + i * lda, lda, ak, B, ldb, C + i * ldc, ldc, acc); break;
    case 3: rows<3>(N, K, A + i * lda, lda, ak, B, ldb, C + i * ldc, ldc, acc); break;
    case 2: rows<2>(N, K, A + i * lda, lda, ak, B, ldb, C + i * ldc, ldc, acc); break;
    case 1: rows<1>(N, K, A + i * lda, lda, ak, B, ldb, C + i * ldc, ldc, acc); break;
    default: break;
  }
}

// Runs fn(0..n-1) on XLA's intra-op pool and the calling thread. The caller claims items
// too, so it finishes even if no pool thread ever picks a task up; tasks that start after
// every item is claimed return without touching anything but the shared counters.
template <typename F>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, F& fn) {
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto cnt = std::make_shared<Counters>();
  auto work = [cnt, n, &fn]() {
    for (int64_t i; (i = cnt->next.fetch_add(1)) < n;) {
      fn(i);
      cnt->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    auto copy = work;
    pool.Schedule(std::move(copy));
  }
  work();
  while (cnt->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace fmzoo_cpu
