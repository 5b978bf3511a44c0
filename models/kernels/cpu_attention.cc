// Fused attention for XLA:CPU, fp32: softmax(Q K^T * scale) V and its gradient, one custom
// call each way. XLA:CPU lowers attention to batched [T, D] x [D, S] dots that run far below
// the machine's matmul rate at small head sizes, plus layout copies and a materialised
// [B, H, T, S] score tensor; here each (batch, head) pair is one task that keeps a block of
// score rows in cache, so nothing of size T x S leaves a thread's scratch.
//
// Layout is jax.nn.dot_product_attention's: q [..., T, H, D], k and v [..., S, K, D] with
// K dividing H (grouped-query attention); every leading dim is batch. An optional mask of
// bytes [..., T, S] (shared by the heads: padding, packed segments) hides keys. The
// forward also returns the log-sum-exp of each score row, lse [..., H, T], so the backward
// recomputes the probabilities instead of storing them.
//
// Built at first use by fmzoo/models/cpu_attention.py with the host compiler (-O3
// -march=native); GCC/Clang vector extensions keep it portable across x86 and ARM.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>

#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace fmzoo_cpu;

constexpr int kBlock = 32;  // query rows per block: its scores stay in L2, and a causal block
                            // computes at most 31 masked columns per row

struct Dims {
  int64_t batch, T, S, H, K, D;
};

ffi::Error get_dims(ffi::AnyBuffer q, ffi::AnyBuffer k, Dims* d) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() < 3 || kd.size() != qd.size())
    return ffi::Error::InvalidArgument("fmzoo cpu attention: q [..., T, H, D], k [..., S, K, D]");
  int64_t r = qd.size();
  d->batch = 1;
  for (int64_t i = 0; i < r - 3; ++i) d->batch *= qd[i];
  d->T = qd[r - 3]; d->H = qd[r - 2]; d->D = qd[r - 1];
  d->S = kd[r - 3]; d->K = kd[r - 2];
  if (kd[r - 1] != d->D || d->H % d->K)
    return ffi::Error::InvalidArgument(
        "fmzoo cpu attention: head dims differ or K does not divide H");
  return ffi::Error::Success();
}

ffi::Error check(const Dims& d, bool causal, bool masked, ffi::AnyBuffer mask) {
  if (causal && d.T != d.S)
    return ffi::Error::InvalidArgument("fmzoo cpu attention: causal needs T == S");
  if (masked && static_cast<int64_t>(mask.element_count()) != d.batch * d.T * d.S)
    return ffi::Error::InvalidArgument("fmzoo cpu attention: mask must be [..., T, S] bytes");
  return ffi::Error::Success();
}

// Last key a query row sees (exclusive), for causal attention with T == S.
inline int64_t key_end(int64_t i, int64_t S, bool causal) { return causal ? i + 1 : S; }

// Lanes j..j+7 of a mask row as all-ones (key visible) or zero; every lane without a mask.
inline v8i keep8(const uint8_t* mrow, int64_t j) {
  if (!mrow) return v8i{} - 1;
  v8i x = {mrow[j], mrow[j + 1], mrow[j + 2], mrow[j + 3],
           mrow[j + 4], mrow[j + 5], mrow[j + 6], mrow[j + 7]};
  return x != 0;
}

// Turns a block of raw scores into probabilities in place (zero where a key is past the
// row's causal end or masked out), writing each row's log-sum-exp; or, with from_lse,
// recomputes them from it. A row that sees no key gets zero probabilities (and lse 0).
// mask, when given, holds this batch's [T, S] bytes (nonzero = visible).
void softmax_rows(float* s, int64_t lds, int m, int64_t i0, int64_t ncols, int64_t S,
                  bool causal, float scale, float* lse, bool from_lse, const uint8_t* mask) {
  for (int r = 0; r < m; ++r) {
    float* row = s + r * lds;
    int64_t end = key_end(i0 + r, S, causal);
    const uint8_t* mr = mask ? mask + (i0 + r) * S : nullptr;
    float sub;
    if (from_lse) {
      sub = lse[r];
    } else {
      v8 vm = splat(-INFINITY);
      int64_t j = 0;
      for (; j + 8 <= end; j += 8) {
        v8 x = load8(row + j);
        vm = (keep8(mr, j) & (x > vm)) ? x : vm;
      }
      float mx = -INFINITY;
      for (int l = 0; l < 8; ++l) mx = std::max(mx, vm[l]);
      for (; j < end; ++j)
        if (!mr || mr[j]) mx = std::max(mx, row[j]);
      if (mx == -INFINITY) {  // no visible key: nothing to attend to
        std::fill(row, row + ncols, 0.0f);
        lse[r] = 0.0f;
        continue;
      }
      sub = mx * scale;
    }
    int64_t j = 0;
    v8 acc{};
    for (; j + 8 <= end; j += 8) {
      v8 e = exp8(load8(row + j) * splat(scale) - splat(sub));
      e = keep8(mr, j) ? e : v8{};
      store8(row + j, e);
      acc += e;
    }
    float sum = 0.0f;
    for (; j < end; ++j) {
      row[j] = (!mr || mr[j]) ? std::exp(row[j] * scale - sub) : 0.0f;
      sum += row[j];
    }
    for (int l = 0; l < 8; ++l) sum += acc[l];
    std::fill(row + end, row + ncols, 0.0f);
    if (!from_lse) {
      lse[r] = sub + std::log(sum);
      float inv = 1.0f / sum;
      for (j = 0; j < end; ++j) row[j] *= inv;
    }
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  v8 acc{};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) acc += load8(a + j) * load8(b + j);
  float s = 0.0f;
  for (; j < n; ++j) s += a[j] * b[j];
  for (int l = 0; l < 8; ++l) s += acc[l];
  return s;
}

constexpr int64_t kFewRows = 4;

// One head's [S, D] slice of k or v (row stride ld) copied out: transposed to [D, S] (the
// B operand of Q K^T) or as contiguous rows. Eight rows at a time, so the transposed copy
// writes whole vectors.
void pack_t(const float* src, int64_t ld, int64_t S, int64_t D, float* dst) {
  int64_t s = 0;
  for (; s + 8 <= S; s += 8) {
    const float* r = src + s * ld;
    for (int64_t x = 0; x < D; ++x)
      store8(dst + x * S + s, v8{r[x], r[ld + x], r[2 * ld + x], r[3 * ld + x],
                                 r[4 * ld + x], r[5 * ld + x], r[6 * ld + x], r[7 * ld + x]});
  }
  for (; s < S; ++s)
    for (int64_t x = 0; x < D; ++x) dst[x * S + s] = src[s * ld + x];
}

void pack_rows(const float* src, int64_t ld, int64_t S, int64_t D, float* dst) {
  for (int64_t s = 0; s < S; ++s) std::memcpy(dst + s * D, src + s * ld, D * sizeof(float));
}

// A task's scratch, uninitialised. Up to kKeep floats it is one buffer per pool thread that
// later tasks reuse, so a block is neither allocated nor zero-filled per (batch, head); a
// larger request (long contexts) is the task's own and freed with it, so no thread holds on
// to it after the call.
constexpr size_t kKeep = size_t{4} << 20;  // 16 MB

class Scratch {
 public:
  explicit Scratch(size_t n) {
    thread_local std::unique_ptr<float[]> kept;
    thread_local size_t kept_n = 0;
    if (n > kKeep) {
      own_.reset(new float[n]);
      p_ = own_.get();
      return;
    }
    if (kept_n < n) {
      kept.reset(new float[n]);
      kept_n = n;
    }
    p_ = kept.get();
  }
  float* get() const { return p_; }

 private:
  std::unique_ptr<float[]> own_;
  float* p_;
};

// Cached decode's few query rows per head: copying K and V into packed blocks would cost as
// much as the arithmetic, so read them in place, one key row at a time.
void few_rows(const float* Q, const float* Kp, const float* V, float* O, float* L,
              const uint8_t* Mk, const Dims& d, int64_t b, int64_t h, bool causal,
              float scale) {
  const int64_t T = d.T, S = d.S, H = d.H, K = d.K, D = d.D, kh = h / (H / K);
  Scratch buf(S);
  float* sc = buf.get();
  const float* kb = Kp + b * S * K * D + kh * D;
  const float* vb = V + b * S * K * D + kh * D;
  const uint8_t* mb = Mk ? Mk + b * T * S : nullptr;
  for (int64_t i = 0; i < T; ++i) {
    const float* qi = Q + (b * T + i) * H * D + h * D;
    float* oi = O + (b * T + i) * H * D + h * D;
    int64_t end = key_end(i, S, causal);
    for (int64_t s = 0; s < end; ++s) sc[s] = dot(qi, kb + s * K * D, D);
    softmax_rows(sc, S, 1, i, end, S, causal, scale,
                 L + (b * H + h) * T + i, false, mb);
    std::fill(oi, oi + D, 0.0f);
    for (int64_t s = 0; s < end; ++s) {
      if (sc[s] == 0.0f) continue;  // masked: most of a decode cache is still empty
      const v8 p = splat(sc[s]);
      const float* vs = vb + s * K * D;
      int64_t x = 0;
      for (; x + 8 <= D; x += 8) store8(oi + x, load8(oi + x) + p * load8(vs + x));
      for (; x < D; ++x) oi[x] += sc[s] * vs[x];
    }
  }
}

struct Inputs {
  Dims d;
  const float *q, *k, *v;
  const uint8_t* mask;  // null when unmasked
};

ffi::Error read_inputs(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                       ffi::AnyBuffer mask, bool causal, bool masked, Inputs* in) {
  if (auto e = get_dims(q, k, &in->d); e.failure()) return e;
  if (auto e = check(in->d, causal, masked, mask); e.failure()) return e;
  in->q = static_cast<const float*>(q.untyped_data());
  in->k = static_cast<const float*>(k.untyped_data());
  in->v = static_cast<const float*>(v.untyped_data());
  in->mask = masked ? static_cast<const uint8_t*>(mask.untyped_data()) : nullptr;
  return ffi::Error::Success();
}

ffi::Error forward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::AnyBuffer mask, ffi::Result<ffi::AnyBuffer> out,
                   ffi::Result<ffi::AnyBuffer> lse, bool causal, bool masked, float scale) {
  Inputs in;
  if (auto e = read_inputs(q, k, v, mask, causal, masked, &in); e.failure()) return e;
  const Dims& d = in.d;
  const float *Q = in.q, *Kp = in.k, *V = in.v;
  const uint8_t* Mk = in.mask;
  float* O = static_cast<float*>(out->untyped_data());
  float* L = static_cast<float*>(lse->untyped_data());
  const int64_t T = d.T, S = d.S, H = d.H, K = d.K, D = d.D, G = H / K;
  auto task = [&](int64_t item) {
    int64_t b = item / H, h = item % H, kh = h / G;
    if (T <= kFewRows) return few_rows(Q, Kp, V, O, L, Mk, d, b, h, causal, scale);
    Scratch buf(2 * D * S + kBlock * S);
    float* kt = buf.get();
    float *vv = kt + D * S, *sc = vv + S * D;
    const float* kb = Kp + b * S * K * D + kh * D;
    const float* vb = V + b * S * K * D + kh * D;
    pack_t(kb, K * D, S, D, kt);
    pack_rows(vb, K * D, S, D, vv);
    const float* qb = Q + b * T * H * D + h * D;
    float* ob = O + b * T * H * D + h * D;
    float* lb = L + (b * H + h) * T;
    const uint8_t* mb = Mk ? Mk + b * T * S : nullptr;
    for (int64_t i0 = 0; i0 < T; i0 += kBlock) {
      int m = static_cast<int>(std::min<int64_t>(kBlock, T - i0));
      int64_t ncols = causal ? i0 + m : S;
      gemm(m, ncols, D, qb + i0 * H * D, H * D, 1, kt, S, sc, S, false);
      softmax_rows(sc, S, m, i0, ncols, S, causal, scale, lb + i0, false, mb);
      gemm(m, D, ncols, sc, S, 1, vv, D, ob + i0 * H * D, H * D, false);
    }
  };
  parallel_for(pool, d.batch * H, task);
  return ffi::Error::Success();
}

ffi::Error backward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                    ffi::AnyBuffer mask, ffi::AnyBuffer out, ffi::AnyBuffer lse,
                    ffi::AnyBuffer dout, ffi::Result<ffi::AnyBuffer> dq,
                    ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv, bool causal,
                    bool masked, float scale) {
  Inputs in;
  if (auto e = read_inputs(q, k, v, mask, causal, masked, &in); e.failure()) return e;
  const Dims& d = in.d;
  const float *Q = in.q, *Kp = in.k, *V = in.v;
  const uint8_t* Mk = in.mask;
  const float* O = static_cast<const float*>(out.untyped_data());
  const float* L = static_cast<const float*>(lse.untyped_data());
  const float* dO = static_cast<const float*>(dout.untyped_data());
  float* dQ = static_cast<float*>(dq->untyped_data());
  float* dK = static_cast<float*>(dk->untyped_data());
  float* dV = static_cast<float*>(dv->untyped_data());
  const int64_t T = d.T, S = d.S, H = d.H, K = d.K, D = d.D, G = H / K;
  // One task per (batch, kv head): the G query heads that share it add into one dK, dV.
  auto task = [&](int64_t item) {
    int64_t b = item / K, kh = item % K;
    Scratch buf(5 * D * S + 2 * kBlock * S + kBlock);
    float* kt = buf.get();
    float *kk = kt + D * S, *vt = kk + S * D, *gk = vt + D * S, *gv = gk + S * D;
    float *p = gv + S * D, *dp = p + kBlock * S, *delta = dp + kBlock * S;
    std::fill(gk, gk + 2 * S * D, 0.0f);  // dK and dV accumulate over the query blocks
    const float* kb = Kp + b * S * K * D + kh * D;
    const float* vb = V + b * S * K * D + kh * D;
    pack_t(kb, K * D, S, D, kt);
    pack_rows(kb, K * D, S, D, kk);
    pack_t(vb, K * D, S, D, vt);
    const uint8_t* mb = Mk ? Mk + b * T * S : nullptr;
    for (int64_t g = 0; g < G; ++g) {
      int64_t h = kh * G + g;
      const int64_t off = b * T * H * D + h * D, ld = H * D;
      const float* lb = L + (b * H + h) * T;
      for (int64_t i0 = 0; i0 < T; i0 += kBlock) {
        int m = static_cast<int>(std::min<int64_t>(kBlock, T - i0));
        int64_t ncols = causal ? i0 + m : S;
        const float* qi = Q + off + i0 * ld;
        const float* oi = O + off + i0 * ld;
        const float* doi = dO + off + i0 * ld;
        gemm(m, ncols, D, qi, ld, 1, kt, S, p, S, false);
        softmax_rows(p, S, m, i0, ncols, S, causal, scale,
                     const_cast<float*>(lb + i0), true, mb);
        gemm(m, ncols, D, doi, ld, 1, vt, S, dp, S, false);  // dP = dO V^T
        for (int r = 0; r < m; ++r) {
          float s = 0.0f;
          for (int64_t x = 0; x < D; ++x) s += doi[r * ld + x] * oi[r * ld + x];
          delta[r] = s;
        }
        for (int r = 0; r < m; ++r) {  // dS = P (dP - delta) * scale, in place of dP
          float* dpr = dp + r * S;
          const float* pr = p + r * S;
          v8 dl = splat(delta[r]), sc = splat(scale);
          int64_t j = 0;
          for (; j + 8 <= ncols; j += 8)
            store8(dpr + j, load8(pr + j) * (load8(dpr + j) - dl) * sc);
          for (; j < ncols; ++j) dpr[j] = pr[j] * (dpr[j] - delta[r]) * scale;
        }
        gemm(m, D, ncols, dp, S, 1, kk, D, dQ + off + i0 * ld, ld, false);
        gemm(ncols, D, m, p, 1, S, doi, ld, gv, D, true);  // dV += P^T dO
        gemm(ncols, D, m, dp, 1, S, qi, ld, gk, D, true);  // dK += dS^T Q
      }
    }
    float* dkb = dK + b * S * K * D + kh * D;
    float* dvb = dV + b * S * K * D + kh * D;
    for (int64_t s = 0; s < S; ++s) {
      std::memcpy(dkb + s * K * D, gk + s * D, D * sizeof(float));
      std::memcpy(dvb + s * K * D, gv + s * D, D * sizeof(float));
    }
  };
  parallel_for(pool, d.batch * K, task);
  return ffi::Error::Success();
}

}  // namespace

namespace {
// q, k, v and the mask: the inputs both directions start with.
auto bind_inputs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FmzooAttentionFwd, forward,
                              bind_inputs()
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::AnyBuffer>()  // lse
                                  .Attr<bool>("causal")
                                  .Attr<bool>("masked")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FmzooAttentionBwd, backward,
                              bind_inputs()
                                  .Arg<ffi::AnyBuffer>()  // out
                                  .Arg<ffi::AnyBuffer>()  // lse
                                  .Arg<ffi::AnyBuffer>()  // dout
                                  .Ret<ffi::AnyBuffer>()  // dq
                                  .Ret<ffi::AnyBuffer>()  // dk
                                  .Ret<ffi::AnyBuffer>()  // dv
                                  .Attr<bool>("causal")
                                  .Attr<bool>("masked")
                                  .Attr<float>("scale"));
