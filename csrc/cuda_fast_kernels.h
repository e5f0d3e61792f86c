// Handles of the fast CUDA kernels (cuda_fast_kernels.cuh): the host code of
// cuda_fast.cu plans and launches through them without compiling any device code.
// Each handle is instantiated in the translation unit of its I/O type.
#pragma once
#include <cuda_runtime.h>

#include "column_program.h"
#include "plane_program.h"
#include "strip_program.h"

namespace blurfast {
namespace plane {

// The whole-plane kernel of geometry G (a Geom) and I/O type T.
template <typename G, typename T>
struct PlaneKernel {
  static const void* ptr();     // for occupancy queries and attributes
  static void launch(unsigned grid, size_t bytes, cudaStream_t stream, const Job& job);
};

// The strip kernel (fast or dense passes) for rows of L, Tin -> Tout; SameLayout: the fast
// inverse pass that keeps the rows' layout (run_fast_strips).
template <int L, typename Tin, typename Tout, bool Fast, bool SameLayout = false>
struct StripKernel {
  static const void* ptr();
  static void launch(unsigned grid, size_t bytes, cudaStream_t stream, const StripJob& job);
};

// The column pass of the fused op at 256 x 256 (column_program.h), float in and out.
template <int L>
struct ColumnKernel {
  static const void* ptr();
  static void launch(unsigned grid, size_t bytes, cudaStream_t stream, const ColumnJob& job);
};

}  // namespace plane
}  // namespace blurfast
