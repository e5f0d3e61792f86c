// CUDA entry points. Calls the fused whole-plane kernel (cuda_fast.cu) serves go there;
// every other call runs the simple kernels below.
//
// Simple kernels: a 2-D transform is two launches of one kernel that transforms the last axis and
// transposes: (P, R, N) -> (P, N, R). DCT matrix tiles are computed in the kernel from
// dct_coef, so no tables live on the device.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "blurfast.h"
#include "combine.h"
#include "common.h"
#include "cuda_fast.h"

namespace blurfast {
namespace {

void check(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return;
  (void)cudaGetLastError();   // clear the slot, or the next call's launch check reports e
  throw std::runtime_error(std::string("blurfast CUDA: ") + what + ": " + cudaGetErrorString(e));
}

template <typename C, typename T> __device__ __forceinline__ C load(const T* p) { return (C)*p; }
template <> __device__ __forceinline__ float load<float, __half>(const __half* p) {
  return __half2float(*p);
}
template <> __device__ __forceinline__ float load<float, __nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}
template <typename T, typename C> __device__ __forceinline__ void store(T* p, C v) { *p = (T)v; }
template <> __device__ __forceinline__ void store<__half, float>(__half* p, float v) {
  *p = __float2half_rn(v);
}
template <> __device__ __forceinline__ void store<__nv_bfloat16, float>(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16_rn(v);
}

constexpr int TS = 16;

// out[p, l, r] = sum_n in[p, r, n] * M[l, n], M = C (forward) or C^T (inverse), C of size N,
// summed by DotSum<C> (common.h) from M's entries in double.
template <typename Tin, typename Tout, typename C>
__global__ void axis_transform(const Tin* __restrict__ in, Tout* __restrict__ out, int64_t R,
                               int64_t N, bool inverse) {
  __shared__ C xs[TS][TS + 1];
  __shared__ double ms[TS][TS + 1];
  const int64_t tiles_r = (R + TS - 1) / TS, tiles_n = (N + TS - 1) / TS;
  int64_t b = blockIdx.x;
  const int64_t tn = b % tiles_n;
  b /= tiles_n;
  const int64_t tr = b % tiles_r;
  const int64_t p = b / tiles_r;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t r0 = tr * TS, l0 = tn * TS;
  const Tin* src = in + p * R * N;
  DotSum<C> acc;
  for (int64_t n0 = 0; n0 < N; n0 += TS) {
    const int64_t rr = r0 + ty, nn = n0 + tx, ll = l0 + ty;
    xs[ty][tx] = (rr < R && nn < N) ? load<C>(src + rr * N + nn) : C(0);
    ms[ty][tx] = (ll < N && nn < N) ? (inverse ? dct_coef(nn, ll, N) : dct_coef(ll, nn, N)) : 0.0;
    __syncthreads();
#pragma unroll
    for (int j = 0; j < TS; ++j) acc.add(xs[tx][j], ms[ty][j]);
    __syncthreads();
  }
  const int64_t r = r0 + tx, l = l0 + ty;
  if (r < R && l < N) store(out + p * R * N + l * R + r, acc.value());
}

// One axis pass; the strip kernel (cuda_fast.cu) takes it where it applies.
template <typename Tin, typename Tout, typename C>
void launch_axis(const void* in, void* out, int64_t P, int64_t R, int64_t N, bool inverse,
                 cudaStream_t s, int device) {
  if constexpr (std::is_same<C, float>::value) {
    if (plane::strip_launch<Tin, Tout>(in, out, P, R, N, inverse, device, s)) return;
  }
  const int64_t blocks = P * ((R + TS - 1) / TS) * ((N + TS - 1) / TS);
  if (blocks == 0) return;
  if (blocks > 0x7fffffffLL) throw std::invalid_argument("blurfast CUDA: tensor too large");
  axis_transform<Tin, Tout, C><<<(unsigned)blocks, dim3(TS, TS), 0, s>>>(
      (const Tin*)in, (Tout*)out, R, N, inverse);
  check(cudaGetLastError(), "axis_transform launch");
}

// Planes per chunk of transform2d: about a third of the L2 cache, so that its tmp is
// read back from L2 rather than from memory (64x3x256x256 float32: 3 chunks of 64 planes,
// each still enough blocks to fill an H100), but at least one fast strip block per SM
// (GPUs with a small L2); at most P. `csize`: bytes of the compute type.
int64_t chunk_planes(int64_t P, int64_t H, int64_t W, int64_t csize, int device) {
  const int64_t plane_bytes = H * W * csize;
  const int64_t budget = plane::l2_cache_bytes(device) / 3;
  int64_t chunk = budget == 0 ? P : (plane_bytes < budget ? budget / plane_bytes : 1);
  chunk = std::max(chunk, plane::strip_min_planes(H, W, device));
  return chunk < P ? chunk : P;
}

int64_t compute_size(int dtype) { return dtype == kF64 ? 8 : 4; }

// 2-D transform: in (P,H,W) -> tmp (chunk,W,H) -> out (P,H,W), chunk by chunk.
template <typename Tin, typename Tout, typename C>
void transform2d(const void* in, void* out, C* tmp, int64_t P, int64_t H, int64_t W, bool inverse,
                 cudaStream_t s, int device) {
  const int64_t hw = H * W;
  const int64_t chunk = chunk_planes(P, H, W, sizeof(C), device);
  for (int64_t p0 = 0; p0 < P; p0 += chunk) {
    const int64_t n = P - p0 < chunk ? P - p0 : chunk;
    launch_axis<Tin, C, C>((const Tin*)in + p0 * hw, tmp, n, H, W, inverse, s, device);
    launch_axis<C, Tout, C>(tmp, (Tout*)out + p0 * hw, n, W, H, inverse, s, device);
  }
}

// combine.h's quads: blocks along x cover a plane, along y take planes y, y + gridDim.y, ...
template <typename C>
__global__ void combine_kernel(CombineJob<C> job) {
  const int64_t quads = combine_quads(job);
  for (int64_t p = blockIdx.y; p < job.planes; p += gridDim.y) {
    const PlaneMaps<C> maps(job, p);
    for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < quads;
         k += (int64_t)gridDim.x * blockDim.x)
      combine_quad(job, maps, p, k);
  }
}

template <typename C>
__global__ void normal_kernel(C* out, int64_t n, uint64_t seed, uint64_t offset) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    out[i] = philox_normal<C>(seed, offset + (uint64_t)i);
}

unsigned grid_for(int64_t n) {
  int64_t b = (n + 255) / 256;
  return (unsigned)(b < 65535 ? (b > 0 ? b : 1) : 65535);
}

template <typename T, typename C>
void spectral_typed(const SpectralParams& sp, C* ws, cudaStream_t s, int device) {
  const int64_t P = sp.planes, H = sp.H, W = sp.W, n = P * H * W;
  if (n == 0) return;
  // The workspace (spectral_workspace_elems): tmp, then f1, f2 (with x2), zb (with noise_out).
  C* tmp = ws;
  C* f1 = ws + chunk_planes(P, H, W, sizeof(C), device) * H * W;
  C* f2 = sp.x2 ? f1 + n : nullptr;
  C* zb = sp.noise_out ? f1 + (f2 ? 2 : 1) * n : nullptr;
  transform2d<T, C, C>(sp.x1, f1, tmp, P, H, W, false, s, device);
  if (f2) transform2d<T, C, C>(sp.x2, f2, tmp, P, H, W, false, s, device);
  const CombineJob<C> cj = combine_job(sp, f1, f2, zb);
  const int64_t bx = (combine_quads(cj) + 255) / 256;
  combine_kernel<C><<<dim3((unsigned)(bx < 1024 ? bx : 1024), (unsigned)(P < 65535 ? P : 65535)),
                      256, 0, s>>>(cj);
  check(cudaGetLastError(), "combine launch");
  transform2d<C, T, C>(f1, sp.out, tmp, P, H, W, true, s, device);
  if (zb) transform2d<C, T, C>(zb, sp.noise_out, tmp, P, H, W, true, s, device);
}

template <typename IO, typename Compute>
struct Types {
  using T = IO;
  using C = Compute;
};

// Calls f(Types<T, C>{}) for the I/O type T and compute type C of dtype.
template <typename F>
void dispatch(int dtype, F&& f) {
  switch (dtype) {
    case kF32: f(Types<float, float>{}); break;
    case kF64: f(Types<double, double>{}); break;
    case kF16: f(Types<__half, float>{}); break;
    case kBF16: f(Types<__nv_bfloat16, float>{}); break;
    default: throw std::invalid_argument("blurfast CUDA: unknown dtype code");
  }
}

// Makes `device` current for the call and restores the caller's device afterwards.
struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&prev), "cudaGetDevice");
    if (prev != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != prev) cudaSetDevice(prev);
  }
};

}  // namespace

namespace {

plane::Job dct2_job(const void* in, const void* out, int64_t planes, bool inverse) {
  SpectralParams p;
  p.planes = planes;
  p.x1 = in;
  p.out = const_cast<void*>(out);
  return plane::make_job(p, inverse ? plane::kIdct2 : plane::kDct2);
}

}  // namespace

int64_t dct2_workspace_elems(const void* in, const void* out, int64_t planes, int64_t H,
                             int64_t W, int dtype, int device) {
  DeviceGuard guard(device);
  // Forward and inverse need the same buffers, so either job answers for both.
  if (plane::plane_applies(dct2_job(in, out, planes, false), H, W, dtype, device)) return 0;
  return chunk_planes(planes, H, W, compute_size(dtype), device) * H * W;   // transform2d's tmp
}

int64_t spectral_workspace_elems(const SpectralParams& p, int device) {
  DeviceGuard guard(device);
  if (plane::plane_applies(plane::make_job(p, plane::kSpectral), p.H, p.W, p.dtype, device))
    return 0;
  if (const int64_t floats = plane::column_workspace_floats(p, device)) return floats;
  const int64_t n = p.planes * p.H * p.W;   // spectral_typed's tmp, f1, f2, zb
  return chunk_planes(p.planes, p.H, p.W, compute_size(p.dtype), device) * p.H * p.W +
         (1 + (p.x2 ? 1 : 0) + (p.noise_out ? 1 : 0)) * n;
}

namespace {

// The simple path's buffers come from the caller: a null one means the workspace query and
// the call disagreed (BLURFAST_CUDA_KERNELS changed between them).
void require_workspace(const void* workspace, int64_t elems) {
  if (!workspace && elems > 0)
    throw std::invalid_argument(
        "blurfast CUDA: the simple kernels need a workspace (query *_workspace_elems with the "
        "same arguments and BLURFAST_CUDA_KERNELS as the call), and none was given");
}

}  // namespace

const char* dct2_kernel_name(const void* in, const void* out, int64_t planes, int64_t H,
                             int64_t W, int dtype, int device) {
  return dct2_workspace_elems(in, out, planes, H, W, dtype, device) == 0 && planes * H * W > 0
             ? "plane" : "simple";
}

const char* spectral_kernel_name(const SpectralParams& p, int device) {
  if (p.planes * p.H * p.W == 0) return "simple";
  if (spectral_workspace_elems(p, device) == 0) return "plane";
  DeviceGuard guard(device);
  return plane::column_workspace_floats(p, device) > 0 ? "columns" : "simple";
}

void dct2_cuda(const void* in, void* out, void* workspace, int64_t planes, int64_t H, int64_t W,
               int dtype, bool inverse, int device, void* stream) {
  DeviceGuard guard(device);
  auto s = (cudaStream_t)stream;
  if (plane::plane_launch(dct2_job(in, out, planes, inverse), H, W, dtype, device, s)) return;
  require_workspace(workspace, planes * H * W);
  dispatch(dtype, [&](auto types) {
    using T = typename decltype(types)::T;
    using C = typename decltype(types)::C;
    transform2d<T, T, C>(in, out, (C*)workspace, planes, H, W, inverse, s, device);
  });
}

void spectral_cuda(const SpectralParams& p, void* workspace, int device, void* stream) {
  DeviceGuard guard(device);
  if (plane::plane_launch(plane::make_job(p, plane::kSpectral), p.H, p.W, p.dtype, device,
                          (cudaStream_t)stream))
    return;
  if (plane::column_launch(p, (float*)workspace, device, (cudaStream_t)stream)) return;
  require_workspace(workspace, p.planes * p.H * p.W);
  dispatch(p.dtype, [&](auto types) {
    using T = typename decltype(types)::T;
    using C = typename decltype(types)::C;
    spectral_typed<T, C>(p, (C*)workspace, (cudaStream_t)stream, device);
  });
}

void normal_cuda(void* out, int64_t n, int dtype, uint64_t seed, uint64_t offset, int device,
                 void* stream) {
  DeviceGuard guard(device);
  if (n == 0) return;
  auto s = (cudaStream_t)stream;
  if (dtype == kF64)
    normal_kernel<double><<<grid_for(n), 256, 0, s>>>((double*)out, n, seed, offset);
  else if (dtype == kF32)
    normal_kernel<float><<<grid_for(n), 256, 0, s>>>((float*)out, n, seed, offset);
  else
    throw std::invalid_argument("blurfast CUDA: normal_cuda takes float32 or float64");
  check(cudaGetLastError(), "normal launch");
}

}  // namespace blurfast
