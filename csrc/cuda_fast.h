// Entry points of the fast CUDA kernels (cuda_fast.cu), for cuda_kernels.cu.
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

// One strip pass (strip_program.h): in (planes, rows, L) of Tin -> out (planes, L, rows)
// of Tout, float arithmetic. Launches and returns true when L is 32, 64, 128 or 256,
// rows % 32 == 0, the pointers allow vector access and the shared memory fits; else
// returns false and does nothing. Instantiated for (float, float) and for a 16-bit type
// (__half, __nv_bfloat16) on one side with float on the other.
// same_layout (fast inverse passes with float input only; else returns false): out
// (planes, rows, L); with out2, rows from split_rows on go to out2 instead. in2 (fast
// passes, L = 256, split_rows a multiple of 64): rows from split_rows on come from in2.
template <typename Tin, typename Tout>
bool strip_launch(const void* in, void* out, int64_t planes, int64_t rows, int64_t L,
                  bool inverse, int device, cudaStream_t stream, bool same_layout = false,
                  void* out2 = nullptr, int64_t split_rows = 0, const void* in2 = nullptr);

// The fused op in three passes (column_program.h), for calls the whole-plane kernel does
// not serve: H and W in {32, 64, 128, 256}, float32, float16 or bfloat16 I/O, the fast
// kernels chosen (not "fast+separate"). The workspace it needs in floats (0: it does not
// serve the call), and its launch (false, doing nothing, where it does not serve it).
int64_t column_workspace_floats(const SpectralParams& p, int device);
bool column_launch(const SpectralParams& p, float* ws, int device, cudaStream_t stream);

// The L2 cache size of `device` in bytes (cached).
int64_t l2_cache_bytes(int device);
// Planes of `rows` rows of L whose fast strip pass has one block per SM of `device` (1
// where L is not a strip length).
int64_t strip_min_planes(int64_t rows, int64_t L, int device);

}  // namespace plane
}  // namespace blurfast
