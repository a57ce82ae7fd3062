// Small-batch int8 linear on CPU through oneDNN's prepacked weights. Why, and when the model uses
// it: nanoseek/model/kernels.py.
//
// int8_pack(weight (N, K) int8) -> handle: the weight reordered once into oneDNN's blocked layout
// (onednn::qlinear_prepack), kept in this library until int8_free(handle).
// int8_repack(handle, weight): the same slot holds a new weight of the same shape (a GRPO rollout
// copy requantised after each update, without a new handle per step).
// int8_free(handle): drop the packed weight; the handle answers nothing until repacked.
// int8_linear(x (M, K) float32 / bfloat16, handle, w_scale (N,) float32) -> (M, N) in x's dtype:
// x quantised per row (symmetric, 127 / absmax, as model/quant.py's quantize_rows_int8), shifted
// to uint8 (+128, the zero point oneDNN's u8 x s8 kernels expect), multiplied by the packed
// weight, and scaled back by each row's and each output channel's scale.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

#ifndef NANOSEEK_OPS
#define NANOSEEK_OPS nanoseek
#endif

namespace {

struct Packed {
  at::Tensor weight;      // oneDNN's opaque layout
  at::Tensor zero_point;  // (N,) int64 zeros: the weights are symmetric
  int64_t n = 0, k = 0;
};

std::mutex registry_lock;
std::vector<Packed> registry;

Packed prepack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar, "int8_pack: expected an int8 (N, K) weight");
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("onednn::qlinear_prepack", "");
  torch::jit::Stack stack{weight.contiguous(), c10::IValue()};
  op.callBoxed(&stack);
  return {stack[0].toTensor(), at::zeros({weight.size(0)}, at::kLong), weight.size(0), weight.size(1)};
}

int64_t int8_pack(const at::Tensor& weight) {
  Packed packed = prepack(weight);
  std::lock_guard<std::mutex> guard(registry_lock);
  registry.push_back(std::move(packed));
  return static_cast<int64_t>(registry.size()) - 1;
}

void int8_repack(int64_t handle, const at::Tensor& weight) {
  Packed packed = prepack(weight);
  std::lock_guard<std::mutex> guard(registry_lock);
  TORCH_CHECK(handle >= 0 && handle < static_cast<int64_t>(registry.size()), "int8_repack: unknown handle ", handle);
  registry[handle] = std::move(packed);
}

void int8_free(int64_t handle) {
  std::lock_guard<std::mutex> guard(registry_lock);
  TORCH_CHECK(handle >= 0 && handle < static_cast<int64_t>(registry.size()), "int8_free: unknown handle ", handle);
  registry[handle] = Packed{};
}

template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, int64_t stride, uint8_t* q, float* scale) {
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* row = x + m * stride;
      float amax = 0.f;
#pragma omp simd reduction(max : amax)
      for (int64_t i = 0; i < K; ++i) amax = std::max(amax, std::abs(static_cast<float>(row[i])));
      amax = std::max(amax, 1e-30f);
      const float inv = (1.f / amax) * 127.f;      // torch's 127 / amax: reciprocal, then multiply
      uint8_t* qm = q + m * K;
#pragma omp simd
      for (int64_t i = 0; i < K; ++i)       // |x * inv| <= 127: the shifted value fits in uint8
        qm[i] = static_cast<uint8_t>(static_cast<int32_t>(std::nearbyint(static_cast<float>(row[i]) * inv)) + 128);
      scale[m] = amax / 127.f;
    }
  });
}

// out[m, n] = acc[m, n] * scale[m], in chunks of whole rows' columns (no division per element)
template <typename T>
void scale_rows(const float* acc, const float* scale, int64_t M, int64_t N, T* out) {
  const int64_t chunk = 4096;
  const int64_t per_row = (N + chunk - 1) / chunk;
  at::parallel_for(0, M * per_row, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t m = item / per_row, n0 = item % per_row * chunk, n1 = std::min(N, n0 + chunk);
      const float s = scale[m];
      const float* a = acc + m * N;
      T* o = out + m * N;
      for (int64_t n = n0; n < n1; ++n) o[n] = static_cast<T>(a[n] * s);
    }
  });
}

at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& handle_t, const at::Tensor& w_scale) {
  TORCH_CHECK(handle_t.numel() == 1 && handle_t.scalar_type() == at::kLong && handle_t.is_cpu(),
              "int8_linear: handle must be one int64 on the CPU");
  const int64_t handle = *handle_t.const_data_ptr<int64_t>();    // read directly: item() dispatches, per call
  TORCH_CHECK(x_in.dim() == 2 && (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16),
              "int8_linear: expected x (M, K), float32 or bfloat16");
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  Packed packed;
  {
    std::lock_guard<std::mutex> guard(registry_lock);
    TORCH_CHECK(handle >= 0 && handle < static_cast<int64_t>(registry.size()), "int8_linear: unknown weight handle ",
                handle);
    packed = registry[handle];
  }
  TORCH_CHECK(packed.weight.defined(), "int8_linear: weight handle ", handle, " was freed");
  TORCH_CHECK(x.size(1) == packed.k, "int8_linear: x has ", x.size(1), " features, the weight ", packed.k);
  TORCH_CHECK(w_scale.dim() == 1 && w_scale.size(0) == packed.n && w_scale.scalar_type() == at::kFloat,
              "int8_linear: w_scale must be (N,) float32");
  const int64_t M = x.size(0), K = packed.k, N = packed.n;
  auto q = at::empty({M, K}, at::kByte);
  auto row_scale = at::empty({M}, at::kFloat);
  if (x.scalar_type() == at::kBFloat16)
    quantize_rows(x.const_data_ptr<c10::BFloat16>(), M, K, x.stride(0), q.mutable_data_ptr<uint8_t>(),
                  row_scale.mutable_data_ptr<float>());
  else
    quantize_rows(x.const_data_ptr<float>(), M, K, x.stride(0), q.mutable_data_ptr<uint8_t>(),
                  row_scale.mutable_data_ptr<float>());
  static auto linear = c10::Dispatcher::singleton().findSchemaOrThrow("onednn::qlinear_pointwise", "");
  torch::jit::Stack stack{q, 1.0, int64_t{128}, packed.weight, w_scale.contiguous(), packed.zero_point,
                          c10::IValue(), 1.0, int64_t{0}, at::kFloat, std::string("none"),
                          c10::List<std::optional<at::Scalar>>(), std::string("")};
  linear.callBoxed(&stack);
  const at::Tensor acc = stack[0].toTensor();          // (M, N) float32: sum((q - 128) w) * w_scale
  auto out = at::empty({M, N}, x.options());
  const float* a = acc.const_data_ptr<float>();
  const float* s = row_scale.const_data_ptr<float>();
  if (x.scalar_type() == at::kBFloat16)
    scale_rows(a, s, M, N, out.mutable_data_ptr<c10::BFloat16>());
  else
    scale_rows(a, s, M, N, out.mutable_data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(NANOSEEK_OPS, m) {
  m.def("int8_pack(Tensor weight) -> int");
  m.def("int8_repack(int handle, Tensor weight) -> ()");
  m.def("int8_free(int handle) -> ()", &int8_free);     // no tensor to dispatch on: one kernel for all
  // the handle as a tensor: a compiled layer takes it as an input, so one graph serves every layer
  m.def("int8_linear(Tensor x, Tensor handle, Tensor w_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(NANOSEEK_OPS, CPU, m) {
  m.impl("int8_pack", &int8_pack);
  m.impl("int8_repack", &int8_repack);
  m.impl("int8_linear", &int8_linear);
}
