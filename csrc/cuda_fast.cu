// The fast CUDA kernels: the programs of plane_program.h and strip_program.h as kernels.
//
// Whole-plane kernel: one launch per call. A block holds Geom::kPPB planes in shared
// memory; blocks loop over plane groups (grid = resident blocks). Calls with fewer plane
// groups than SMs take the split geometry (one plane per block). Serves float32, float16
// and bfloat16 I/O with float arithmetic for H = W in {32, 64, 128} when the shared memory
// fits (N = 128 with three buffers needs Hopper's 227 KiB).
// Passes (line_passes.h): fast by default; BLURFAST_CUDA_KERNELS=dense takes the dense
// ones (tables in shared memory, built once per block), =simple no fused kernel at all.
//
// Strip kernels: one 1-D pass with transposed output (two make a 2-D transform); the
// simple path (cuda_kernels.cu) uses them for rows of 32, 64, 128 or 256 elements, 256 x 256
// planes included. Fast passes by default, dense with BLURFAST_CUDA_KERNELS=dense.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_fast.h"
#include "plane_program.h"
#include "strip_program.h"

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
  *reinterpret_cast<uint2*>(p) = raw;
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
  *reinterpret_cast<uint2*>(p) = raw;
#else
  for (int q = 0; q < 4; ++q) p[q] = __float2bfloat16_rn(v[q]);
#endif
}

namespace {

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
// with three buffers allows 2 or more (N = 32, 64 with split 1), else 1. (A cap of 4
// blocks at N = 64 split, 128 registers, measured slower: benchmarks/NOTES.md.)
template <typename G>
constexpr int kMinBlocks = G::N == 128 || G::kSplit == 2 ? 1 : 2;

template <typename G, typename T>
__global__ void __launch_bounds__(G::kThreads, kMinBlocks<G>) plane_kernel(Job job) {
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

template <int L, typename Tin, typename Tout>
__global__ void __launch_bounds__(FastStripGeom<L>::kThreads) fast_strip_kernel(StripJob job) {
  extern __shared__ float4 smem4[];
  GpuCtx ctx;
  run_fast_strips<L, Tin, Tout>(ctx, job, reinterpret_cast<float*>(smem4));
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("blurfast CUDA (plane kernel): ") + what + ": " +
                             cudaGetErrorString(e));
}

// Resident blocks per SM of one instantiation when a call uses `bytes` of shared memory;
// 0 when that does not fit. `max_bytes` (>= bytes) is the most any call of this kernel
// uses: the kernel's dynamic shared-memory limit is raised to it once, so a later call
// with more bytes than an earlier one still launches. Cached per (device, kernel, bytes).
int blocks_per_sm(const void* kernel, int threads, int device, int64_t bytes,
                  int64_t max_bytes) {
  static std::mutex mu;
  static std::map<std::tuple<int, const void*, int64_t>, int> cache;
  static std::map<std::pair<int, const void*>, int64_t> limit;   // attribute set so far
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(device, kernel, bytes);  // (kernel fixes threads)
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int optin = 0, nb = 0;
  check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
        "cudaDeviceGetAttribute");
  if (bytes <= optin) {
    const int64_t want = max_bytes <= optin ? max_bytes : bytes;
    int64_t& have = limit[std::make_pair(device, kernel)];
    if (have < want) {
      check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)want),
            "cudaFuncSetAttribute");
      have = want;
    }
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, kernel, threads, (size_t)bytes),
          "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  }
  cache[key] = nb;
  return nb;
}

// A device attribute, cached: launches inside CUDA-graph capture then make no queries.
int device_attr(int device, cudaDeviceAttr attr, const char* what) {
  static std::mutex mu;
  static std::map<std::pair<int, int>, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(device, (int)attr);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int v = 0;
  check(cudaDeviceGetAttribute(&v, attr, device), what);
  cache[key] = v;
  return v;
}

int sm_count(int device) {
  return device_attr(device, cudaDevAttrMultiProcessorCount, "SM count");
}

bool aligned(const void* p, size_t bytes) { return ((uintptr_t)p % bytes) == 0; }

// BLURFAST_CUDA_KERNELS: unset or "fast", "dense", "simple" (no fused or strip kernel).
// The fast kernel prefetches (the next plane group's x1 copied into a spare buffer while
// this group is transformed; float I/O, where it fits) in calls with two buffers, where it
// measured faster; "fast+prefetch" prefetches in every call and "fast+noprefetch" in none
// (the A/B of benchmarks/NOTES.md).
enum class Choice { kFast, kDense, kSimple };
enum class Prefetch { kTwoBuffers, kAll, kNone };

struct Options {
  Choice choice = Choice::kFast;
  Prefetch prefetch = Prefetch::kTwoBuffers;
};

Options options_from_env() {
  Options o;
  const char* v = std::getenv("BLURFAST_CUDA_KERNELS");
  if (!v) return o;
  const std::string s(v);
  if (s == "simple") o.choice = Choice::kSimple;
  if (s == "dense") o.choice = Choice::kDense;
  if (s == "fast+prefetch") o.prefetch = Prefetch::kAll;
  if (s == "fast+noprefetch") o.prefetch = Prefetch::kNone;
  return o;
}

Choice choice_from_env() { return options_from_env().choice; }

// Calls f(std::integral_constant<int, N>, (T*)nullptr) for the plane size and I/O type;
// false when no instantiation exists.
template <typename F>
bool with_kernel(int64_t n, int dtype, F&& f) {
  auto by_type = [&](auto size) -> bool {
    switch (dtype) {
      case kF32: return f(size, (float*)nullptr);
      case kF16: return f(size, (__half*)nullptr);
      case kBF16: return f(size, (__nv_bfloat16*)nullptr);
      default: return false;
    }
  };
  switch (n) {
    case 32: return by_type(std::integral_constant<int, 32>{});
    case 64: return by_type(std::integral_constant<int, 64>{});
    case 128: return by_type(std::integral_constant<int, 128>{});
    default: return false;
  }
}

// Time of a call in units of one plane on a whole SM, for a geometry with `ppb` planes per
// block and `per_sm` resident blocks: rounds of blocks, each a plane group on a share of
// its SM. It counts the last, partial wave (768 planes at N = 64 on 132 SMs: 8 for 2
// planes per block and 2 blocks per SM, 6 for 1 plane per block and 3 blocks per SM).
int64_t wave_cost(int64_t planes, int ppb, int per_sm, int sms) {
  const int64_t groups = (planes + ppb - 1) / ppb, slots = (int64_t)per_sm * sms;
  const int64_t rounds = (groups + slots - 1) / slots;
  const int64_t share = std::min<int64_t>(per_sm, (groups + sms - 1) / sms);
  return rounds * ppb * share;
}

// The plan for a call: the kernel fits and every pointer is aligned for vector access.
struct Plan {
  bool ok = false;
  int split = 1;        // Geom's kSplit
  bool fast = true;     // Geom's kFast
  bool prefetch = false;
  int64_t bytes = 0;
  int per_sm = 0;
};

// With prefetch where asked for and it fits (float I/O, shared memory), else without.
template <typename G, typename T>
Plan plan_for(Job job, int device, bool prefetch) {
  Plan plan;
  plan.split = G::kSplit;
  plan.fast = G::kFast;
  job.prefetch = prefetch && std::is_same<T, float>::value;
  plan.prefetch = job.prefetch;
  plan.bytes = G::smem_floats(buffers_needed(job)) * (int64_t)sizeof(float);
  plan.per_sm = blocks_per_sm(reinterpret_cast<const void*>(&plane_kernel<G, T>), G::kThreads,
                              device, plan.bytes, G::smem_floats(4) * (int64_t)sizeof(float));
  plan.ok = plan.per_sm > 0;
  if (!plan.ok && job.prefetch) return plan_for<G, T>(job, device, false);
  return plan;
}

Plan make_plan(const Job& job, int64_t H, int64_t W, int dtype, int device) {
  Plan plan;
  const Options opt = options_from_env();
  const Choice choice = opt.choice;
  if (choice == Choice::kSimple || H != W || job.planes <= 0) return plan;
  const size_t io = dtype == kF32 ? 16 : 8;   // bytes of four I/O elements
  for (const void* p : {job.x1, job.x2, (const void*)job.out, (const void*)job.noise_out})
    if (p && !aligned(p, io)) return plan;
  for (const void* p : {job.a1.ptr, job.a2.ptr, job.g.ptr, (const void*)job.zb})
    if (p && !aligned(p, 16)) return plan;
  if (job.mode == kSpectral && !job.a1.ptr) return plan;
  for (const MapRef* m : {&job.a1, &job.a2, &job.g})   // 32-bit map offsets (GroupMaps)
    if (m->ptr && m->mod * H * W >= ((int64_t)1 << 31)) return plan;
  const bool prefetch = opt.prefetch == Prefetch::kAll ||
                        (opt.prefetch == Prefetch::kTwoBuffers && buffers_needed(job) == 2);
  with_kernel(H, dtype, [&](auto size, auto* t) {
    constexpr int N = decltype(size)::value;
    using T = std::remove_pointer_t<decltype(t)>;
    // Fewer plane groups than SMs: one plane per block (split 2). Fast passes at N = 128
    // already hold one plane per block.
    const int sms = sm_count(device);
    const int64_t groups = (job.planes + Geom<N>::kPPB - 1) / Geom<N>::kPPB;
    const bool split = N >= 64 && groups < sms;
    // The fused op with fewer plane groups than SMs at N = 64 runs on the dense passes'
    // split geometry, whose 256 threads per plane (against 128) measured faster there:
    // 18.2 against 21.1 µs for q_sample at 16x3x64x64 on an H100 (benchmarks/NOTES.md).
    const bool small_fused = N == 64 && split && job.mode == kSpectral;
    if (choice == Choice::kFast && !small_fused) {
      plan = plan_for<Geom<N, 1, true>, T>(job, device, prefetch);
      if constexpr (N == 64) {
        // More groups than SMs: split 2 still wins when its last wave of blocks is the
        // fuller one (wave_cost below), e.g. 768 planes on 132 SMs.
        const Plan one = plan_for<Geom<N, 2, true>, T>(job, device, prefetch);
        if (one.ok && (split || !plan.ok ||
                       wave_cost(job.planes, 1, one.per_sm, sms) <
                           wave_cost(job.planes, Geom<N, 1, true>::kPPB, plan.per_sm, sms)))
          plan = one;
      }
      return true;
    }
    if constexpr (N >= 64) {
      if (split && (plan = plan_for<Geom<N, 2>, T>(job, device, false)).ok) return true;
    }
    plan = plan_for<Geom<N, 1>, T>(job, device, false);
    return true;
  });
  return plan;
}

// Calls f(std::integral_constant<int, L>) for a strip row length; false for others.
template <typename F>
bool with_length(int64_t n, F&& f) {
  switch (n) {
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    case 256: return f(std::integral_constant<int, 256>{});
    default: return false;
  }
}

}  // namespace

template <typename Tin, typename Tout>
bool strip_launch(const void* in, void* out, int64_t planes, int64_t rows, int64_t L,
                  bool inverse, int device, cudaStream_t stream) {
  const Choice choice = choice_from_env();
  if (choice == Choice::kSimple || rows % 32 != 0 || planes * rows == 0) return false;
  if (!aligned(in, 4 * sizeof(Tin)) || !aligned(out, 4 * sizeof(Tout))) return false;
  StripJob job;
  job.in = in;
  job.out = out;
  job.planes = planes;
  job.rows = rows;
  job.inverse = inverse;
  // Launches `kernel` with grid = min(work items, resident blocks).
  auto launch = [&](auto kernel, int threads, int64_t bytes, int64_t items) {
    const int per_sm = blocks_per_sm(reinterpret_cast<const void*>(kernel), threads, device,
                                     bytes, bytes);
    if (per_sm == 0) return false;
    const int64_t resident = (int64_t)per_sm * sm_count(device);
    kernel<<<(unsigned)(items < resident ? items : resident), threads, (size_t)bytes, stream>>>(
        job);
    check(cudaGetLastError(), "strip launch");
    return true;
  };
  return with_length(L, [&](auto size) {
    constexpr int N = decltype(size)::value;
    if (choice == Choice::kFast) {
      using G = FastStripGeom<N>;
      return launch(&fast_strip_kernel<N, Tin, Tout>, G::kThreads,
                    G::kSmemFloats * (int64_t)sizeof(float),
                    (planes * rows + G::kRows - 1) / G::kRows);
    }
    using G = StripGeom<N>;
    return launch(&strip_kernel<N, Tin, Tout>, G::kThreads,
                  G::kSmemFloats * (int64_t)sizeof(float), planes * (rows / 32));
  });
}

template bool strip_launch<float, float>(const void*, void*, int64_t, int64_t, int64_t, bool, int,
                                         cudaStream_t);
template bool strip_launch<__half, float>(const void*, void*, int64_t, int64_t, int64_t, bool,
                                          int, cudaStream_t);
template bool strip_launch<__nv_bfloat16, float>(const void*, void*, int64_t, int64_t, int64_t,
                                                 bool, int, cudaStream_t);
template bool strip_launch<float, __half>(const void*, void*, int64_t, int64_t, int64_t, bool,
                                          int, cudaStream_t);
template bool strip_launch<float, __nv_bfloat16>(const void*, void*, int64_t, int64_t, int64_t,
                                                 bool, int, cudaStream_t);

int64_t l2_cache_bytes(int device) {
  return device_attr(device, cudaDevAttrL2CacheSize, "L2 size");
}

bool plane_applies(const Job& job, int64_t H, int64_t W, int dtype, int device) {
  return make_plan(job, H, W, dtype, device).ok;
}

bool plane_launch(const Job& job, int64_t H, int64_t W, int dtype, int device,
                  cudaStream_t stream) {
  const Plan plan = make_plan(job, H, W, dtype, device);
  if (!plan.ok) return false;
  const int64_t resident = (int64_t)plan.per_sm * sm_count(device);
  Job run = job;
  run.prefetch = plan.prefetch;
  auto launch = [&](auto geom, auto* t) {
    using G = decltype(geom);
    using T = std::remove_pointer_t<decltype(t)>;
    const int64_t groups = (run.planes + G::kPPB - 1) / G::kPPB;
    const unsigned grid = (unsigned)(groups < resident ? groups : resident);
    plane_kernel<G, T><<<grid, G::kThreads, (size_t)plan.bytes, stream>>>(run);
    check(cudaGetLastError(), "launch");
    return true;
  };
  return with_kernel(H, dtype, [&](auto size, auto* t) {
    constexpr int N = decltype(size)::value;
    if (plan.fast) {
      if constexpr (N == 64) {
        if (plan.split == 2) return launch(Geom<N, 2, true>{}, t);
      }
      return launch(Geom<N, 1, true>{}, t);
    }
    if constexpr (N >= 64) {
      if (plan.split == 2) return launch(Geom<N, 2>{}, t);
    }
    return launch(Geom<N, 1>{}, t);
  });
}

}  // namespace plane
}  // namespace blurfast
