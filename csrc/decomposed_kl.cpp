// Decomposed KL on CPU: Std, Vis, Lang, VDS per row in one pass over the vocabulary, and the
// gradients ds, du from per-term cotangents in one more pass (math: docs/ARCHITECTURE.md, "The method"; Python side,
// fake kernels and the reference: vgs_kernels/ops/decomposed_kl.py).
//
// Rows are processed in parallel (at::parallel_for). Each row is walked in L1-sized chunks: the
// chunk is converted to the accumulation type (fp32, or fp64 when an input is fp64) and scaled
// by 1/T, its maxima update the running maxima (rescaling what was summed so far, as in online
// softmax), then one vectorised loop does every exp and sum. 4 exps per element in forward (q*'s
// from the u, a, b ones, see forward_row), so a vectorisable polynomial exp (vexp) makes it fast.
//
// Masked vocabulary (exact math, docs/ARCHITECTURE.md): a token at -inf in x has probability 0 and adds
// nothing to KL(softmax(x) || softmax(y)); a live token at -inf in y makes it +inf. q* = 0 where
// pu or qa is 0; where only qb is 0, q* is unbounded there: Vis = +inf and LSE(q) = +inf.
// The backward drops a term whose cotangent is 0, so gradients stay finite wherever the loss is.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include <sys/mman.h>

namespace {

constexpr int64_t kChunk = 512;  // 5 buffers x 512 x 4 B = 10 KiB: stays in L1

// exp(x) for x <= 88 (callers pass x - max <= 0), as Cephes expf: 2^n * P(r), |r| <= ln2/2,
// within ~1 ulp; exactly 0 below -87 (so exp(-inf) = 0); NaN in gives NaN out. Written with
// selects only, so GCC vectorises it inside `omp simd` loops.
[[gnu::always_inline]] inline float vexp(float x) {  // inlined, or the loops stay scalar
  float xc = x >= -87.0f ? x : -87.0f;  // NaN -> -87: keeps the integer conversion defined
  xc = xc <= 88.0f ? xc : 88.0f;
  // Round to nearest through the 1.5 * 2^23 shifter (floorf does not vectorise under strict FP).
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split in two, exact n*hi
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = (p * r * r + r) + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  const float e = y * std::bit_cast<float>(bits);
  return x >= -87.0f ? e : (x < -87.0f ? 0.0f : x);
}

inline double vexp(double x) { return std::exp(x); }

template <typename acc_t>
constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

// Rows of a 2-D tensor with unit stride along V, read as acc_t (any float dtype).
struct RowIn {
  const char* data = nullptr;
  int64_t row_bytes = 0;
  at::ScalarType dtype = at::kFloat;

  RowIn() = default;
  explicit RowIn(const at::Tensor& x)
      : data(static_cast<const char*>(x.data_ptr())), row_bytes(x.stride(0) * x.element_size()),
        dtype(x.scalar_type()) {}

  // out[j] = it * x[r, c + j] for j < n.
  template <typename acc_t>
  void load(int64_t r, int64_t c, int64_t n, acc_t it, acc_t* out) const {
    const char* row = data + r * row_bytes;
    switch (dtype) {
      case at::kFloat: return scaled(reinterpret_cast<const float*>(row) + c, n, it, out);
      case at::kDouble: return scaled(reinterpret_cast<const double*>(row) + c, n, it, out);
      case at::kBFloat16: return scaled(reinterpret_cast<const c10::BFloat16*>(row) + c, n, it, out);
      case at::kHalf: return scaled(reinterpret_cast<const c10::Half*>(row) + c, n, it, out);
      default: TORCH_CHECK(false, "decomposed_kl: unsupported dtype ", dtype);
    }
  }

  template <typename in_t, typename acc_t>
  static void scaled(const in_t* x, int64_t n, acc_t it, acc_t* out) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<acc_t>(x[j]) * it;
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
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<out_t>(in[j]);
  }

  void zero_row(int64_t r) const { std::memset(data + r * row_bytes, 0, row_bytes); }
};

// Max (kMax) or min of x[0, n) (NaN ignored: NaN reaches the terms through the sums instead).
// Lane-wise so that GCC vectorises it: a float max reduction does not vectorise under strict FP.
template <bool kMax, typename acc_t>
acc_t chunk_extreme(const acc_t* x, int64_t n) {
  constexpr int64_t L = 16;
  constexpr acc_t init = kMax ? kNegInf<acc_t> : -kNegInf<acc_t>;
  const auto pick = [](acc_t v, acc_t m) { return kMax ? (v > m ? v : m) : (v < m ? v : m); };
  acc_t lane[L];
  std::fill(lane, lane + L, init);
  int64_t j = 0;
  for (; j + L <= n; j += L) {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) lane[l] = pick(x[j + l], lane[l]);
  }
  for (; j < n; ++j) lane[0] = pick(x[j], lane[0]);
  acc_t m = lane[0];
  for (int64_t l = 1; l < L; ++l) m = pick(lane[l], m);
  return m;
}

// e^(x - m) (x - y): one token's part of sum e^(x - m) (x - y), with the masked-vocabulary
// limits: 0 where x = -inf (p = 0, whatever y), +inf where only y = -inf (even if e underflowed).
template <typename acc_t>
[[gnu::always_inline]] inline acc_t kl_part(acc_t e, acc_t x, acc_t y) {
  // Selects on computed values only, then one product: GCC if-converts (and so vectorises) a
  // select, not a floating-point operation inside a branch (-ftrapping-math).
  const acc_t d = x - y;
  return (x == kNegInf<acc_t> ? acc_t(0) : d) * (d == -kNegInf<acc_t> ? acc_t(1) : e);
}

// A term's share of the gradient, dropped when its cotangent is 0 (so that an infinite term
// nobody differentiates cannot turn a finite gradient into NaN through 0 * inf).
template <typename acc_t>
[[gnu::always_inline]] inline acc_t weighted(acc_t g, acc_t x) {
  return g * (g != acc_t(0) ? x : acc_t(0));  // select, then multiply: stays vectorisable
}

struct Inputs {
  RowIn s, u, a, b;
  const bool* mask;  // nullptr = every row valid
  int64_t V;
};

// q*'s sum from the u, a, b exponentials: e^(q - mq) = eu ea / eb * e^(mu + ma - mb - mq). Used on
// a chunk only where that is exact to rounding: every b logit of the chunk within kQGuard of its
// running max (so eb >= e^-30 never underflows, and a product eu ea that underflows drops a term
// below e^(-87 + 30) of the running max's) and the scalar factor in range. Otherwise (masked
// tokens or very negative logits in b) the chunk takes the fifth exp.
constexpr double kQGuard = 30, kQRange = 80;

// Per-row sums over one chunk: e^(x - m) for s, u, a, b, q and sum e^(x - m) (x - y) of the four
// KLs, added into acc = {S_s, S_u, S_a, S_b, S_q, A_std, A_vis, A_lang, A_vds}.
template <typename acc_t, bool kFastQ>
void chunk_sums(const acc_t* xs, const acc_t* xu, const acc_t* xa, const acc_t* xb,
                const acc_t* xq, int64_t n, const acc_t* ref, acc_t cq, acc_t* acc) {
  const acc_t ms = ref[0], mu = ref[1], ma = ref[2], mb = ref[3], mq = ref[4];
  acc_t ss = 0, su = 0, sa = 0, sb = 0, sq = 0, a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : ss, su, sa, sb, sq, a0, a1, a2, a3)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t es = vexp(xs[j] - ms), eu = vexp(xu[j] - mu), ea = vexp(xa[j] - ma),
                eb = vexp(xb[j] - mb);
    ss += es;
    su += eu;
    sa += ea;
    sb += eb;
    if constexpr (kFastQ)
      sq += eu * ea / eb * cq;
    else
      sq += vexp(xq[j] - mq);
    a0 += kl_part(es, xs[j], xa[j]);
    a1 += kl_part(es, xs[j], xq[j]);
    a2 += kl_part(eu, xu[j], xb[j]);
    a3 += kl_part(ea, xa[j], xb[j]);
  }
  const acc_t add[9] = {ss, su, sa, sb, sq, a0, a1, a2, a3};
  for (int k = 0; k < 9; ++k) acc[k] += add[k];
}

// One row of the forward. terms/stats: this row's column of the [4, N] / [5, N] outputs.
// NaN or +inf logits make the row's terms NaN (they reach the sums); -inf is a masked token.
template <typename acc_t, bool kMono>
void forward_row(const Inputs& in, int64_t r, acc_t it, acc_t* terms, acc_t* stats, int64_t N) {
  alignas(64) acc_t xs[kChunk], xu[kChunk], xa[kChunk], xb[kChunk], xq[kChunk];
  // Running maxima of s, u, a, b, q = u + a - b; acc: see chunk_sums (std, vis scale with s;
  // lang with u; vds with a).
  acc_t m[5], acc[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
  std::fill(m, m + 5, kNegInf<acc_t>);
  int64_t q_unbounded = 0;  // tokens where qb = 0 < pu qa: q* is +inf there
  constexpr auto used = [](int k) { return !kMono || k == 0 || k == 2; };  // mono: s and a only
  for (int64_t c = 0; c < in.V; c += kChunk) {
    const int64_t n = std::min(kChunk, in.V - c);
    in.s.load(r, c, n, it, xs);
    in.a.load(r, c, n, it, xa);
    if constexpr (!kMono) {
      in.u.load(r, c, n, it, xu);
      in.b.load(r, c, n, it, xb);
      int64_t unbounded = 0;
#pragma omp simd reduction(+ : unbounded)
      for (int64_t j = 0; j < n; ++j) {
        const acc_t q = xu[j] + (xa[j] - xb[j]);  // a - b first: finfo.min in all four stays finite
        const bool dead = xu[j] == kNegInf<acc_t> || xa[j] == kNegInf<acc_t>;  // pu qa = 0
        const bool inf = !dead && xb[j] == kNegInf<acc_t>;
        unbounded += inf ? 1 : 0;
        xq[j] = dead || inf ? kNegInf<acc_t> : q;  // unbounded ones: counted, then Vis = +inf
      }
      q_unbounded += unbounded;
    }
    const acc_t* xk[5] = {xs, xu, xa, xb, xq};
    acc_t scale[5] = {1, 1, 1, 1, 1}, ref[5] = {0, 0, 0, 0, 0};
    for (int k = 0; k < 5; ++k) {
      if (!used(k)) continue;
      const acc_t mk = std::max(m[k], chunk_extreme<true>(xk[k], n));
      if (mk != kNegInf<acc_t>) scale[k] = std::exp(m[k] - mk), ref[k] = mk;  // else: all masked
      m[k] = mk;
    }
    for (int k = 0; k < 5; ++k) acc[k] *= scale[k];
    acc[5] *= scale[0], acc[6] *= scale[0], acc[7] *= scale[1], acc[8] *= scale[2];
    if constexpr (kMono) {
      const acc_t ms = ref[0], ma = ref[2];
      acc_t ss = 0, sa = 0, a0 = 0;
#pragma omp simd reduction(+ : ss, sa, a0)
      for (int64_t j = 0; j < n; ++j) {
        const acc_t es = vexp(xs[j] - ms);
        ss += es;
        a0 += kl_part(es, xs[j], xa[j]);
        sa += vexp(xa[j] - ma);
      }
      acc[0] += ss, acc[2] += sa, acc[5] += a0;
    } else {
      const acc_t rq = ref[1] + ref[2] - ref[3] - ref[4];
      const bool fast = chunk_extreme<false>(xb, n) >= m[3] - acc_t(kQGuard) && std::isfinite(rq) &&
                        std::abs(rq) <= acc_t(kQRange) && m[4] != kNegInf<acc_t>;
      if (fast)
        chunk_sums<acc_t, true>(xs, xu, xa, xb, xq, n, ref, std::exp(rq), acc);
      else
        chunk_sums<acc_t, false>(xs, xu, xa, xb, xq, n, ref, acc_t(0), acc);
    }
  }
  acc_t lse[5] = {0, 0, 0, 0, 0};
  for (int k = 0; k < 5; ++k)
    if (used(k)) lse[k] = m[k] + std::log(acc[k]);
  // KL(softmax(x) || softmax(y)) = E_x[x - y] - LSE(x) + LSE(y)
  terms[0] = acc[5] / acc[0] - lse[0] + lse[2];
  if constexpr (!kMono) {
    if (q_unbounded > 0) lse[4] = -kNegInf<acc_t>;
    terms[N] = q_unbounded > 0 ? lse[4] : acc[6] / acc[0] - lse[0] + lse[4];
    terms[2 * N] = acc[7] / acc[1] - lse[1] + lse[3];
    terms[3 * N] = acc[8] / acc[2] - lse[2] + lse[3];
  }
  for (int k = 0; k < 5; ++k) stats[k * N] = lse[k];
}

// One row of the backward: ds = (1/T) p ⊙ (g_std (log p - log qa - Std) + g_vis (log p - log q* - Vis)),
// du = (1/T) [pu ⊙ g_lang (log pu - log qb - Lang) + (not detached) g_vis (q* - p)], expanded so
// that every per-row constant is folded in before the loop. Tokens with p = 0 (pu = 0) get exact
// zeros and terms with a zero cotangent are dropped (masked vocabulary, see the file comment).
template <typename acc_t, bool kMono, bool kDetach>
void backward_row(const Inputs& in, int64_t r, acc_t it, const acc_t* stats, const acc_t* terms,
                  const acc_t* g, int64_t N, const RowOut& ds_out, const RowOut* du_out) {
  alignas(64) acc_t xs[kChunk], xu[kChunk], xa[kChunk], xb[kChunk], ds[kChunk], du[kChunk];
  constexpr acc_t ninf = kNegInf<acc_t>;
  const acc_t lse_s = stats[0], lse_u = stats[N], lse_a = stats[2 * N], lse_b = stats[3 * N],
              lse_q = stats[4 * N];
  const acc_t g_std = g[0], g_vis = kMono ? acc_t(0) : g[N], g_lang = g[2 * N];
  const acc_t c_s = weighted(g_std, lse_a - lse_s - terms[0]) +
                    (kMono ? acc_t(0) : weighted(g_vis, lse_q - lse_s - terms[N]));
  const acc_t c_u = kMono ? acc_t(0) : weighted(g_lang, lse_b - lse_u - terms[2 * N]);
  for (int64_t c = 0; c < in.V; c += kChunk) {
    const int64_t n = std::min(kChunk, in.V - c);
    in.s.load(r, c, n, it, xs);
    in.a.load(r, c, n, it, xa);
    if constexpr (kMono) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const acc_t v = it * vexp(xs[j] - lse_s) * (weighted(g_std, xs[j] - xa[j]) + c_s);
        ds[j] = xs[j] == ninf ? acc_t(0) : v;
      }
    } else {
      in.u.load(r, c, n, it, xu);
      in.b.load(r, c, n, it, xb);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const acc_t p = vexp(xs[j] - lse_s), d_sa = xs[j] - xa[j], d_ub = xu[j] - xb[j];
        // log p - log q* - (lse_q - lse_s) = s - (u + a - b)
        const acc_t vs = it * p * (weighted(g_std, d_sa) + weighted(g_vis, d_sa - d_ub) + c_s);
        ds[j] = xs[j] == ninf ? acc_t(0) : vs;
        acc_t v = vexp(xu[j] - lse_u) * (weighted(g_lang, d_ub) + c_u);
        v = xu[j] == ninf ? acc_t(0) : v;
        if constexpr (!kDetach) {
          const bool dead = xu[j] == ninf || xa[j] == ninf;  // pu qa = 0: q* = 0
          const acc_t eq = vexp(d_ub + xa[j] - lse_q);
          const acc_t q = dead ? acc_t(0) : eq;
          v += weighted(g_vis, q - p);
        }
        du[j] = it * v;
      }
      du_out->store(r, c, n, du);
    }
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
                                           const std::optional<at::Tensor>& mask) {
  const Prepared p = prepare(s, u, a, b, mask);
  const int64_t N = s.size(0);
  auto terms = at::zeros({4, N}, s.options().dtype(p.acc));
  auto stats = at::zeros({5, N}, s.options().dtype(p.acc));
  AT_DISPATCH_FLOATING_TYPES(p.acc, "decomposed_kl_forward", [&] {
    auto* t = terms.data_ptr<scalar_t>();
    auto* st = stats.data_ptr<scalar_t>();
    const auto it = static_cast<scalar_t>(inv_temperature);
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (p.in.mask && !p.in.mask[r]) continue;  // zeros, never read
        if (p.mono)
          forward_row<scalar_t, true>(p.in, r, it, t + r, st + r, N);
        else
          forward_row<scalar_t, false>(p.in, r, it, t + r, st + r, N);
      }
    });
  });
  return {terms, stats};
}

std::tuple<at::Tensor, at::Tensor> backward(
    const at::Tensor& s, const std::optional<at::Tensor>& u, const at::Tensor& a,
    const std::optional<at::Tensor>& b, const at::Tensor& stats, const at::Tensor& terms,
    const at::Tensor& grad_terms, double inv_temperature, bool detach_prior,
    const std::optional<at::Tensor>& mask, std::optional<at::ScalarType> out_dtype) {
  const Prepared p = prepare(s, u, a, b, mask);
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
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (p.in.mask && !p.in.mask[r]) {
          ds_out.zero_row(r);
          if (!p.mono) du_out.zero_row(r);
          continue;
        }
        const auto* sr = stp + r;
        const auto* tr = tp + r;
        const auto* gr = gp + r;
        if (p.mono)
          backward_row<scalar_t, true, true>(p.in, r, it, sr, tr, gr, N, ds_out, nullptr);
        else if (detach_prior)
          backward_row<scalar_t, false, true>(p.in, r, it, sr, tr, gr, N, ds_out, &du_out);
        else
          backward_row<scalar_t, false, false>(p.in, r, it, sr, tr, gr, N, ds_out, &du_out);
      }
    });
  });
  return {ds, du};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vgs_kernels, m) {
  m.def("decomposed_kl_forward(Tensor s, Tensor? u, Tensor a, Tensor? b, float inv_temperature, "
        "Tensor? mask) -> (Tensor terms, Tensor stats)");
  m.def("decomposed_kl_backward(Tensor s, Tensor? u, Tensor a, Tensor? b, Tensor stats, "
        "Tensor terms, Tensor grad_terms, float inv_temperature, bool detach_prior, Tensor? mask, "
        "ScalarType? out_dtype) -> (Tensor ds, Tensor du)");
}

TORCH_LIBRARY_IMPL(vgs_kernels, CPU, m) {
  m.impl("decomposed_kl_forward", &forward);
  m.impl("decomposed_kl_backward", &backward);
}
