// Decode attention on CPU: one query token per row against that row's cached keys, each unmasked
// key and value read once for all the query heads that share it (GQA). Why a kernel, and how it is
// built and loaded: nanoseek/model/kernels.py.
//
// q (B, H, Dk), k (Hkv, B, S, Dk), v (Hkv, B, S, Dv), any strides but a unit one in the last dim;
// mask (B, S) bool -> out (B, H, Dv). Query head h reads kv head h / G, G = H / Hkv. Scores,
// softmax and the weighted sum of values accumulate in float32 whatever the input dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX512F__) && !defined(NANOSEEK_GENERIC)
#include <immintrin.h>
#define NANOSEEK_AVX512 1
#endif

#ifndef NANOSEEK_OPS
#define NANOSEEK_OPS nanoseek
#endif

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// the G query heads of one (kv head, row) item, converted to float32 and pre-scaled -> out (G, D)
template <typename T>
void load_queries(const T* q, int64_t stride, int64_t G, int64_t D, float scale, float* out) {
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = to_float(q[g * stride + d]) * scale;
}

#ifdef NANOSEEK_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {     // bf16 is float32's top half: widen and shift
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// dot products of one key with NG <= 4 query heads; D % 16 == 0. The four 16-lane partial sums
// (zeros past NG) are folded into one __m128 by two unpack/shuffle rounds and a lane sum, instead
// of four separate horizontal reductions (which took most of the time in a plain-C++ version)
template <int NG, typename T>
inline __m128 dot4(const float* q, int64_t D, const T* k) {
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t d = 0; d < D; d += 16) {
    const __m512 kd = load16(k + d);
    for (int i = 0; i < NG; ++i) a[i] = _mm512_fmadd_ps(_mm512_loadu_ps(q + i * D + d), kd, a[i]);
  }
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
  const __m512 u = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 h = _mm512_add_ps(u, _mm512_shuffle_f32x4(u, u, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_add_ps(_mm512_castps512_ps128(h), _mm512_extractf32x4_ps(h, 1));
}

// e^x, x <= 0, 16 at a time: e^x = 2^n * e^f with n = round(x log2 e), |f| <= ln 2 / 2, e^f by
// its degree-6 Taylor polynomial (remainder < 2e-7 relative there); scalef applies 2^n
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.69314718f), x);
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// max / sum over the four 128-bit lanes: per column of a (n, 4) array read 16 floats at a time
template <typename Op>
inline __m128 fold4(__m512 x, Op op) {
  const __m128 a = op(_mm512_castps512_ps128(x), _mm512_extractf32x4_ps(x, 1));
  return op(a, op(_mm512_extractf32x4_ps(x, 2), _mm512_extractf32x4_ps(x, 3)));
}
inline __mmask16 tail_mask(int64_t lanes) { return static_cast<__mmask16>((1u << lanes) - 1); }

// acc[g][c] += p_g * v[c * 16 ...] for NG heads and NC 16-float chunks, accumulators in registers
template <int NG, int NC, typename T>
void weigh_values(const float* scores, const int32_t* idx, int64_t n, const T* v, int64_t stride, float* out,
                  int64_t Dv, const float* inv) {
  __m512 acc[NG][NC];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const T* vs = v + idx[j] * stride;
    __m512 vd[NC];
    for (int c = 0; c < NC; ++c) vd[c] = load16(vs + 16 * c);
    for (int g = 0; g < NG; ++g) {
      const __m512 p = _mm512_set1_ps(scores[4 * j + g]);
      for (int c = 0; c < NC; ++c) acc[g][c] = _mm512_fmadd_ps(p, vd[c], acc[g][c]);
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(out + g * Dv + 16 * c, _mm512_mul_ps(acc[g][c], _mm512_set1_ps(inv[g])));
}

// NG <= 4 query heads of one (kv head, row) item: q (NG, Dk) -> out (NG, Dv); Dk, Dv % 16 == 0.
// scores (n, 4): a key's scores side by side, so each step below is whole vectors (lanes past NG
// hold zeros and are never read back)
template <int NG, typename T>
void attend_group(const float* q, int64_t Dk, int64_t Dv, const T* k, int64_t kstride, const T* v, int64_t vstride,
                  const int32_t* idx, int64_t n, float* scores, float* out) {
  for (int64_t j = 0; j < n; ++j) _mm_storeu_ps(scores + 4 * j, dot4<NG>(q, Dk, k + idx[j] * kstride));
  const int64_t full = 4 * n / 16 * 16, rest = 4 * n - full;      // floats in whole vectors, and after
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < full; i += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(scores + i));
  if (rest) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, tail_mask(rest), scores + full));
  const __m512 best = _mm512_broadcast_f32x4(fold4(mx, [](__m128 a, __m128 b) { return _mm_max_ps(a, b); }));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < full; i += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + i), best));
    _mm512_storeu_ps(scores + i, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (rest) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail_mask(rest), scores + full), best));
    _mm512_mask_storeu_ps(scores + full, tail_mask(rest), e);
    sum = _mm512_mask_add_ps(sum, tail_mask(rest), sum, e);
  }
  float inv[4];
  _mm_storeu_ps(inv, fold4(sum, [](__m128 a, __m128 b) { return _mm_add_ps(a, b); }));
  for (float& x : inv) x = x > 0.f ? 1.f / x : 0.f;       // a row with no visible key gives zeros
  for (int64_t d0 = 0; d0 < Dv; d0 += 64) {               // up to 4 heads x 4 chunks = 16 accumulators
    const T* vd = v + d0;
    float* o = out + d0;
    switch (std::min<int64_t>(4, (Dv - d0) / 16)) {
      case 4: weigh_values<NG, 4>(scores, idx, n, vd, vstride, o, Dv, inv); break;
      case 3: weigh_values<NG, 3>(scores, idx, n, vd, vstride, o, Dv, inv); break;
      case 2: weigh_values<NG, 2>(scores, idx, n, vd, vstride, o, Dv, inv); break;
      default: weigh_values<NG, 1>(scores, idx, n, vd, vstride, o, Dv, inv);
    }
  }
}

// one (kv head, row) item, its G query heads in groups of 4: q (G, Dk) -> out (G, Dv)
template <typename T>
void attend_item(const float* q, int64_t G, int64_t Dk, int64_t Dv, const T* k, int64_t kstride, const T* v,
                 int64_t vstride, const int32_t* idx, int64_t n, float* scores, float* out) {
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    const float* qg = q + g0 * Dk;
    float* og = out + g0 * Dv;
    switch (std::min<int64_t>(4, G - g0)) {
      case 4: attend_group<4>(qg, Dk, Dv, k, kstride, v, vstride, idx, n, scores, og); break;
      case 3: attend_group<3>(qg, Dk, Dv, k, kstride, v, vstride, idx, n, scores, og); break;
      case 2: attend_group<2>(qg, Dk, Dv, k, kstride, v, vstride, idx, n, scores, og); break;
      default: attend_group<1>(qg, Dk, Dv, k, kstride, v, vstride, idx, n, scores, og);
    }
  }
}
#endif

// the same in plain C++ (any head dim, any CPU): scores (G, n)
template <typename T>
void attend_item_generic(const float* q, int64_t G, int64_t Dk, int64_t Dv, const T* k, int64_t kstride, const T* v,
                         int64_t vstride, const int32_t* idx, int64_t n, float* scores, float* out) {
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * n;
    float best = -INFINITY, sum = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      const T* ks = k + idx[j] * kstride;
      float dot = 0.f;
      for (int64_t d = 0; d < Dk; ++d) dot += q[g * Dk + d] * to_float(ks[d]);
      best = std::max(best, sg[j] = dot);
    }
    for (int64_t j = 0; j < n; ++j) sum += (sg[j] = std::exp(sg[j] - best));
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    float* o = out + g * Dv;
    std::fill(o, o + Dv, 0.f);
    for (int64_t j = 0; j < n; ++j) {
      const T* vs = v + idx[j] * vstride;
      for (int64_t d = 0; d < Dv; ++d) o[d] += sg[j] * to_float(vs[d]);
    }
    for (int64_t d = 0; d < Dv; ++d) o[d] *= inv;
  }
}

template <typename T>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                           double scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), Dk = q.size(2), Dv = v.size(3);
  const int64_t Hkv = k.size(0), S = k.size(2), G = H / Hkv;
  bool vector = false;
#ifdef NANOSEEK_AVX512
  vector = Dk % 16 == 0 && Dv % 16 == 0;
#endif
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  const bool* mp = mask.const_data_ptr<bool>();
  T* op = out.mutable_data_ptr<T>();
  // one work item per (kv head, row): its keys and values are read by exactly one thread
  at::parallel_for(0, Hkv * B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * Dk), scores(std::max<int64_t>(G, 4) * S), o(G * Dv);
    std::vector<int32_t> idx(S);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / B, b = item % B;
      load_queries(qp + b * q.stride(0) + h * G * q.stride(1), q.stride(1), G, Dk, static_cast<float>(scale), qf.data());
      int64_t n = 0;                                       // the row's visible keys, in order
      for (int64_t s = 0; s < S; ++s)
        if (mp[b * S + s]) idx[n++] = static_cast<int32_t>(s);
      const T* kb = kp + h * k.stride(0) + b * k.stride(1);
      const T* vb = vp + h * v.stride(0) + b * v.stride(1);
#ifdef NANOSEEK_AVX512
      if (vector)
        attend_item(qf.data(), G, Dk, Dv, kb, k.stride(2), vb, v.stride(2), idx.data(), n, scores.data(), o.data());
#endif
      if (!vector)
        attend_item_generic(qf.data(), G, Dk, Dv, kb, k.stride(2), vb, v.stride(2), idx.data(), n, scores.data(),
                            o.data());
      T* dst = op + (b * H + h * G) * Dv;
      for (int64_t i = 0; i < G * Dv; ++i) dst[i] = static_cast<T>(o[i]);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                            double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 2,
              "decode_attention: expected q (B, H, Dk), k (Hkv, B, S, Dk), v (Hkv, B, S, Dv), mask (B, S)");
  TORCH_CHECK(k.size(0) == v.size(0) && k.size(1) == v.size(1) && k.size(2) == v.size(2) &&
                  k.size(1) == q.size(0) && k.size(3) == q.size(2) && k.size(0) > 0 && q.size(1) % k.size(0) == 0 &&
                  mask.size(0) == q.size(0) && mask.size(1) == k.size(2),
              "decode_attention: shapes do not match: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(),
              ", mask ", mask.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16) &&
                  mask.scalar_type() == at::kBool,
              "decode_attention: q, k and v must share a dtype, float32 or bfloat16; mask must be bool");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: k and v need a unit stride in the last dim");
  const auto qc = q.stride(2) == 1 ? q : q.contiguous();     // a fused qkv projection's q is strided
  const auto mc = mask.contiguous();
  auto out = at::empty({q.size(0), q.size(1), v.size(3)}, q.options());
  if (q.scalar_type() == at::kBFloat16)
    decode_attention_impl<c10::BFloat16>(qc, k, v, mc, scale, out);
  else
    decode_attention_impl<float>(qc, k, v, mc, scale, out);
  return out;
}

}  // namespace

TORCH_LIBRARY(NANOSEEK_OPS, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(NANOSEEK_OPS, CPU, m) { m.impl("decode_attention", &decode_attention); }
