// The one pybind11 module, fastcls._C. Tensors cross as raw addresses (Python's tensor.data_ptr()), so the
// extension needs no torch headers; the Python op modules own shapes, dtypes, contiguity and allocation.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "cross_entropy.h"
#include "dropout.h"

namespace py = pybind11;

namespace {

template <typename T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

template <typename Logit>
using ForwardKernel = void (*)(const Logit*, int64_t, int64_t, int64_t, const int64_t*, int64_t, float*, float*, int);
template <typename Logit>
using BackwardKernel = void (*)(const Logit*, int64_t, int64_t, int64_t, const int64_t*, int64_t, const float*,
                                const float*, Logit*, int);

template <typename Logit>
void def_cross_entropy(py::module_& m, const char* suffix, ForwardKernel<Logit> forward,
                       BackwardKernel<Logit> backward) {
  m.def(
      (std::string("cross_entropy_forward_") + suffix).c_str(),
      [forward](std::uintptr_t logits, int64_t n_rows, int64_t n_classes, int64_t row_stride, std::uintptr_t target,
                int64_t ignore_index, std::uintptr_t loss, std::uintptr_t lse, int num_threads) {
        py::gil_scoped_release release;
        forward(as_ptr<const Logit>(logits), n_rows, n_classes, row_stride, as_ptr<const int64_t>(target),
                ignore_index, as_ptr<float>(loss), as_ptr<float>(lse), num_threads);
      },
      py::arg("logits"), py::arg("n_rows"), py::arg("n_classes"), py::arg("row_stride"), py::arg("target"),
      py::arg("ignore_index"), py::arg("loss"), py::arg("lse"), py::arg("num_threads"),
      "Per-row loss and logsumexp (fp32) of softmax cross-entropy; IndexError on an out-of-range target.");
  m.def(
      (std::string("cross_entropy_backward_") + suffix).c_str(),
      [backward](std::uintptr_t logits, int64_t n_rows, int64_t n_classes, int64_t row_stride,
                 std::uintptr_t target, int64_t ignore_index, std::uintptr_t lse, std::uintptr_t scale,
                 std::uintptr_t grad, int num_threads) {
        py::gil_scoped_release release;
        backward(as_ptr<const Logit>(logits), n_rows, n_classes, row_stride, as_ptr<const int64_t>(target),
                 ignore_index, as_ptr<const float>(lse), as_ptr<const float>(scale), as_ptr<Logit>(grad),
                 num_threads);
      },
      py::arg("logits"), py::arg("n_rows"), py::arg("n_classes"), py::arg("row_stride"), py::arg("target"),
      py::arg("ignore_index"), py::arg("lse"), py::arg("scale"), py::arg("grad"), py::arg("num_threads"),
      "Gradient of softmax cross-entropy into a contiguous grad[n_rows, n_classes] of the logits' dtype.");
}

template <typename Element>
using DropoutKernel = void (*)(const Element*, Element*, int64_t, uint64_t, uint64_t, float, int);

template <typename Element>
void def_dropout(py::module_& m, const char* suffix, DropoutKernel<Element> kernel) {
  m.def(
      (std::string("dropout_") + suffix).c_str(),
      [kernel](std::uintptr_t x, std::uintptr_t out, int64_t n, uint64_t seed, uint64_t threshold, float scale,
               int num_threads) {
        py::gil_scoped_release release;
        kernel(as_ptr<const Element>(x), as_ptr<Element>(out), n, seed, threshold, scale, num_threads);
      },
      py::arg("x"), py::arg("out"), py::arg("n"), py::arg("seed"), py::arg("threshold"), py::arg("scale"),
      py::arg("num_threads"),
      "out = keep * x * scale over n contiguous elements, keep = Philox bits >= threshold (see dropout.h); "
      "the same call on the upstream gradient is the backward.");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastcls C++ CPU kernels (raw-pointer interface; see fastcls/ops for the torch-facing ops)";
  def_cross_entropy<float>(m, "f32", fastcls::cross_entropy_forward_f32, fastcls::cross_entropy_backward_f32);
  def_cross_entropy<uint16_t>(m, "bf16", fastcls::cross_entropy_forward_bf16, fastcls::cross_entropy_backward_bf16);
  def_dropout<float>(m, "f32", fastcls::dropout_f32);
  def_dropout<uint16_t>(m, "bf16", fastcls::dropout_bf16);
}
