// The fused op on planes the whole-plane program cannot hold (256 x 256, and other sides of
// 32 to 256 it does not take): three passes through memory instead of six and a separate
// combine (version 8, benchmarks/LOG.md).
//
//   1. row pass (run_fast_strips, forward): T[p][l][r] = sum_n C[l][n] x[p][r][n], for x1 and
//      x2: rows of T are the columns l of a plane, transposed;
//   2. run_column_spectral, below, on the rows of T: the column pass gives column l of
//      the 2-D transform, X[p][k][l]; the frequency-space step (combine_chunk of
//      plane_program.h: a1 X1 + a2 X2 + g zb, zb numbered as in every other path); the
//      inverse column pass of the result and of zb, written transposed:
//      U[p][r][l] = sum_k C[k][r] A[p][k][l];
//   3. row pass (run_fast_strips, inverse, kSameLayout): out[p][r][n] =
//      sum_l C[l][n] U[p][r][l], for the result and the noise.
//
// In pass 2 a block owns kRows consecutive rows of T (columns l0 .. l0 + kRows - 1 of one
// plane; W % kRows == 0), two threads per row and buffer, like the fast strips; the
// buffers change layout from rows of T ([l][k], rows of L) to columns ([k][l], rows of
// kRows) at the forward pass, so the combine step moves float4s along l (one Philox block,
// one map load) and the inverse passes read columns without bank conflicts.
// cuda_fast.cu runs it on the GPU, emulate.cpp on the CPU.
#pragma once
#include <cstdint>

#include "plane_program.h"
#include "strip_program.h"

namespace blurfast {
namespace plane {

template <int L_>
struct ColumnGeom {
  static constexpr int L = L_;                  // H, the length of a column
  static constexpr int kRows = 32;              // rows of T (columns of a plane) per block
  static constexpr int kThreads = 4 * kRows;    // two per row for each of two buffers
  static constexpr int kBuf = kRows * L;
  static constexpr int kChunks = kBuf / 4 / kThreads;          // float4s per thread and buffer
  static constexpr int kBatch = kChunks < 4 ? kChunks : 4;      // combine chunks in flight
  static constexpr int64_t kSmemFloats = 2 * kBuf;
  static_assert(L == 32 || L == 64 || L == 128 || L == 256, "column program: L in 32..256");
  static_assert(kBuf % (8 * kThreads) == 0 && kChunks % kBatch == 0,
                "chunks must divide evenly (the stores take half a buffer's)");
};

// One launch of pass 2, on planes plane0 .. plane0 + planes - 1 of a call (the host runs a
// call in chunks of planes whose intermediates fit in L2). spec: the call's
// frequency-space step (x2 and noise_out non-null as flags: x2's row pass is in t2, the
// noise is wanted in u2), its maps, zb and noise numbering by the call's plane index.
struct ColumnJob {
  Job spec;
  const float* t1 = nullptr;    // (planes, W, L): x1's row pass, transposed
  const float* t2 = nullptr;    // x2's, with spec.x2
  float* u1 = nullptr;          // (planes, L, W): the result's inverse column pass
  float* u2 = nullptr;          // the noise's, with spec.noise_out
  int64_t plane0 = 0, planes = 0;
  int W = 0;
};

// The job of planes p0 .. p0 + planes - 1 of call p, whose intermediates for those planes
// are at t1, u1 (and t2 with x2, u2 with the noise returned).
inline ColumnJob column_job(const SpectralParams& p, const float* t1, const float* t2,
                            float* u1, float* u2, int64_t p0, int64_t planes) {
  ColumnJob job;
  job.spec = make_job(p, kSpectral);
  job.t1 = t1;
  job.t2 = p.x2 ? t2 : nullptr;
  job.u1 = u1;
  job.u2 = p.noise_out ? u2 : nullptr;
  job.plane0 = p0;
  job.planes = planes;
  job.W = (int)p.W;
  return job;
}

// A thread's half of a line, kept from one phase to the next.
template <int L>
struct ColumnHalf {
  float h[L / 2];
};

template <int L, typename Ctx>
BF_HD void run_column_spectral(Ctx& ctx, const ColumnJob& job, float* sm) {
  using G = ColumnGeom<L>;
  constexpr int H = L / 2, R = G::kRows, kPerRow4 = R / 4;
  const Job& spec = job.spec;
  const bool two_in = spec.x2 != nullptr, two_out = spec.noise_out != nullptr;
  auto B = [sm](int s) { return s == 0 ? sm : sm + G::kBuf; };   // no local-memory array
  const int64_t hw = (int64_t)L * job.W, blocks = job.planes * (job.W / R);
  auto keep = ctx.template per_thread<ColumnHalf<L>>();
  // Thread tid: buffer tid / (2R), role (tid / R) % 2, line q = tid % R of the block.
  for (int64_t b = ctx.block(); b < blocks; b += ctx.grid()) {
    const int64_t p = b / (job.W / R), gp = job.plane0 + p;     // in the chunk, in the call
    const int l0 = (int)(b % (job.W / R)) * R;
    const int64_t row0 = p * job.W + l0;                  // first row of T
    ctx.phase([&](int tid) {                              // rows of T -> B(0), B(1)
      for (int s = 0; s < (two_in ? 2 : 1); ++s) {
        const float* src = (s == 0 ? job.t1 : job.t2) + row0 * L;
        float v[G::kChunks][4];
        BF_UNROLL for (int u = 0; u < G::kChunks; ++u) ld4(src + 4 * (tid + u * G::kThreads), v[u]);
        BF_UNROLL for (int u = 0; u < G::kChunks; ++u) {
          const int f = 4 * (tid + u * G::kThreads);
          st4(B(s) + sidx<L>(f / L, f % L), v[u]);
        }
      }
    });
    ctx.phase([&](int tid) {                              // forward column pass
      const int s = tid / (2 * R);
      if (s == 1 && !two_in) return;
      with_role((tid / R) % 2, [&](auto role_) {
        fast_forward_row<L, decltype(role_)::value>(B(s), tid % R, keep(tid).h);
      });
    });
    ctx.phase([&](int tid) {                              // X[k][l] at row k, column l - l0
      const int s = tid / (2 * R), role = (tid / R) % 2, q = tid % R;
      if (s == 1 && !two_in) return;
      BF_UNROLL for (int j = 0; j < H; ++j) B(s)[sidx<R>(2 * j + role, q)] = keep(tid).h[j];
    });
    ctx.phase([&](int tid) {                              // the frequency-space step
      const int32_t m = (int32_t)(map_plane(gp, spec.a1.div, spec.a1.mod) * hw);
      const int32_t m2 = two_in ? (int32_t)(map_plane(gp, spec.a2.div, spec.a2.mod) * hw) : 0;
      const int32_t mg = spec.g.ptr ? (int32_t)(map_plane(gp, spec.g.div, spec.g.mod) * hw) : 0;
      // Batches of kBatch chunks: their map loads are all issued before the first is used.
      BF_NO_UNROLL for (int u0 = 0; u0 < G::kChunks; u0 += G::kBatch) {
        float c1[G::kBatch][4], c2[G::kBatch][4], cg[G::kBatch][4];
        int at[G::kBatch];
        int32_t f[G::kBatch];
        BF_UNROLL for (int i = 0; i < G::kBatch; ++i) {   // chunk (k, 4 j): row k, columns 4j..
          const int c = tid + (u0 + i) * G::kThreads, k = c / kPerRow4, j = c % kPerRow4;
          at[i] = sidx<R>(k, 4 * j);
          f[i] = k * job.W + l0 + 4 * j;
          BF_UNROLL for (int t = 0; t < 4; ++t) c1[i][t] = c2[i][t] = cg[i][t] = 0.f;
          ld4((const float*)spec.a1.ptr + m + f[i], c1[i]);
          if (two_in) ld4((const float*)spec.a2.ptr + m2 + f[i], c2[i]);
          if (spec.g.ptr) ld4((const float*)spec.g.ptr + mg + f[i], cg[i]);
        }
        BF_UNROLL for (int i = 0; i < G::kBatch; ++i)
          combine_chunk(spec, B(0), B(1), at[i], gp * hw + f[i], c1[i], c2[i], cg[i],
                        NoiseAt::kMake);
      }
    });
    ctx.phase([&](int tid) {                              // inverse column pass
      const int s = tid / (2 * R);
      if (s == 1 && !two_out) return;
      with_role((tid / R) % 2, [&](auto role_) {
        fast_inverse_col<L, decltype(role_)::value, R>(B(s), tid % R, keep(tid).h);
      });
    });
    ctx.phase([&](int tid) {                              // u at rows n, w at rows L-1-n
      const int s = tid / (2 * R), role = (tid / R) % 2, q = tid % R;
      if (s == 1 && !two_out) return;
      BF_UNROLL for (int n = 0; n < H; ++n)
        B(s)[sidx<R>(role == 0 ? n : L - 1 - n, q)] = keep(tid).h[n];
    });
    ctx.phase([&](int tid) {        // U[r][l]: x[n] = u[n] + w[n], x[L-1-n] = u[n] - w[n]
      for (int s = 0; s < (two_out ? 2 : 1); ++s) {
        float* dst = (s == 0 ? job.u1 : job.u2) + p * hw + l0;
        BF_UNROLL for (int i = 0; i < G::kChunks / 2; ++i) {
          const int c = tid + i * G::kThreads, n = c / kPerRow4, j = 4 * (c % kPerRow4);
          float u[4], w[4], lo[4], hi[4];
          ld4(B(s) + sidx<R>(n, j), u);
          ld4(B(s) + sidx<R>(L - 1 - n, j), w);
          BF_UNROLL for (int t = 0; t < 4; ++t) {
            lo[t] = u[t] + w[t];
            hi[t] = u[t] - w[t];
          }
          store4<float>(dst + (int64_t)n * job.W + j, lo);
          store4<float>(dst + (int64_t)(L - 1 - n) * job.W + j, hi);
        }
      }
    });
  }
}

}  // namespace plane
}  // namespace blurfast
