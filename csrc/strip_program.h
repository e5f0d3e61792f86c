// The strip program: one 1-D pass over the rows of a stack of planes, result transposed,
//   in (planes, rows, L) -> out (planes, L, rows), out[p][k][r] = sum_n M[k][n] in[p][r][n],
// M = C (forward) or C^T (inverse), for L in {32, 64, 128, 256} and rows % 32 == 0.
// Two of them make a 2-D transform of any plane whose sides are such sizes (256 x 256
// included, which the whole-plane program cannot hold in shared memory).
//
// A block owns strips of 32 consecutive rows (contiguous in memory) in turn, blockIdx,
// blockIdx + gridDim, ...; it loads the next strip into registers while it transforms
// the current one. Like plane_program.h, written as phases that cuda_fast.cu runs on the
// GPU and emulate.cpp on the CPU.
#pragma once
#include <cstdint>

#include "line_passes.h"

namespace blurfast {
namespace plane {

template <int L_>
struct StripGeom {
  static constexpr int L = L_;
  static constexpr int kWarps = L / 16;          // column groups of 8 in each half
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kTables = TableSize<L>::kFloats;
  static constexpr int kBuf = 32 * L;            // one strip
  static constexpr int kChunks = kBuf / 4 / kThreads;
  static constexpr int64_t kSmemFloats = kTables + 2 * kBuf;
  static_assert(L == 32 || L == 64 || L == 128 || L == 256, "strip program: L in 32..256");
  static_assert(kBuf % (4 * kThreads) == 0, "chunks must divide evenly");
};

struct StripJob {
  const void* in = nullptr;
  void* out = nullptr;
  int64_t planes = 0, rows = 0;
  bool inverse = false;
};

// One thread's prefetched strip chunks.
template <int L>
struct StripPrefetch {
  float v[StripGeom<L>::kChunks][4];
};

template <int L, typename Tin, typename Tout, typename Ctx>
BF_HD void run_strips(Ctx& ctx, const StripJob& job, float* sm) {
  using G = StripGeom<L>;
  const Tables tab = tables_at<L>(sm);
  float* S = sm + G::kTables;
  float* D = S + G::kBuf;
  const int64_t per_plane = job.rows / 32, strips = job.planes * per_plane;
  auto pre = ctx.template per_thread<StripPrefetch<L>>();
  // Strip st is the 32 L contiguous elements from st * 32 L on.
  auto fetch = [&](int64_t st, int tid) {
    const Tin* src = (const Tin*)job.in + st * G::kBuf;
    BF_UNROLL for (int u = 0; u < G::kChunks; ++u)
      load4<Tin>(src + 4 * (tid + u * G::kThreads), pre(tid).v[u]);
  };

  ctx.phase([&](int tid) { fill_tables<L>(tab, tid, G::kThreads); });
  int64_t st = ctx.block();
  if (st < strips) ctx.phase([&](int tid) { fetch(st, tid); });
  for (; st < strips; st += ctx.grid()) {
    ctx.phase([&](int tid) {
      BF_UNROLL for (int u = 0; u < G::kChunks; ++u) {
        const int f = 4 * (tid + u * G::kThreads);
        st4(S + sidx<L>(f / L, f % L), pre(tid).v[u]);
      }
    });
    ctx.phase([&](int tid) {
      if (st + ctx.grid() < strips) fetch(st + ctx.grid(), tid);
      if (job.inverse)
        inverse_pass<L, 1, 32>(S, D, tab, tid / 32, 0, tid % 32);
      else
        forward_pass<L, 1, 32>(S, D, tab, tid / 32, 0, tid % 32);
    });
    ctx.phase([&](int tid) {
      const int64_t p = st / per_plane, r0 = (st % per_plane) * 32;
      Tout* dst = (Tout*)job.out + p * L * job.rows + r0;
      BF_UNROLL for (int u = 0; u < G::kChunks; ++u) {
        const int c = tid + u * G::kThreads, k = c / 8, q = c % 8;   // 8 float4 per output row
        float v[4];
        ld4(D + sidx<32>(k, 4 * q), v);
        store4<Tout>(dst + k * job.rows + 4 * q, v);
      }
    });
  }
}

}  // namespace plane
}  // namespace blurfast
