// Float <-> fp32 conversions that GCC vectorises, shared by the CPU kernels (csrc/multi_tensor.cpp,
// csrc/decomposed_kl.cpp).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include <bit>
#include <cstdint>
#include <type_traits>

namespace vgs {

// Element access through raw storage types so that GCC vectorises the conversions.
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  using raw = float;
  static float load(float x) { return x; }
  static float store(float x) { return x; }
};
template <>
struct Elem<c10::BFloat16> {
  using raw = uint16_t;
  static float load(uint16_t x) { return std::bit_cast<float>(uint32_t(x) << 16); }
  static uint16_t store(float x) {  // round to nearest even, as c10::BFloat16(float)
    uint32_t u = std::bit_cast<uint32_t>(x);
    return x != x ? uint16_t(0x7FC0) : uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
};
template <>
struct Elem<c10::Half> {
  using raw = uint16_t;
  static float load(uint16_t x) { return c10::detail::fp16_ieee_to_fp32_value(x); }
  static uint16_t store(float x) { return c10::detail::fp16_ieee_from_fp32_value(x); }
};

// n elements to/from fp32. GCC vectorises the generic loops; it does not vectorise _Float16
// conversions without AVX512-FP16, hence the F16C intrinsics. noinline: inlined into gram_slice,
// GCC fuses the bfloat16 conversion into the accumulation loop and vectorises it poorly (2.5x slower).
template <typename T>
__attribute__((noinline)) const float* to_float(const typename Elem<T>::raw* __restrict src, int64_t n, float* __restrict buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;  // read in place
  } else {
    int64_t l = 0;
#ifdef __F16C__
    if constexpr (std::is_same_v<T, c10::Half>)
      for (; l + 8 <= n; l += 8)
        _mm256_storeu_ps(buf + l, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + l))));
#endif
    for (; l < n; ++l) buf[l] = Elem<T>::load(src[l]);
    return buf;
  }
}

template <typename T>
void from_float(const float* __restrict x, int64_t n, typename Elem<T>::raw* __restrict dst) {
  int64_t l = 0;
#ifdef __F16C__
  if constexpr (std::is_same_v<T, c10::Half>)
    for (; l + 8 <= n; l += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + l),
                       _mm256_cvtps_ph(_mm256_loadu_ps(x + l), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; l < n; ++l) dst[l] = Elem<T>::store(x[l]);
}

}  // namespace vgs
