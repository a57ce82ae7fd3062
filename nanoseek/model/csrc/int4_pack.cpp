// Quantise a float weight to int4 groups and pack it for _weight_int4pack_mm_for_cpu in one pass,
// into existing buffers: a GRPO rollout copy requantised after every update (model/quant.py). The
// torch path (quantize_int4, then _convert_weight_to_int4pack_for_cpu) makes ~10 passes over
// float32 and int32 temporaries.
//
// int4_quantize_pack_(w (N, K) float32 / bfloat16, group_size, packed (N, K/2) uint8,
// scales_and_zeros (K/g, N, 2) bfloat16) -> (): the same numbers as quant.quantize_int4, operation
// for operation in float32: per group of g along K, scale = bf16((max - min) / 15), zero =
// bf16(min + 8 scale), q = clamp(round((w - (zero - 8 scale)) / scale), 0, 15) (scale 0: divide by 1).
// The packed layout is torch's for AVX512 builds: rows in blocks of 64, each block (K, 32) bytes,
// byte j of column k = q[j][k] | q[j + 32][k] << 4. quant.py checks once that torch packs the same
// way here (an AVX2 build packs blocks of 32) before it uses this.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#ifndef NANOSEEK_OPS
#define NANOSEEK_OPS nanoseek
#endif

namespace {

constexpr int64_t kBlockN = 64;

// One group's scale and zero from its min and max, and the offset and divisor its integers use.
struct GroupParams {
  c10::BFloat16 scale, zero;
  float base, divisor;
};

inline GroupParams group_params(float lo, float hi) {
  const c10::BFloat16 scale((hi - lo) / 15.f);
  const float s = static_cast<float>(scale);
  const c10::BFloat16 zero(lo + 8.f * s);
  return {scale, zero, static_cast<float>(zero) - 8.f * s, s > 0.f ? s : 1.f};
}

#ifdef __AVX512F__
#include <immintrin.h>
// One float32 group, 16 lanes at a time: the scalar loop's operations (min / max are exact in any
// order; the division is IEEE's; roundscale to nearest-even without exceptions is nearbyint in the
// default rounding mode), so the same integers, bit for bit. g must be a multiple of 16.
inline GroupParams quantize_group_avx512(const float* x, int64_t g, uint8_t* q) {
  __m512 lo = _mm512_loadu_ps(x), hi = lo;
  for (int64_t i = 16; i < g; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    lo = _mm512_min_ps(lo, v);
    hi = _mm512_max_ps(hi, v);
  }
  const GroupParams p = group_params(_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi));
  const __m512 base = _mm512_set1_ps(p.base), divisor = _mm512_set1_ps(p.divisor);
  const __m512 top = _mm512_set1_ps(15.f), bottom = _mm512_setzero_ps();
  for (int64_t i = 0; i < g; i += 16) {
    __m512 v = _mm512_div_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), base), divisor);
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(top, _mm512_max_ps(bottom, v));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
  }
  return p;
}
#endif

template <typename T>
GroupParams quantize_group(const T* x, int64_t g, uint8_t* q) {
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, float>) {
    if (g % 16 == 0) return quantize_group_avx512(x, g, q);
  }
#endif
  float lo = static_cast<float>(x[0]), hi = lo;
  for (int64_t i = 0; i < g; ++i) {
    lo = std::min(lo, static_cast<float>(x[i]));
    hi = std::max(hi, static_cast<float>(x[i]));
  }
  const GroupParams p = group_params(lo, hi);
  for (int64_t i = 0; i < g; ++i) {
    const float v = std::nearbyint((static_cast<float>(x[i]) - p.base) / p.divisor);
    q[i] = static_cast<uint8_t>(std::min(15.f, std::max(0.f, v)));
  }
  return p;
}

template <typename T>
void quantize_block(const T* w, int64_t rows, int64_t K, int64_t g, int64_t n0, int64_t N, uint8_t* q,
                    c10::BFloat16* sz) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k0 = 0; k0 < K; k0 += g) {
      const GroupParams p = quantize_group(w + r * K + k0, g, q + r * K + k0);
      c10::BFloat16* out = sz + ((k0 / g) * N + n0 + r) * 2;
      out[0] = p.scale;
      out[1] = p.zero;
    }
  }
}

void int4_quantize_pack_(const at::Tensor& w_in, int64_t group_size, at::Tensor& packed, at::Tensor& sz) {
  TORCH_CHECK(w_in.dim() == 2 && (w_in.scalar_type() == at::kFloat || w_in.scalar_type() == at::kBFloat16),
              "int4_quantize_pack_: expected a float32 or bfloat16 (N, K) weight");
  const at::Tensor w = w_in.contiguous();
  const int64_t N = w.size(0), K = w.size(1), g = group_size;
  TORCH_CHECK(N % kBlockN == 0 && g > 0 && K % g == 0 && K % 2 == 0, "int4_quantize_pack_: N must be a multiple of ",
              kBlockN, " and K of the group size, got ", N, " x ", K, ", groups of ", g);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.numel() == N * K / 2,
              "int4_quantize_pack_: packed must be a contiguous (N, K/2) uint8 tensor");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.numel() == K / g * N * 2,
              "int4_quantize_pack_: scales_and_zeros must be a contiguous (K/g, N, 2) bfloat16 tensor");
  uint8_t* dst = packed.mutable_data_ptr<uint8_t>();
  c10::BFloat16* szp = sz.mutable_data_ptr<c10::BFloat16>();
  at::parallel_for(0, N / kBlockN, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> q(kBlockN * K);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kBlockN;
      if (w.scalar_type() == at::kFloat)
        quantize_block(w.const_data_ptr<float>() + n0 * K, kBlockN, K, g, n0, N, q.data(), szp);
      else
        quantize_block(w.const_data_ptr<c10::BFloat16>() + n0 * K, kBlockN, K, g, n0, N, q.data(), szp);
      uint8_t* out = dst + n0 * K / 2;          // this block's (K, 32) bytes
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < kBlockN / 2; ++j)
          out[k * (kBlockN / 2) + j] = q[j * K + k] | static_cast<uint8_t>(q[(j + kBlockN / 2) * K + k] << 4);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(NANOSEEK_OPS, m) {
  m.def("int4_quantize_pack_(Tensor w, int group_size, Tensor(a!) packed, Tensor(b!) scales_and_zeros) -> ()");
}

TORCH_LIBRARY_IMPL(NANOSEEK_OPS, CPU, m) { m.impl("int4_quantize_pack_", &int4_quantize_pack_); }
