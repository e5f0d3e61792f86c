// The fused program for 256 x 256 planes on a thread-block cluster (Hopper, sm_90): one
// plane at a time is spread over the kCtas blocks of a cluster, each holding kRows of its
// rows in shared memory. A pass transforms the rows a block holds and writes its result,
// transposed, into the blocks that own the output rows (distributed shared memory), so a
// plane is read from global memory once and each output written once, as in
// plane_program.h, whose phases (load, passes, combine, stores) this program repeats.
//
// Rows n and 255-n live in the same block (row_of below), so the stores of the inverse
// passes' mirrored form (fast_inverse_pass) stay local.
//
// Ctx for this program: cluster() and clusters() number the clusters; phase(f) runs
// f(block rank, thread) for every thread of every block of the cluster, then waits at a
// cluster-wide barrier; smem(j, rank) is block `rank`'s shared memory as block j sees it;
// copy16_async and wait_async as in the plane program's Ctx.
// cuda_fast_kernels.cuh runs it as a cluster kernel; emulate.cpp runs the blocks of a
// cluster phase by phase on the CPU.
#pragma once
#include <cstdint>
#include <type_traits>

#include "plane_program.h"

namespace blurfast {
namespace plane {

template <int Ctas>
struct ClusterGeom {
  static constexpr int N = 256;
  static constexpr int kCtas = Ctas;
  static constexpr int kRows = N / Ctas;              // rows per block
  static constexpr int kHalf = kRows / 2;
  static constexpr int kThreads = 2 * kRows;          // two per row, as the fast passes
  static constexpr int kPart = kRows * N;             // floats of one buffer
  static constexpr int kChunks = kPart / 4 / kThreads;
  static constexpr int kPPB = 1, kPlane = N * N;      // one plane at a time (GroupMaps)
  static_assert(Ctas == 4 || Ctas == 8, "cluster program: 4 or 8 blocks per cluster");
  static constexpr int64_t smem_floats(int nbuf) { return (int64_t)nbuf * kPart; }
  // Global row of local row l of block j: the first half counts up from j kHalf, the
  // second down from 255 - j kHalf.
  static BF_HD int row_of(int j, int l) {
    return l < kHalf ? j * kHalf + l : N - 1 - (j * kHalf + (l - kHalf));
  }
  static constexpr BF_HD int owner(int g) { return (g < N / 2 ? g : N - 1 - g) / kHalf; }
  static constexpr BF_HD int local(int g) {
    return g < N / 2 ? g % kHalf : kHalf + (N - 1 - g) % kHalf;
  }
  // The passes rely on it: the two roles' output rows (2k and 2k+1 forward, k and 255-k
  // inverse) have the same owner.
  static constexpr bool roles_share_owners() {
    for (int k = 0; k < N / 2; ++k)
      if (owner(2 * k) != owner(2 * k + 1) || owner(k) != owner(N - 1 - k)) return false;
    return true;
  }
  static_assert(roles_share_owners(), "cluster program: row split breaks the passes");
};

// Float4 chunk u of thread tid in a block's rows: local row l, column f.
template <typename G>
BF_HD void cluster_chunk(int u, int tid, int& l, int& f) {
  const int c = tid + u * G::kThreads;
  l = c / (G::N / 4);
  f = 4 * (c % (G::N / 4));
}

template <typename G, typename T, typename Ctx>
BF_HD void run_cluster_program(Ctx& ctx, const Job& job) {
  constexpr int N = G::N, kPlane = N * N;
  auto buf = [&](int j, int rank, int b) { return ctx.smem(j, rank) + b * G::kPart; };

  // Thread tid of block j: role tid / kRows of local row tid % kRows (whole warps share a
  // role). The stores come after the role branch (inside it, ptxas spilled, as for the
  // fast strip pass); the block owning each output row is a compile-time constant.
  auto pass = [&](int src, int dst, auto inverse_) {
    constexpr bool inv = decltype(inverse_)::value;
    ctx.phase([&](int j, int tid) {
      const int l = tid % G::kRows, role = tid / G::kRows, col = G::row_of(j, l);
      float h[N / 2];
      with_role(role, [&](auto role_) {
        constexpr int kRole = decltype(role_)::value;
        if constexpr (inv)
          fast_inverse_row<N, kRole>(buf(j, j, src), l, h);
        else
          fast_forward_row<N, kRole>(buf(j, j, src), l, h);
      });
      BF_UNROLL for (int k = 0; k < N / 2; ++k) {
        const int g = inv ? (role == 0 ? k : N - 1 - k) : 2 * k + role;
        store1<float>(buf(j, G::owner(inv ? k : 2 * k), dst) + sidx<N>(G::local(g), col), h[k]);
      }
    });
  };
  auto forward = [&](int src, int dst) { pass(src, dst, std::false_type{}); };
  auto inverse = [&](int src, int dst) { pass(src, dst, std::true_type{}); };

  // Rows of plane p -> buffer b of block j. Float I/O: asynchronous 16-byte copies
  // straight into shared memory, so no registers are held while they are in flight (with
  // loads through registers, ptxas spilled); the caller waits (ctx.wait_async) before the
  // phase's barrier. Other types: through registers, a quarter of the chunks at a time
  // (with half, ptxas spilled).
  auto load_rows = [&](const T* src, int j, int b, int64_t p, int tid) {
    float* B = buf(j, j, b);
    if constexpr (std::is_same<T, float>::value) {
      BF_UNROLL for (int u = 0; u < G::kChunks; ++u) {
        int l, f;
        cluster_chunk<G>(u, tid, l, f);
        ctx.copy16_async(B + sidx<N>(l, f), src + p * kPlane + G::row_of(j, l) * N + f);
      }
    } else {
      constexpr int kPart = G::kChunks / 4;
      BF_UNROLL for (int h = 0; h < 4; ++h) {
        float v[kPart][4];
        BF_UNROLL for (int u = 0; u < kPart; ++u) {
          int l, f;
          cluster_chunk<G>(h * kPart + u, tid, l, f);
          load4<T>(src + p * kPlane + G::row_of(j, l) * N + f, v[u]);
        }
        BF_UNROLL for (int u = 0; u < kPart; ++u) {
          int l, f;
          cluster_chunk<G>(h * kPart + u, tid, l, f);
          st4(B + sidx<N>(l, f), v[u]);
        }
      }
    }
  };
  // The noise of plane p's rows in block j (given, or Philox), into buffer b.
  auto noise_rows = [&](int j, int b, int64_t p, int tid) {
    float* B = buf(j, j, b);
#ifdef __CUDA_ARCH__
#pragma unroll 2
#endif
    for (int u = 0; u < G::kChunks; ++u) {
      int l, f;
      cluster_chunk<G>(u, tid, l, f);
      float n[4];
      noise4(job, p * kPlane + G::row_of(j, l) * N + f, n);
      st4(B + sidx<N>(l, f), n);
    }
  };
  // Frequency space, in place in buffer 0 (combine_group of plane_program.h, for the rows
  // of one block; combine_chunk for the arithmetic).
  auto combine = [&](int j, int64_t p, int tid, bool noise_in_c) {
    constexpr int kBatch = 4;
    const GroupMaps<G> maps(job, p);
    float* A = buf(j, j, 0);
    float* C = buf(j, j, 2);
    BF_NO_UNROLL for (int u0 = 0; u0 < G::kChunks; u0 += kBatch) {
      float m1[kBatch][4], m2[kBatch][4], mg[kBatch][4];
      BF_UNROLL for (int b = 0; b < kBatch; ++b) {
        int l, f;
        cluster_chunk<G>(u0 + b, tid, l, f);
        const int64_t at = G::row_of(j, l) * N + f;
        BF_UNROLL for (int q = 0; q < 4; ++q) m2[b][q] = mg[b][q] = 0.f;
        ld4((const float*)job.a1.ptr + maps.a1[0] + at, m1[b]);
        if (job.x2) ld4((const float*)job.a2.ptr + maps.a2[0] + at, m2[b]);
        if (job.g.ptr) ld4((const float*)job.g.ptr + maps.g[0] + at, mg[b]);
      }
      BF_UNROLL for (int b = 0; b < kBatch; ++b) {
        int l, f;
        cluster_chunk<G>(u0 + b, tid, l, f);
        combine_chunk(job, A, C, sidx<N>(l, f), p * kPlane + G::row_of(j, l) * N + f, m1[b],
                      m2[b], mg[b], noise_in_c);
      }
    }
  };
  // Buffer b of block j -> plane p of dst, rows as they are (dct2).
  auto store_rows = [&](int j, int b, void* dst, int64_t p, int tid) {
    const float* B = buf(j, j, b);
    BF_UNROLL for (int u = 0; u < G::kChunks; ++u) {
      int l, f;
      cluster_chunk<G>(u, tid, l, f);
      float v[4];
      ld4(B + sidx<N>(l, f), v);
      store4<T>((T*)dst + p * kPlane + G::row_of(j, l) * N + f, v);
    }
  };
  // After two inverse passes, buffer b holds the mirrored form along both axes
  // (store_mirrored_group of plane_program.h): local rows l and l + kHalf are the mirror
  // rows r and 255 - r.
  auto store_mirrored = [&](int b, void* dst, int64_t p) {
    ctx.phase([&](int j, int tid) {
      constexpr int Q = N / 8, kItems = G::kHalf * Q;     // chunks in a half row
      const float* B = buf(j, j, b);
      T* out = (T*)dst + p * kPlane;
      BF_UNROLL for (int i = tid; i < kItems; i += G::kThreads) {
        const int l = i / Q, c = 4 * (i % Q), cm = N - 4 - c;
        const int r = G::row_of(j, l), rm = N - 1 - r;
        float a[4], bb[4], d[4], e[4];
        ld4(B + sidx<N>(l, c), a);
        ld4(B + sidx<N>(l, cm), bb);
        ld4(B + sidx<N>(l + G::kHalf, c), d);
        ld4(B + sidx<N>(l + G::kHalf, cm), e);
        float x00[4], x01[4], x10[4], x11[4];
        BF_UNROLL for (int t = 0; t < 4; ++t) {
          const float sp = a[t] + bb[3 - t], sm = a[t] - bb[3 - t];
          const float tp = d[t] + e[3 - t], tm = d[t] - e[3 - t];
          x00[t] = sp + tp;
          x10[t] = sp - tp;
          x01[3 - t] = sm + tm;
          x11[3 - t] = sm - tm;
        }
        store4<T>(out + r * N + c, x00);
        store4<T>(out + r * N + cm, x01);
        store4<T>(out + rm * N + c, x10);
        store4<T>(out + rm * N + cm, x11);
      }
    });
  };

  // As in run_program: without x2, the noise goes to buffer 2 while the loads of x1 are
  // in flight, when it is returned.
  const bool early_noise = job.mode == kSpectral && !job.x2 && job.noise_out;
  for (int64_t p = ctx.cluster(); p < job.planes; p += ctx.clusters()) {
    ctx.phase([&](int j, int tid) {
      load_rows((const T*)job.x1, j, 0, p, tid);
      if (job.mode == kSpectral && job.x2) load_rows((const T*)job.x2, j, 2, p, tid);
      if (early_noise) noise_rows(j, 2, p, tid);
      ctx.wait_async();
    });
    if (job.mode == kIdct2) {
      inverse(0, 1);
      inverse(1, 0);
      store_mirrored(0, job.out, p);
      continue;
    }
    forward(0, 1);
    forward(1, 0);
    if (job.mode == kDct2) {
      ctx.phase([&](int j, int tid) { store_rows(j, 0, job.out, p, tid); });
      continue;
    }
    if (job.x2) {
      forward(2, 1);
      forward(1, 2);
    }
    ctx.phase([&](int j, int tid) { combine(j, p, tid, early_noise); });
    inverse(0, 1);
    inverse(1, 0);
    store_mirrored(0, job.out, p);
    if (job.noise_out) {
      inverse(2, 1);
      inverse(1, 2);
      store_mirrored(2, job.noise_out, p);
    }
  }
}

// Buffers of a call: the third holds x2 or the noise.
BF_HD int cluster_buffers(const Job& job) {
  return job.mode == kSpectral && (job.x2 || job.noise_out) ? 3 : 2;
}

}  // namespace plane
}  // namespace blurfast
