// The fast kernels' device code: the programs of plane_program.h and strip_program.h as
// CUDA kernels, and the handles of cuda_fast_kernels.h that launch them. Included by one
// translation unit per I/O type (cuda_fast_f32.cu, cuda_fast_f16.cu, cuda_fast_bf16.cu),
// each instantiating its own kernels, so they compile in parallel.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_fast_kernels.h"

namespace blurfast {
namespace plane {

template <> BF_HD void load4<__half>(const __half* p, float v[4]) {
#ifdef __CUDA_ARCH__
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const float2 lo = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
  const float2 hi = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
  v[0] = lo.x; v[1] = lo.y; v[2] = hi.x; v[3] = hi.y;
#else
  for (int q = 0; q < 4; ++q) v[q] = __half2float(p[q]);
#endif
}

template <> BF_HD void store4<__half>(__half* p, const float v[4]) {
#ifdef __CUDA_ARCH__
  const __half2 lo = __floats2half2_rn(v[0], v[1]), hi = __floats2half2_rn(v[2], v[3]);
  uint2 raw;
  raw.x = *reinterpret_cast<const unsigned*>(&lo);
  raw.y = *reinterpret_cast<const unsigned*>(&hi);
  stg_v2(p, raw.x, raw.y);
#else
  for (int q = 0; q < 4; ++q) p[q] = __float2half_rn(v[q]);
#endif
}

template <> BF_HD void store1<__half>(__half* p, float v) { *p = __float2half_rn(v); }
template <> BF_HD void store1<__nv_bfloat16>(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16_rn(v);
}

template <> BF_HD void load4<__nv_bfloat16>(const __nv_bfloat16* p, float v[4]) {
#ifdef __CUDA_ARCH__
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
  const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
  v[0] = lo.x; v[1] = lo.y; v[2] = hi.x; v[3] = hi.y;
#else
  for (int q = 0; q < 4; ++q) v[q] = __bfloat162float(p[q]);
#endif
}

template <> BF_HD void store4<__nv_bfloat16>(__nv_bfloat16* p, const float v[4]) {
#ifdef __CUDA_ARCH__
  const __nv_bfloat162 lo = __floats2bfloat162_rn(v[0], v[1]);
  const __nv_bfloat162 hi = __floats2bfloat162_rn(v[2], v[3]);
  uint2 raw;
  raw.x = *reinterpret_cast<const unsigned*>(&lo);
  raw.y = *reinterpret_cast<const unsigned*>(&hi);
  stg_v2(p, raw.x, raw.y);
#else
  for (int q = 0; q < 4; ++q) p[q] = __float2bfloat16_rn(v[q]);
#endif
}

namespace gpu {


struct GpuCtx {
  __device__ int64_t block() const { return blockIdx.x; }
  __device__ int64_t grid() const { return gridDim.x; }
  template <typename F>
  __device__ void phase(F&& f) {
    f((int)threadIdx.x);
    __syncthreads();
  }
  // State a thread keeps from one phase to a later one: its own registers.
  template <typename T>
  struct PerThread {
    T v;
    __device__ T& operator()(int) { return v; }
  };
  template <typename T>
  __device__ PerThread<T> per_thread() const {
    return PerThread<T>{};
  }
  // 16 bytes global -> shared without registers (cp.async, sm_80 and later; L2 only).
  __device__ void copy16_async(float* dst, const float* src) {
#if __CUDA_ARCH__ >= 800
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
#else
    *reinterpret_cast<float4*>(dst) = *reinterpret_cast<const float4*>(src);
#endif
  }
  // Until this thread's asynchronous copies have landed.
  __device__ void wait_async() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
  }
};

// Blocks per SM the register budget is sized for: 2 where the shared memory of a call
// with three buffers allows 2 or more (N = 32, 64 with split 1), and for the wide
// geometry (split 4: 2 blocks of 256 threads, its reason to be), else 1. A cap for 4
// blocks at N = 64 split 2 (fast+occ) was no faster in run v6 and is gone
// (benchmarks/LOG.md, version 6).
template <typename G>
struct MinBlocks {
  static constexpr int value = G::kSplit == 4 ? 2 : G::N == 128 || G::kSplit >= 2 ? 1 : 2;
};

template <typename G, typename T>
__global__ void __launch_bounds__(G::kThreads, MinBlocks<G>::value) plane_kernel(Job job) {
  extern __shared__ float4 smem4[];
  GpuCtx ctx;
  run_program<G, T>(ctx, job, reinterpret_cast<float*>(smem4));
}

template <int L, typename Tin, typename Tout>
__global__ void __launch_bounds__(StripGeom<L>::kThreads) strip_kernel(StripJob job) {
  extern __shared__ float4 smem4[];
  GpuCtx ctx;
  run_strips<L, Tin, Tout>(ctx, job, reinterpret_cast<float*>(smem4));
}

template <int L, typename Tin, typename Tout, bool SameLayout>
__global__ void __launch_bounds__(FastStripGeom<L>::kThreads) fast_strip_kernel(StripJob job) {
  extern __shared__ float4 smem4[];
  GpuCtx ctx;
  run_fast_strips<L, Tin, Tout, GpuCtx, SameLayout>(ctx, job, reinterpret_cast<float*>(smem4));
}

template <int L>
__global__ void __launch_bounds__(ColumnGeom<L>::kThreads) column_kernel(ColumnJob job) {
  extern __shared__ float4 smem4[];
  GpuCtx ctx;
  run_column_spectral<L>(ctx, job, reinterpret_cast<float*>(smem4));
}

}  // namespace gpu

template <int L>
const void* ColumnKernel<L>::ptr() {
  return reinterpret_cast<const void*>(&gpu::column_kernel<L>);
}

template <int L>
void ColumnKernel<L>::launch(unsigned grid, size_t bytes, cudaStream_t stream,
                             const ColumnJob& job) {
  gpu::column_kernel<L><<<grid, ColumnGeom<L>::kThreads, bytes, stream>>>(job);
}

template <typename G, typename T>
const void* PlaneKernel<G, T>::ptr() {
  return reinterpret_cast<const void*>(&gpu::plane_kernel<G, T>);
}

template <typename G, typename T>
void PlaneKernel<G, T>::launch(unsigned grid, size_t bytes, cudaStream_t stream, const Job& job) {
  gpu::plane_kernel<G, T><<<grid, G::kThreads, bytes, stream>>>(job);
}

template <int L, typename Tin, typename Tout, bool Fast, bool SameLayout>
const void* StripKernel<L, Tin, Tout, Fast, SameLayout>::ptr() {
  static_assert(Fast || !SameLayout, "same layout: fast passes only");
  if constexpr (Fast)
    return reinterpret_cast<const void*>(&gpu::fast_strip_kernel<L, Tin, Tout, SameLayout>);
  else
    return reinterpret_cast<const void*>(&gpu::strip_kernel<L, Tin, Tout>);
}

template <int L, typename Tin, typename Tout, bool Fast, bool SameLayout>
void StripKernel<L, Tin, Tout, Fast, SameLayout>::launch(unsigned grid, size_t bytes,
                                                         cudaStream_t stream,
                                                         const StripJob& job) {
  if constexpr (Fast)
    gpu::fast_strip_kernel<L, Tin, Tout, SameLayout>
        <<<grid, FastStripGeom<L>::kThreads, bytes, stream>>>(job);
  else
    gpu::strip_kernel<L, Tin, Tout><<<grid, StripGeom<L>::kThreads, bytes, stream>>>(job);
}

// Every kernel of one I/O type: the plane kernel in each geometry make_plan may choose.
#define BLURFAST_PLANE_KERNELS(T)                       \
  template struct PlaneKernel<Geom<32, 1, true>, T>;    \
  template struct PlaneKernel<Geom<64, 1, true>, T>;    \
  template struct PlaneKernel<Geom<64, 2, true>, T>;    \
  template struct PlaneKernel<Geom<64, 4, true>, T>;    \
  template struct PlaneKernel<Geom<128, 1, true>, T>;   \
  template struct PlaneKernel<Geom<32>, T>;             \
  template struct PlaneKernel<Geom<64>, T>;             \
  template struct PlaneKernel<Geom<64, 2>, T>;          \
  template struct PlaneKernel<Geom<128>, T>;            \
  template struct PlaneKernel<Geom<128, 2>, T>;

// Both strip kernels for every row length, Tin -> Tout; the same-layout inverse pass of
// the column path (float in).
#define BLURFAST_STRIP_KERNELS_L(L, Tin, Tout)          \
  template struct StripKernel<L, Tin, Tout, true>;      \
  template struct StripKernel<L, Tin, Tout, false>;
#define BLURFAST_SAME_LAYOUT_KERNELS(Tout)                \
  template struct StripKernel<32, float, Tout, true, true>;  \
  template struct StripKernel<64, float, Tout, true, true>;  \
  template struct StripKernel<128, float, Tout, true, true>; \
  template struct StripKernel<256, float, Tout, true, true>;
#define BLURFAST_STRIP_KERNELS(Tin, Tout)               \
  BLURFAST_STRIP_KERNELS_L(32, Tin, Tout)               \
  BLURFAST_STRIP_KERNELS_L(64, Tin, Tout)               \
  BLURFAST_STRIP_KERNELS_L(128, Tin, Tout)              \
  BLURFAST_STRIP_KERNELS_L(256, Tin, Tout)

}  // namespace plane
}  // namespace blurfast
