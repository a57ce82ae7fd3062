// One token per row of logits on CPU: temperature -> top-k -> top-p -> min-p -> inverse-CDF draw,
// or argmax for greedy rows, without sorting the vocabulary. Why a kernel, and the torch path it
// agrees with token for token: nanoseek/engine/sampling.py (`draw`).
//
// sample_rows(logits (R, V) float32 / bfloat16, unit stride in the last dim, temperature (R,)
// float32 (<= 0: greedy), top_k (R,) int64 (<= 0 or >= V: off), top_p (R,) float32 (>= 1: off),
// min_p (R,) float32 (0: off), uniform (R,) float64 in [0, 1)) -> (token (R,) int64, kept (R,)
// int64: how many tokens the row drew from, those with a weight; 1 for greedy rows).
//
// A random row, s = logit / temperature, y = s - max s, e = e^y:
//   1. one vectorised read of the row stores y and e, the sum of e (float64, per 256-token block)
//      and, per depth D in kDepth, how many tokens have y >= -D and their mass;
//   2. each filter keeps a prefix of the row in the torch path's order (s descending, then id): the
//      tokens with y >= -D for the smallest D whose count (top-k) or mass (top-p) or min-p's floor
//      shows it holds that prefix are the candidates (`refine` splits a wide gap between depths);
//   3. on the candidates, kept in id order: the k-th largest s by nth_element, top-p's cut by a
//      weighted quickselect (ties at the cut taken in id order, as a stable sort would), min-p's floor;
//      a deeper D when the candidates cannot decide (the last depth holds every token with a weight);
//   4. the draw: the first token, in id order, whose running weight exceeds uniform * the kept
//      weight (float64). Rows without filters draw over the whole row through the block sums.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(NANOSEEK_GENERIC)
#include <immintrin.h>
#define NANOSEEK_AVX512 1
#endif

#ifndef NANOSEEK_OPS
#define NANOSEEK_OPS nanoseek
#endif

namespace {

constexpr int64_t kBlock = 256;                        // weights per block sum (the unfiltered draw)
constexpr int kLevels = 6;                             // candidate depths D: s - max s >= -D
constexpr float kDepth[kLevels] = {2.f, 4.f, 8.f, 16.f, 32.f, 87.f};   // the last: every token with a weight
constexpr float kNoWeight = -87.f;                     // below this, e^y is taken as 0 (e^-87 ~ 1.6e-38)
constexpr int64_t kManyCandidates = 1024;              // more at the first level that could do: `refine`

struct Params {
  float temperature, top_p, min_p;
  int64_t top_k;
  double uniform;
};

struct Candidate {
  float s, e;                                          // logit / temperature, its weight
  int32_t id;
};

struct Scratch {                                       // one per thread, reused across rows and calls
  std::vector<float> weight, depth;                    // (V,) e = exp(y), y = s - max s (0 where no weight)
  std::vector<double> block;                           // (V / kBlock,) sums of weight
  std::vector<Candidate> candidates, work, kept;       // in id order; top-p's working copy; the drawn-from
  std::vector<int32_t> ids;                            // (V,) ids gathered before their values
  std::vector<float> values;                           // top-k's working copy
};

struct Stats {                                         // pass 2's sums, per level
  double total = 0;                                    // sum of all weights
  int64_t count[kLevels] = {};
  double mass[kLevels] = {};
};

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

#ifdef NANOSEEK_AVX512
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {   // bf16 is float32's top half: widen and shift
  const __m256i raw = _mm256_maskz_loadu_epi16(m, reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// e^y for y <= 0, 16 at a time: 2^n e^f, n = round(y log2 e), |f| <= ln 2 / 2, e^f by a degree-6
// Taylor polynomial (relative error < 2e-7); 0 below kNoWeight
inline __m512 exp16(__m512 y) {
  const __mmask16 some = _mm512_cmp_ps_mask(y, _mm512_set1_ps(kNoWeight), _CMP_GE_OQ);
  y = _mm512_max_ps(y, _mm512_set1_ps(kNoWeight));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.69314718f), y);
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_maskz_mov_ps(some, _mm512_scalef_ps(p, n));
}
#endif

inline float exp1(float y) { return y >= kNoWeight ? std::exp(y) : 0.f; }

template <typename T>
float row_max(const T* x, int64_t V) {
  float best = -INFINITY;
#ifdef NANOSEEK_AVX512
  __m512 mx = _mm512_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 16 <= V; j += 16) mx = _mm512_max_ps(mx, load16(x + j, 0xFFFF));
  best = _mm512_reduce_max_ps(mx);
  for (; j < V; ++j) best = std::max(best, to_float(x[j]));
#else
  for (int64_t j = 0; j < V; ++j) best = std::max(best, to_float(x[j]));
#endif
  return best;
}

// weight[j] = e^y, depth[j] = y = x[j] / t - top, per-block float64 sums, and (Levels) each
// level's count and mass
template <bool Levels, typename T>
Stats weigh(const T* x, int64_t V, float t, float top, Scratch& w) {
  Stats st;
  float *e = w.weight.data(), *d = w.depth.data();
  for (int64_t b = 0; b * kBlock < V; ++b) {
    const int64_t lo = b * kBlock, hi = std::min(V, lo + kBlock);
    double sum = 0;
#ifdef NANOSEEK_AVX512
    __m512d acc = _mm512_setzero_pd();
    __m512 mass[kLevels];                             // 256 weights per block: float lanes suffice here
    __m512i count[kLevels];
    for (int l = 0; l < kLevels; ++l) mass[l] = _mm512_setzero_ps(), count[l] = _mm512_setzero_si512();
    for (int64_t j = lo; j < hi; j += 16) {
      const __mmask16 m = lanes(hi - j);
      const __m512 y = _mm512_sub_ps(_mm512_div_ps(load16(x + j, m), _mm512_set1_ps(t)), _mm512_set1_ps(top));
      const __m512 ej = _mm512_maskz_mov_ps(m, exp16(y));
      _mm512_mask_storeu_ps(e + j, m, ej);
      _mm512_mask_storeu_ps(d + j, m, y);
      acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_castps512_ps256(ej)));
      acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(ej), 1))));
      for (int l = Levels ? 0 : kLevels - 1; l < kLevels; ++l) {   // the last level: tokens with a weight
        const __mmask16 in = _mm512_mask_cmp_ps_mask(m, y, _mm512_set1_ps(-kDepth[l]), _CMP_GE_OQ);
        count[l] = _mm512_mask_add_epi32(count[l], in, count[l], _mm512_set1_epi32(1));
        mass[l] = _mm512_mask_add_ps(mass[l], in, mass[l], ej);
      }
    }
    for (int l = Levels ? 0 : kLevels - 1; l < kLevels; ++l)
      st.mass[l] += _mm512_reduce_add_ps(mass[l]), st.count[l] += _mm512_reduce_add_epi32(count[l]);
    sum = _mm512_reduce_add_pd(acc);
#else
    for (int64_t j = lo; j < hi; ++j) {
      const float y = d[j] = to_float(x[j]) / t - top;
      sum += (e[j] = exp1(y));
      for (int l = Levels ? 0 : kLevels - 1; l < kLevels; ++l)
        if (y >= -kDepth[l]) ++st.count[l], st.mass[l] += e[j];
    }
#endif
    w.block[b] = sum;
    st.total += sum;
  }
  return st;
}

// the row's tokens with y >= -depth (y as `weigh` stored it), in id order
template <typename T>
void gather_candidates(const T* x, int64_t V, float t, float depth, Scratch& w) {
  w.candidates.clear();
  const float* d = w.depth.data();
  int32_t* ids = w.ids.data();
  int64_t n = 0, j = 0;
#ifdef NANOSEEK_AVX512
  const __m512i step = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (; j < V; j += 16) {
    const __mmask16 m = lanes(V - j);
    const __mmask16 in = _mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, d + j), _mm512_set1_ps(-depth), _CMP_GE_OQ);
    _mm512_mask_compressstoreu_epi32(ids + n, in, _mm512_add_epi32(step, _mm512_set1_epi32(static_cast<int32_t>(j))));
    n += _mm_popcnt_u32(in);
  }
#endif
  for (; j < V; ++j)
    if (d[j] >= -depth) ids[n++] = static_cast<int32_t>(j);
  for (int64_t i = 0; i < n; ++i) w.candidates.push_back({to_float(x[ids[i]]) / t, w.weight[ids[i]], ids[i]});
}

// Whether the tokens with s - top >= -depth (count of them, their weight `mass`) could hold the
// kept prefix: enough of them for top-k, enough mass for top-p, or min-p's floor above the depth
bool could_hold(int64_t count, double mass, float depth, const Params& p, int64_t V, double total) {
  const bool top_k = p.top_k > 0 && p.top_k < V;
  if (top_k && p.top_k <= count) return true;
  if (top_k && p.top_p < 1.f) return false;           // top-p needs the whole top-k set's mass
  if (p.top_p < 1.f && mass >= static_cast<double>(p.top_p) * total * (1 + 1e-5)) return true;
  return p.min_p > 0.f && std::log(static_cast<double>(p.min_p)) > -depth + 1e-3;
}

// Between two levels (a row flatter than the levels expect): the shallowest of kSteps depths in
// (shallow, deep] that could hold the kept prefix, from the stored y and e, so fewer candidates
// are gathered. Returns `deep` if none is.
float refine(const Scratch& w, int64_t V, float shallow, float deep, const Params& p, double total) {
  constexpr int kSteps = 8;
  float depth[kSteps];
  int64_t count[kSteps] = {};
  double mass[kSteps] = {};
  for (int i = 0; i < kSteps; ++i) depth[i] = shallow + (deep - shallow) * (i + 1) / kSteps;
  const float *e = w.weight.data(), *d = w.depth.data();
#ifdef NANOSEEK_AVX512
  for (int64_t lo = 0; lo < V; lo += kBlock) {       // float lanes per block, as `weigh`
    __m512 m[kSteps];
    __m512i c[kSteps];
    for (int i = 0; i < kSteps; ++i) m[i] = _mm512_setzero_ps(), c[i] = _mm512_setzero_si512();
    for (int64_t j = lo; j < std::min(V, lo + kBlock); j += 16) {
      const __mmask16 k = lanes(V - j);
      const __m512 y = _mm512_maskz_loadu_ps(k, d + j), ej = _mm512_maskz_loadu_ps(k, e + j);
      for (int i = 0; i < kSteps; ++i) {
        const __mmask16 in = _mm512_mask_cmp_ps_mask(k, y, _mm512_set1_ps(-depth[i]), _CMP_GE_OQ);
        c[i] = _mm512_mask_add_epi32(c[i], in, c[i], _mm512_set1_epi32(1));
        m[i] = _mm512_mask_add_ps(m[i], in, m[i], ej);
      }
    }
    for (int i = 0; i < kSteps; ++i) mass[i] += _mm512_reduce_add_ps(m[i]), count[i] += _mm512_reduce_add_epi32(c[i]);
  }
#else
  for (int64_t j = 0; j < V; ++j)
    for (int i = 0; i < kSteps; ++i)
      if (d[j] >= -depth[i]) ++count[i], mass[i] += e[j];
#endif
  for (int i = 0; i + 1 < kSteps; ++i)
    if (could_hold(count[i], mass[i], depth[i], p, V, total)) return depth[i];
  return deep;
}

// smallest level whose counts / mass could hold the kept prefix (kLevels - 1 always can)
int first_level(const Stats& st, const Params& p, int64_t V) {
  for (int l = 0; l + 1 < kLevels; ++l)
    if (could_hold(st.count[l], st.mass[l], kDepth[l], p, V, st.total)) return l;
  return kLevels - 1;
}

// Top-p over the candidates with s >= kth: in (s descending, id ascending) order a token stays
// while the mass before it is below `reach`. Found by weighted quickselect instead of a sort: split
// at a pivot value into > | == | <, go to the part where the mass reaches `reach`. Keeps s > value
// and the first `ties` tokens (in id order) with s == value; false when their mass falls short.
struct Cut {
  float value;
  int64_t ties;
};
bool top_p_cut(Scratch& w, float kth, double reach, Cut& cut) {
  auto& items = w.work;
  items.clear();
  for (const Candidate& c : w.candidates)
    if (c.s >= kth) items.push_back(c);
  double base = 0;                                    // mass of the tokens above the range
  auto lo = items.begin(), hi = items.end();
  while (lo < hi) {
    const float pivot = (lo + (hi - lo) / 2)->s;
    const auto eq = std::partition(lo, hi, [pivot](const Candidate& c) { return c.s > pivot; });
    const auto lt = std::partition(eq, hi, [pivot](const Candidate& c) { return c.s == pivot; });
    double above = 0, same = 0;
    for (auto i = lo; i < eq; ++i) above += i->e;
    for (auto i = eq; i < lt; ++i) same += i->e;
    if (base + above >= reach) {                      // the last kept token lies above the pivot
      hi = eq;
      continue;
    }
    if (base + above + same >= reach) {               // among the pivot's ties, taken in id order
      double before = base + above;
      int64_t ties = 0;
      for (; ties < lt - eq && before < reach; ++ties) before += eq->e;
      cut = {pivot, ties};
      return true;
    }
    base += above + same;
    lo = lt;
  }
  return false;
}

// The row's draw once its candidates are gathered (in id order): top-k, top-p, min-p as the torch
// path, then the inverse CDF over what they keep. Returns {token, kept} or {-1, 0} when the
// result depends on tokens past the candidates (take a deeper level). `complete`: the candidates
// are every token with a weight; `depth`: every other token has s - top < -depth.
std::pair<int64_t, int64_t> draw_filtered(Scratch& w, const Params& p, int64_t V, double total, float top,
                                          float depth, bool complete) {
  const auto& cands = w.candidates;
  const int64_t n = static_cast<int64_t>(cands.size());
  bool decided = complete;
  float kth = -INFINITY;
  double mass = total;                                // top-p's normaliser: the top-k set's weight
  if (p.top_k > 0 && p.top_k < V) {
    if (p.top_k <= n) {                               // ties with the k-th stay (vLLM)
      auto& s = w.values;
      s.clear();
      for (const Candidate& c : cands) s.push_back(c.s);
      std::nth_element(s.begin(), s.begin() + (p.top_k - 1), s.end(), std::greater<float>());
      kth = s[p.top_k - 1];
      mass = 0;
      for (const Candidate& c : cands) mass += c.s >= kth ? c.e : 0.f;
      decided = true;                                 // every other token is below the k-th
    } else if (p.top_p < 1.f && !complete) {
      return {-1, 0};                                 // top-p needs the whole top-k set's mass
    }
  }
  Cut cut{-INFINITY, 0};
  bool cuts = false;
  if (p.top_p < 1.f && top_p_cut(w, kth, static_cast<double>(p.top_p) * mass, cut)) cuts = decided = true;
  float floor = -INFINITY;
  if (p.min_p > 0.f) {
    const double log_min_p = std::log(static_cast<double>(p.min_p));
    floor = top + static_cast<float>(log_min_p);
    // tokens past the candidates lie below the floor when some candidate does, or when log(min_p)
    // is above -depth by more than rounding
    const float margin = 1e-5f * (std::fabs(top) + depth) + 1e-6f;
    for (const Candidate& c : cands) decided = decided || c.s < floor;
    decided = decided || log_min_p > -depth + margin;
  }
  if (!decided) return {-1, 0};
  w.kept.clear();
  double sum = 0;
  int64_t ties = 0;
  for (const Candidate& c : cands) {
    if (c.s < kth || c.s < floor) continue;
    if (cuts && (c.s < cut.value || (c.s == cut.value && ties++ >= cut.ties))) continue;
    if (c.e > 0) w.kept.push_back(c), sum += c.e;
  }
  const double target = p.uniform * sum;
  double run = 0;
  for (const Candidate& c : w.kept)
    if ((run += c.e) > target) return {c.id, static_cast<int64_t>(w.kept.size())};
  return {w.kept.empty() ? cands[0].id : w.kept.back().id, static_cast<int64_t>(w.kept.size())};
}

// inverse CDF over the row's weights in id order, through the block sums
int64_t draw_all(const Scratch& w, int64_t V, double total, double u) {
  const float* e = w.weight.data();
  double target = u * total, run = 0;
  int64_t last = 0;                                   // the last block with a weight, if rounding runs past
  for (int64_t b = 0; b * kBlock < V; ++b) {
    if (w.block[b] > 0) last = b;
    if (run + w.block[b] <= target) {
      run += w.block[b];
      continue;
    }
    const int64_t hi = std::min(V, (b + 1) * kBlock);
    for (int64_t j = b * kBlock; j < hi; ++j) {
      run += e[j];
      if (run > target && e[j] > 0) return j;
    }
    last = b;
    break;
  }
  for (int64_t j = std::min(V, (last + 1) * kBlock) - 1; j >= 0; --j)
    if (e[j] > 0) return j;
  return 0;
}

// the first j with x[j] == best, as torch.argmax
template <typename T>
int64_t first_max(const T* x, int64_t V, float best) {
  int64_t j = 0;
#ifdef NANOSEEK_AVX512
  for (; j < V; j += 16) {
    const __mmask16 m = lanes(V - j);
    const __mmask16 hit = _mm512_mask_cmp_ps_mask(m, load16(x + j, m), _mm512_set1_ps(best), _CMP_EQ_OQ);
    if (hit) return j + __builtin_ctz(hit);
  }
#endif
  for (; j < V; ++j)
    if (to_float(x[j]) == best) return j;
  return 0;
}

template <typename T>
std::pair<int64_t, int64_t> sample_row(const T* x, int64_t V, const Params& p, Scratch& w) {
  const float best = row_max(x, V);
  if (!(p.temperature > 0.f)) return {first_max(x, V, best), 1};      // greedy
  const float top = best / p.temperature;
  const bool top_k = p.top_k > 0 && p.top_k < V, filtered = top_k || p.top_p < 1.f || p.min_p > 0.f;
  if (!filtered) {
    const Stats st = weigh<false>(x, V, p.temperature, top, w);
    return {draw_all(w, V, st.total, p.uniform), st.count[kLevels - 1]};
  }
  const Stats st = top_k || p.top_p < 1.f ? weigh<true>(x, V, p.temperature, top, w)
                                          : weigh<false>(x, V, p.temperature, top, w);   // min-p alone
  const int first = first_level(st, p, V);
  if (first > 0 && first < kLevels - 1 && st.count[first] > kManyCandidates) {
    const float depth = refine(w, V, kDepth[first - 1], kDepth[first], p, st.total);
    if (depth < kDepth[first]) {
      gather_candidates(x, V, p.temperature, depth, w);
      const auto drawn = draw_filtered(w, p, V, st.total, top, depth, false);
      if (drawn.first >= 0) return drawn;
    }
  }
  for (int l = first; l < kLevels; ++l) {
    gather_candidates(x, V, p.temperature, kDepth[l], w);
    const auto drawn = draw_filtered(w, p, V, st.total, top, kDepth[l], l == kLevels - 1);
    if (drawn.first >= 0) return drawn;
  }
  return {0, 0};                                      // unreachable: the last level always decides
}

template <typename T>
void sample_rows_impl(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                      const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& uniform,
                      at::Tensor& token, at::Tensor& kept) {
  const int64_t R = logits.size(0), V = logits.size(1), stride = logits.stride(0);
  const T* x = logits.const_data_ptr<T>();
  const float* tp = temperature.const_data_ptr<float>();
  const int64_t* kp = top_k.const_data_ptr<int64_t>();
  const float* pp = top_p.const_data_ptr<float>();
  const float* mp = min_p.const_data_ptr<float>();
  const double* up = uniform.const_data_ptr<double>();
  int64_t* out = token.mutable_data_ptr<int64_t>();
  int64_t* size = kept.mutable_data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    thread_local Scratch w;                           // kept between calls: no (V,) allocations per step
    w.weight.resize(V);
    w.depth.resize(V);
    w.block.resize((V + kBlock - 1) / kBlock);
    w.ids.resize(V);
    for (int64_t r = begin; r < end; ++r) {
      const Params p{tp[r], pp[r], mp[r], kp[r], up[r]};
      std::tie(out[r], size[r]) = sample_row(x + r * stride, V, p, w);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sample_rows(const at::Tensor& logits, const at::Tensor& temperature,
                                               const at::Tensor& top_k, const at::Tensor& top_p,
                                               const at::Tensor& min_p, const at::Tensor& uniform) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0 && logits.size(1) < (int64_t{1} << 31),
              "sample_rows: expected logits (R, V), 0 < V < 2^31, got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
              "sample_rows: logits must be float32 or bfloat16");
  const int64_t R = logits.size(0);
  const auto column = [R](const at::Tensor& t, at::ScalarType type, const char* name) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == R && t.scalar_type() == type, "sample_rows: ", name,
                " must be (R,) ", c10::toString(type));
    return t.contiguous();
  };
  const auto t = column(temperature, at::kFloat, "temperature"), k = column(top_k, at::kLong, "top_k");
  const auto p = column(top_p, at::kFloat, "top_p"), m = column(min_p, at::kFloat, "min_p");
  const auto u = column(uniform, at::kDouble, "uniform");
  const auto x = logits.stride(1) == 1 ? logits : logits.contiguous();
  auto token = at::empty({R}, logits.options().dtype(at::kLong));
  auto kept = at::empty({R}, logits.options().dtype(at::kLong));
  if (x.scalar_type() == at::kBFloat16)
    sample_rows_impl<c10::BFloat16>(x, t, k, p, m, u, token, kept);
  else
    sample_rows_impl<float>(x, t, k, p, m, u, token, kept);
  return {token, kept};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(NANOSEEK_OPS, m) {
  m.def("sample_rows(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, "
        "Tensor uniform) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(NANOSEEK_OPS, CPU, m) { m.impl("sample_rows", &sample_rows); }
