// blurfast kernel library: torch-free C++ API (raw pointers, sizes, streams).
//
// Layout: every tensor is a contiguous stack of `planes` planes of H x W.
// Transforms are the orthonormal 2-D DCT-II (forward) and DCT-III (inverse).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace blurfast {

// Element types of inputs and outputs. Arithmetic is float64 for kF64, else float32.
enum DType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

// A frequency map of shape (mod, H, W) in the compute type: plane p of the data
// uses map plane (p / div) % mod. ptr == nullptr means "term absent".
struct MapRef {
  const void* ptr = nullptr;
  int64_t div = 1;
  int64_t mod = 1;
};

// out = idct2(a1 * dct2(x1) + a2 * dct2(x2) + g * zb), optionally noise_out = idct2(zb).
// zb is `zb` (compute type, frequency space) when given, else Philox normals:
// element e = offset + flat_index uses philox_normal<C>(seed, e), C the compute type.
struct SpectralParams {
  int64_t planes = 0, H = 0, W = 0;
  int dtype = kF32;                 // type of x1, x2, out, noise_out
  const void* x1 = nullptr;
  const void* x2 = nullptr;         // optional
  MapRef a1, a2, g;                 // a2 only with x2; g optional
  const void* zb = nullptr;         // optional given noise (compute type)
  uint64_t seed = 0, offset = 0;
  void* out = nullptr;
  void* noise_out = nullptr;        // optional
};

// CPU (dtype kF32 or kF64). num_threads <= 0: all hardware threads.
void dct2_cpu(const void* in, void* out, int64_t planes, int64_t H, int64_t W, int dtype,
              bool inverse, int num_threads);
void spectral_cpu(const SpectralParams& p, int num_threads);
void normal_cpu(void* out, int64_t n, int dtype, uint64_t seed, uint64_t offset);
// Which build of the CPU kernels serves calls now: on x86-64 "avx2" (AVX2 + FMA) or
// "baseline"; elsewhere "portable".
const char* cpu_build();

// Test hook: runs the fused whole-plane CUDA program (plane_program.h) on the CPU, for
// float32 or bfloat16 I/O (p.dtype) and H = W in {32, 64, 128}. mode: 0 dct2 (x1 -> out), 1 idct2, 2 spectral.
// grid: number of blocks; reverse_threads: run the blocks, and each phase's threads,
// last to first; split: the work split (1; 2 at N = 64, and at 128 with the dense passes: one plane per
// block; 4 at N = 64 with the fast passes: the wide geometry); fast: the fast passes (two
// threads per row, O(N log N)) instead of the dense ones; prefetch: copy the next plane
// group's input while working on this one (prefetch_group in plane_program.h); float32
// only, ignored for bfloat16 as on the GPU.
void plane_emulate(const SpectralParams& p, int mode, int64_t grid, bool reverse_threads,
                   int split, bool fast, bool prefetch);
// Test hook: runs the strip CUDA programs (strip_program.h) on the CPU:
// in (planes, rows, L) -> out (planes, L, rows), each row transformed, rows % 32 == 0;
// fast: run_fast_strips, else run_strips (dense passes). in_dtype, out_dtype: kF32 both,
// or one of them kBF16 (the pairs the GPU runs: bfloat16 in the first pass of a 2-D
// transform, in the second out).
// same_layout (fast inverse passes, float input): out (planes, rows, L), rows kept in
// place; with out2 (not null), rows from split_rows on go to out2; with in2 (fast passes,
// split_rows a multiple of a block's rows), rows from split_rows on come from in2.
void strip_emulate(const void* in, void* out, int64_t planes, int64_t rows, int64_t L,
                   bool inverse, int64_t grid, bool reverse_threads, bool fast, int in_dtype,
                   int out_dtype, bool same_layout, void* out2, int64_t split_rows,
                   const void* in2);
// Test hook: runs the column pass of the fused op at 256 x 256 (column_program.h) on the
// CPU, float32: p.x1 (and p.x2) hold the row passes of x1 (x2), (planes, W, H); p.out and
// p.noise_out receive the inverse column passes of the result and the noise, (planes, H,
// W); maps, zb, seed and offset are the call's. H in {32, 64, 128, 256}, W % 32 == 0.
// chunk: planes per launch, as the GPU runs calls whose intermediates exceed its L2.
void column_emulate(const SpectralParams& p, int64_t grid, bool reverse_threads,
                    int64_t chunk);
// Test hook: runs the CUDA path's frequency-space combine (combine.h) on the CPU, float32
// or float64: x1 holds f1 and receives the result, x2 is f2, noise_out receives zb.
void combine_emulate(const SpectralParams& p);
// Test hook: checks the emulator's own checks. Runs the toy block program `program`
// (missing_barrier, unwritten_read, async_read_before_wait, async_never_waited,
// write_other_block, read_outside, write_input: each a deliberate bug; `fixed`: its
// corrected version) on the emulator, threads and blocks in reverse order with
// `reverse`, and returns its output: input 1, 2, ..., 64 copied, in missing_barrier
// shifted one thread left within each block.
std::vector<float> emulator_selfcheck(const std::string& program, bool fixed, bool reverse);

#ifdef BLURFAST_WITH_CUDA
// CUDA (any DType). `workspace` holds at least workspace_elems(...) compute-type
// elements (0 when the fused whole-plane kernel serves the call); `stream` is a
// cudaStream_t; kernels run on `device`. Environment BLURFAST_CUDA_KERNELS=simple turns
// the fused kernel off (for comparisons).
int64_t dct2_workspace_elems(const void* in, const void* out, int64_t planes, int64_t H,
                             int64_t W, int dtype, int device);
int64_t spectral_workspace_elems(const SpectralParams& p, int device);
// Which kernel serves a call: "plane" (fused, one launch) or "simple" (several launches).
const char* dct2_kernel_name(const void* in, const void* out, int64_t planes, int64_t H,
                             int64_t W, int dtype, int device);
const char* spectral_kernel_name(const SpectralParams& p, int device);
void dct2_cuda(const void* in, void* out, void* workspace, int64_t planes, int64_t H, int64_t W,
               int dtype, bool inverse, int device, void* stream);
void spectral_cuda(const SpectralParams& p, void* workspace, int device, void* stream);
void normal_cuda(void* out, int64_t n, int dtype, uint64_t seed, uint64_t offset, int device,
                 void* stream);
#endif

}  // namespace blurfast
