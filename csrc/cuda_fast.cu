// The fast CUDA kernels' host side: which kernel and geometry serve a call, and their
// launch. The kernels themselves are in cuda_fast_kernels.cuh, compiled in one
// translation unit per I/O type (cuda_fast_f32.cu, cuda_fast_f16.cu, cuda_fast_bf16.cu).
//
// Whole-plane kernel: one launch per call. A block holds Geom::kPPB planes in shared
// memory; blocks loop over plane groups (grid = resident blocks). Calls with fewer plane
// groups than SMs take the split geometry (one plane per block). Serves float32, float16
// and bfloat16 I/O with float arithmetic for H = W in {32, 64, 128} when the shared memory
// fits (N = 128 with three buffers needs Hopper's 227 KiB). The fused op at N = 64 with
// float I/O takes the wide geometry (256 threads per plane).
// Passes (line_passes.h): fast by default; BLURFAST_CUDA_KERNELS=dense takes the dense
// ones (tables in shared memory, built once per block), =simple no fused kernel at all.
//
// Strip kernels: one 1-D pass with transposed output (two make a 2-D transform); the
// simple path (cuda_kernels.cu) uses them for rows of 32, 64, 128 or 256 elements, 256 x 256
// planes included. Fast passes by default, dense with BLURFAST_CUDA_KERNELS=dense.
//
// Column path (column_program.h): the fused op on planes the whole-plane kernel does not
// take (256 x 256), in three passes per chunk of planes: strip kernels for the rows, the
// column kernel between them.
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
#include "cuda_fast_kernels.h"

namespace blurfast {
namespace plane {
namespace {

void check(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return;
  (void)cudaGetLastError();   // clear the slot, or the next call's launch check reports e
  throw std::runtime_error(std::string("blurfast CUDA (plane kernel): ") + what + ": " +
                             cudaGetErrorString(e));
}

// Resident blocks per SM of one instantiation when a call uses `bytes` of shared memory;
// 0 when that does not fit. `max_bytes` is the most a call of this kernel usually uses:
// the kernel's dynamic shared-memory limit is raised to it (or to `bytes`, when more) at
// once, so a later call with more bytes than an earlier one still launches. Cached per
// (device, kernel, bytes).
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
    const int64_t want = std::max(bytes, std::min<int64_t>(max_bytes, optin));
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
// (the A/B of benchmarks/NOTES.md). "fast+wide" serves every call at N = 64 with the fast
// passes' wide geometry (256 threads per plane, one plane per block): the default for the
// fused op with float I/O there, on trial for dct2, idct2 and the other types.
// "fast+separate" runs the fused op at 256 x 256 as version 5 did (six strip passes and a
// separate combine kernel, cuda_kernels.cu) instead of the three passes of
// column_program.h; "fast+fill" runs the three passes in chunks large enough for two
// strip blocks per SM in every launch, not in chunks whose intermediates fit in half the L2.
enum class Choice { kFast, kDense, kSimple };
enum class Prefetch { kTwoBuffers, kAll, kNone };

struct Options {
  Choice choice = Choice::kFast;
  Prefetch prefetch = Prefetch::kTwoBuffers;
  bool wide = false;
  bool separate = false;
  bool fill = false;
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
  o.wide = s == "fast+wide";
  o.separate = s == "fast+separate";
  o.fill = s == "fast+fill";
  return o;
}

Choice choice_from_env() { return options_from_env().choice; }

// Calls f((T*)nullptr) for the I/O type T of dtype; false for types without fast kernels.
template <typename F>
bool with_io_type(int dtype, F&& f) {
  switch (dtype) {
    case kF32: return f((float*)nullptr);
    case kF16: return f((__half*)nullptr);
    case kBF16: return f((__nv_bfloat16*)nullptr);
    default: return false;
  }
}

// Calls f(std::integral_constant<int, N>, (T*)nullptr) for the plane size and I/O type;
// false when no instantiation exists.
template <typename F>
bool with_kernel(int64_t n, int dtype, F&& f) {
  auto by_type = [&](auto size) -> bool {
    return with_io_type(dtype, [&](auto* t) { return f(size, t); });
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
  plan.bytes = G::smem_floats(buffers_of<G>(job)) * (int64_t)sizeof(float);
  plan.per_sm = blocks_per_sm(PlaneKernel<G, T>::ptr(), G::kThreads,
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
    // The fused op at N = 64 with float I/O runs on the wide geometry (256 threads per
    // plane, the two transforms of a step side by side), which measured faster than every
    // other geometry at 16 and 256 planes of 3 (H100, run v6: q_sample 16.3 against 18.4
    // µs and 50.8 against 57.4 µs; benchmarks/NOTES.md). The other I/O types have not
    // been timed on it: with fewer plane groups than SMs they keep the dense passes' split
    // geometry (256 threads per plane too), measured faster than 128 in run v4.
    const bool wide_fused = N == 64 && job.mode == kSpectral && std::is_same<T, float>::value;
    const bool small_fused = N == 64 && split && job.mode == kSpectral;
    if constexpr (N == 64) {
      if (choice == Choice::kFast && (opt.wide || wide_fused)) {
        plan = plan_for<Geom<N, 4, true>, T>(job, device, prefetch);
        if (plan.ok || opt.wide) return true;
      }
    }
    if (choice == Choice::kFast && !small_fused) {
      plan = plan_for<Geom<N, 1, true>, T>(job, device, prefetch);
      if constexpr (N == 64) {
        // More groups than SMs: split 2 still wins when its last wave of blocks is the
        // fuller one (wave_cost below), e.g. 768 planes on 132 SMs, and on a tie: at
        // 256x3x64x64 the two-plane geometry measured 17.6 against 15.0 µs for dct2
        // when a tie chose it (benchmarks/LOG.md, version 4).
        const Plan one = plan_for<Geom<N, 2, true>, T>(job, device, prefetch);
        if (one.ok && (split || !plan.ok ||
                       wave_cost(job.planes, 1, one.per_sm, sms) <=
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
                  bool inverse, int device, cudaStream_t stream, bool same_layout, void* out2,
                  int64_t split_rows, const void* in2) {
  const Choice choice = choice_from_env();
  if (choice == Choice::kSimple || rows % 32 != 0 || planes * rows == 0) return false;
  if (same_layout && !(inverse && choice == Choice::kFast && std::is_same<Tin, float>::value))
    return false;
  if (out2 && (!same_layout || !aligned(out2, 4 * sizeof(Tout)))) return false;
  if (in2 && (choice != Choice::kFast || !aligned(in2, 4 * sizeof(Tin)) ||
              split_rows % FastStripGeom<256>::kRows != 0 || L != 256))
    return false;   // (the blocks of 64 rows at L = 256 never straddle split_rows)
  if (!aligned(in, 4 * sizeof(Tin)) || !aligned(out, 4 * sizeof(Tout))) return false;
  StripJob job;
  job.in = in;
  job.out = out;
  job.planes = planes;
  job.rows = rows;
  job.inverse = inverse;
  job.in2 = in2;
  job.out2 = out2;
  job.split_rows = split_rows;
  // Launches kernel K with grid = min(work items, resident blocks).
  auto launch = [&](auto kernel, int threads, int64_t bytes, int64_t items) {
    using K = decltype(kernel);
    const int per_sm = blocks_per_sm(K::ptr(), threads, device, bytes, bytes);
    if (per_sm == 0) return false;
    const int64_t resident = (int64_t)per_sm * sm_count(device);
    K::launch((unsigned)(items < resident ? items : resident), (size_t)bytes, stream, job);
    check(cudaGetLastError(), "strip launch");
    return true;
  };
  return with_length(L, [&](auto size) {
    constexpr int N = decltype(size)::value;
    if (choice == Choice::kFast) {
      using G = FastStripGeom<N>;
      const int64_t bytes = G::kSmemFloats * (int64_t)sizeof(float);
      const int64_t items = (planes * rows + G::kRows - 1) / G::kRows;
      if constexpr (std::is_same<Tin, float>::value) {
        if (same_layout) return launch(StripKernel<N, float, Tout, true, true>{}, G::kThreads,
                                       bytes, items);
      }
      return launch(StripKernel<N, Tin, Tout, true>{}, G::kThreads, bytes, items);
    }
    using G = StripGeom<N>;
    return launch(StripKernel<N, Tin, Tout, false>{}, G::kThreads,
                  G::kSmemFloats * (int64_t)sizeof(float), planes * (rows / 32));
  });
}

template bool strip_launch<float, float>(const void*, void*, int64_t, int64_t, int64_t, bool, int,
                                         cudaStream_t, bool, void*, int64_t, const void*);
template bool strip_launch<__half, float>(const void*, void*, int64_t, int64_t, int64_t, bool,
                                          int, cudaStream_t, bool, void*, int64_t, const void*);
template bool strip_launch<__nv_bfloat16, float>(const void*, void*, int64_t, int64_t, int64_t,
                                                 bool, int, cudaStream_t, bool, void*, int64_t,
                                                 const void*);
template bool strip_launch<float, __half>(const void*, void*, int64_t, int64_t, int64_t, bool,
                                          int, cudaStream_t, bool, void*, int64_t, const void*);
template bool strip_launch<float, __nv_bfloat16>(const void*, void*, int64_t, int64_t, int64_t,
                                                 bool, int, cudaStream_t, bool, void*, int64_t,
                                                 const void*);

int64_t l2_cache_bytes(int device) {
  return device_attr(device, cudaDevAttrL2CacheSize, "L2 size");
}

int64_t strip_min_planes(int64_t rows, int64_t L, int device) {
  int64_t block_rows = 0;
  if (rows <= 0 || !with_length(L, [&](auto size) {
        block_rows = FastStripGeom<decltype(size)::value>::kRows;
        return true;
      }))
    return 1;
  return (sm_count(device) * block_rows + rows - 1) / rows;
}

namespace {

// The column path's plan for a call the whole-plane kernel does not serve: planes per
// chunk (0: the path does not apply) and the intermediate arrays of a chunk (t1, t2 with
// x2; u1, u2 with the noise returned).
struct ColumnPlan {
  int64_t chunk = 0;
  int arrays = 0;
};

ColumnPlan column_plan(const SpectralParams& p, int device) {
  ColumnPlan plan;
  const Options opt = options_from_env();
  if (opt.choice != Choice::kFast || opt.separate || p.planes <= 0 || !p.a1.ptr) return plan;
  if (p.dtype != kF32 && p.dtype != kF16 && p.dtype != kBF16) return plan;
  if (!with_length(p.H, [](auto) { return true; }) || !with_length(p.W, [](auto) { return true; }))
    return plan;
  const size_t io = p.dtype == kF32 ? 16 : 8;
  for (const void* q : {p.x1, p.x2, (const void*)p.out, (const void*)p.noise_out})
    if (q && !aligned(q, io)) return plan;
  for (const void* q : {p.a1.ptr, p.a2.ptr, p.g.ptr, p.zb})
    if (q && !aligned(q, 16)) return plan;
  for (const MapRef* m : {&p.a1, &p.a2, &p.g})   // 32-bit map offsets (column_program.h)
    if (m->ptr && m->mod * p.H * p.W >= ((int64_t)1 << 31)) return plan;
  plan.arrays = (p.x2 ? 2 : 1) + (p.noise_out ? 2 : 1);
  // A chunk's intermediates in half the L2 cache, so that each pass reads the previous
  // one's output from L2, but at least one row-pass block per SM (GPUs with a small L2);
  // with fast+fill two blocks per SM instead (66 planes of 256 x 256 on 132 SMs). Chunks
  // of equal size (no small last one).
  const int64_t plane_bytes = plan.arrays * p.H * p.W * (int64_t)sizeof(float);
  const int64_t min_planes = strip_min_planes(p.H, p.W, device);
  int64_t fit = std::max<int64_t>(min_planes, l2_cache_bytes(device) / 2 / plane_bytes);
  if (opt.fill) fit = 2 * min_planes;
  const int64_t chunks = (p.planes + fit - 1) / fit;
  plan.chunk = (p.planes + chunks - 1) / chunks;
  return plan;
}

}  // namespace

int64_t column_workspace_floats(const SpectralParams& p, int device) {
  const ColumnPlan plan = column_plan(p, device);
  return plan.chunk * plan.arrays * p.H * p.W;
}

bool column_launch(const SpectralParams& p, float* ws, int device, cudaStream_t stream) {
  const ColumnPlan plan = column_plan(p, device);
  if (plan.chunk == 0) return false;
  if (!ws) throw std::invalid_argument("blurfast CUDA: the column path needs a workspace");
  const int64_t hw = p.H * p.W, n = plan.chunk * hw;
  // t2 follows the chunk's planes of t1, u2 those of u1 (see below).
  float* t1 = ws;
  float* u1 = t1 + (p.x2 ? 2 : 1) * n;
  const size_t io = p.dtype == kF32 ? 4 : 2;
  auto at = [&](const void* base, int64_t p0) { return (const char*)base + p0 * hw * io; };
  // Two arrays in one launch where the strips allow it (twice the blocks of one): x1's and
  // x2's row passes into t1, t2; u1 and u2 (one after the other) into out and noise_out.
  // Every type pair's row pass is instantiated: one that does not launch would leave the
  // call half done.
  auto rows = [&](const void* in, void* out, int64_t planes, bool inverse, void* out2 = nullptr,
                  int64_t split_rows = 0, const void* in2 = nullptr) {
    const bool ok = with_io_type(p.dtype, [&](auto* t) {
      using T = std::remove_pointer_t<decltype(t)>;
      return inverse ? strip_launch<float, T>(in, out, planes, p.H, p.W, true, device, stream,
                                              true, out2, split_rows)
                     : strip_launch<T, float>(in, out, planes, p.H, p.W, false, device, stream,
                                              false, nullptr, split_rows, in2);
    });
    if (!ok)
      throw std::runtime_error("blurfast CUDA: a row pass of the column path did not launch");
  };
  for (int64_t p0 = 0; p0 < p.planes; p0 += plan.chunk) {
    const int64_t planes = std::min(plan.chunk, p.planes - p0);
    // (t2 follows the chunk's planes of t1)
    if (p.x2 && p.W == 256 && (planes * p.H) % FastStripGeom<256>::kRows == 0) {
      rows(at(p.x1, p0), t1, 2 * planes, false, nullptr, planes * p.H, at(p.x2, p0));
    } else {
      rows(at(p.x1, p0), t1, planes, false);
      if (p.x2) rows(at(p.x2, p0), t1 + planes * hw, planes, false);
    }
    const ColumnJob job = column_job(p, t1, t1 + planes * hw, u1, u1 + planes * hw, p0, planes);
    with_length(p.H, [&](auto size) {   // the column length
      constexpr int L = decltype(size)::value;
      using K = ColumnKernel<L>;
      const int64_t bytes = ColumnGeom<L>::kSmemFloats * (int64_t)sizeof(float);
      const int per_sm = blocks_per_sm(K::ptr(), ColumnGeom<L>::kThreads, device, bytes, bytes);
      if (per_sm == 0) throw std::runtime_error("blurfast CUDA: the column pass does not fit");
      const int64_t blocks = planes * (p.W / ColumnGeom<L>::kRows);
      const int64_t resident = (int64_t)per_sm * sm_count(device);
      K::launch((unsigned)std::min(blocks, resident), (size_t)bytes, stream, job);
      check(cudaGetLastError(), "column launch");
      return true;
    });
    if (p.noise_out)
      rows(u1, (void*)at(p.out, p0), 2 * planes, true, (void*)at(p.noise_out, p0), planes * p.H);
    else
      rows(u1, (void*)at(p.out, p0), planes, true);
  }
  return true;
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
    PlaneKernel<G, T>::launch(grid, (size_t)plan.bytes, stream, run);
    check(cudaGetLastError(), "launch");
    return true;
  };
  return with_kernel(H, dtype, [&](auto size, auto* t) {
    constexpr int N = decltype(size)::value;
    if (plan.fast) {
      if constexpr (N == 64) {
        if (plan.split == 2) return launch(Geom<N, 2, true>{}, t);
        if (plan.split == 4) return launch(Geom<N, 4, true>{}, t);
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
