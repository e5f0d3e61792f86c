// Entry points of the fused whole-plane CUDA kernel (cuda_fast.cu), for cuda_kernels.cu.
#pragma once
#include <cuda_runtime.h>

#include "plane_program.h"

namespace blurfast {
namespace plane {

// Whether the fused kernel serves this call on `device` (size, type, alignment, shared
// memory, BLURFAST_CUDA_KERNELS).
bool plane_applies(const Job& job, int64_t H, int64_t W, int dtype, int device);
// Launches it when it applies; returns false (and does nothing) otherwise.
bool plane_launch(const Job& job, int64_t H, int64_t W, int dtype, int device,
                  cudaStream_t stream);

}  // namespace plane
}  // namespace blurfast
