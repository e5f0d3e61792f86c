// The strip programs: one 1-D pass over the rows of a stack of planes, result transposed,
//   in (planes, rows, L) -> out (planes, L, rows), out[p][k][r] = sum_n M[k][n] in[p][r][n],
// M = C (forward) or C^T (inverse), for L in {32, 64, 128, 256} and rows % 32 == 0.
// Two of them make a 2-D transform of any plane whose sides are such sizes (256 x 256
// included, which the whole-plane program cannot hold in shared memory).
//
// Two programs, one per pass family (line_passes.h). Like plane_program.h, written as
// phases that cuda_fast.cu runs on the GPU and emulate.cpp on the CPU.
// - run_strips (dense passes): a block owns strips of 32 consecutive rows (contiguous in
//   memory) in turn, blockIdx, blockIdx + gridDim, ...; it loads the next strip into
//   registers while it transforms the current one.
// - run_fast_strips (fast passes): a block owns kRows consecutive rows in turn, two
//   threads per row, and stores the results from registers straight to global memory
//   (lanes on consecutive rows: coalesced). Blocks of 64 KiB of shared memory, several per
//   SM, overlap one another's loads. Its inverse pass can also keep the rows' layout
//   (kSameLayout), the last pass of column_program.h.
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
  // Two arrays in one launch (fast strips only): rows from split_rows on are read from in2
  // (from its start; split_rows a multiple of the block's rows), or, in the same-layout
  // pass, written to out2. The other side is one array, the two one after the other.
  const void* in2 = nullptr;
  void* out2 = nullptr;
  int64_t split_rows = 0;
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

template <int L_>
struct FastStripGeom {
  static constexpr int L = L_;
  static constexpr int kRows = L == 256 ? 64 : (L == 128 ? 128 : 256);   // 64 KiB or less
  static constexpr int kThreads = 2 * kRows;
  static constexpr int kBuf = kRows * L;
  static constexpr int kChunks = kBuf / 4 / kThreads;
  static constexpr int64_t kSmemFloats = kBuf;
  static_assert(L == 32 || L == 64 || L == 128 || L == 256, "strip program: L in 32..256");
};

// One thread's half of an inverse row (u or w), kept from one phase to the next.
template <int L>
struct HalfRow {
  float h[L / 2];
};

// kSameLayout (inverse jobs only): out keeps the input's layout, out[p][r][n] (the last
// pass of column_program.h, whose rows are transposed already). A kernel of its own: as a
// run-time branch, its store phase made ptxas spill in the others (440 bytes at L = 256).
template <int L, typename Tin, typename Tout, typename Ctx, bool kSameLayout = false>
BF_HD void run_fast_strips(Ctx& ctx, const StripJob& job, float* S) {
  using G = FastStripGeom<L>;
  constexpr int H = L / 2;
  const int64_t total = job.planes * job.rows;     // rows of the call, a multiple of 32
  const int64_t blocks = (total + G::kRows - 1) / G::kRows;
  auto keep = ctx.template per_thread<HalfRow<L>>();
  // Output element k of global row g = p rows + r is out[p][k][r].
  auto out_row = [&](int64_t g) {
    return (Tout*)job.out + (g / job.rows) * L * job.rows + g % job.rows;
  };
  for (int64_t b = ctx.block(); b < blocks; b += ctx.grid()) {
    const int64_t g0 = b * G::kRows;
    const int nrows = (int)(total - g0 < G::kRows ? total - g0 : G::kRows);
    ctx.phase([&](int tid) {                         // rows g0 .. g0 + nrows - 1 -> S
      const Tin* src = job.in2 && g0 >= job.split_rows
                           ? (const Tin*)job.in2 + (g0 - job.split_rows) * L
                           : (const Tin*)job.in + g0 * L;
      float v[G::kChunks][4];
      BF_UNROLL for (int u = 0; u < G::kChunks; ++u) {
        const int f = 4 * (tid + u * G::kThreads);
        v[u][0] = v[u][1] = v[u][2] = v[u][3] = 0.f;
        if (f / L < nrows) load4<Tin>(src + f, v[u]);
      }
      BF_UNROLL for (int u = 0; u < G::kChunks; ++u) {
        const int f = 4 * (tid + u * G::kThreads);
        st4(S + sidx<L>(f / L, f % L), v[u]);
      }
    });
    // Thread tid: role tid / kRows of row q = tid % kRows (whole warps share a role).
    if (!job.inverse) {
      ctx.phase([&](int tid) {
        const int q = tid % G::kRows, role = tid / G::kRows;
        if (q >= nrows) return;
        float h[H];
        with_role(role, [&](auto role_) { fast_forward_row<L, decltype(role_)::value>(S, q, h); });
        Tout* dst = out_row(g0 + q) + role * job.rows;
        BF_UNROLL for (int k = 0; k < H; ++k) store1<Tout>(dst + 2 * k * job.rows, h[k]);
      });
      continue;
    }
    // Rows past nrows (zeros) are transformed too: keep is then written on every path, so
    // the compiler sees it dead between iterations.
    ctx.phase([&](int tid) {
      with_role(tid / G::kRows, [&](auto role_) {
        fast_inverse_row<L, decltype(role_)::value>(S, tid % G::kRows, keep(tid).h);
      });
    });
    // u and w through shared memory (row q of S: u in columns [0, L/2), w after it), then
    // x[n] = u[n] + w[n] (role 0) and x[L-1-n] = u[n] - w[n] (role 1).
    ctx.phase([&](int tid) {
      const int q = tid % G::kRows, role = tid / G::kRows;
      BF_UNROLL for (int n = 0; n < H; n += 4) st4(S + sidx<L>(q, role * H + n), keep(tid).h + n);
    });
    if constexpr (kSameLayout) {
      // Chunk c: row c / (H/4), elements n .. n+3 and their mirrors L-1-n .. L-4-n; a warp
      // stores whole output rows.
      ctx.phase([&](int tid) {
        constexpr int kPerRow = H / 4, kPerThread = G::kRows * kPerRow / G::kThreads;
        // Not unrolled: unrolled at L = 256, ptxas spilled 456 bytes.
        BF_NO_UNROLL for (int i = 0; i < kPerThread; ++i) {
          const int c = tid + i * G::kThreads, q = c / kPerRow, n = 4 * (c % kPerRow);
          if (q >= nrows) continue;
          float u[4], w[4], lo[4], hi[4];
          ld4(S + sidx<L>(q, n), u);
          ld4(S + sidx<L>(q, H + n), w);
          BF_UNROLL for (int t = 0; t < 4; ++t) {
            lo[t] = u[t] + w[t];                  // x[n + t]
            hi[3 - t] = u[t] - w[t];              // x[L-1-n-t], at L-4-n + (3-t)
          }
          const int64_t g = g0 + q;
          Tout* dst = job.out2 && g >= job.split_rows ? (Tout*)job.out2 + (g - job.split_rows) * L
                                                      : (Tout*)job.out + g * L;
          store4<Tout>(dst + n, lo);
          store4<Tout>(dst + L - 4 - n, hi);
        }
      });
      continue;
    }
    ctx.phase([&](int tid) {
      const int q = tid % G::kRows, role = tid / G::kRows;
      if (q >= nrows) return;
      Tout* dst = out_row(g0 + q);
      const float sign = role == 0 ? 1.f : -1.f;
      BF_UNROLL for (int n = 0; n < H; n += 4) {
        float u[4], w[4];
        ld4(S + sidx<L>(q, n), u);
        ld4(S + sidx<L>(q, H + n), w);
        BF_UNROLL for (int t = 0; t < 4; ++t) {
          const int k = role == 0 ? n + t : L - 1 - n - t;
          store1<Tout>(dst + k * job.rows, u[t] + sign * w[t]);
        }
      }
    });
  }
}

}  // namespace plane
}  // namespace blurfast
