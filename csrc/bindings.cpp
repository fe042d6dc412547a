// The pybind11 module of one CPU variant, fastcls._C_<variant> (setup.py compiles it once per variant, naming it
// by FASTCLS_MODULE; fastcls/ops/cpu_variant.py picks the one to import). Tensors cross as raw addresses (Python's
// tensor.data_ptr()), so the extension needs no torch headers; the Python op modules own shapes, dtypes,
// contiguity and allocation. Over 400 lines: it binds every kernel entry point, each with its arguments' names.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "adamw.h"
#include "bias_gelu.h"
#include "cross_entropy.h"
#include "dropout.h"
#include "encoder_layer.h"
#include "layer_norm.h"
#include "linear_bf16.h"
#include "multi_task_cross_entropy.h"
#include "varlen_attention.h"

namespace py = pybind11;

namespace {

template <typename T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

template <typename Logit>
using CrossEntropyRowsKernel = void (*)(const Logit*, int64_t, int64_t, int64_t, const int64_t*, int64_t, const float*,
                                        float, float*, Logit*, int64_t, float, int);

// class_weight and grad may be 0 (null): no class weights, no gradient.
template <typename Logit>
void def_cross_entropy_rows(py::module_& m, const char* suffix, CrossEntropyRowsKernel<Logit> kernel) {
  m.def(
      (std::string("cross_entropy_rows_") + suffix).c_str(),
      [kernel](std::uintptr_t logits, int64_t n_rows, int64_t n_classes, int64_t row_stride, std::uintptr_t target,
               int64_t ignore_index, std::uintptr_t class_weight, float label_smoothing, std::uintptr_t loss,
               std::uintptr_t grad, int64_t grad_row_stride, float grad_scale, int num_threads) {
        py::gil_scoped_release release;
        kernel(as_ptr<const Logit>(logits), n_rows, n_classes, row_stride, as_ptr<const int64_t>(target),
               ignore_index, as_ptr<const float>(class_weight), label_smoothing, as_ptr<float>(loss),
               as_ptr<Logit>(grad), grad_row_stride, grad_scale, num_threads);
      },
      py::arg("logits"), py::arg("n_rows"), py::arg("n_classes"), py::arg("row_stride"), py::arg("target"),
      py::arg("ignore_index"), py::arg("class_weight"), py::arg("label_smoothing"), py::arg("loss"),
      py::arg("grad"), py::arg("grad_row_stride"), py::arg("grad_scale"), py::arg("num_threads"),
      "Per-row softmax cross-entropy (fp32) and, unless grad is 0, its gradient times grad_scale (see "
      "cross_entropy.h).");
}

void def_cross_entropy_target_summary(py::module_& m) {
  m.def(
      "cross_entropy_target_summary",
      [](std::uintptr_t target, int64_t n_rows, int64_t n_classes, int64_t ignore_index, std::uintptr_t class_weight) {
        double weight_sum = 0.0;
        int64_t kept_rows = 0;
        fastcls::cross_entropy_target_summary(as_ptr<const int64_t>(target), n_rows, n_classes, ignore_index,
                                              as_ptr<const float>(class_weight), &weight_sum, &kept_rows);
        return py::make_tuple(weight_sum, kept_rows);
      },
      py::arg("target"), py::arg("n_rows"), py::arg("n_classes"), py::arg("ignore_index"), py::arg("class_weight"),
      "(sum of class weights over kept rows, number of kept rows); IndexError on an out-of-range target.");
}

template <typename Logit>
using MultiTaskCrossEntropyKernel = void (*)(const Logit*, int64_t, int64_t, int64_t, const int64_t*, int64_t,
                                             const int64_t*, int64_t, const float*, float*, float*, Logit*, int64_t,
                                             int);

// grad may be 0 (null): no gradient.
template <typename Logit>
void def_multi_task_cross_entropy(py::module_& m, const char* suffix, MultiTaskCrossEntropyKernel<Logit> kernel) {
  m.def(
      (std::string("multi_task_cross_entropy_") + suffix).c_str(),
      [kernel](std::uintptr_t logits, int64_t n_rows, int64_t n_classes, int64_t row_stride, std::uintptr_t targets,
               int64_t n_tasks, std::uintptr_t segments, int64_t ignore_index, std::uintptr_t task_scale,
               std::uintptr_t task_loss_sums, std::uintptr_t loss, std::uintptr_t grad, int64_t grad_row_stride,
               int num_threads) {
        py::gil_scoped_release release;
        kernel(as_ptr<const Logit>(logits), n_rows, n_classes, row_stride, as_ptr<const int64_t>(targets), n_tasks,
               as_ptr<const int64_t>(segments), ignore_index, as_ptr<const float>(task_scale),
               as_ptr<float>(task_loss_sums), as_ptr<float>(loss), as_ptr<Logit>(grad), grad_row_stride,
               num_threads);
      },
      py::arg("logits"), py::arg("n_rows"), py::arg("n_classes"), py::arg("row_stride"), py::arg("targets"),
      py::arg("n_tasks"), py::arg("segments"), py::arg("ignore_index"), py::arg("task_scale"),
      py::arg("task_loss_sums"), py::arg("loss"), py::arg("grad"), py::arg("grad_row_stride"), py::arg("num_threads"),
      "Per-task cross-entropy sums, their task_scale-weighted total and, unless grad is 0, its gradient (see "
      "multi_task_cross_entropy.h); ValueError on segments that do not tile a row, IndexError on an out-of-range "
      "target.");
}

template <typename Element>
using DropoutKernel = void (*)(const Element*, Element*, int64_t, uint64_t, uint64_t, uint64_t, float, int);

template <typename Element>
void def_dropout(py::module_& m, const char* suffix, DropoutKernel<Element> kernel) {
  m.def(
      (std::string("dropout_") + suffix).c_str(),
      [kernel](std::uintptr_t x, std::uintptr_t out, int64_t n, uint64_t seed, uint64_t counter_offset,
               uint64_t threshold, float scale, int num_threads) {
        py::gil_scoped_release release;
        kernel(as_ptr<const Element>(x), as_ptr<Element>(out), n, seed, counter_offset, threshold, scale, num_threads);
      },
      py::arg("x"), py::arg("out"), py::arg("n"), py::arg("seed"), py::arg("counter_offset"), py::arg("threshold"),
      py::arg("scale"),
      py::arg("num_threads"),
      "out = keep * x * scale over n contiguous elements, keep = Philox bits >= threshold (see dropout.h); "
      "the same call on the upstream gradient is the backward.");
}

// Dropout + residual add + LayerNorm (or LayerNorm + dropout) forward and backward; see layer_norm.h.
void def_layer_norm(py::module_& m) {
  m.def(
      "layer_norm_output_recovers",
      [](std::uintptr_t weight, std::uintptr_t bias, int dtype, int64_t n, float max_bias_over_weight) {
        return fastcls::layer_norm_output_recovers(as_ptr<const void>(weight), as_ptr<const void>(bias), dtype, n,
                                                   max_bias_over_weight);
      },
      py::arg("weight"), py::arg("bias"), py::arg("dtype"), py::arg("n"), py::arg("max_bias_over_weight"),
      "Whether a LayerNorm's output can stand in for its pre-norm sum in the backward (layer_norm.h).");
  m.def(
      "layer_norm_forward",
      [](std::uintptr_t x, int x_dtype, std::uintptr_t residual, int residual_dtype, std::uintptr_t weight,
         std::uintptr_t bias, std::uintptr_t out, std::uintptr_t sum, int out_dtype, std::uintptr_t out_bf16,
         std::uintptr_t mean, std::uintptr_t rstd, int64_t n_rows, int64_t n_cols, float eps, uint64_t seed,
         uint64_t counter_offset, uint64_t threshold, float scale, bool dropout_after, int num_threads) {
        py::gil_scoped_release release;
        fastcls::layer_norm_forward(as_ptr<const void>(x), x_dtype, as_ptr<const void>(residual), residual_dtype,
                                    as_ptr<const float>(weight), as_ptr<const float>(bias), as_ptr<void>(out),
                                    as_ptr<void>(sum), out_dtype, as_ptr<void>(out_bf16), as_ptr<float>(mean),
                                    as_ptr<float>(rstd), n_rows, n_cols, eps, seed, counter_offset, threshold, scale,
                                    dropout_after, num_threads);
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("residual"), py::arg("residual_dtype"), py::arg("weight"),
      py::arg("bias"), py::arg("out"), py::arg("sum"), py::arg("out_dtype"), py::arg("out_bf16"), py::arg("mean"),
      py::arg("rstd"),
      py::arg("n_rows"), py::arg("n_cols"), py::arg("eps"), py::arg("seed"), py::arg("counter_offset"),
      py::arg("threshold"), py::arg("scale"), py::arg("dropout_after"), py::arg("num_threads"),
      "out = LayerNorm(dropout(x) + residual) or dropout(LayerNorm(x)) over contiguous rows, with the per-row mean "
      "and rstd (layer_norm.h), and out_bf16, out rounded to bf16; dtype codes 0 fp32, 1 bf16; a null address is 0.");
  m.def(
      "layer_norm_backward",
      [](std::uintptr_t grad_out, std::uintptr_t saved, int saved_dtype, bool saved_is_output, std::uintptr_t weight,
         std::uintptr_t bias, std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t grad_sum,
         std::uintptr_t grad_x, int x_dtype, std::uintptr_t grad_residual, int residual_dtype,
         std::uintptr_t grad_weight_partial, std::uintptr_t grad_bias_partial, int64_t n_rows, int64_t n_cols,
         uint64_t seed, uint64_t counter_offset, uint64_t threshold, float scale, bool dropout_after,
         int num_threads) {
        py::gil_scoped_release release;
        fastcls::layer_norm_backward(
            as_ptr<const void>(grad_out), as_ptr<const void>(saved), saved_dtype, saved_is_output,
            as_ptr<const float>(weight), as_ptr<const float>(bias), as_ptr<const float>(mean),
            as_ptr<const float>(rstd), as_ptr<const void>(grad_sum), as_ptr<void>(grad_x), x_dtype,
            as_ptr<void>(grad_residual), residual_dtype, as_ptr<float>(grad_weight_partial),
            as_ptr<float>(grad_bias_partial), n_rows, n_cols, seed, counter_offset, threshold, scale, dropout_after,
            num_threads);
      },
      py::arg("grad_out"), py::arg("saved"), py::arg("saved_dtype"), py::arg("saved_is_output"), py::arg("weight"),
      py::arg("bias"), py::arg("mean"), py::arg("rstd"), py::arg("grad_sum"), py::arg("grad_x"), py::arg("x_dtype"),
      py::arg("grad_residual"), py::arg("residual_dtype"), py::arg("grad_weight_partial"),
      py::arg("grad_bias_partial"), py::arg("n_rows"), py::arg("n_cols"), py::arg("seed"), py::arg("counter_offset"),
      py::arg("threshold"), py::arg("scale"), py::arg("dropout_after"), py::arg("num_threads"),
      "Gradients of layer_norm_forward, redrawing its mask; per-thread fp32 partial weight and bias gradients "
      "(layer_norm.h).");
}

template <typename Element>
using BiasGeluForwardKernel = void (*)(const Element*, const float*, Element*, uint16_t*, int, int64_t, int64_t, int);
#if defined(__AVX512BF16__)
// The Linear layer's bf16 products and their packings (linear_bf16.h): this variant only, so that
// fastcls/ops/linear.py finds `linear_bf16_gemm` exactly where the kernels run.
template <typename Source>
void def_linear_packs(py::module_& m, const char* suffix,
                      void (*pack_wt)(const Source*, int64_t, int64_t, int64_t, uint16_t*, uint16_t*, int64_t, int),
                      void (*pack_pairs)(const Source*, int64_t, int64_t, int64_t, int64_t, int64_t, uint16_t*, int)) {
  m.def((std::string("linear_pack_wt_") + suffix).c_str(),
        [pack_wt](std::uintptr_t w, int64_t rows, int64_t row_offset, int64_t K, std::uintptr_t packed,
                  std::uintptr_t pairs_out, int64_t R, int num_threads) {
          py::gil_scoped_release release;
          pack_wt(as_ptr<const Source>(w), rows, row_offset, K, as_ptr<uint16_t>(packed), as_ptr<uint16_t>(pairs_out),
                  R, num_threads);
        },
        py::arg("w"), py::arg("rows"), py::arg("row_offset"), py::arg("K"), py::arg("packed"), py::arg("pairs_out"),
        py::arg("R"), py::arg("num_threads"),
        "Rows of a stacked weight [N, K] packed as the forward's B = W^T, and as the input gradient's B = W unless "
        "pairs_out is 0 (linear_bf16.h).");
  m.def((std::string("linear_pack_pairs_") + suffix).c_str(),
        [pack_pairs](std::uintptr_t b, int64_t ld, int64_t rows, int64_t row_offset, int64_t R, int64_t C,
                     std::uintptr_t packed, int num_threads) {
          py::gil_scoped_release release;
          pack_pairs(as_ptr<const Source>(b), ld, rows, row_offset, R, C, as_ptr<uint16_t>(packed), num_threads);
        },
        py::arg("b"), py::arg("ld"), py::arg("rows"), py::arg("row_offset"), py::arg("R"), py::arg("C"),
        py::arg("packed"), py::arg("num_threads"),
        "Rows of B [R, C] packed in pairs with the reduction over B's rows (linear_bf16.h).");
}

void def_linear(py::module_& m) {
  m.def("linear_bf16_gemm",
        [](std::uintptr_t a, int64_t row_stride, int64_t pair_stride, std::uintptr_t packed, std::uintptr_t bias,
           std::uintptr_t c_bf16, std::uintptr_t c_f32, bool accumulate, int64_t ldc, int64_t M, int64_t N,
           int64_t K, int num_threads) {
          py::gil_scoped_release release;
          fastcls::linear_bf16_gemm(as_ptr<const uint16_t>(a), row_stride, pair_stride, as_ptr<const uint16_t>(packed),
                                    as_ptr<const float>(bias), as_ptr<uint16_t>(c_bf16), as_ptr<float>(c_f32),
                                    accumulate, ldc, M, N, K, num_threads);
        },
        py::arg("a"), py::arg("row_stride"), py::arg("pair_stride"), py::arg("packed"), py::arg("bias"),
        py::arg("c_bf16"), py::arg("c_f32"), py::arg("accumulate"), py::arg("ldc"), py::arg("M"), py::arg("N"),
        py::arg("K"),
        py::arg("num_threads"), "C[M, N] = A . packed B (+ fp32 bias), fp32 accumulation (linear_bf16.h).");
  def_linear_packs<uint16_t>(m, "bf16", fastcls::linear_pack_wt_bf16, fastcls::linear_pack_pairs_bf16);
  def_linear_packs<float>(m, "f32", fastcls::linear_pack_wt_f32, fastcls::linear_pack_pairs_f32);
  m.def("linear_interleave_row_pairs",
        [](std::uintptr_t in, int64_t ld, int64_t R, int64_t C, std::uintptr_t out, std::uintptr_t col_sums,
           int num_threads) {
          py::gil_scoped_release release;
          fastcls::linear_interleave_row_pairs(as_ptr<const uint16_t>(in), ld, R, C, as_ptr<uint16_t>(out),
                                               as_ptr<float>(col_sums), num_threads);
        },
        py::arg("in"), py::arg("ld"), py::arg("R"), py::arg("C"), py::arg("out"), py::arg("col_sums"),
        py::arg("num_threads"), "out[rp][c][t] = in[2 rp + t][c], zeros past R; col_sums: in's (linear_bf16.h).");
}

// The encoder layer's calls take their sizes, addresses and flags as one list, in the order of `fields` in
// fastcls.ops.cpp.encoder_layer_forward and _backward: read in that order, the count checked first and last.
class LayerFields {
 public:
  LayerFields(const std::vector<std::uintptr_t>& values, size_t count, const char* call)
      : values_(values), call_(call) {
    if (values.size() != count)
      throw std::invalid_argument(std::string(call) + ": " + std::to_string(count) + " fields, got " +
                                  std::to_string(values.size()));
  }
  int64_t size() { return int64_t(values_[at_++]); }
  template <typename T>
  T* ptr() {
    return as_ptr<T>(values_[at_++]);
  }
  void done() const {
    if (at_ != values_.size()) throw std::logic_error(std::string(call_) + ": field count");
  }

 private:
  const std::vector<std::uintptr_t>& values_;
  const char* call_;
  size_t at_ = 0;
};

// The attention's, LN1's and LN2's dropouts from their (seed, counter offset, threshold) words and their scales,
// scales[first] onwards.
std::array<fastcls::EncoderLayerDropout, 3> layer_dropouts(const std::vector<uint64_t>& words,
                                                           const std::vector<float>& scales, size_t first,
                                                           const char* call) {
  if (words.size() != 9 || scales.size() != first + 3)
    throw std::invalid_argument(std::string(call) + ": 9 dropout words and " + std::to_string(first + 3) + " scalars");
  std::array<fastcls::EncoderLayerDropout, 3> dropouts;
  for (size_t i = 0; i < 3; ++i) dropouts[i] = {words[3 * i], words[3 * i + 1], words[3 * i + 2], scales[first + i]};
  return dropouts;
}

void def_encoder_layer(py::module_& m) {
  m.def("encoder_layer_backward_workspace", &fastcls::encoder_layer_backward_workspace, py::arg("tokens"),
        py::arg("rows"), py::arg("width"), py::arg("ffn"), py::arg("cls_only"), py::arg("num_threads"),
        "Scratch bytes encoder_layer_backward needs (encoder_layer.h).");
  m.def("encoder_layer_forward_workspace", &fastcls::encoder_layer_forward_workspace, py::arg("tokens"),
        py::arg("rows"), py::arg("width"), py::arg("ffn"), py::arg("cls_only"),
        "Scratch bytes encoder_layer_forward needs (encoder_layer.h).");
  m.def(
      "encoder_layer_forward",
      [](const std::vector<std::uintptr_t>& fields, const std::vector<uint64_t>& dropouts,
         const std::vector<float>& scalars, int num_threads) {
        LayerFields f(fields, 45, "encoder_layer_forward");
        fastcls::EncoderLayerForward a{};
        a.tokens = f.size(), a.width = f.size(), a.ffn = f.size(), a.rows = f.size(), a.heads = f.size();
        a.h = f.ptr<const float>(), a.hb = f.ptr<const uint16_t>();
        a.cu = f.ptr<const int64_t>(), a.cls_index = f.ptr<const int64_t>();
        a.qkv_packed = f.ptr<const uint16_t>(), a.kv_packed = f.ptr<const uint16_t>();
        a.attn_out_packed = f.ptr<const uint16_t>(), a.ffn_in_packed = f.ptr<const uint16_t>();
        a.ffn_out_packed = f.ptr<const uint16_t>();
        a.query_bias = f.ptr<const void>(), a.key_bias = f.ptr<const void>(), a.value_bias = f.ptr<const void>();
        a.attn_out_bias = f.ptr<const void>(), a.ffn_in_bias = f.ptr<const void>();
        a.ffn_out_bias = f.ptr<const void>();
        a.ln1_weight = f.ptr<const void>(), a.ln1_bias = f.ptr<const void>();
        a.ln2_weight = f.ptr<const void>(), a.ln2_bias = f.ptr<const void>();
        a.bias_dtype = int(f.size()), a.norm_dtype = int(f.size());
        a.qkv = f.ptr<uint16_t>(), a.q = f.ptr<uint16_t>(), a.query_in = f.ptr<uint16_t>();
        a.context = f.ptr<uint16_t>(), a.f = f.ptr<uint16_t>(), a.g_pairs = f.ptr<uint16_t>();
        a.h1b = f.ptr<uint16_t>(), a.h2b = f.ptr<uint16_t>();
        a.lse = f.ptr<float>(), a.h1 = f.ptr<float>(), a.sum1 = f.ptr<float>(), a.mean1 = f.ptr<float>();
        a.rstd1 = f.ptr<float>(), a.h2 = f.ptr<float>(), a.sum2 = f.ptr<float>(), a.mean2 = f.ptr<float>();
        a.rstd2 = f.ptr<float>();
        a.workspace = f.ptr<void>(), a.workspace_bytes = f.size();
        f.done();
        const auto drops = layer_dropouts(dropouts, scalars, 3, "encoder_layer_forward");
        a.attn_scale = scalars[0], a.ln1_eps = scalars[1], a.ln2_eps = scalars[2];
        a.attn_dropout = drops[0], a.ln1_dropout = drops[1], a.ln2_dropout = drops[2];
        py::gil_scoped_release release;
        fastcls::encoder_layer_forward(a, num_threads);
      },
      py::arg("fields"), py::arg("dropouts"), py::arg("scalars"), py::arg("num_threads"),
      "The encoder layer's forward in one call (encoder_layer.h); scalars: the attention's scale, the LayerNorms' "
      "epsilons, the dropouts' scales.");
  m.def(
      "encoder_layer_backward",
      [](const std::vector<std::uintptr_t>& fields, const std::vector<uint64_t>& dropouts,
         const std::vector<float>& scales, int num_threads) {
        LayerFields f(fields, 46, "encoder_layer_backward");
        fastcls::EncoderLayerBackward a{};
        a.tokens = f.size(), a.width = f.size(), a.ffn = f.size(), a.rows = f.size(), a.heads = f.size();
        a.hb = f.ptr<const uint16_t>(), a.qkv = f.ptr<const uint16_t>(), a.q = f.ptr<const uint16_t>();
        a.query_in = f.ptr<const uint16_t>(), a.context = f.ptr<const uint16_t>(), a.h1b = f.ptr<const uint16_t>();
        a.f = f.ptr<const uint16_t>(), a.g_pairs = f.ptr<const uint16_t>();
        a.lse = f.ptr<const float>(), a.saved1 = f.ptr<const float>(), a.mean1 = f.ptr<const float>();
        a.rstd1 = f.ptr<const float>(), a.saved2 = f.ptr<const float>(), a.mean2 = f.ptr<const float>();
        a.rstd2 = f.ptr<const float>();
        a.cu = f.ptr<const int64_t>(), a.cls_index = f.ptr<const int64_t>();
        a.saved1_is_output = f.size() != 0, a.saved2_is_output = f.size() != 0;
        a.qkv_packed = f.ptr<const uint16_t>(), a.kv_packed = f.ptr<const uint16_t>();
        a.attn_out_packed = f.ptr<const uint16_t>(), a.ffn_in_packed = f.ptr<const uint16_t>();
        a.ffn_out_packed = f.ptr<const uint16_t>();
        a.ffn_in_bias = f.ptr<const void>(), a.ln1_weight = f.ptr<const void>(), a.ln1_bias = f.ptr<const void>();
        a.ln2_weight = f.ptr<const void>(), a.ln2_bias = f.ptr<const void>();
        a.bias_dtype = int(f.size()), a.norm_dtype = int(f.size());
        a.grad_h2 = f.ptr<const float>(), a.grad_h = f.ptr<float>();
        a.qkv_grad = f.ptr<uint16_t>(), a.attn_out_grad = f.ptr<uint16_t>(), a.ffn_in_grad = f.ptr<uint16_t>();
        a.ffn_out_grad = f.ptr<uint16_t>();
        a.bias_grads = f.ptr<void>(), a.norm_grads = f.ptr<void>();
        a.workspace = f.ptr<void>(), a.workspace_bytes = f.size();
        f.done();
        const auto drops = layer_dropouts(dropouts, scales, 1, "encoder_layer_backward");
        a.attn_scale = scales[0];
        a.attn_dropout = drops[0], a.ln1_dropout = drops[1], a.ln2_dropout = drops[2];
        py::gil_scoped_release release;
        fastcls::encoder_layer_backward(a, num_threads);
      },
      py::arg("fields"), py::arg("dropouts"), py::arg("scales"), py::arg("num_threads"),
      "The encoder layer's backward in one call (encoder_layer.h); scales: the attention's, then the dropouts'.");
}
#endif

template <typename Element>
using BiasGeluBackwardKernel = void (*)(const Element*, const Element*, const float*, Element*, float*, uint16_t*,
                                        int, int64_t, int64_t, int);

// GELU(x + bias) over contiguous rows and its gradients; bias and grad_bias may be 0 (see bias_gelu.h).
template <typename Element>
void def_bias_gelu(py::module_& m, const char* suffix, BiasGeluForwardKernel<Element> forward,
                   BiasGeluBackwardKernel<Element> backward) {
  m.def(
      (std::string("bias_gelu_forward_") + suffix).c_str(),
      [forward](std::uintptr_t x, std::uintptr_t bias, std::uintptr_t out, std::uintptr_t pairs, int pairs_layout,
                int64_t n_rows, int64_t n_cols, int num_threads) {
        py::gil_scoped_release release;
        forward(as_ptr<const Element>(x), as_ptr<const float>(bias), as_ptr<Element>(out), as_ptr<uint16_t>(pairs),
                pairs_layout, n_rows, n_cols, num_threads);
      },
      py::arg("x"), py::arg("bias"), py::arg("out"), py::arg("pairs"), py::arg("pairs_layout"), py::arg("n_rows"),
      py::arg("n_cols"), py::arg("num_threads"),
      "out = gelu(x + bias), erf form, fp32 arithmetic (see bias_gelu.h).");
  m.def(
      (std::string("bias_gelu_backward_") + suffix).c_str(),
      [backward](std::uintptr_t grad_out, std::uintptr_t x, std::uintptr_t bias, std::uintptr_t grad_x,
                 std::uintptr_t grad_bias, std::uintptr_t pairs, int pairs_layout, int64_t n_rows, int64_t n_cols,
                 int num_threads) {
        py::gil_scoped_release release;
        backward(as_ptr<const Element>(grad_out), as_ptr<const Element>(x), as_ptr<const float>(bias),
                 as_ptr<Element>(grad_x), as_ptr<float>(grad_bias), as_ptr<uint16_t>(pairs), pairs_layout, n_rows,
                 n_cols, num_threads);
      },
      py::arg("grad_out"), py::arg("x"), py::arg("bias"), py::arg("grad_x"), py::arg("grad_bias"), py::arg("pairs"),
      py::arg("pairs_layout"), py::arg("n_rows"), py::arg("n_cols"), py::arg("num_threads"),
      "grad_x = grad_out * gelu'(x + bias) and grad_bias (fp32) = its column sums (see bias_gelu.h).");
}

using AdamWKernel = void (*)(const int64_t*, int64_t, const fastcls::AdamWOptions&, const float*, const float*,
                             const float*, const float*, int);

void def_adamw(py::module_& m, const char* name, AdamWKernel kernel, const char* doc) {
  m.def(
      name,
      [kernel](std::uintptr_t table, int64_t n_tensors, double lr, std::uintptr_t lr_tensor, double beta1,
               double beta2, double eps, double weight_decay, bool amsgrad, bool maximize, bool bias_correction,
               std::uintptr_t grad_scale, std::uintptr_t found_inf, std::uintptr_t clip_coef, int num_threads) {
        py::gil_scoped_release release;
        const fastcls::AdamWOptions options{lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, bias_correction};
        kernel(as_ptr<const int64_t>(table), n_tensors, options, as_ptr<const float>(lr_tensor),
               as_ptr<const float>(grad_scale), as_ptr<const float>(found_inf), as_ptr<const float>(clip_coef),
               num_threads);
      },
      py::arg("table"), py::arg("n_tensors"), py::arg("lr"), py::arg("lr_tensor"), py::arg("beta1"),
      py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("amsgrad"), py::arg("maximize"),
      py::arg("bias_correction"), py::arg("grad_scale"), py::arg("found_inf"), py::arg("clip_coef"),
      py::arg("num_threads"), doc);
}

using GradSumOfSquaresKernel = void (*)(const int64_t*, int64_t, const float*, double*, int);

void def_grad_sum_of_squares(py::module_& m, const char* name, GradSumOfSquaresKernel kernel) {
  m.def(
      name,
      [kernel](std::uintptr_t table, int64_t n_tensors, std::uintptr_t grad_scale, std::uintptr_t out,
               int num_threads) {
        py::gil_scoped_release release;
        kernel(as_ptr<const int64_t>(table), n_tensors, as_ptr<const float>(grad_scale), as_ptr<double>(out),
               num_threads);
      },
      py::arg("table"), py::arg("n_tensors"), py::arg("grad_scale"), py::arg("out"), py::arg("num_threads"),
      "Sum of the squares of a table's gradients (divided by grad_scale squared; 0 or an address) into the fp64 "
      "at out (see adamw.h).");
}

using AdamWLiveRowsKernel = void (*)(const int64_t*, const int64_t*, int64_t, const fastcls::AdamWOptions&,
                                     const float*, const float*, const float*, const float*, int);

void def_adamw_live_rows(py::module_& m, const char* name, AdamWLiveRowsKernel kernel, const char* doc) {
  m.def(
      name,
      [kernel](std::uintptr_t table, std::uintptr_t live_table, int64_t n_tensors, double lr, std::uintptr_t lr_tensor,
               double beta1, double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
               bool bias_correction, std::uintptr_t grad_scale, std::uintptr_t found_inf, std::uintptr_t clip_coef,
               int num_threads) {
        py::gil_scoped_release release;
        const fastcls::AdamWOptions options{lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, bias_correction};
        kernel(as_ptr<const int64_t>(table), as_ptr<const int64_t>(live_table), n_tensors, options,
               as_ptr<const float>(lr_tensor), as_ptr<const float>(grad_scale), as_ptr<const float>(found_inf),
               as_ptr<const float>(clip_coef), num_threads);
      },
      py::arg("table"), py::arg("live_table"), py::arg("n_tensors"), py::arg("lr"), py::arg("lr_tensor"),
      py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("amsgrad"),
      py::arg("maximize"), py::arg("bias_correction"), py::arg("grad_scale"), py::arg("found_inf"),
      py::arg("clip_coef"), py::arg("num_threads"), doc);
}

using GradSumOfSquaresLiveRowsKernel = void (*)(const int64_t*, const int64_t*, int64_t, const float*, double*, int);

void def_grad_sum_of_squares_live_rows(py::module_& m, const char* name, GradSumOfSquaresLiveRowsKernel kernel) {
  m.def(
      name,
      [kernel](std::uintptr_t table, std::uintptr_t live_table, int64_t n_tensors, std::uintptr_t grad_scale,
               std::uintptr_t out, int num_threads) {
        py::gil_scoped_release release;
        kernel(as_ptr<const int64_t>(table), as_ptr<const int64_t>(live_table), n_tensors,
               as_ptr<const float>(grad_scale), as_ptr<double>(out), num_threads);
      },
      py::arg("table"), py::arg("live_table"), py::arg("n_tensors"), py::arg("grad_scale"), py::arg("out"),
      py::arg("num_threads"), "adamw_grad_sum_of_squares reading only the live rows of masked tensors (adamw.h).");
}

using AdamWCatchUpKernel = int64_t (*)(const int64_t*, const int64_t*, bool, int);

void def_adamw_catch_up_rows(py::module_& m, const char* name, AdamWCatchUpKernel kernel) {
  m.def(
      name,
      [kernel](std::uintptr_t table_row, std::uintptr_t live_row, bool write_param, int num_threads) {
        py::gil_scoped_release release;
        return kernel(as_ptr<const int64_t>(table_row), as_ptr<const int64_t>(live_row), write_param, num_threads);
      },
      py::arg("table_row"), py::arg("live_row"), py::arg("write_param"), py::arg("num_threads"),
      "Brings a deferred tensor's rows up to date by replaying the steps they skipped (the parameter itself only "
      "with write_param); -1 where an id is outside the table (adamw.h).");
}

// Whether the CPU, and the OS (which must save the wider registers), runs the instructions of a variant.
// __builtin_cpu_supports asks both; GCC 12 names the x86-64 levels, older compilers get their features.
bool cpu_supports(const std::string& variant) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
  const bool v3 = __builtin_cpu_supports("x86-64-v3");
  const bool v4 = __builtin_cpu_supports("x86-64-v4");
#else
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
                  __builtin_cpu_supports("bmi2");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512cd");
#endif
  if (variant == "avx2") return v3;
  if (variant == "avx512") return v4;
  if (variant == "avx512_bf16") return v4 && __builtin_cpu_supports("avx512bf16");
#endif
  return variant == "baseline";
}

// Attention over packed sequences with mask-free dropout, forward and backward; see varlen_attention.h.
void def_varlen_attention(py::module_& m) {
  auto shape_of = [](std::uintptr_t cu_q, std::uintptr_t cu_k, int64_t rows, int64_t heads, int64_t head_dim,
                     const py::tuple& strides) {
    const auto stride = [&](int i) { return strides[i].cast<int64_t>(); };
    return fastcls::VarlenAttentionShape{as_ptr<const int64_t>(cu_q), as_ptr<const int64_t>(cu_k), rows, heads,
                                         head_dim, stride(0), stride(1), stride(2), stride(3), stride(4), stride(5)};
  };
  m.def(
      "varlen_attention_forward",
      [shape_of](std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, int dtype, py::tuple strides,
                 std::uintptr_t cu_q, std::uintptr_t cu_k, int64_t rows, int64_t heads, int64_t head_dim, float scale,
                 uint64_t seed, uint64_t counter_offset, uint64_t threshold, float drop_scale, std::uintptr_t out,
                 std::uintptr_t lse, int num_threads) {
        const auto shape = shape_of(cu_q, cu_k, rows, heads, head_dim, strides);
        py::gil_scoped_release release;
        fastcls::varlen_attention_forward(as_ptr<const void>(q), as_ptr<const void>(k), as_ptr<const void>(v), dtype,
                                          shape, scale, {seed, counter_offset, threshold, drop_scale},
                                          as_ptr<void>(out), as_ptr<float>(lse), num_threads);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("dtype"), py::arg("strides"), py::arg("cu_q"),
      py::arg("cu_k"), py::arg("rows"), py::arg("heads"), py::arg("head_dim"), py::arg("scale"), py::arg("seed"),
      py::arg("counter_offset"), py::arg("threshold"), py::arg("drop_scale"), py::arg("out"), py::arg("lse"),
      py::arg("num_threads"),
      "out = dropout(softmax(q k^T * scale)) v per packed row, and the fp32 log-sum-exp per (query, head); strides: "
      "the token and head strides of q, k and v; dtype code 0 fp32, 1 bf16 (varlen_attention.h).");
  m.def(
      "varlen_attention_backward",
      [shape_of](std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, int dtype, py::tuple strides,
                 std::uintptr_t cu_q, std::uintptr_t cu_k, int64_t rows, int64_t heads, int64_t head_dim, float scale,
                 uint64_t seed, uint64_t counter_offset, uint64_t threshold, float drop_scale, std::uintptr_t grad_out,
                 std::uintptr_t lse, std::uintptr_t grad_q, std::uintptr_t grad_k, std::uintptr_t grad_v,
                 int64_t grad_token_stride, int num_threads) {
        const auto shape = shape_of(cu_q, cu_k, rows, heads, head_dim, strides);
        py::gil_scoped_release release;
        fastcls::varlen_attention_backward(as_ptr<const void>(q), as_ptr<const void>(k), as_ptr<const void>(v), dtype,
                                           shape, scale, {seed, counter_offset, threshold, drop_scale},
                                           as_ptr<const void>(grad_out), as_ptr<const float>(lse),
                                           as_ptr<void>(grad_q), as_ptr<void>(grad_k), as_ptr<void>(grad_v),
                                           grad_token_stride, num_threads);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("dtype"), py::arg("strides"), py::arg("cu_q"),
      py::arg("cu_k"), py::arg("rows"), py::arg("heads"), py::arg("head_dim"), py::arg("scale"), py::arg("seed"),
      py::arg("counter_offset"), py::arg("threshold"), py::arg("drop_scale"), py::arg("grad_out"), py::arg("lse"),
      py::arg("grad_q"), py::arg("grad_k"), py::arg("grad_v"), py::arg("grad_token_stride"), py::arg("num_threads"),
      "Gradients of varlen_attention_forward from the saved log-sum-exp, redrawing its mask (varlen_attention.h).");
}

}  // namespace

PYBIND11_MODULE(FASTCLS_MODULE, m) {
  m.doc() = "fastcls C++ CPU kernels (raw-pointer interface; see fastcls/ops for the torch-facing ops)";
  m.def("cpu_supports", &cpu_supports, py::arg("variant"),
        "Whether this CPU and OS run the variant's instructions (baseline, avx2, avx512, avx512_bf16).");
  def_adamw(m, "adamw_f32", fastcls::adamw_f32,
            "AdamW step over a table of fp32 tensors (row layout in adamw.h); lr_tensor (replacing lr), grad_scale, "
            "found_inf, clip_coef: 0 or addresses.");
  def_adamw(m, "adamw_bf16_master", fastcls::adamw_bf16_master,
            "AdamW step over a table of bf16 params/grads with fp32 master weights and moments (see adamw.h).");
  def_grad_sum_of_squares(m, "adamw_grad_sum_of_squares_f32", fastcls::adamw_grad_sum_of_squares_f32);
  def_grad_sum_of_squares(m, "adamw_grad_sum_of_squares_bf16", fastcls::adamw_grad_sum_of_squares_bf16);
  def_adamw_live_rows(m, "adamw_live_rows_f32", fastcls::adamw_live_rows_f32,
                      "adamw_f32 updating only the live rows of masked tensors, the rest decayed (adamw.h).");
  def_adamw_live_rows(m, "adamw_live_rows_bf16_master", fastcls::adamw_live_rows_bf16_master,
                      "adamw_bf16_master updating only the live rows of masked tensors (adamw.h).");
  def_grad_sum_of_squares_live_rows(m, "adamw_live_rows_grad_sum_of_squares_f32",
                                    fastcls::adamw_live_rows_grad_sum_of_squares_f32);
  def_grad_sum_of_squares_live_rows(m, "adamw_live_rows_grad_sum_of_squares_bf16",
                                    fastcls::adamw_live_rows_grad_sum_of_squares_bf16);
  def_adamw_catch_up_rows(m, "adamw_catch_up_rows_f32", fastcls::adamw_catch_up_rows_f32);
  def_adamw_catch_up_rows(m, "adamw_catch_up_rows_bf16_master", fastcls::adamw_catch_up_rows_bf16_master);
  def_cross_entropy_target_summary(m);
  def_cross_entropy_rows<float>(m, "f32", fastcls::cross_entropy_rows_f32);
  def_cross_entropy_rows<uint16_t>(m, "bf16", fastcls::cross_entropy_rows_bf16);
  def_cross_entropy_rows<uint16_t>(m, "f16", fastcls::cross_entropy_rows_f16);
  def_multi_task_cross_entropy<float>(m, "f32", fastcls::multi_task_cross_entropy_f32);
  def_multi_task_cross_entropy<uint16_t>(m, "bf16", fastcls::multi_task_cross_entropy_bf16);
  def_multi_task_cross_entropy<uint16_t>(m, "f16", fastcls::multi_task_cross_entropy_f16);
  def_dropout<float>(m, "f32", fastcls::dropout_f32);
  def_dropout<uint16_t>(m, "bf16", fastcls::dropout_bf16);
  def_layer_norm(m);
  def_varlen_attention(m);
  def_bias_gelu<float>(m, "f32", fastcls::bias_gelu_forward_f32, fastcls::bias_gelu_backward_f32);
  def_bias_gelu<uint16_t>(m, "bf16", fastcls::bias_gelu_forward_bf16, fastcls::bias_gelu_backward_bf16);
#if defined(__AVX512BF16__)
  def_linear(m);
  def_encoder_layer(m);
#endif
}
