// Shared pieces of the whole-plane and strip CUDA programs (plane_program.h,
// strip_program.h): the swizzled shared-memory layout, vector access, and the two
// 1-D passes. Host and device code alike (BF_HD), so the CPU emulator runs them too.
//
// A 1-D transform of length L uses the even/odd split: X[2k] = sum_{n<L/2} C[2k][n]
// (x[n] + x[L-1-n]) and X[2k+1] = sum_{n<L/2} C[2k+1][n] (x[n] - x[L-1-n]): two (L/2)^2
// products instead of one L^2 product, with the tables Ef = C[2k][n], Of = C[2k+1][n]
// in shared memory.
#pragma once
#include <cstdint>
#include <cstring>

#include "common.h"

#ifdef __CUDACC__
#define BF_UNROLL _Pragma("unroll")
#define BF_NO_UNROLL _Pragma("unroll 1")   // keeps register use within the occupancy budget
#else
#define BF_UNROLL
#define BF_NO_UNROLL
#endif

namespace blurfast {
namespace plane {

// Shared-memory index of element (row, col) of a buffer with rows of W floats (W a
// multiple of 32): columns XOR-swizzled in groups of four by row % 8, so row-wise float4
// reads by 32 lanes on 32 rows and column-wise scalar writes are both free of bank
// conflicts.
template <int W>
BF_HD int sidx(int row, int col) {
  return row * W + (col ^ ((row & 7) << 2));
}

BF_HD void ld4(const float* p, float v[4]) {
#ifdef __CUDA_ARCH__
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
#else
  std::memcpy(v, p, 4 * sizeof(float));
#endif
}

BF_HD void st4(float* p, const float v[4]) {
#ifdef __CUDA_ARCH__
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
#else
  std::memcpy(p, v, 4 * sizeof(float));
#endif
}

// Four consecutive I/O elements <-> float. float here; cuda_fast.cu adds half, bfloat16.
template <typename T> BF_HD void load4(const T* p, float v[4]);
template <typename T> BF_HD void store4(T* p, const float v[4]);
template <> BF_HD void load4<float>(const float* p, float v[4]) { ld4(p, v); }
template <> BF_HD void store4<float>(float* p, const float v[4]) { st4(p, v); }

// DCT matrix entry C[k][i] of a power-of-two size n in float. On the GPU from cospif of
// the exactly reduced angle (exact argument: n is a power of two), within 2 ulp.
BF_HD float dct_coef_f(int k, int i, int n) {
#ifdef __CUDA_ARCH__
  const int m = ((2 * i + 1) * k) % (4 * n);
  return (k == 0 ? rsqrtf((float)n) : sqrtf(2.0f / (float)n)) * cospif((float)m / (float)(2 * n));
#else
  return (float)dct_coef(k, i, n);
#endif
}

// Ef[k][n] = C[2k][n], Of[k][n] = C[2k+1][n] for k, n < L/2 (L: transform length).
template <int L>
BF_HD void fill_tables(float* Ef, float* Of, int tid, int nthreads) {
  constexpr int H = L / 2;
  for (int i = tid; i < H * H; i += nthreads) {
    const int k = i / H, n = i % H;
    Ef[i] = dct_coef_f(2 * k, n, L);
    Of[i] = dct_coef_f(2 * k + 1, n, L);
  }
}

// A pass transforms 32 R rows of length L held in S (rows of L floats) and writes the
// result transposed into D (rows of 32 R floats). Lanes own rows lane + 32 i, i < R.

// Forward pass: D^T = rows of S times C^T. Warp column group j owns outputs 2k and 2k+1
// for k in [8j, 8j+8).
template <int L, int R>
BF_HD void forward_pass(const float* S, float* D, const float* Ef, const float* Of, int j,
                        int lane) {
  constexpr int H = L / 2, N = L;
  const int k0 = 8 * j;
  float ae[R][8], ao[R][8];
  BF_UNROLL for (int i = 0; i < R; ++i) BF_UNROLL for (int q = 0; q < 8; ++q) ae[i][q] = ao[i][q] = 0.f;
  for (int m = 0; m < H; m += 4) {
    float e[R][4], o[R][4];
    BF_UNROLL for (int i = 0; i < R; ++i) {
      const int r = lane + 32 * i;
      float a[4], b[4];                       // x[m..m+3] and x[N-4-m..N-1-m]
      ld4(S + sidx<N>(r, m), a);
      ld4(S + sidx<N>(r, N - 4 - m), b);
      BF_UNROLL for (int t = 0; t < 4; ++t) {
        e[i][t] = a[t] + b[3 - t];
        o[i][t] = a[t] - b[3 - t];
      }
    }
    BF_UNROLL for (int q = 0; q < 8; ++q) {
      float te[4], to[4];
      ld4(Ef + (k0 + q) * H + m, te);
      ld4(Of + (k0 + q) * H + m, to);
      BF_UNROLL for (int i = 0; i < R; ++i) BF_UNROLL for (int t = 0; t < 4; ++t) {
        ae[i][q] += e[i][t] * te[t];
        ao[i][q] += o[i][t] * to[t];
      }
    }
  }
  BF_UNROLL for (int i = 0; i < R; ++i) BF_UNROLL for (int q = 0; q < 8; ++q) {
    const int r = lane + 32 * i, k = k0 + q;
    D[sidx<32 * R>(2 * k, r)] = ae[i][q];
    D[sidx<32 * R>(2 * k + 1, r)] = ao[i][q];
  }
}

// Inverse pass: u[n] = sum_k C[2k][n] X[2k], v[n] = sum_k C[2k+1][n] X[2k+1];
// x[n] = u + v, x[L-1-n] = u - v. Warp column group j owns n in [8j, 8j+8).
template <int L, int R>
BF_HD void inverse_pass(const float* S, float* D, const float* Ef, const float* Of, int j,
                        int lane) {
  constexpr int H = L / 2, N = L;
  const int n0 = 8 * j;
  float u[R][8], v[R][8];
  BF_UNROLL for (int i = 0; i < R; ++i) BF_UNROLL for (int q = 0; q < 8; ++q) u[i][q] = v[i][q] = 0.f;
  for (int k = 0; k < H; k += 4) {
    float ev[R][4], od[R][4];                 // X[2k..2k+7] split by parity
    BF_UNROLL for (int i = 0; i < R; ++i) {
      const int r = lane + 32 * i;
      float s0[4], s1[4];
      ld4(S + sidx<N>(r, 2 * k), s0);
      ld4(S + sidx<N>(r, 2 * k + 4), s1);
      ev[i][0] = s0[0]; ev[i][1] = s0[2]; ev[i][2] = s1[0]; ev[i][3] = s1[2];
      od[i][0] = s0[1]; od[i][1] = s0[3]; od[i][2] = s1[1]; od[i][3] = s1[3];
    }
    BF_UNROLL for (int t = 0; t < 4; ++t) {
      float te[8], to[8];
      ld4(Ef + (k + t) * H + n0, te);
      ld4(Ef + (k + t) * H + n0 + 4, te + 4);
      ld4(Of + (k + t) * H + n0, to);
      ld4(Of + (k + t) * H + n0 + 4, to + 4);
      BF_UNROLL for (int i = 0; i < R; ++i) BF_UNROLL for (int q = 0; q < 8; ++q) {
        u[i][q] += ev[i][t] * te[q];
        v[i][q] += od[i][t] * to[q];
      }
    }
  }
  BF_UNROLL for (int i = 0; i < R; ++i) BF_UNROLL for (int q = 0; q < 8; ++q) {
    const int r = lane + 32 * i, n = n0 + q;
    D[sidx<32 * R>(n, r)] = u[i][q] + v[i][q];
    D[sidx<32 * R>(N - 1 - n, r)] = u[i][q] - v[i][q];
  }
}

}  // namespace plane
}  // namespace blurfast
