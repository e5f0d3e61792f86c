// pybind11 module blurfast._C: thin wrappers passing raw pointers (Python ints) to the
// kernel library. No libtorch: Python passes data_ptr(), sizes and the stream handle.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "blurfast.h"
#include "common.h"

namespace py = pybind11;
using namespace blurfast;

namespace {

const void* cptr(uintptr_t p) { return reinterpret_cast<const void*>(p); }
void* mptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

MapRef map_ref(py::object m) {
  MapRef r;
  if (m.is_none()) return r;
  auto t = m.cast<std::tuple<uintptr_t, int64_t, int64_t>>();
  r.ptr = cptr(std::get<0>(t));
  r.div = std::get<1>(t);
  r.mod = std::get<2>(t);
  return r;
}

SpectralParams spectral_params(int64_t planes, int64_t H, int64_t W, int dtype, uintptr_t x1,
                               uintptr_t x2, py::object a1, py::object a2, py::object g,
                               uintptr_t zb, uint64_t seed, uint64_t offset, uintptr_t out,
                               uintptr_t noise_out) {
  SpectralParams p;
  p.planes = planes;
  p.H = H;
  p.W = W;
  p.dtype = dtype;
  p.x1 = cptr(x1);
  p.x2 = cptr(x2);
  p.a1 = map_ref(a1);
  p.a2 = map_ref(a2);
  p.g = map_ref(g);
  p.zb = cptr(zb);
  p.seed = seed;
  p.offset = offset;
  p.out = mptr(out);
  p.noise_out = mptr(noise_out);
  return p;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "blurfast kernels (raw-pointer API; see blurfast/ops.py)";
  m.attr("has_cuda") =
#ifdef BLURFAST_WITH_CUDA
      true;
  m.attr("cuda_archs") = std::string(BLURFAST_CUDA_ARCHS);
#else
      false;
  m.attr("cuda_archs") = std::string("");
#endif

  m.def("philox4x32_10", [](std::array<uint32_t, 4> ctr, std::array<uint32_t, 2> key) {
    philox4x32_10(ctr.data(), key[0], key[1]);
    return ctr;
  }, "Philox4x32-10 of one counter block (for known-answer tests).");
  m.def("box_muller_f", [](uint32_t w1, uint32_t w2) {
    float c = 0.f, s = 0.f;
    box_muller_f(w1, w2, &c, &s);
    return std::make_pair(c, s);
  }, "Float Box-Muller of two Philox words: (r cos, r sin) (for tests).");

  m.def("dot_sum", [](const std::vector<double>& x, const std::vector<double>& m, bool in_float) {
    if (x.size() != m.size()) throw std::invalid_argument("dot_sum: x and m differ in length");
    if (in_float) {
      DotSum<float> acc;
      for (size_t i = 0; i < x.size(); ++i) acc.add((float)x[i], m[i]);
      return (double)acc.value();
    }
    DotSum<double> acc;
    for (size_t i = 0; i < x.size(); ++i) acc.add(x[i], m[i]);
    return acc.value();
  }, "The simple CUDA kernels' sum of x_i m_i (DotSum, x as float with in_float) (for tests).");

  m.def("dct2_cpu", [](uintptr_t in, uintptr_t out, int64_t planes, int64_t H, int64_t W,
                       int dtype, bool inverse, int num_threads) {
    py::gil_scoped_release nogil;
    dct2_cpu(cptr(in), mptr(out), planes, H, W, dtype, inverse, num_threads);
  });
  m.def("spectral_cpu", [](int64_t planes, int64_t H, int64_t W, int dtype, uintptr_t x1,
                           uintptr_t x2, py::object a1, py::object a2, py::object g, uintptr_t zb,
                           uint64_t seed, uint64_t offset, uintptr_t out, uintptr_t noise_out,
                           int num_threads) {
    SpectralParams p = spectral_params(planes, H, W, dtype, x1, x2, a1, a2, g, zb, seed, offset,
                                       out, noise_out);
    py::gil_scoped_release nogil;
    spectral_cpu(p, num_threads);
  });
  m.def("plane_emulate", [](int64_t planes, int64_t H, int64_t W, int dtype, uintptr_t x1,
                            uintptr_t x2, py::object a1, py::object a2, py::object g,
                            uintptr_t zb, uint64_t seed, uint64_t offset, uintptr_t out,
                            uintptr_t noise_out, int mode, int64_t grid, bool reverse_threads,
                            int split, bool fast, bool prefetch) {
    SpectralParams p = spectral_params(planes, H, W, dtype, x1, x2, a1, a2, g, zb, seed, offset,
                                       out, noise_out);
    py::gil_scoped_release nogil;
    plane_emulate(p, mode, grid, reverse_threads, split, fast, prefetch);
  }, "CPU emulation of the fused whole-plane CUDA kernel (tests only).");
  m.def("combine_emulate", [](int64_t planes, int64_t H, int64_t W, int dtype, uintptr_t f1,
                              uintptr_t f2, py::object a1, py::object a2, py::object g,
                              uintptr_t zb, uint64_t seed, uint64_t offset, uintptr_t out,
                              uintptr_t zb_out) {
    (void)out;
    SpectralParams p = spectral_params(planes, H, W, dtype, f1, f2, a1, a2, g, zb, seed, offset,
                                       0, zb_out);
    py::gil_scoped_release nogil;
    combine_emulate(p);
  }, "CPU emulation of the CUDA path's frequency-space combine, in place in f1 (tests only).");
  m.def("strip_emulate", [](uintptr_t in, uintptr_t out, int64_t planes, int64_t rows, int64_t L,
                            bool inverse, int64_t grid, bool reverse_threads, bool fast,
                            int in_dtype, int out_dtype, bool same_layout, uintptr_t out2,
                            int64_t split_rows, uintptr_t in2) {
    py::gil_scoped_release nogil;
    strip_emulate(cptr(in), mptr(out), planes, rows, L, inverse, grid, reverse_threads, fast,
                  in_dtype, out_dtype, same_layout, mptr(out2), split_rows, cptr(in2));
  }, "CPU emulation of the strip CUDA kernel (tests only).");
  m.def("column_emulate", [](int64_t planes, int64_t H, int64_t W, int dtype, uintptr_t t1,
                             uintptr_t t2, py::object a1, py::object a2, py::object g,
                             uintptr_t zb, uint64_t seed, uint64_t offset, uintptr_t u1,
                             uintptr_t u2, int64_t grid, bool reverse_threads,
                             int64_t chunk) {
    SpectralParams p = spectral_params(planes, H, W, dtype, t1, t2, a1, a2, g, zb, seed, offset,
                                       u1, u2);
    py::gil_scoped_release nogil;
    column_emulate(p, grid, reverse_threads, chunk);
  }, "CPU emulation of the column pass of the CUDA fused op at 256 x 256 (tests only).");
  m.def("emulator_selfcheck", [](const std::string& program, bool fixed, bool reverse) {
    py::gil_scoped_release nogil;
    return emulator_selfcheck(program, fixed, reverse);
  }, "Runs a deliberately broken toy block program (or its fix) on the emulator (tests only).");
  m.def("normal_cpu", [](uintptr_t out, int64_t n, int dtype, uint64_t seed, uint64_t offset) {
    py::gil_scoped_release nogil;
    normal_cpu(mptr(out), n, dtype, seed, offset);
  });
  m.def("cpu_build", [] { return std::string(cpu_build()); },
        "The build of the CPU kernels that serves calls now: 'avx2', 'baseline' or 'portable'.");

#ifdef BLURFAST_WITH_CUDA
  m.def("dct2_workspace_elems", [](uintptr_t in, uintptr_t out, int64_t planes, int64_t H,
                                   int64_t W, int dtype, int device) {
    return dct2_workspace_elems(cptr(in), cptr(out), planes, H, W, dtype, device);
  });
  m.def("dct2_kernel_name", [](uintptr_t in, uintptr_t out, int64_t planes, int64_t H, int64_t W,
                               int dtype, int device) {
    return std::string(dct2_kernel_name(cptr(in), cptr(out), planes, H, W, dtype, device));
  });
  m.def("spectral_workspace_elems", [](int64_t planes, int64_t H, int64_t W, int dtype,
                                       uintptr_t x1, uintptr_t x2, py::object a1, py::object a2,
                                       py::object g, uintptr_t zb, uint64_t seed, uint64_t offset,
                                       uintptr_t out, uintptr_t noise_out, int device) {
    return spectral_workspace_elems(spectral_params(planes, H, W, dtype, x1, x2, a1, a2, g, zb,
                                                    seed, offset, out, noise_out), device);
  });
  m.def("spectral_kernel_name", [](int64_t planes, int64_t H, int64_t W, int dtype, uintptr_t x1,
                                   uintptr_t x2, py::object a1, py::object a2, py::object g,
                                   uintptr_t zb, uint64_t seed, uint64_t offset, uintptr_t out,
                                   uintptr_t noise_out, int device) {
    return std::string(spectral_kernel_name(spectral_params(planes, H, W, dtype, x1, x2, a1, a2,
                                                            g, zb, seed, offset, out, noise_out),
                                            device));
  });
  m.def("dct2_cuda", [](uintptr_t in, uintptr_t out, uintptr_t ws, int64_t planes, int64_t H,
                        int64_t W, int dtype, bool inverse, int device, uintptr_t stream) {
    py::gil_scoped_release nogil;
    dct2_cuda(cptr(in), mptr(out), mptr(ws), planes, H, W, dtype, inverse, device, mptr(stream));
  });
  m.def("spectral_cuda", [](int64_t planes, int64_t H, int64_t W, int dtype, uintptr_t x1,
                            uintptr_t x2, py::object a1, py::object a2, py::object g, uintptr_t zb,
                            uint64_t seed, uint64_t offset, uintptr_t out, uintptr_t noise_out,
                            uintptr_t ws, int device, uintptr_t stream) {
    SpectralParams p = spectral_params(planes, H, W, dtype, x1, x2, a1, a2, g, zb, seed, offset,
                                       out, noise_out);
    py::gil_scoped_release nogil;
    spectral_cuda(p, mptr(ws), device, mptr(stream));
  });
  m.def("normal_cuda", [](uintptr_t out, int64_t n, int dtype, uint64_t seed, uint64_t offset,
                          int device, uintptr_t stream) {
    py::gil_scoped_release nogil;
    normal_cuda(mptr(out), n, dtype, seed, offset, device, mptr(stream));
  });
#endif
}
