// Multi-tensor Gram and combine over k gradient lists (CPU). Python side: vgs_kernels/ops/gram.py,
// vgs_kernels/ops/combine.py (which also hold the Triton kernels and the plain-torch references).
//
//   gram(Tensor?[] tensors, int k) -> Tensor[k, k] float32
//       G[a][b] = sum_j <g_a[j], g_b[j]>
//   combine_(Tensor(a!)[] out, Tensor?[] tensors, Tensor coeffs) -> ()
//       out[j] = sum_i coeffs[i] * g_i[j]
//
//   gram_checked(Tensor?[] tensors, int k) -> (Tensor G, Tensor rest)
//   combine_checked_(Tensor(a!)[] out, Tensor?[] tensors, Tensor coeffs) -> Tensor rest
//       the same, called by vgs.gram / vgs.combine with the caller's lists as they are: the
//       validation is here (O(1) Python work per call), and a parameter the kernels cannot read
//       as one flat range (float64, a non-dense layout, strides differing between its tensors)
//       is skipped and listed in `rest` (int64 indices) for the plain-torch reference.
//
// `tensors` is component-major: tensors[i * T + j] is component i of parameter j (T parameters).
// None means "this parameter got no gradient from component i" and reads as zeros. All components
// of a parameter share its numel and dtype (float32, bfloat16 or float16; parameters may differ).
// The work is split into fixed-size chunks over all parameters (apex multi_tensor_apply): every
// chunk reads the k components of one parameter range together, in one sweep, accumulating in
// fp32 lanes that GCC vectorises, flushed to double every kStage elements. `out` may alias one of the
// inputs (e.g. the .grad holding g_0): each element is read before it is written.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "elem.h"

#include <algorithm>
#include <type_traits>
#include <array>
#include <bit>
#include <vector>

namespace {

using vgs::Elem;
using vgs::from_float;
using vgs::to_float;

constexpr int64_t kChunk = 1 << 16;  // elements per work item
constexpr int kLanes = 16;           // independent fp32 accumulators (one AVX-512 register)
constexpr int kMaxK = 4;

// Elements per component staged as fp32 on the stack (at most 4 x 4 KB, stays in L1).
constexpr int64_t kStage = 1024;

// Gram of M present components over n elements: g[a * M + b] += <p[a], p[b]> (b >= a).
template <int M, typename T>
void gram_slice(const typename Elem<T>::raw* const* p, int64_t n, double* g) {
  if constexpr (M > 0) {
    double total[M][M][kLanes] = {};  // fp32 lanes are flushed here after every staged block
    float buf[M][kStage];
    for (int64_t e0 = 0; e0 < n; e0 += kStage) {
      const int64_t len = std::min(kStage, n - e0);
      const float* x[M];
      for (int i = 0; i < M; ++i) x[i] = to_float<T>(p[i] + e0, len, buf[i]);
      float acc[M][M][kLanes] = {};
      int64_t e = 0;
      for (; e + kLanes <= len; e += kLanes) {
        float v[M][kLanes];  // copy to a local block first: the shape GCC vectorises best
        for (int i = 0; i < M; ++i) {
          const float* __restrict src = x[i] + e;
          for (int l = 0; l < kLanes; ++l) v[i][l] = src[l];
        }
        for (int a = 0; a < M; ++a)
          for (int b = a; b < M; ++b)
            for (int l = 0; l < kLanes; ++l) acc[a][b][l] += v[a][l] * v[b][l];
      }
      for (; e < len; ++e)
        for (int a = 0; a < M; ++a)
          for (int b = a; b < M; ++b) acc[a][b][0] += x[a][e] * x[b][e];
      for (int a = 0; a < M; ++a)
        for (int b = a; b < M; ++b)
          for (int l = 0; l < kLanes; ++l) total[a][b][l] += acc[a][b][l];
    }
    for (int a = 0; a < M; ++a)
      for (int b = a; b < M; ++b) {
        double s = 0;
        for (int l = 0; l < kLanes; ++l) s += total[a][b][l];
        g[a * M + b] += s;
      }
  }
}

// out[e] = sum_i c[i] * p[i][e] over M present components (M == 0 writes zeros). Each staged
// block is read completely before it is written, so out may alias an input.
template <int M, typename T>
void combine_slice(typename Elem<T>::raw* out, const typename Elem<T>::raw* const* p, const float* c, int64_t n) {
  float buf[M > 0 ? M : 1][kStage], s[kStage];
  for (int64_t e = 0; e < n; e += kStage) {
    const int64_t len = std::min(kStage, n - e);
    const float* x[M > 0 ? M : 1];
    for (int i = 0; i < M; ++i) x[i] = to_float<T>(p[i] + e, len, buf[i]);
    for (int64_t l = 0; l < len; ++l) {
      float t = 0.f;
      for (int i = 0; i < M; ++i) t += c[i] * x[i][l];
      s[l] = t;
    }
    from_float<T>(s, len, out + e);
  }
}

// f.template operator()<T>() for the runtime dtype, f.template operator()<M>() for the runtime count.
template <typename F>
void dispatch_type(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f.template operator()<float>();
    case at::kBFloat16: return f.template operator()<c10::BFloat16>();
    case at::kHalf: return f.template operator()<c10::Half>();
    default: TORCH_CHECK(false, "vgs_kernels: gradients must be float32, bfloat16 or float16, got ", dtype);
  }
}

template <typename F>
void dispatch_count(int m, F&& f) {
  switch (m) {
    case 0: return f.template operator()<0>();
    case 1: return f.template operator()<1>();
    case 2: return f.template operator()<2>();
    case 3: return f.template operator()<3>();
    case 4: return f.template operator()<4>();
  }
}

// The validated inputs: per parameter its numel, dtype and the contiguous present components.
struct Table {
  int64_t k = 0, n_params = 0;
  std::vector<at::Tensor> in;        // component-major, contiguous, undefined where None
  std::vector<int64_t> numel;        // per parameter
  std::vector<at::ScalarType> dtype; // per parameter
  std::vector<int64_t> first_chunk;  // prefix sums of chunk counts, size T + 1
  bool flat = false;                 // inputs read in place as flat ranges (out too, if dense)

  // Runs f(j, begin, n) over every chunk in parallel. Chunk c belongs to the parameter found by
  // binary search in first_chunk, so the bookkeeping is O(parameters), not O(elements).
  template <typename F>
  void for_chunks(int64_t c0, int64_t c1, F&& f) const {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t j = std::upper_bound(first_chunk.begin(), first_chunk.end(), c) - first_chunk.begin() - 1;
      int64_t begin = (c - first_chunk[j]) * kChunk;
      f(j, begin, std::min(kChunk, numel[j] - begin));
    }
  }

  // The present components of parameter j at element offset begin, and their indices.
  template <typename T>
  int present(int64_t j, int64_t begin, const typename Elem<T>::raw** p, int* idx) const {
    int m = 0;
    for (int64_t i = 0; i < k; ++i) {
      const at::Tensor& g = in[i * n_params + j];
      if (g.defined()) {
        p[m] = reinterpret_cast<const typename Elem<T>::raw*>(g.template const_data_ptr<T>()) + begin;
        idx[m++] = int(i);
      }
    }
    return m;
  }
};

// Whether t covers exactly numel consecutive elements in some dimension order (a permuted
// contiguous tensor): then it is read as the flat range starting at data_ptr().
bool dense(const at::Tensor& t) {
  if (t.is_contiguous()) return true;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the non-trivial dimensions
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) != 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t expected = 1;
  for (auto [stride, size] : dims) {
    if (stride != expected) return false;
    expected *= size;
  }
  return true;
}

bool fast_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// `out` (optional) fixes each parameter's numel and dtype for combine_. With `rest` (the *_checked
// ops), a parameter that is not a fast flat range is left out (numel 0) and its index appended to
// *rest; without it, such tensors are copied contiguous (and float64 raises).
Table make_table(const c10::List<std::optional<at::Tensor>>& tensors, int64_t k, at::TensorList out,
                 std::vector<int64_t>* rest = nullptr, at::Device dev = at::kCPU) {
  TORCH_CHECK(k >= 1 && k <= kMaxK, "vgs_kernels: k must be 1..4, got ", k);
  TORCH_CHECK(tensors.size() % k == 0, "vgs_kernels: tensors holds ", tensors.size(),
              " entries, not a multiple of k = ", k);
  Table t;
  t.k = k;
  t.flat = rest != nullptr;
  t.n_params = int64_t(tensors.size()) / k;
  TORCH_CHECK(out.empty() || int64_t(out.size()) == t.n_params, "vgs_kernels.combine_: out has ", out.size(),
              " tensors but tensors has ", t.n_params, " per component");
  t.in.resize(tensors.size());
  t.numel.assign(t.n_params, -1);
  t.dtype.assign(t.n_params, at::kFloat);
  for (int64_t j = 0; j < t.n_params; ++j) {
    at::Tensor ref;  // the first tensor of the parameter (out, else a component): shape and strides to share
    bool flat = true;
    if (!out.empty()) {
      TORCH_CHECK(out[j].device() == dev, "vgs_kernels.combine_: out[", j, "] is on ", out[j].device(),
                  dev.is_cpu() ? "; the C++ kernels take CPU tensors" : "; expected the gradients' device");
      t.numel[j] = out[j].numel();
      t.dtype[j] = out[j].scalar_type();
      ref = out[j];
    }
    for (int64_t i = 0; i < k; ++i) {
      std::optional<at::Tensor> o = tensors.get(i * t.n_params + j);
      if (!o.has_value() || !o->defined()) continue;
      const at::Tensor& g = *o;
      TORCH_CHECK(g.device() == dev, "vgs_kernels: component ", i, " of parameter ", j, " is on ",
                  g.device(), dev.is_cpu() ? "; the C++ kernels take CPU tensors" : "; expected ", dev);
      if (t.numel[j] < 0) {
        t.numel[j] = g.numel();
        t.dtype[j] = g.scalar_type();
      }
      TORCH_CHECK(g.numel() == t.numel[j] && g.scalar_type() == t.dtype[j], "vgs_kernels: component ", i,
                  " of parameter ", j, " has numel ", g.numel(), " and dtype ", g.scalar_type(),
                  ", expected numel ", t.numel[j], " and dtype ", t.dtype[j],
                  " like the other tensors of that parameter");
      if (rest) {
        TORCH_CHECK(at::isFloatingType(g.scalar_type()), "vgs_kernels: component ", i, " of parameter ", j,
                    " is not floating point");
        if (!ref.defined()) {
          ref = g;
        } else {
          TORCH_CHECK(g.sizes() == ref.sizes(), "vgs_kernels: component ", i, " of parameter ", j,
                      " has shape ", g.sizes(), ", expected ", ref.sizes());
          flat = flat && g.strides() == ref.strides();
        }
        t.in[i * t.n_params + j] = g;
      } else {
        t.in[i * t.n_params + j] = g.contiguous();  // a no-op on the fast path
      }
    }
    if (rest && t.numel[j] > 0 && !(flat && fast_dtype(t.dtype[j]) && ref.defined() && dense(ref))) {
      rest->push_back(j);
      t.numel[j] = 0;
      for (int64_t i = 0; i < k; ++i) t.in[i * t.n_params + j] = at::Tensor();
    }
  }
  t.first_chunk.assign(t.n_params + 1, 0);
  for (int64_t j = 0; j < t.n_params; ++j)
    t.first_chunk[j + 1] = t.first_chunk[j] + (std::max<int64_t>(t.numel[j], 0) + kChunk - 1) / kChunk;
  return t;
}

at::Tensor gram_table(const Table& t, int64_t k);

at::Tensor gram_cpu(const c10::List<std::optional<at::Tensor>>& tensors, int64_t k) {
  return gram_table(make_table(tensors, k, {}), k);
}

at::Tensor rest_tensor(const std::vector<int64_t>& rest) {
  return at::tensor(c10::ArrayRef<int64_t>(rest), at::kLong);
}

std::tuple<at::Tensor, at::Tensor> gram_checked(const c10::List<std::optional<at::Tensor>>& tensors, int64_t k) {
  std::vector<int64_t> rest;
  Table t = make_table(tensors, k, {}, &rest);
  return {gram_table(t, k), rest_tensor(rest)};
}

at::Tensor gram_table(const Table& t, int64_t k) {
  using Acc = std::array<double, kMaxK * kMaxK>;
  // One partial per task (thread), summed in a fixed order: deterministic for a thread count.
  Acc total = at::parallel_reduce(
      0, t.first_chunk.back(), 1, Acc{},
      [&](int64_t c0, int64_t c1, Acc acc) {
        t.for_chunks(c0, c1, [&](int64_t j, int64_t begin, int64_t n) {
          dispatch_type(t.dtype[j], [&]<typename T>() {
            const typename Elem<T>::raw* p[kMaxK];
            int idx[kMaxK];
            int m = t.present<T>(j, begin, p, idx);
            double g[kMaxK * kMaxK] = {};
            dispatch_count(m, [&]<int M>() { gram_slice<M, T>(p, n, g); });
            for (int a = 0; a < m; ++a)
              for (int b = a; b < m; ++b) {
                acc[idx[a] * k + idx[b]] += g[a * m + b];
                if (a != b) acc[idx[b] * k + idx[a]] += g[a * m + b];
              }
          });
        });
        return acc;
      },
      [](Acc a, const Acc& b) {
        for (size_t i = 0; i < a.size(); ++i) a[i] += b[i];
        return a;
      });
  at::Tensor G = at::empty({k, k}, at::kFloat);
  float* g = G.data_ptr<float>();
  for (int64_t i = 0; i < k * k; ++i) g[i] = float(total[i]);
  return G;
}

void combine_run(at::TensorList out, const Table& t, const at::Tensor& coeffs);

int64_t coeff_count(const at::Tensor& coeffs) {
  TORCH_CHECK(coeffs.dim() == 1 && coeffs.size(0) >= 1 && coeffs.size(0) <= kMaxK,
              "vgs_kernels.combine_: coeffs must have shape [k] with k in 1..4, got ", coeffs.sizes());
  TORCH_CHECK(coeffs.device().is_cpu(), "vgs_kernels.combine_: coeffs is on ", coeffs.device());
  return coeffs.size(0);
}

void combine_cpu(at::TensorList out, const c10::List<std::optional<at::Tensor>>& tensors,
                 const at::Tensor& coeffs) {
  combine_run(out, make_table(tensors, coeff_count(coeffs), out), coeffs);
}

at::Tensor combine_checked(at::TensorList out, const c10::List<std::optional<at::Tensor>>& tensors,
                           const at::Tensor& coeffs) {
  std::vector<int64_t> rest;
  Table t = make_table(tensors, coeff_count(coeffs), out, &rest);
  combine_run(out, t, coeffs);
  return rest_tensor(rest);
}

void combine_run(at::TensorList out, const Table& t, const at::Tensor& coeffs) {
  at::Tensor c32 = coeffs.to(at::kFloat).contiguous();
  const float* c = c32.const_data_ptr<float>();
  // A non-contiguous out is written through a contiguous buffer (correct, not the fast path),
  // except a dense one that shares its gradients' strides (checked ops: then it is a flat range).
  std::vector<at::Tensor> dst(out.size());
  for (size_t j = 0; j < out.size(); ++j)
    dst[j] = t.numel[j] <= 0 || (t.flat && dense(out[j])) ? out[j] : out[j].contiguous();
  at::parallel_for(0, t.first_chunk.back(), 1, [&](int64_t c0, int64_t c1) {
    t.for_chunks(c0, c1, [&](int64_t j, int64_t begin, int64_t n) {
      dispatch_type(t.dtype[j], [&]<typename T>() {
        const typename Elem<T>::raw* p[kMaxK];
        int idx[kMaxK];
        float cm[kMaxK];
        int m = t.present<T>(j, begin, p, idx);
        for (int a = 0; a < m; ++a) cm[a] = c[idx[a]];
        auto* o = reinterpret_cast<typename Elem<T>::raw*>(dst[j].template data_ptr<T>()) + begin;
        dispatch_count(m, [&]<int M>() { combine_slice<M, T>(o, p, cm, n); });
      });
    });
  });
  for (size_t j = 0; j < out.size(); ++j)
    if (t.numel[j] > 0 && !dst[j].is_same(out[j])) out[j].copy_(dst[j]);
}

// The Triton kernels' pointer tables (gram.py, combine.py), from the same classification as the
// C++ kernels (make_table with `rest`): rows [data_ptr of each component (0 = None), 0 up to
// `width`, out's data_ptr (when out is given), numel, first chunk of the row's launch], grouped
// by (dtype, all 16-byte aligned) since each group is one launch. groups: [n_groups, 4] rows of
// (first row, rows, chunks, index of the group's first parameter). rest: parameters the kernels
// cannot read as flat ranges (the caller takes the reference for them). Device-agnostic: it reads
// metadata only, so it serves CUDA tensors (and CPU ones under the Triton interpreter).
std::tuple<at::Tensor, at::Tensor, at::Tensor> pointer_table(const c10::List<std::optional<at::Tensor>>& tensors,
                                                             int64_t k, at::TensorList out, int64_t width) {
  std::optional<at::Device> dev;
  for (const auto& o : out) { dev = o.device(); break; }
  for (size_t i = 0; !dev && i < tensors.size(); ++i) {
    std::optional<at::Tensor> o = tensors.get(i);
    if (o.has_value() && o->defined()) dev = o->device();
  }
  TORCH_CHECK(width >= k, "vgs_kernels.pointer_table: width ", width, " < k = ", k);
  std::vector<int64_t> rest;
  Table t = make_table(tensors, k, out, &rest, dev.value_or(at::kCPU));
  const int64_t cols = width + (out.empty() ? 0 : 1) + 2;
  // Group key: dtype and alignment, in order of first appearance (as the launches run).
  std::vector<std::pair<int, int64_t>> keys;  // (dtype * 2 + aligned, first parameter)
  std::vector<int> group(t.n_params, -1);
  for (int64_t j = 0; j < t.n_params; ++j) {
    if (t.numel[j] <= 0) continue;
    bool aligned = out.empty() || reinterpret_cast<uintptr_t>(out[j].data_ptr()) % 16 == 0;
    for (int64_t i = 0; i < k; ++i) {
      const at::Tensor& g = t.in[i * t.n_params + j];
      if (g.defined()) aligned = aligned && reinterpret_cast<uintptr_t>(g.data_ptr()) % 16 == 0;
    }
    int key = int(t.dtype[j]) * 2 + aligned, gi = 0;
    while (gi < int(keys.size()) && keys[gi].first != key) ++gi;
    if (gi == int(keys.size())) keys.emplace_back(key, j);
    group[j] = gi;
  }
  std::vector<int64_t> count(keys.size(), 0);
  for (int g : group) if (g >= 0) ++count[g];
  std::vector<int64_t> next(keys.size(), 0), chunks(keys.size(), 0);
  at::Tensor groups = at::empty({int64_t(keys.size()), 4}, at::kLong);
  int64_t* gp = groups.data_ptr<int64_t>();
  for (size_t g = 0, row = 0; g < keys.size(); row += count[g], ++g) {
    next[g] = int64_t(row);
    gp[g * 4] = int64_t(row);
    gp[g * 4 + 1] = count[g];
    gp[g * 4 + 3] = keys[g].second;
  }
  at::Tensor table = at::zeros({int64_t(next.empty() ? 0 : next.back() + count.back()), cols}, at::kLong);
  int64_t* tp = table.data_ptr<int64_t>();
  for (int64_t j = 0; j < t.n_params; ++j) {
    int g = group[j];
    if (g < 0) continue;
    int64_t* r = tp + next[g]++ * cols;
    for (int64_t i = 0; i < k; ++i) {
      const at::Tensor& x = t.in[i * t.n_params + j];
      r[i] = x.defined() ? int64_t(reinterpret_cast<uintptr_t>(x.data_ptr())) : 0;
    }
    if (!out.empty()) r[width] = int64_t(reinterpret_cast<uintptr_t>(out[j].data_ptr()));
    r[cols - 2] = t.numel[j];
    r[cols - 1] = chunks[g];
    chunks[g] += (t.numel[j] + kChunk - 1) / kChunk;
  }
  for (size_t g = 0; g < keys.size(); ++g) gp[g * 4 + 2] = chunks[g];
  return {table, groups, rest_tensor(rest)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vgs_kernels, m) {
  m.def("pointer_table(Tensor?[] tensors, int k, Tensor[] out, int width) -> (Tensor, Tensor, Tensor)");
  m.def("gram(Tensor?[] tensors, int k) -> Tensor");
  m.def("combine_(Tensor(a!)[] out, Tensor?[] tensors, Tensor coeffs) -> ()");
  m.def("gram_checked(Tensor?[] tensors, int k) -> (Tensor, Tensor)");
  m.def("combine_checked_(Tensor(a!)[] out, Tensor?[] tensors, Tensor coeffs) -> Tensor");
}

TORCH_LIBRARY_IMPL(vgs_kernels, CompositeExplicitAutograd, m) {
  m.impl("pointer_table", &pointer_table);
}

TORCH_LIBRARY_IMPL(vgs_kernels, CPU, m) {
  m.impl("gram", &gram_cpu);
  m.impl("combine_", &combine_cpu);
  m.impl("gram_checked", &gram_checked);
  m.impl("combine_checked_", &combine_checked);
}
