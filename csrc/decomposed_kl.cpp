// Decomposed KL on CPU: Std, Vis, Lang, VDS per row in one pass over the vocabulary, and the
// gradients ds, du from per-term cotangents in one more pass (math: docs/ARCHITECTURE.md, "The method"; Python side,
// fake kernels and the reference: vgs_kernels/ops/decomposed_kl.py).
//
// Rows are handed to the threads one at a time (for_rows). Each row is walked in L1-sized chunks. One
// load pass per input row converts the chunk to the accumulation type (fp32, or fp64 when an input is
// fp64), scales it by 1/T, prefetches the row's next chunk and records the chunk's max, min and
// finiteness (b's pass also builds q = u + (a - b) and its max); then the running maxima are updated
// (rescaling what was summed so far, as in online softmax) and two vectorised loops do every exp and
// sum. A polynomial exp that GCC vectorises (vexp) makes it fast.
//
// Lean chunks: where every logit of the chunk is finite and within kLean of its max (of its LSE in the
// backward), which the load passes tell, the chunk takes lexp (vexp without its clamps and -inf / NaN
// handling), plain products instead of the masked-vocabulary selects and, in the forward, q*'s sum
// from the u, a, b exponentials (a division instead of a fifth exp). Other chunks take the general
// path, exact for masked vocabulary and non-finite logits.
//
// The monolithic mode's divergence (TRL's beta; vgs_kernels.ops.decomposed_kl.divergence) is a template
// parameter kDiv: the reverse KL(p || q) (beta = 1), the forward KL(q || p) (beta = 0: the same single
// pass, weighted by q) or the generalised JSD beta KL(q || m) + (1 - beta) KL(p || m), whose log m needs
// both LSEs: a second pass over s and a (jsd_row). Its KL(p || m) goes to the stats row of the absent u.
//
// Masked vocabulary (exact math, docs/ARCHITECTURE.md): a token at -inf in x has probability 0 and adds
// nothing to KL(softmax(x) || softmax(y)); a live token at -inf in y makes it +inf. q* = 0 where
// pu or qa is 0; where only qb is 0, q* is unbounded there: Vis = +inf and LSE(q) = +inf.
// The backward drops a term whose cotangent is 0, so gradients stay finite wherever the loss is.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include <sys/mman.h>

#include "elem.h"

namespace {

// 6 buffers x 512 x 4 B = 12 KiB, plus the next chunk's 4 x 2 KiB being prefetched: stays in L1.
constexpr int64_t kChunk = 512;

template <typename acc_t>
constexpr int kLanes = 64 / sizeof(acc_t);  // one 512-bit vector: the lane-wise reductions' width

// e^(x - n ln2) for n the integer nearest x / ln2 (|x - n ln2| <= ln2 / 2): Cephes expf's polynomial,
// shared by vexp and lexp.
[[gnu::always_inline]] inline float exp_reduced(float x, float n) {
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split in two, exact n*hi
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = (p * r * r + r) + 1.0f;
  return y;
}

// exp(x) for x <= 88 (callers pass x - max <= 0), as Cephes expf: 2^n * P(r), |r| <= ln2/2,
// within ~1 ulp; exactly 0 below -87 (so exp(-inf) = 0); NaN in gives NaN out. Written with
// selects only, so GCC vectorises it inside `omp simd` loops.
[[gnu::always_inline]] inline float vexp(float x) {  // inlined, or the loops stay scalar
  float xc = x >= -87.0f ? x : -87.0f;  // NaN -> -87: keeps the integer conversion defined
  xc = xc <= 88.0f ? xc : 88.0f;
  // Round to nearest through the 1.5 * 2^23 shifter (floorf does not vectorise under strict FP).
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float y = exp_reduced(xc, n);
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  const float e = y * std::bit_cast<float>(bits);
  return x >= -87.0f ? e : (x < -87.0f ? 0.0f : x);
}

// vexp for x in [-87, 88] (lean chunks), bit for bit, without the clamps and the final selects (a
// third of vexp's instructions). 2^n comes from the shifter sum's bits, not from a float-to-int
// conversion: an input out of range gives a wrong value, never undefined behaviour.
[[gnu::always_inline]] inline float lexp(float x) {
  const float t = x * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23 + n, n in the low bits
  const float n = t - 12582912.0f;
  const float y = exp_reduced(x, n);
  const uint32_t bits = (std::bit_cast<uint32_t>(t) - 0x4B400000u + 127u) << 23;  // (n + 127) << 23
  return y * std::bit_cast<float>(bits);
}

inline double vexp(double x) { return std::exp(x); }
inline double lexp(double x) { return std::exp(x); }

// Lean chunks: exponents x - max (x - LSE) >= -kLean, so lexp is exact there.
constexpr double kLean = 87;

template <bool kLeanChunk, typename acc_t>
[[gnu::always_inline]] inline acc_t chunk_exp(acc_t x) {
  if constexpr (kLeanChunk) return lexp(x);
  else return vexp(x);
}

template <typename acc_t>
constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

enum Div : int { kReverse = 0, kForward = 1, kJsd = 2 };  // vgs_kernels.ops.decomposed_kl's REVERSE, ...

// log(x) for x in [1, 2] (the JSD's log(1 + e^-d)), as Cephes logf: x = m 2^e with m in [sqrt(1/2),
// sqrt(2)], a polynomial in m - 1; within ~1 ulp, selects only (vectorises).
[[gnu::always_inline]] inline float log12(float x) {
  const bool big = x > 1.41421356f;
  const float e = big ? 1.0f : 0.0f, f = (big ? x * 0.5f : x) - 1.0f, z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  return (f + ((f * z * p - 2.12194440e-4f * e) - 0.5f * z)) + 0.693359375f * e;
}
inline double log12(double x) { return std::log(x); }

// log((1 - beta) p + beta q) from log p + log(1 - beta) (x) and log q + log(beta) (y): the larger plus
// log(1 + e^(smaller - larger)); -inf where both are (p = q = 0).
template <typename acc_t>
[[gnu::always_inline]] inline acc_t log_m(acc_t x, acc_t y) {
  const acc_t hi = x > y ? x : y, lo = x > y ? y : x;
  const acc_t t = vexp(hi == kNegInf<acc_t> ? acc_t(0) : lo - hi);  // in [0, 1]
  return hi == kNegInf<acc_t> ? hi : hi + log12(acc_t(1) + t);
}

// What a load pass learns about its chunk: max and min (NaN ignored) and fin, a sum of x * 0:
// exactly 0 when every value is finite, NaN when one is +-inf or NaN.
template <typename acc_t>
struct Range {
  acc_t hi, lo, fin;
  bool finite() const { return fin == acc_t(0); }
};

// b's load pass also builds q = u + (a - b) into `out` (a - b first: finfo.min in all four stays
// finite) and its max into `hi` (the lean path's q; the general path rebuilds it with the masks).
template <typename acc_t>
struct QBuild {
  const acc_t* u;
  const acc_t* a;
  acc_t* out;
  acc_t hi;
};

// Rows of a 2-D tensor with unit stride along V, read as acc_t (any float dtype).
struct RowIn {
  const char* data = nullptr;
  int64_t row_bytes = 0, cols = 0, elem = 0;
  at::ScalarType dtype = at::kFloat;

  RowIn() = default;
  explicit RowIn(const at::Tensor& x)
      : data(static_cast<const char*>(x.data_ptr())), row_bytes(x.stride(0) * x.element_size()),
        cols(x.size(1)), elem(x.element_size()), dtype(x.scalar_type()) {}

  // out[j] = it * x[r, c + j] for j < n, and the chunk's Range (with q: QBuild). Prefetches the
  // row's next chunk first: the hardware prefetcher alone leaves the loads waiting on memory.
  template <typename acc_t>
  Range<acc_t> load(int64_t r, int64_t c, int64_t n, acc_t it, acc_t* out, QBuild<acc_t>* q = nullptr) const {
    const char* row = data + r * row_bytes;
    const auto next = reinterpret_cast<uintptr_t>(row + (c + n) * elem) & ~uintptr_t(63);  // its first line
    for (auto p = reinterpret_cast<const char*>(next); p < row + std::min(c + n + kChunk, cols) * elem; p += 64)
      __builtin_prefetch(p);
    switch (dtype) {
      case at::kFloat: return scaled(reinterpret_cast<const float*>(row) + c, n, it, out, q);
      case at::kDouble: return scaled(reinterpret_cast<const double*>(row) + c, n, it, out, q);
      case at::kBFloat16: return scaled(reinterpret_cast<const c10::BFloat16*>(row) + c, n, it, out, q);
      case at::kHalf: return scaled(reinterpret_cast<const c10::Half*>(row) + c, n, it, out, q);
      default: TORCH_CHECK(false, "decomposed_kl: unsupported dtype ", dtype);
    }
  }

  template <typename in_t, typename acc_t>
  static Range<acc_t> scaled(const in_t* x, int64_t n, acc_t it, acc_t* out, QBuild<acc_t>* q) {
    return q ? scaled<true>(x, n, it, out, q) : scaled<false>(x, n, it, out, q);
  }

  // Lane-wise reductions, so that GCC vectorises them (a float max reduction does not vectorise
  // under strict FP).
  template <bool kQ, typename in_t, typename acc_t>
  static Range<acc_t> scaled(const in_t* __restrict x, int64_t n, acc_t it, acc_t* __restrict out, QBuild<acc_t>* q) {
    constexpr int L = kLanes<acc_t>;
    acc_t hi[L], lo[L], fin[L], qhi[L];
    std::fill(hi, hi + L, kNegInf<acc_t>);
    std::fill(lo, lo + L, -kNegInf<acc_t>);
    std::fill(fin, fin + L, acc_t(0));
    std::fill(qhi, qhi + L, kNegInf<acc_t>);
    const auto step = [&](int64_t j, int l) [[gnu::always_inline]] {
      const acc_t v = static_cast<acc_t>(x[j]) * it;
      out[j] = v;
      hi[l] = v > hi[l] ? v : hi[l];
      lo[l] = v < lo[l] ? v : lo[l];
      fin[l] += v * acc_t(0);
      if constexpr (kQ) {
        const acc_t qv = q->u[j] + (q->a[j] - v);
        q->out[j] = qv;
        qhi[l] = qv > qhi[l] ? qv : qhi[l];
      }
    };
    int64_t j = 0;
    for (; j + L <= n; j += L) {
#pragma omp simd
      for (int l = 0; l < L; ++l) step(j + l, l);
    }
    for (; j < n; ++j) step(j, 0);
    Range<acc_t> rg{hi[0], lo[0], fin[0]};
    for (int l = 1; l < L; ++l) {
      rg.hi = std::max(rg.hi, hi[l]);
      rg.lo = std::min(rg.lo, lo[l]);
      rg.fin += fin[l];
      qhi[0] = std::max(qhi[0], qhi[l]);
    }
    if constexpr (kQ) q->hi = qhi[0];
    return rg;
  }
};

// Rows of a contiguous 2-D output tensor, written from acc_t.
struct RowOut {
  char* data;
  int64_t row_bytes;
  at::ScalarType dtype;

  explicit RowOut(at::Tensor& x)
      : data(static_cast<char*>(x.data_ptr())), row_bytes(x.stride(0) * x.element_size()),
        dtype(x.scalar_type()) {}

  template <typename acc_t>
  void store(int64_t r, int64_t c, int64_t n, const acc_t* in) const {
    char* row = data + r * row_bytes;
    switch (dtype) {
      case at::kFloat: return cast(in, n, reinterpret_cast<float*>(row) + c);
      case at::kDouble: return cast(in, n, reinterpret_cast<double*>(row) + c);
      case at::kBFloat16: return cast(in, n, reinterpret_cast<c10::BFloat16*>(row) + c);
      case at::kHalf: return cast(in, n, reinterpret_cast<c10::Half*>(row) + c);
      default: TORCH_CHECK(false, "decomposed_kl: unsupported output dtype ", dtype);
    }
  }

  template <typename acc_t, typename out_t>
  static void cast(const acc_t* in, int64_t n, out_t* out) {
    if constexpr (std::is_same_v<acc_t, float> && !std::is_floating_point_v<out_t>) {
      // c10's scalar conversions do not vectorise (bf16's branches on NaN): the shared raw ones
      vgs::from_float<out_t>(in, n, reinterpret_cast<typename vgs::Elem<out_t>::raw*>(out));
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) out[j] = static_cast<out_t>(in[j]);
    }
  }

  void zero_row(int64_t r) const { std::memset(data + r * row_bytes, 0, row_bytes); }
};

// f(r) for r in [0, N), rows handed out one at a time: a thread that the OS preempts (a busy
// machine) delays its current row only, not a static share of them.
template <typename F>
void for_rows(int64_t N, const F& f) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(N, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t r; (r = next.fetch_add(1, std::memory_order_relaxed)) < N;) f(r);
  });
}

// e^(x - m) (x - y): one token's part of sum e^(x - m) (x - y), with the masked-vocabulary
// limits: 0 where x = -inf (p = 0, whatever y), +inf where only y = -inf (even if e underflowed).
// Lean chunks have neither: the plain product.
template <bool kLeanChunk, typename acc_t>
[[gnu::always_inline]] inline acc_t kl_part(acc_t e, acc_t x, acc_t y) {
  const acc_t d = x - y;
  if constexpr (kLeanChunk) return e * d;
  // Selects on computed values only, then one product: GCC if-converts (and so vectorises) a
  // select, not a floating-point operation inside a branch (-ftrapping-math).
  else return (x == kNegInf<acc_t> ? acc_t(0) : d) * (d == -kNegInf<acc_t> ? acc_t(1) : e);
}

// A term's share of the gradient, dropped when its cotangent is 0 (so that an infinite term
// nobody differentiates cannot turn a finite gradient into NaN through 0 * inf). Lean chunks
// have no infinite term: the plain product.
template <bool kLeanChunk, typename acc_t>
[[gnu::always_inline]] inline acc_t weighted(acc_t g, acc_t x) {
  if constexpr (kLeanChunk) return g * x;
  else return g * (g != acc_t(0) ? x : acc_t(0));  // select, then multiply: stays vectorisable
}

struct Inputs {
  RowIn s, u, a, b;
  const bool* mask;  // nullptr = every row valid
  int64_t V;
};

// The lean forward takes q*'s sum from the u, a, b exponentials: e^(q - R) = eu (ea / eb) with
// R = mu + (ma - mb), times e^(R - mq) per chunk. That is exact to rounding where every b logit of
// the chunk is within kQGuard of its max (ea / eb <= e^30 never overflows) and R - mq <= kQRange:
// a term of weight >= e^-47 against q's max is then >= e^-87 against R (no underflow in eu (ea / eb)).
constexpr double kQGuard = 30, kQRange = 40;

// Per-row sums over one chunk: e^(x - m) for s, u, a, b, q and sum e^(x - m) (x - y) of the four
// KLs, added into acc = {S_s, S_u, S_a, S_b, S_q, A_std, A_vis, A_lang, A_vds} (monolithic: A_std of
// kDiv, E_p[s - a] or E_q[a - s]; nothing for the JSD, whose second pass is jsd_row). Two loops, s and a
// then u and b: one loop of all four exps needed more than the 32 vector registers (its nine
// accumulators and the exps' constants) and spilled on every iteration. Lean chunks (see above):
// lexp, plain products, S_q from the division (cq = e^(R - mq)); general ones: a fifth exp.
template <typename acc_t, bool kMono, bool kLeanChunk, int kDiv = kReverse>
void chunk_sums(const acc_t* xs, const acc_t* xu, const acc_t* xa, const acc_t* xb, const acc_t* xq,
                acc_t* ea_buf, int64_t n, const acc_t* ref, acc_t cq, acc_t* acc) {
  const acc_t ms = ref[0], mu = ref[1], ma = ref[2], mb = ref[3], mq = ref[4];
  acc_t ss = 0, sa = 0, a0 = 0, a1 = 0, a3 = 0;
#pragma omp simd reduction(+ : ss, sa, a0, a1, a3)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t es = chunk_exp<kLeanChunk>(xs[j] - ms), ea = chunk_exp<kLeanChunk>(xa[j] - ma);
    ss += es;
    sa += ea;
    if constexpr (kDiv == kReverse) a0 += kl_part<kLeanChunk>(es, xs[j], xa[j]);
    if constexpr (kDiv == kForward) a0 += kl_part<kLeanChunk>(ea, xa[j], xs[j]);
    if constexpr (!kMono) {
      a1 += kl_part<kLeanChunk>(es, xs[j], xq[j]);
      a3 += kl_part<kLeanChunk>(ea, xa[j], xb[j]);
      if constexpr (kLeanChunk) ea_buf[j] = ea;
    }
  }
  acc[0] += ss, acc[2] += sa, acc[5] += a0;
  if constexpr (!kMono) {
    acc_t su = 0, sb = 0, sq = 0, a2 = 0;
#pragma omp simd reduction(+ : su, sb, sq, a2)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t eu = chunk_exp<kLeanChunk>(xu[j] - mu), eb = chunk_exp<kLeanChunk>(xb[j] - mb);
      su += eu;
      sb += eb;
      if constexpr (kLeanChunk)
        sq += eu * (ea_buf[j] / eb);
      else
        sq += vexp(xq[j] - mq);
      a2 += kl_part<kLeanChunk>(eu, xu[j], xb[j]);
    }
    acc[1] += su, acc[3] += sb, acc[4] += kLeanChunk ? sq * cq : sq;
    acc[6] += a1, acc[7] += a2, acc[8] += a3;
  }
}

// The general path's q: u + (a - b) with q* = 0 (-inf) where pu qa = 0, and -inf where only qb = 0
// (unbounded: counted into *unbounded, then Vis = +inf). Returns its max.
template <typename acc_t>
acc_t masked_q(const acc_t* xu, const acc_t* xa, const acc_t* xb, int64_t n, acc_t* xq, int64_t* unbounded) {
  constexpr int L = kLanes<acc_t>;
  acc_t hi[L];
  std::fill(hi, hi + L, kNegInf<acc_t>);
  int64_t count = 0;
  const auto step = [&](int64_t j, int l) [[gnu::always_inline]] {
    const acc_t q = xu[j] + (xa[j] - xb[j]);
    const bool dead = xu[j] == kNegInf<acc_t> || xa[j] == kNegInf<acc_t>;
    const bool inf = !dead && xb[j] == kNegInf<acc_t>;
    count += inf ? 1 : 0;
    xq[j] = dead || inf ? kNegInf<acc_t> : q;
    hi[l] = xq[j] > hi[l] ? xq[j] : hi[l];
  };
  int64_t j = 0;
  for (; j + L <= n; j += L) {
#pragma omp simd reduction(+ : count)
    for (int l = 0; l < L; ++l) step(j + l, l);
  }
  for (; j < n; ++j) step(j, 0);
  *unbounded += count;
  return *std::max_element(hi, hi + L);
}

// The JSD's second pass over one row, from its LSEs: beta KL(q || m) + (1 - beta) KL(p || m), with
// KL(p || m) into *kl_pm. lp, lq, log m are finite or -inf; the masked-vocabulary limits as kl_part's.
template <typename acc_t>
acc_t jsd_row(const Inputs& in, int64_t r, acc_t it, acc_t lse_s, acc_t lse_a, acc_t beta, acc_t* kl_pm) {
  alignas(64) acc_t xs[kChunk], xa[kChunk];
  const acc_t cp = std::log1p(-beta), cq = std::log(beta);
  acc_t sp = 0, sq = 0;
  for (int64_t c = 0; c < in.V; c += kChunk) {
    const int64_t n = std::min(kChunk, in.V - c);
    in.s.load(r, c, n, it, xs);
    in.a.load(r, c, n, it, xa);
#pragma omp simd reduction(+ : sp, sq)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t lp = xs[j] - lse_s, lq = xa[j] - lse_a, lm = log_m(lp + cp, lq + cq);
      sp += kl_part<false>(vexp(lp), lp, lm);
      sq += kl_part<false>(vexp(lq), lq, lm);
    }
  }
  *kl_pm = sp;
  return beta * sq + (acc_t(1) - beta) * sp;
}

// One row of the forward. terms/stats: this row's column of the [4, N] / [5, N] outputs.
// NaN or +inf logits make the row's terms NaN (they reach the sums); -inf is a masked token.
template <typename acc_t, bool kMono, int kDiv = kReverse>
void forward_row(const Inputs& in, int64_t r, acc_t it, acc_t* terms, acc_t* stats, int64_t N, double beta = 1) {
  alignas(64) acc_t xs[kChunk], xu[kChunk], xa[kChunk], xb[kChunk], xq[kChunk], ea[kChunk];
  // Running maxima of s, u, a, b, q = u + a - b; acc: see chunk_sums (std, vis scale with s;
  // lang with u; vds with a).
  acc_t m[5], acc[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
  std::fill(m, m + 5, kNegInf<acc_t>);
  int64_t q_unbounded = 0;  // tokens where qb = 0 < pu qa: q* is +inf there
  constexpr auto used = [](int k) { return !kMono || k == 0 || k == 2; };  // mono: s and a only
  for (int64_t c = 0; c < in.V; c += kChunk) {
    const int64_t n = std::min(kChunk, in.V - c);
    Range<acc_t> rg[4];
    QBuild<acc_t> q{xu, xa, xq, kNegInf<acc_t>};
    rg[0] = in.s.load(r, c, n, it, xs);
    rg[2] = in.a.load(r, c, n, it, xa);
    if constexpr (!kMono) {
      rg[1] = in.u.load(r, c, n, it, xu);
      rg[3] = in.b.load(r, c, n, it, xb, &q);
    }
    acc_t mk[5];  // the maxima with this chunk
    bool lean = true;
    for (int k = 0; k < 4; ++k) {
      if (!used(k)) continue;
      mk[k] = std::max(m[k], rg[k].hi);
      lean = lean && rg[k].finite() && rg[k].lo >= mk[k] - acc_t(kLean);
    }
    acc_t rq = 0;
    if constexpr (!kMono) {
      mk[4] = std::max(m[4], q.hi);  // every q finite where lean
      rq = mk[1] + (mk[2] - mk[3]) - mk[4];  // R - mq, R formed as q is
      lean = lean && rg[3].lo >= mk[3] - acc_t(kQGuard) && std::isfinite(rq) && rq <= acc_t(kQRange);
      if (!lean) mk[4] = std::max(m[4], masked_q(xu, xa, xb, n, xq, &q_unbounded));
    }
    acc_t scale[5] = {1, 1, 1, 1, 1}, ref[5] = {0, 0, 0, 0, 0};
    for (int k = 0; k < 5; ++k) {
      if (!used(k)) continue;
      if (mk[k] != kNegInf<acc_t>)  // else: all masked so far
        scale[k] = mk[k] == m[k] ? acc_t(1) : std::exp(m[k] - mk[k]), ref[k] = mk[k];
      m[k] = mk[k];
    }
    for (int k = 0; k < 5; ++k) acc[k] *= scale[k];
    acc[5] *= scale[kDiv == kForward ? 2 : 0], acc[6] *= scale[0], acc[7] *= scale[1], acc[8] *= scale[2];
    if (lean)
      chunk_sums<acc_t, kMono, true, kDiv>(xs, xu, xa, xb, xq, ea, n, ref, std::exp(rq), acc);
    else
      chunk_sums<acc_t, kMono, false, kDiv>(xs, xu, xa, xb, xq, ea, n, ref, acc_t(0), acc);
  }
  acc_t lse[5] = {0, 0, 0, 0, 0};
  for (int k = 0; k < 5; ++k)
    if (used(k)) lse[k] = m[k] + std::log(acc[k]);
  // KL(softmax(x) || softmax(y)) = E_x[x - y] - LSE(x) + LSE(y)
  if constexpr (kDiv == kReverse) terms[0] = acc[5] / acc[0] - lse[0] + lse[2];
  if constexpr (kDiv == kForward) terms[0] = acc[5] / acc[2] - lse[2] + lse[0];
  if constexpr (kDiv == kJsd) terms[0] = jsd_row(in, r, it, lse[0], lse[2], acc_t(beta), &lse[1]);
  if constexpr (!kMono) {
    if (q_unbounded > 0) lse[4] = -kNegInf<acc_t>;
    terms[N] = q_unbounded > 0 ? lse[4] : acc[6] / acc[0] - lse[0] + lse[4];
    terms[2 * N] = acc[7] / acc[1] - lse[1] + lse[3];
    terms[3 * N] = acc[8] / acc[2] - lse[2] + lse[3];
  }
  for (int k = 0; k < 5; ++k) stats[k * N] = lse[k];
}

// Per-row constants of the backward (see backward_row).
template <typename acc_t>
struct Grad {
  acc_t it, lse_s, lse_u, lse_q, g_std, g_vis, g_lang, c_s, c_u;
  acc_t lse_a = 0, beta = 1, kl_pm = 0;  // the monolithic mode's forward KL and JSD
};

// ds, du over one chunk (see backward_row). Lean chunks (every logit finite, exponents >= -kLean):
// lexp and no selects; q*'s exponent (not detached) is clamped at -kLean instead: at most e^-87
// too much in q* - p, which no large factor multiplies.
template <typename acc_t, bool kMono, bool kDetach, bool kLeanChunk, int kDiv = kReverse>
void grad_chunk(const Grad<acc_t>& k, const acc_t* xs, const acc_t* xu, const acc_t* xa, const acc_t* xb,
                int64_t n, acc_t* ds, acc_t* du) {
  constexpr acc_t ninf = kNegInf<acc_t>;
  const auto w = [](acc_t g, acc_t x) [[gnu::always_inline]] { return weighted<kLeanChunk>(g, x); };
  if constexpr (kDiv == kForward) {  // d KL(q || p) / ds = p - q
#pragma omp simd
    for (int64_t j = 0; j < n; ++j)
      ds[j] = k.it * w(k.g_std, chunk_exp<kLeanChunk>(xs[j] - k.lse_s) - chunk_exp<kLeanChunk>(xa[j] - k.lse_a));
  } else if constexpr (kDiv == kJsd) {  // (1 - beta) p (log p - log m - KL(p || m)); 0 where p = 0
    const acc_t cp = std::log1p(-k.beta), cq = std::log(k.beta), g = k.g_std * (acc_t(1) - k.beta);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const acc_t lp = xs[j] - k.lse_s, lm = log_m(lp + cp, xa[j] - k.lse_a + cq);
      const acc_t v = k.it * vexp(lp) * weighted<false>(g, lp - lm - k.kl_pm);
      ds[j] = xs[j] != ninf ? v : acc_t(0);
    }
  } else if constexpr (kMono) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const acc_t v = k.it * chunk_exp<kLeanChunk>(xs[j] - k.lse_s) * (w(k.g_std, xs[j] - xa[j]) + k.c_s);
      ds[j] = kLeanChunk || xs[j] != ninf ? v : acc_t(0);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const acc_t p = chunk_exp<kLeanChunk>(xs[j] - k.lse_s), d_sa = xs[j] - xa[j], d_ub = xu[j] - xb[j];
      // log p - log q* - (lse_q - lse_s) = s - (u + a - b)
      const acc_t vs = k.it * p * (w(k.g_std, d_sa) + w(k.g_vis, d_sa - d_ub) + k.c_s);
      ds[j] = kLeanChunk || xs[j] != ninf ? vs : acc_t(0);
      acc_t v = chunk_exp<kLeanChunk>(xu[j] - k.lse_u) * (w(k.g_lang, d_ub) + k.c_u);
      v = kLeanChunk || xu[j] != ninf ? v : acc_t(0);
      if constexpr (!kDetach) {
        const acc_t x = d_ub + xa[j] - k.lse_q;
        const bool dead = xu[j] == ninf || xa[j] == ninf;  // pu qa = 0: q* = 0
        const acc_t eq = kLeanChunk ? lexp(x < -acc_t(kLean) ? -acc_t(kLean) : x) : vexp(x);
        v += w(k.g_vis, (kLeanChunk || !dead ? eq : acc_t(0)) - p);
      }
      du[j] = k.it * v;
    }
  }
}

// One row of the backward: ds = (1/T) p ⊙ (g_std (log p - log qa - Std) + g_vis (log p - log q* - Vis)),
// du = (1/T) [pu ⊙ g_lang (log pu - log qb - Lang) + (not detached) g_vis (q* - p)], expanded so
// that every per-row constant is folded in before the loop. Tokens with p = 0 (pu = 0) get exact
// zeros and terms with a zero cotangent are dropped (masked vocabulary, see the file comment).
template <typename acc_t, bool kMono, bool kDetach, int kDiv = kReverse>
void backward_row(const Inputs& in, int64_t r, acc_t it, const acc_t* stats, const acc_t* terms,
                  const acc_t* g, int64_t N, const RowOut& ds_out, const RowOut* du_out, double beta = 1) {
  alignas(64) acc_t xs[kChunk], xu[kChunk], xa[kChunk], xb[kChunk], ds[kChunk], du[kChunk];
  Grad<acc_t> k{it, stats[0], stats[N], stats[4 * N], g[0], kMono ? acc_t(0) : g[N], g[2 * N], 0, 0};
  const acc_t lse_a = stats[2 * N], lse_b = stats[3 * N];
  k.lse_a = lse_a, k.beta = acc_t(beta), k.kl_pm = stats[N];
  k.c_s = weighted<false>(k.g_std, lse_a - k.lse_s - terms[0]) +
          (kMono ? acc_t(0) : weighted<false>(k.g_vis, k.lse_q - k.lse_s - terms[N]));
  k.c_u = kMono ? acc_t(0) : weighted<false>(k.g_lang, lse_b - k.lse_u - terms[2 * N]);
  for (int64_t c = 0; c < in.V; c += kChunk) {
    const int64_t n = std::min(kChunk, in.V - c);
    const Range<acc_t> rs = in.s.load(r, c, n, it, xs), ra = in.a.load(r, c, n, it, xa);
    bool lean = rs.finite() && ra.finite() && rs.lo >= k.lse_s - acc_t(kLean) &&
                (kDiv != kForward || ra.lo >= lse_a - acc_t(kLean));
    if constexpr (!kMono) {
      const Range<acc_t> ru = in.u.load(r, c, n, it, xu), rb = in.b.load(r, c, n, it, xb);
      lean = lean && ru.finite() && rb.finite() && ru.lo >= k.lse_u - acc_t(kLean);
    }
    if (lean)
      grad_chunk<acc_t, kMono, kDetach, true, kDiv>(k, xs, xu, xa, xb, n, ds, du);
    else
      grad_chunk<acc_t, kMono, kDetach, false, kDiv>(k, xs, xu, xa, xb, n, ds, du);
    if constexpr (!kMono) du_out->store(r, c, n, du);
    ds_out.store(r, c, n, ds);
  }
}

// The [N, V] gradients are written once, right after allocation, and first touch of fresh memory
// (a fault per 4 KiB page, each zeroed by the kernel) cost more than the kernel's own writes here
// (BENCHMARKS.md, first-touch bandwidth: 2.2 GB/s against 24 GB/s for a copy). So ask for
// transparent huge pages on them, as torch does for every allocation under THP_MEM_ALLOC_ENABLE=1:
// 512x fewer faults. A hint only: harmless where THP is off or the memory was touched before.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto t = at::empty(sizes, options);
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + t.nbytes()) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
  return t;
}

at::Tensor rows_of(const at::Tensor& x, const at::Tensor& s, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.sizes() == s.sizes(), "decomposed_kl: ", name,
              " must have the shape of s ", s.sizes(), ", got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "decomposed_kl: ", name, " must be a CPU tensor");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "decomposed_kl: ", name,
              " must be a floating-point tensor, got ", x.scalar_type());
  return x.stride(1) == 1 ? x : x.contiguous();
}

struct Prepared {
  at::Tensor s, u, a, b, mask;  // keep the (possibly copied) tensors alive
  Inputs in;
  bool mono;
  at::ScalarType acc;
};

Prepared prepare(const at::Tensor& s_, const std::optional<at::Tensor>& u_, const at::Tensor& a_,
                 const std::optional<at::Tensor>& b_, const std::optional<at::Tensor>& mask_) {
  TORCH_CHECK(s_.dim() == 2, "decomposed_kl: s must be [N, V], got ", s_.sizes());
  TORCH_CHECK(u_.has_value() == b_.has_value(), "decomposed_kl: u and b must be given together");
  Prepared p;
  p.mono = !u_.has_value();
  p.s = rows_of(s_, s_, "s");
  p.a = rows_of(a_, s_, "a");
  if (!p.mono) {
    p.u = rows_of(*u_, s_, "u");
    p.b = rows_of(*b_, s_, "b");
  }
  bool f64 = p.s.scalar_type() == at::kDouble || p.a.scalar_type() == at::kDouble ||
             (!p.mono && (p.u.scalar_type() == at::kDouble || p.b.scalar_type() == at::kDouble));
  p.acc = f64 ? at::kDouble : at::kFloat;
  if (mask_.has_value()) {
    TORCH_CHECK(mask_->dim() == 1 && mask_->size(0) == s_.size(0),
                "decomposed_kl: mask must be [N] = [", s_.size(0), "], got ", mask_->sizes());
    p.mask = mask_->to(at::kBool).contiguous();
  }
  p.in = Inputs{RowIn(p.s), p.mono ? RowIn() : RowIn(p.u), RowIn(p.a), p.mono ? RowIn() : RowIn(p.b),
                p.mask.defined() ? p.mask.data_ptr<bool>() : nullptr, s_.size(1)};
  return p;
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& s, const std::optional<at::Tensor>& u,
                                           const at::Tensor& a, const std::optional<at::Tensor>& b,
                                           double inv_temperature,
                                           const std::optional<at::Tensor>& mask, double beta) {
  const Prepared p = prepare(s, u, a, b, mask);
  const int div = beta == 1 ? kReverse : beta == 0 ? kForward : kJsd;
  TORCH_CHECK(beta >= 0 && beta <= 1 && (p.mono || div == kReverse),
              "decomposed_kl: beta must be in [0, 1], and 1 with u and b (the four-term split), got ", beta);
  const int64_t N = s.size(0);
  auto terms = at::zeros({4, N}, s.options().dtype(p.acc));
  auto stats = at::zeros({5, N}, s.options().dtype(p.acc));
  AT_DISPATCH_FLOATING_TYPES(p.acc, "decomposed_kl_forward", [&] {
    auto* t = terms.data_ptr<scalar_t>();
    auto* st = stats.data_ptr<scalar_t>();
    const auto it = static_cast<scalar_t>(inv_temperature);
    for_rows(N, [&](int64_t r) {
      if (p.in.mask && !p.in.mask[r]) return;  // zeros, never read
      if (div == kForward)
        forward_row<scalar_t, true, kForward>(p.in, r, it, t + r, st + r, N);
      else if (div == kJsd)
        forward_row<scalar_t, true, kJsd>(p.in, r, it, t + r, st + r, N, beta);
      else if (p.mono)
        forward_row<scalar_t, true>(p.in, r, it, t + r, st + r, N);
      else
        forward_row<scalar_t, false>(p.in, r, it, t + r, st + r, N);
    });
  });
  return {terms, stats};
}

std::tuple<at::Tensor, at::Tensor> backward(
    const at::Tensor& s, const std::optional<at::Tensor>& u, const at::Tensor& a,
    const std::optional<at::Tensor>& b, const at::Tensor& stats, const at::Tensor& terms,
    const at::Tensor& grad_terms, double inv_temperature, bool detach_prior,
    const std::optional<at::Tensor>& mask, std::optional<at::ScalarType> out_dtype, double beta) {
  const Prepared p = prepare(s, u, a, b, mask);
  const int div = beta == 1 ? kReverse : beta == 0 ? kForward : kJsd;
  TORCH_CHECK(beta >= 0 && beta <= 1 && (p.mono || div == kReverse),
              "decomposed_kl: beta must be in [0, 1], and 1 with u and b (the four-term split), got ", beta);
  const int64_t N = s.size(0);
  TORCH_CHECK(stats.sizes() == at::IntArrayRef({5, N}), "decomposed_kl: stats must be [5, ", N,
              "], got ", stats.sizes());
  TORCH_CHECK(terms.sizes() == at::IntArrayRef({4, N}) && grad_terms.sizes() == terms.sizes(),
              "decomposed_kl: terms and grad_terms must be [4, ", N, "], got ", terms.sizes(),
              " and ", grad_terms.sizes());
  const auto st = stats.to(p.acc).contiguous(), te = terms.to(p.acc).contiguous(),
             g = grad_terms.to(p.acc).contiguous();
  auto ds = empty_output(p.s.sizes(), s.options().dtype(out_dtype.value_or(s.scalar_type())));
  auto du = p.mono ? at::empty({0}, s.options())
                   : empty_output(p.u.sizes(), s.options().dtype(out_dtype.value_or(u->scalar_type())));
  const RowOut ds_out(ds);
  const RowOut du_out = p.mono ? RowOut(ds) : RowOut(du);
  AT_DISPATCH_FLOATING_TYPES(p.acc, "decomposed_kl_backward", [&] {
    const auto* stp = st.data_ptr<scalar_t>();
    const auto* tp = te.data_ptr<scalar_t>();
    const auto* gp = g.data_ptr<scalar_t>();
    const auto it = static_cast<scalar_t>(inv_temperature);
    for_rows(N, [&](int64_t r) {
      if (p.in.mask && !p.in.mask[r]) {
        ds_out.zero_row(r);
        if (!p.mono) du_out.zero_row(r);
        return;
      }
      const auto* sr = stp + r;
      const auto* tr = tp + r;
      const auto* gr = gp + r;
      if (div == kForward)
        backward_row<scalar_t, true, true, kForward>(p.in, r, it, sr, tr, gr, N, ds_out, nullptr);
      else if (div == kJsd)
        backward_row<scalar_t, true, true, kJsd>(p.in, r, it, sr, tr, gr, N, ds_out, nullptr, beta);
      else if (p.mono)
        backward_row<scalar_t, true, true>(p.in, r, it, sr, tr, gr, N, ds_out, nullptr);
      else if (detach_prior)
        backward_row<scalar_t, false, true>(p.in, r, it, sr, tr, gr, N, ds_out, &du_out);
      else
        backward_row<scalar_t, false, false>(p.in, r, it, sr, tr, gr, N, ds_out, &du_out);
    });
  });
  return {ds, du};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vgs_kernels, m) {
  m.def("decomposed_kl_forward(Tensor s, Tensor? u, Tensor a, Tensor? b, float inv_temperature, "
        "Tensor? mask, float beta=1.0) -> (Tensor terms, Tensor stats)");
  m.def("decomposed_kl_backward(Tensor s, Tensor? u, Tensor a, Tensor? b, Tensor stats, "
        "Tensor terms, Tensor grad_terms, float inv_temperature, bool detach_prior, Tensor? mask, "
        "ScalarType? out_dtype, float beta=1.0) -> (Tensor ds, Tensor du)");
}

TORCH_LIBRARY_IMPL(vgs_kernels, CPU, m) {
  m.impl("decomposed_kl_forward", &forward);
  m.impl("decomposed_kl_backward", &backward);
}
