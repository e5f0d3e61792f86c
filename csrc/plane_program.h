// The fused whole-plane program: every plane of a call is transformed, combined and
// transformed back inside one thread block's shared memory, so each input is read once
// and each output written once.
//
// The program is written once, as a sequence of phases separated by block barriers
// (Ctx::phase runs a lambda for every thread, then syncs). cuda_fast.cu runs it as a
// CUDA kernel; emulate.cpp runs the same code on the CPU, thread by thread, so its
// indexing is tested without a GPU.
//
// Square planes N x N, N in {32, 64, 128}, float arithmetic; the 1-D passes of
// line_passes.h, each writing its result transposed, so two passes make a 2-D transform.
#pragma once
#include <cstdint>
#include <type_traits>

#include "blurfast.h"
#include "common.h"
#include "line_passes.h"

namespace blurfast {
namespace plane {

enum Mode : int { kDct2 = 0, kIdct2 = 1, kSpectral = 2 };

// One call. x1/x2/out/noise_out have the I/O type; maps and zb are float.
struct Job {
  int mode = kSpectral;
  int64_t planes = 0;
  const void* x1 = nullptr;
  const void* x2 = nullptr;
  MapRef a1, a2, g;
  const float* zb = nullptr;
  uint64_t seed = 0, offset = 0;
  void* out = nullptr;
  void* noise_out = nullptr;
  // Load the next plane group's x1 into a spare buffer (Ctx::copy16_async) while this
  // group is transformed. Float I/O only; the host sets it (BLURFAST_CUDA_KERNELS).
  bool prefetch = false;
};

// Work split for plane size N and a pass family (line_passes.h).
// Dense passes: each warp owns one column group of one plane, for all its rows (kSplit =
// 1: kPPB planes per block of 256 threads, for throughput) or for half of them (kSplit =
// 2: one plane per block, twice the warps, half the work per warp: for calls with fewer
// plane groups than SMs).
// Fast passes: two threads per row (the first kPPB N threads make the even halves, the
// rest the odd halves); kSplit = 2 is one plane per block, 2 N threads (N = 64 only: at
// N = 128 that is already the throughput geometry); kSplit = 4 ("wide", N = 64 only) is
// one plane per block with 4 N threads: the passes take the first 2 N, and all of them
// share the loads, the noise, the combine step and the stores.
template <int N_, int Split = 1, bool Fast = false>
struct Geom {
  static constexpr int N = N_;
  static constexpr int kSplit = Split;
  static constexpr bool kFast = Fast;
  static constexpr int kPPB = Split >= 2 ? 1 : (N <= 32 ? 4 : (N == 64 ? 2 : 1));
  static constexpr int kGroups = N / 16;                         // column groups per plane
  static constexpr int kWarpsPerPlane = kGroups * Split;
  static constexpr int kPassThreads = Fast ? 2 * N * kPPB : 32 * kWarpsPerPlane * kPPB;
  static constexpr int kThreads = Fast && Split == 4 ? 2 * kPassThreads : kPassThreads;
  static constexpr int kRows = N / 32 / Split;                   // rows per lane
  static constexpr int kPlane = N * N;
  static constexpr int kTables = Fast ? 0 : TableSize<N>::kFloats;
  static constexpr int kChunksPerThread = kPPB * kPlane / 4 / kThreads;
  // Fast inverse passes load whole float4 chunks (fast_inverse_row), except with 16-bit
  // I/O at N = 64 with two planes per block, where ptxas spilled 8 bytes with them and
  // none without.
  template <typename T>
  static constexpr bool whole_loads() {
    return !(Fast && N == 64 && Split == 1 && sizeof(T) == 2);
  }
  static_assert(N == 32 || N == 64 || N == 128, "plane program: N must be 32, 64 or 128");
  static_assert(Split == 1 || (Split == 2 && N >= 64) || (Split == 4 && Fast && N == 64),
                "plane program: split 2 needs N >= 64, split 4 the fast passes at N = 64");
  static_assert(!(Fast && Split == 2 && N == 128), "fast passes: N = 128 has no split 2");
  static_assert(kPPB * kPlane % (16 * kThreads) == 0, "chunks must divide evenly");
  // Shared memory: the pass tables, then nbuf buffers of kPPB planes.
  static constexpr int64_t smem_floats(int nbuf) { return kTables + nbuf * kPPB * kPlane; }
};

// Global plane group p0 .. p0+kPPB-1 <-> buffer (planes past `planes` read as zero and
// are not written). Thread tid moves float4 chunks tid, tid + kThreads, ...; all loads
// are issued before the first shared-memory store.
// `while_waiting()` runs between issuing the loads and storing what they bring.
template <typename G, typename T, typename F>
BF_HD void load_group(const T* src, float* buf, int64_t p0, int64_t planes, int tid,
                      F&& while_waiting) {
  constexpr int N = G::N;
  float v[G::kChunksPerThread][4];
  BF_UNROLL for (int u = 0; u < G::kChunksPerThread; ++u) {
    const int c = tid + u * G::kThreads, s = c / (G::kPlane / 4), f = (c % (G::kPlane / 4)) * 4;
    v[u][0] = v[u][1] = v[u][2] = v[u][3] = 0.f;
    if (p0 + s < planes) load4<T>(src + (p0 + s) * G::kPlane + f, v[u]);
  }
  while_waiting();
  BF_UNROLL for (int u = 0; u < G::kChunksPerThread; ++u) {
    const int c = tid + u * G::kThreads, s = c / (G::kPlane / 4), f = (c % (G::kPlane / 4)) * 4;
    st4(buf + s * G::kPlane + sidx<N>(f / N, f % N), v[u]);
  }
}

template <typename G, typename T>
BF_HD void store_group(const float* buf, T* dst, int64_t p0, int64_t planes, int tid) {
  constexpr int N = G::N;
  BF_UNROLL for (int u = 0; u < G::kChunksPerThread; ++u) {
    const int c = tid + u * G::kThreads, s = c / (G::kPlane / 4), f = (c % (G::kPlane / 4)) * 4;
    if (p0 + s >= planes) continue;
    float v[4];
    ld4(buf + s * G::kPlane + sidx<N>(f / N, f % N), v);
    store4<T>(dst + (p0 + s) * G::kPlane + f, v);
  }
}

// Stores a plane group that two fast inverse passes left in mirrored form along both
// axes (fast_inverse_pass): with y the buffer, x[n] = y[n] + y[N-1-n] and
// x[N-1-n] = y[n] - y[N-1-n] for n < N/2, along rows and along columns. A thread takes
// the four float4 chunks that mirror each other: rows r, N-1-r; columns c.., N-4-c...
template <typename G, typename T>
BF_HD void store_mirrored_group(const float* buf, T* dst, int64_t p0, int64_t planes, int tid) {
  constexpr int N = G::N, Q = N / 8, kPerPlane = (N / 2) * Q;   // chunks in a half row
  BF_UNROLL for (int u = 0; u < G::kChunksPerThread / 4; ++u) {
    const int i = tid + u * G::kThreads, s = i / kPerPlane, r = (i % kPerPlane) / Q;
    const int c = 4 * (i % Q), rm = N - 1 - r, cm = N - 4 - c;
    if (p0 + s >= planes) continue;
    const float* B = buf + s * G::kPlane;
    float a[4], b[4], d[4], e[4];               // element t of b, e: column N-1-c-(3-t)
    ld4(B + sidx<N>(r, c), a);
    ld4(B + sidx<N>(r, cm), b);
    ld4(B + sidx<N>(rm, c), d);
    ld4(B + sidx<N>(rm, cm), e);
    float x00[4], x01[4], x10[4], x11[4];       // rows r / rm, columns c.. / cm..
    BF_UNROLL for (int t = 0; t < 4; ++t) {
      const float sp = a[t] + b[3 - t], sm = a[t] - b[3 - t];   // row r, columns c+t, N-1-c-t
      const float tp = d[t] + e[3 - t], tm = d[t] - e[3 - t];   // row rm
      x00[t] = sp + tp;
      x10[t] = sp - tp;
      x01[3 - t] = sm + tm;
      x11[3 - t] = sm - tm;
    }
    T* out = dst + (p0 + s) * G::kPlane;
    store4<T>(out + r * N + c, x00);
    store4<T>(out + r * N + cm, x01);
    store4<T>(out + rm * N + c, x10);
    store4<T>(out + rm * N + cm, x11);
  }
}

// Chunk u (< kChunksPerThread) of thread tid in a plane group: plane slot u / kUPP, float4
// at element f of that plane. A thread's chunks never straddle planes (kThreads divides a
// plane's chunk count), so with u unrolled the slot is a compile-time constant.
template <typename G>
struct Chunks {
  static constexpr int kUPP = G::kPlane / 4 / G::kThreads;     // chunks per plane per thread
  static_assert(G::kPlane / 4 % G::kThreads == 0, "a thread's chunks must not straddle planes");
  static constexpr BF_HD int slot(int u) { return u / kUPP; }
  static BF_HD int elem(int u, int tid) { return 4 * (tid + (u % kUPP) * G::kThreads); }
};

// Element offsets of the maps of each plane of the group, computed once per group (the
// plane-to-map index is a 64-bit division). 32-bit, as few registers as possible: the
// compiler may hoist them above the passes (the host only plans a fused call whose maps
// have under 2^31 elements). Planes past the end get offset 0.
template <typename G>
struct GroupMaps {
  int32_t a1[G::kPPB], a2[G::kPPB], g[G::kPPB];
  BF_HD GroupMaps(const Job& job, int64_t p0) {
    BF_UNROLL for (int s = 0; s < G::kPPB; ++s) {
      const int64_t p = p0 + s < job.planes ? p0 + s : 0;
      a1[s] = (int32_t)(map_plane(p, job.a1.div, job.a1.mod) * G::kPlane);
      a2[s] = job.x2 ? (int32_t)(map_plane(p, job.a2.div, job.a2.mod) * G::kPlane) : 0;
      g[s] = job.g.ptr ? (int32_t)(map_plane(p, job.g.div, job.g.mod) * G::kPlane) : 0;
    }
  }
  // v[s] for a run-time s, by selects (a dynamic index would put v in local memory).
  static BF_HD int32_t pick(const int32_t (&v)[G::kPPB], int s) {
    int32_t r = v[0];
    BF_UNROLL for (int i = 1; i < G::kPPB; ++i) r = s == i ? v[i] : r;
    return r;
  }
};

// The noise of elements e .. e+3 of a call: given (zb), else the call's Philox stream.
BF_HD void noise4(const Job& job, int64_t e, float n[4]) {
  if (job.zb)
    ld4(job.zb + e, n);
  else
    philox_normal4(job.seed, job.offset + (uint64_t)e, n);
}

// The noise zb of the plane group (given, or Philox), into C at the plane layout.
template <typename G>
BF_HD void noise_group(const Job& job, float* C, int64_t p0, int tid) {
  constexpr int N = G::N;
  using K = Chunks<G>;
  // Unrolled by two: two independent Philox blocks in flight per thread.
#ifdef __CUDA_ARCH__
#pragma unroll 2
#endif
  for (int u = 0; u < G::kChunksPerThread; ++u) {
    const int s = K::slot(u), f = K::elem(u, tid);
    const int64_t p = p0 + s;
    if (p >= job.planes) continue;
    float n[4];
    noise4(job, p * G::kPlane + f, n);
    st4(C + s * G::kPlane + sidx<N>(f / N, f % N), n);
  }
}

// The noise term g zb of the group's one plane (G::kPPB = 1), into dst where
// copy_maps_async would put the map g (plain layout): the wide geometry's calls that do
// not return the noise make it while the loads are in flight (NoiseAt::kInMaps).
template <typename G>
BF_HD void noise_term_group(const Job& job, float* dst, int64_t p, int tid) {
  static_assert(G::kPPB == 1, "one plane per group");
  using K = Chunks<G>;
  if (p >= job.planes) return;
  const float* g = (const float*)job.g.ptr + map_plane(p, job.g.div, job.g.mod) * G::kPlane;
  // Unrolled by two, as noise_group; each chunk's map load waits behind its noise.
#ifdef __CUDA_ARCH__
#pragma unroll 2
#endif
  for (int u = 0; u < G::kChunksPerThread; ++u) {
    const int f = K::elem(u, tid);
    float m[4], n[4];
    ld4(g + f, m);
    noise4(job, p * G::kPlane + f, n);
    BF_UNROLL for (int q = 0; q < 4; ++q) n[q] = mul_rn(m[q], n[q]);
    st4(dst + f, n);
  }
}

// Where combine_chunk finds the noise: it makes zb (given, or Philox: kMake); zb is in C
// (noise_group, calls without x2: kInC); or the product g zb is in place of the map g
// (noise_term_group, the wide geometry's calls that do not return the noise: kInMaps).
enum class NoiseAt : int { kMake, kInC, kInMaps };

// One float4 chunk of the frequency-space step, at `at` in A and C:
//   A = fma(m1, A, fma(m2, C, g zb)),  g zb = mul_rn(mg, zb),
// zb the noise of elements e .. e+3 of the call; C = zb when noise is returned (kMake).
// m2 is used with x2, mg with g. Every product and sum is rounded as written (no
// contraction to choose), so each geometry, made early or not, gives the same bits.
BF_HD void combine_chunk(const Job& job, float* A, float* C, int at, int64_t e,
                         const float m1[4], const float m2[4], const float mg[4],
                         NoiseAt noise) {
  float x[4], n[4] = {0.f, 0.f, 0.f, 0.f}, t[4] = {0.f, 0.f, 0.f, 0.f};
  if (noise == NoiseAt::kInC)
    ld4(C + at, n);
  else if (noise == NoiseAt::kMake && (job.g.ptr || job.noise_out))
    noise4(job, e, n);
  if (job.g.ptr) {
    BF_UNROLL for (int q = 0; q < 4; ++q)
      t[q] = noise == NoiseAt::kInMaps ? mg[q] : mul_rn(mg[q], n[q]);
  }
  if (job.x2) {                       // x2's spectrum is in C: read before the noise goes there
    float y[4];
    ld4(C + at, y);
    BF_UNROLL for (int q = 0; q < 4; ++q) t[q] = fma_f(m2[q], y[q], t[q]);
  }
  if (job.noise_out && noise == NoiseAt::kMake) st4(C + at, n);
  ld4(A + at, x);
  BF_UNROLL for (int q = 0; q < 4; ++q) x[q] = fma_f(m1[q], x[q], t[q]);
  st4(A + at, x);
}

// The early maps of a call: a1, a2 with x2, g when given, in that order (a buffer each:
// the wide geometry has one plane per group; maps_early below).
BF_HD int early_g_index(const Job& job) { return job.x2 ? 2 : 1; }
BF_HD int early_map_count(const Job& job) { return early_g_index(job) + (job.g.ptr ? 1 : 0); }

// Frequency space, in place in A: A = a1 A + a2 C + g zb; C = zb when noise is returned.
// `noise`: where combine_chunk finds it.
// Chunks go in batches of kBatch: the batch's map loads are all issued before the first
// is used, so the threads wait for global memory once per batch, not once per chunk.
// kMapsIn: the maps of the group's one plane are in shared memory (copy_maps_async), in
// plain layout: a1 at maps_in, then a2 (with x2), then g (or g zb: NoiseAt::kInMaps).
template <typename G, bool kMapsIn = false>
BF_HD void combine_group(const Job& job, float* A, float* C, int64_t p0, int tid,
                         NoiseAt noise, const float* maps_in = nullptr) {
  constexpr int N = G::N, kU = G::kChunksPerThread, kBatch = kU < 4 ? kU : 4;
  static_assert(kU % kBatch == 0, "batches must divide the chunks");
  static_assert(!kMapsIn || G::kPPB == 1, "maps in shared memory: one plane per group");
  using K = Chunks<G>;
  const GroupMaps<G> maps(job, kMapsIn ? 0 : p0);
  const float* a1 = kMapsIn ? maps_in : (const float*)job.a1.ptr;
  const float* a2 = kMapsIn ? maps_in + G::kPlane : (const float*)job.a2.ptr;
  const float* g = kMapsIn ? (job.g.ptr ? maps_in + early_g_index(job) * G::kPlane
                                          : nullptr)
                           : (const float*)job.g.ptr;
  BF_NO_UNROLL for (int u0 = 0; u0 < kU; u0 += kBatch) {
    float m1[kBatch][4], m2[kBatch][4], mg[kBatch][4];
    BF_UNROLL for (int b = 0; b < kBatch; ++b) {
      const int s = K::slot(u0 + b), f = K::elem(u0 + b, tid);
      BF_UNROLL for (int q = 0; q < 4; ++q) m1[b][q] = m2[b][q] = mg[b][q] = 0.f;
      if (p0 + s >= job.planes) continue;
      if constexpr (kMapsIn) {
        ld4(a1 + f, m1[b]);
        if (job.x2) ld4(a2 + f, m2[b]);
        if (g) ld4(g + f, mg[b]);
        continue;
      }
      ld4(a1 + maps.pick(maps.a1, s) + f, m1[b]);
      if (job.x2) ld4(a2 + maps.pick(maps.a2, s) + f, m2[b]);
      if (g) ld4(g + maps.pick(maps.g, s) + f, mg[b]);
    }
    BF_UNROLL for (int b = 0; b < kBatch; ++b) {
      const int s = K::slot(u0 + b), f = K::elem(u0 + b, tid);
      const int64_t p = p0 + s;
      if (p >= job.planes) continue;
      combine_chunk(job, A, C, s * G::kPlane + sidx<N>(f / N, f % N), p * G::kPlane + f,
                    m1[b], m2[b], mg[b], noise);
    }
  }
}

inline Job make_job(const SpectralParams& p, int mode) {
  Job j;
  j.mode = mode;
  j.planes = p.planes;
  j.x1 = p.x1;
  j.out = p.out;
  if (mode == kSpectral) {
    j.x2 = p.x2;
    j.a1 = p.a1;
    j.a2 = p.a2;
    j.g = p.g;
    j.zb = (const float*)p.zb;
    j.seed = p.seed;
    j.offset = p.offset;
    j.noise_out = p.noise_out;
  }
  return j;
}

// Buffers a call needs: a third one holds x2 or the noise; the last one, with prefetch,
// receives the next group's x1.
BF_HD int buffers_needed(const Job& job) {
  return (job.mode == kSpectral && (job.x2 || job.noise_out) ? 3 : 2) + (job.prefetch ? 1 : 0);
}

// The wide geometry (passes on the first kPassThreads threads) runs a fused call's two
// independent transforms side by side, the second on the other threads, with a fourth
// buffer: x1's and x2's forward transforms, and the result's and the noise's inverse ones.
template <typename G>
BF_HD bool pairs_transforms(const Job& job) {
  return G::kFast && G::kThreads > G::kPassThreads && job.mode == kSpectral &&
         (job.x2 || job.noise_out) && !job.prefetch;
}

// The wide geometry, a fused call: the plane's maps are copied into shared memory with
// the loads of x1 (copy_maps_async), so the combine step finds them there instead of
// waiting for global memory once more.
template <typename G>
BF_HD bool maps_early(const Job& job) {
  return G::kFast && G::kThreads > G::kPassThreads && job.mode == kSpectral && !job.prefetch;
}

// Buffers of a call on geometry G: buffers_needed, the fourth of paired transforms, then
// the early maps.
template <typename G>
BF_HD int buffers_of(const Job& job) {
  return buffers_needed(job) + (pairs_transforms<G>(job) ? 1 : 0) +
         (maps_early<G>(job) ? early_map_count(job) : 0);
}

// Starts copying plane p's maps (a1, then a2 with x2, then g) into dst, plain layout, one
// 16-byte asynchronous copy per chunk; read only after ctx.wait_async() and a barrier.
// Without `with_g` the map g's buffer is left to noise_term_group.
template <typename G, typename Ctx>
BF_HD void copy_maps_async(Ctx& ctx, const Job& job, float* dst, int64_t p, int tid,
                           bool with_g) {
  if (p >= job.planes) return;
  auto copy = [&](const MapRef& m, float* to) {
    const float* src = (const float*)m.ptr + map_plane(p, m.div, m.mod) * G::kPlane;
    BF_UNROLL for (int u = 0; u < G::kChunksPerThread; ++u) {
      const int f = 4 * (tid + u * G::kThreads);
      ctx.copy16_async(to + f, src + f);
    }
  };
  copy(job.a1, dst);
  if (job.x2) copy(job.a2, dst + G::kPlane);
  if (job.g.ptr && with_g) copy(job.g, dst + early_g_index(job) * G::kPlane);
}

// Starts copying plane group p0's x1 (float I/O) into buf: one 16-byte asynchronous copy
// per chunk; chunks of planes past the end are zeroed. The data may be read only after
// ctx.wait_async() in every thread and a barrier.
template <typename G, typename Ctx>
BF_HD void prefetch_group(Ctx& ctx, const float* src, float* buf, int64_t p0, int64_t planes,
                          int tid) {
  constexpr int N = G::N;
  using K = Chunks<G>;
  BF_UNROLL for (int u = 0; u < G::kChunksPerThread; ++u) {
    const int s = K::slot(u), f = K::elem(u, tid);
    float* dst = buf + s * G::kPlane + sidx<N>(f / N, f % N);
    if (p0 + s < planes) {
      ctx.copy16_async(dst, src + (p0 + s) * G::kPlane + f);
    } else {
      const float zero[4] = {0.f, 0.f, 0.f, 0.f};
      st4(dst, zero);
    }
  }
}

// The whole program for one block of geometry G (a Geom). `sm` holds
// G::smem_floats(buffers_of<G>(job)) floats. Blocks take plane groups blockIdx,
// blockIdx + gridDim, ...
template <typename G, typename T, typename Ctx>
BF_HD void run_program(Ctx& ctx, const Job& job, float* sm) {
  constexpr int N = G::N;
  const Tables tab = tables_at<N>(sm);
  // With prefetch, buffer 0 (x1 and the result) and the last buffer (the next group's x1)
  // trade places after every group: `first` and `spare` are their physical slots.
  const int spare_slot = buffers_of<G>(job) - 1;
  int first = 0, spare = spare_slot;
  auto buf = [sm, &first, &spare, spare_slot](int b) {
    const int slot = b == 0 ? first : b == spare_slot ? spare : b;
    return sm + G::kTables + slot * G::kPPB * G::kPlane;
  };
  // Dense passes: warp w works on plane slot w / kWarpsPerPlane; within it, on column
  // group wp % kGroups of rows from 32 kRows (wp / kGroups) on (wp = w % kWarpsPerPlane).
  // Fast passes: thread tid is role tid / (kPPB N) of row tid % (kPPB N) of the group.
  constexpr int kRowsPerBlock = G::kPPB * N;
  constexpr bool kWide = G::kFast && G::kThreads > G::kPassThreads;
  // `inverse_`: std::true_type or std::false_type, so each phase holds one pass's code.
  // A fast pass of buffer src into dst by pass thread t (< kPassThreads).
  auto fast_rows = [&](int src, int dst, int t, auto inverse_) {
    const int q = t % kRowsPerBlock, role = t / kRowsPerBlock;
    const float* S = buf(src) + (q / N) * G::kPlane;
    float* D = buf(dst) + (q / N) * G::kPlane;
    if constexpr (decltype(inverse_)::value)
      fast_inverse_pass<N, N, G::template whole_loads<T>()>(S, D, role, q % N);
    else
      fast_forward_pass<N, N>(S, D, role, q % N);
  };
  auto pass = [&](int src, int dst, auto inverse_) {
    ctx.phase([&](int tid) {
      if constexpr (G::kFast) {
        if (G::kThreads > G::kPassThreads && tid >= G::kPassThreads) return;   // wide
        fast_rows(src, dst, tid, inverse_);
      } else {
        const int w = tid / 32, wp = w % G::kWarpsPerPlane;
        const float* S = buf(src) + (w / G::kWarpsPerPlane) * G::kPlane;
        float* D = buf(dst) + (w / G::kWarpsPerPlane) * G::kPlane;
        const int j = wp % G::kGroups, row0 = 32 * G::kRows * (wp / G::kGroups);
        if constexpr (decltype(inverse_)::value)
          inverse_pass<N, G::kRows, N>(S, D, tab, j, row0, tid % 32);
        else
          forward_pass<N, G::kRows, N>(S, D, tab, j, row0, tid % 32);
      }
    });
  };
  // A 2-D transform of buffer a, with s as scratch: the pass a -> s, then s -> a. A loop,
  // not two inlined copies of the pass: ptxas then made each kernel a fifth to nearly half
  // smaller, with fewer registers, and left no spill in any fast geometry.
  auto transform = [&](int a, int s, auto inverse_) {
    BF_NO_UNROLL for (int k = 0; k < 2; ++k) pass(k ? s : a, k ? a : s, inverse_);
  };
  auto forward = [&](int a, int s) { transform(a, s, std::false_type{}); };
  auto inverse = [&](int a, int s) { transform(a, s, std::true_type{}); };
  // After two inverse passes: fast ones leave the mirrored form (store_mirrored_group).
  auto store_inverse = [&](int src, void* dst, int64_t p0) {
    ctx.phase([&](int tid) {
      if constexpr (G::kFast)
        store_mirrored_group<G, T>(buf(src), (T*)dst, p0, job.planes, tid);
      else
        store_group<G, T>(buf(src), (T*)dst, p0, job.planes, tid);
    });
  };
  // Wide geometry (pairs_transforms): 2-D transforms of a and of a2 (scratch s, s2) side
  // by side, a's passes on the pass threads and a2's on the others; the two results'
  // stores in one phase.
  auto transform_pair = [&](int a, int s, int a2, int s2, auto inverse_) {
    BF_NO_UNROLL for (int k = 0; k < 2; ++k) {
      ctx.phase([&](int tid) {
        const bool second = tid >= G::kPassThreads;
        fast_rows(second ? (k ? s2 : a2) : (k ? s : a), second ? (k ? a2 : s2) : (k ? a : s),
                  second ? tid - G::kPassThreads : tid, inverse_);
      });
    }
  };
  auto store_pair = [&](int src, void* dst, int src2, void* dst2, int64_t p0) {
    ctx.phase([&](int tid) {
      if constexpr (kWide) {
        store_mirrored_group<G, T>(buf(src), (T*)dst, p0, job.planes, tid);
        store_mirrored_group<G, T>(buf(src2), (T*)dst2, p0, job.planes, tid);
      }
    });
  };
  const bool pair = pairs_transforms<G>(job);
  const bool early_maps = maps_early<G>(job);
  const int maps_at = buffers_needed(job) + (pair ? 1 : 0);     // their buffer (early_maps)

  // Only in the geometries of one plane per block at N = 64 (split 2 and 4: the dense
  // split one, 256 threads; the fast one, 128; the wide one, 256), chosen for calls with
  // few planes per SM, where little else hides the loads; there the registers suffice.
  // Elsewhere ptxas showed the early noise raising register spills.
  constexpr bool kEarlyNoiseFits = G::kSplit >= 2 && G::kThreads <= 256;
  const bool early_noise = kEarlyNoiseFits && job.mode == kSpectral && !job.x2 && job.noise_out;
  // The wide geometry's calls with g that do not return the noise (sampler steps): g zb is
  // made early, in place of the map g.
  const bool early_term = early_maps && job.g.ptr && !job.noise_out;
  const NoiseAt noise_at =
      early_noise ? NoiseAt::kInC : early_term ? NoiseAt::kInMaps : NoiseAt::kMake;
  auto combine = [&](int64_t p0) {
    if constexpr (kWide) {
      if (early_maps) {
        ctx.phase([&](int tid) {
          combine_group<G, true>(job, buf(0), buf(2), p0, tid, noise_at, buf(maps_at));
        });
        return;
      }
    }
    ctx.phase([&](int tid) { combine_group<G>(job, buf(0), buf(2), p0, tid, noise_at); });
  };
  if constexpr (!G::kFast) ctx.phase([&](int tid) { fill_tables<N>(tab, tid, G::kThreads); });
  const int64_t groups = (job.planes + G::kPPB - 1) / G::kPPB;
  for (int64_t grp = ctx.block(); grp < groups; grp += ctx.grid()) {
    const int64_t p0 = grp * G::kPPB, next = p0 + ctx.grid() * G::kPPB;
    // x1 is in the spare slot (float I/O only: the other types never prefetch, whatever
    // job.prefetch says)
    const bool prefetched =
        std::is_same<T, float>::value && job.prefetch && grp != ctx.block();
    if (prefetched) {
      const int t = first;
      first = spare;
      spare = t;
    }
    ctx.phase([&](int tid) {
      // Without x2 the third buffer is free until the combine: the noise goes there while
      // the loads of x1 are in flight.
      auto meanwhile = [&] {
        if constexpr (std::is_same<T, float>::value) {
          if (job.prefetch && next < job.planes)
            prefetch_group<G>(ctx, (const float*)job.x1, buf(spare_slot), next, job.planes, tid);
        }
        if (early_noise) noise_group<G>(job, buf(2), p0, tid);
        if constexpr (kWide) {
          if (early_term)
            noise_term_group<G>(job, buf(maps_at) + early_g_index(job) * G::kPlane, p0, tid);
        }
      };
      if constexpr (kWide) {
        if (early_maps) copy_maps_async<G>(ctx, job, buf(maps_at), p0, tid, !early_term);
      }
      auto load_x1 = [&] {
        if (prefetched) {
          ctx.wait_async();        // this thread's copies into buffer 0 have landed
          meanwhile();
        } else {
          load_group<G, T>((const T*)job.x1, buf(0), p0, job.planes, tid, meanwhile);
        }
      };
      if (job.mode == kSpectral && job.x2) {
        // x2's loads go out first and x1's before either lands: one wait for global
        // memory, not two. Where both would not fit in registers, one after the other.
        if constexpr (G::kChunksPerThread <= 4) {
          load_group<G, T>((const T*)job.x2, buf(2), p0, job.planes, tid, load_x1);
        } else {
          load_x1();
          load_group<G, T>((const T*)job.x2, buf(2), p0, job.planes, tid, [] {});
        }
      } else {
        load_x1();
      }
      if constexpr (kWide) {
        if (early_maps) ctx.wait_async();      // the maps, before the phase's barrier
      }
    });
    if (job.mode == kIdct2) {
      inverse(0, 1);
      store_inverse(0, job.out, p0);
    } else if (kWide && pair && job.x2) {   // x1 and x2 side by side (3: x2's scratch)
      transform_pair(0, 1, 2, 3, std::false_type{});
    } else {
      forward(0, 1);
    }
    if (job.mode == kSpectral) {
      if (job.x2 && !pair) forward(2, 1);
      combine(p0);
      if (kWide && pair && job.noise_out) {   // the result and the noise side by side
        transform_pair(0, 1, 2, 3, std::true_type{});
        store_pair(0, job.out, 2, job.noise_out, p0);
        continue;
      }
      inverse(0, 1);
      store_inverse(0, job.out, p0);
    }
    if (job.mode == kDct2)
      ctx.phase([&](int tid) { store_group<G, T>(buf(0), (T*)job.out, p0, job.planes, tid); });
    if (job.mode == kSpectral && job.noise_out) {
      inverse(2, 1);
      store_inverse(2, job.noise_out, p0);
    }
  }
}

}  // namespace plane
}  // namespace blurfast
