// Shared pieces of the whole-plane and strip CUDA programs (plane_program.h,
// strip_program.h): the swizzled shared-memory layout, vector access, and the two
// 1-D passes. Host and device code alike (BF_HD), so the CPU emulator runs them too.
//
// Two families of passes:
// - dense: two levels of the even/odd split, then products with tables in shared memory,
//   3 L^2 / 8 multiply-adds per row; a warp owns a group of outputs of 32 R rows;
// - fast: two threads per row, each an O(L log L) transform on its registers
//   (fast_dct.h); no tables.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "fast_dct.h"

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

#ifndef __CUDA_ARCH__
// The emulator (emulate.cpp) lists the memory a call may touch: its inputs and maps
// (read only), its outputs and the block's shared memory. On the host, ld4, st4 and
// store1 check every access against that list and throw outside it: an out-of-bounds
// read whose values go unused would otherwise pass unseen. No list (nullptr): no checks.
//
// An access must lie whole in one buffer: one that runs from a buffer into the next
// throws even where the two are adjacent. Inputs may overlap one another (x2 may be x1);
// a write must lie in a writable buffer and touch no other, so an output that overlaps
// an input or another output throws where a write lands in both, whatever the list's
// order.
struct EmuRange {
  const char* lo;
  const char* hi;
  bool writable;
  const char* name;                // the call's argument, for messages
};
inline thread_local const std::vector<EmuRange>* emu_memory = nullptr;

inline void emu_check(const void* p, size_t bytes, bool write) {
  if (!emu_memory) return;
  const char* lo = static_cast<const char*>(p);
  const char* hi = lo + bytes;
  // A buffer holding the whole access (a read needs no more); for a write, a writable
  // one where there is one.
  const EmuRange* home = nullptr;
  for (const EmuRange& r : *emu_memory) {
    if (lo < r.lo || hi > r.hi) continue;
    if (!write) return;
    home = &r;
    if (r.writable) break;
  }
  if (!home)
    throw std::out_of_range(std::string("emulated kernel: ") + (write ? "write" : "read") +
                            " outside every buffer of the call");
  if (!home->writable)
    throw std::out_of_range(std::string("emulated kernel: write to an input (") + home->name +
                            ")");
  for (const EmuRange& r : *emu_memory)
    if (&r != home && lo < r.hi && r.lo < hi)
      throw std::out_of_range(std::string("emulated kernel: write to ") + home->name +
                              " also writes " + r.name + " (the buffers overlap)");
}

// A vector access on the GPU needs an address that is a multiple of its size (a float4
// at 16 bytes, four 16-bit values at 8), or the kernel faults; the emulator's are
// memcpy, so it checks that here (the dispatch's fallbacks to the element-wise kernels
// keep misaligned calls away from the programs).
inline void emu_check_aligned(const void* p, size_t bytes) {
  if (emu_memory && reinterpret_cast<uintptr_t>(p) % bytes != 0)
    throw std::out_of_range("emulated kernel: a " + std::to_string(bytes) +
                            "-byte vector access at an address that is not a multiple of " +
                            std::to_string(bytes));
}
#endif

BF_HD void ld4(const float* p, float v[4]) {
#ifdef __CUDA_ARCH__
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
#else
  emu_check(p, 4 * sizeof(float), false);
  emu_check_aligned(p, 4 * sizeof(float));
  std::memcpy(v, p, 4 * sizeof(float));
#endif
}

BF_HD void st4(float* p, const float v[4]) {
#ifdef __CUDA_ARCH__
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
#else
  emu_check(p, 4 * sizeof(float), true);
  emu_check_aligned(p, 4 * sizeof(float));
  std::memcpy(p, v, 4 * sizeof(float));
#endif
}

#ifdef __CUDA_ARCH__
// One 16- or 8-byte store to global memory. nvcc 13 compiled the plain float4 and uint2
// stores of store4 into 32-bit ones (PTX st.global.f32 / .u32: four STG.E per float4 in
// every plane kernel); these keep one STG.E.128 / STG.E.64. The same bytes land.
__device__ __forceinline__ void stg_v4(void* p, float a, float b, float c, float d) {
  asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(a), "f"(b), "f"(c),
               "f"(d) : "memory");
}
__device__ __forceinline__ void stg_v2(void* p, unsigned a, unsigned b) {
  asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(a), "r"(b) : "memory");
}
#endif

// ld4 of shared memory for a caller that uses only some of the four floats. Compiled
// from ld4, ptxas split such a 16-byte load into one 32-bit LDS per float used (even a
// plain ld.shared.v4: only a volatile load stays whole): fast_inverse_row then made two
// LDS per chunk, each 4 shared-memory wavefronts (the 32 lanes are 32 rows of one column,
// which meet 8 banks), where one LDS.128 takes 4. Same values.
BF_HD void lds4_whole(const float* p, float v[4]) {
#ifdef __CUDA_ARCH__
  const unsigned a = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ld.volatile.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
               : "=f"(v[0]), "=f"(v[1]), "=f"(v[2]), "=f"(v[3]) : "r"(a) : "memory");
#else
  ld4(p, v);
#endif
}

// Four consecutive I/O elements <-> float, and one float -> I/O element. float here;
// cuda_fast.cu adds half, bfloat16. The pointers are global memory.
template <typename T> BF_HD void load4(const T* p, float v[4]);
template <typename T> BF_HD void store4(T* p, const float v[4]);
template <typename T> BF_HD void store1(T* p, float v);
template <> BF_HD void load4<float>(const float* p, float v[4]) { ld4(p, v); }
template <> BF_HD void store4<float>(float* p, const float v[4]) {
#ifdef __CUDA_ARCH__
  stg_v4(p, v[0], v[1], v[2], v[3]);
#else
  st4(p, v);
#endif
}
template <> BF_HD void store1<float>(float* p, float v) {
#ifndef __CUDA_ARCH__
  emu_check(p, sizeof(float), true);
#endif
  *p = v;
}

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

// The pass tables for transform length L, in shared memory: odd[k][n] = C[2k+1][n] for
// k, n < L/2; ee[k][n] = C[4k][n] and eo[k][n] = C[4k+2][n] for k, n < L/4.
struct Tables {
  float* odd;
  float* ee;
  float* eo;
};

template <int L>
struct TableSize {
  static constexpr int kOdd = (L / 2) * (L / 2), kQuarter = (L / 4) * (L / 4);
  static constexpr int kFloats = kOdd + 2 * kQuarter;   // 3 L^2 / 8, a multiple of 4
};

template <int L>
BF_HD Tables tables_at(float* sm) {
  return Tables{sm, sm + TableSize<L>::kOdd, sm + TableSize<L>::kOdd + TableSize<L>::kQuarter};
}

template <int L>
BF_HD void fill_tables(const Tables& t, int tid, int nthreads) {
  constexpr int H = L / 2, Q = L / 4;
  for (int i = tid; i < H * H; i += nthreads) t.odd[i] = dct_coef_f(2 * (i / H) + 1, i % H, L);
  for (int i = tid; i < Q * Q; i += nthreads) {
    t.ee[i] = dct_coef_f(4 * (i / Q), i % Q, L);
    t.eo[i] = dct_coef_f(4 * (i / Q) + 2, i % Q, L);
  }
}

// Passes. A pass transforms rows of length L held in S (rows of L floats) and writes the
// result transposed into D (rows of DW floats, DW = the number of rows in S). A warp
// owns rows row0 + lane + 32 i, i < R, and, as warp j of the L/16 column groups, a
// fixed set of outputs.
//
// Two levels of the even/odd split. With e[n] = x[n] + x[L-1-n], o[n] = x[n] - x[L-1-n]
// (n < L/2), and then ee[n] = e[n] + e[L/2-1-n], eo[n] = e[n] - e[L/2-1-n] (n < L/4):
//   X[2k+1] = sum_{n<L/2} C[2k+1][n] o[n],
//   X[4k]   = sum_{n<L/4} C[4k][n] ee[n],   X[4k+2] = sum_{n<L/4} C[4k+2][n] eo[n],
// 3 L^2 / 8 multiply-adds per row instead of L^2 / 2 (one level) or L^2 (none).

// Forward: warp j owns X[2k+1] for k in [8j, 8j+8) and X[4k], X[4k+2] for k in [4j, 4j+4).
template <int L, int R, int DW>
BF_HD void forward_pass(const float* S, float* D, const Tables& T, int j, int row0, int lane) {
  constexpr int H = L / 2, Q = L / 4;
  const int k0 = 8 * j, k1 = 4 * j;
  float ao[R][8], aee[R][4], aeo[R][4];
  BF_UNROLL for (int i = 0; i < R; ++i) {
    BF_UNROLL for (int q = 0; q < 8; ++q) ao[i][q] = 0.f;
    BF_UNROLL for (int q = 0; q < 4; ++q) aee[i][q] = aeo[i][q] = 0.f;
  }
  for (int m = 0; m < Q; m += 4) {
    const int mm = H - 4 - m;                 // the mirror chunk within the first half
    float olo[R][4], ohi[R][4], ee[R][4], eo[R][4];
    BF_UNROLL for (int i = 0; i < R; ++i) {
      const int r = row0 + lane + 32 * i;
      float a[4], b[4], c[4], d[4];
      ld4(S + sidx<L>(r, m), a);              // x[m+t];      partner x[L-1-m-t] = b[3-t]
      ld4(S + sidx<L>(r, L - 4 - m), b);
      ld4(S + sidx<L>(r, mm), c);             // x[mm+t];     partner x[L-1-mm-t] = d[3-t]
      ld4(S + sidx<L>(r, H + m), d);
      float elo[4], ehi[4];
      BF_UNROLL for (int t = 0; t < 4; ++t) {
        elo[t] = a[t] + b[3 - t];
        olo[i][t] = a[t] - b[3 - t];
        ehi[t] = c[t] + d[3 - t];
        ohi[i][t] = c[t] - d[3 - t];
      }
      BF_UNROLL for (int t = 0; t < 4; ++t) { // e[m+t] with e[H-1-m-t] = ehi[3-t]
        ee[i][t] = elo[t] + ehi[3 - t];
        eo[i][t] = elo[t] - ehi[3 - t];
      }
    }
    BF_UNROLL for (int q = 0; q < 8; ++q) {
      float tl[4], th[4];
      ld4(T.odd + (k0 + q) * H + m, tl);
      ld4(T.odd + (k0 + q) * H + mm, th);
      BF_UNROLL for (int i = 0; i < R; ++i) BF_UNROLL for (int t = 0; t < 4; ++t)
        ao[i][q] += olo[i][t] * tl[t] + ohi[i][t] * th[t];
    }
    BF_UNROLL for (int q = 0; q < 4; ++q) {
      float te[4], to[4];
      ld4(T.ee + (k1 + q) * Q + m, te);
      ld4(T.eo + (k1 + q) * Q + m, to);
      BF_UNROLL for (int i = 0; i < R; ++i) BF_UNROLL for (int t = 0; t < 4; ++t) {
        aee[i][q] += ee[i][t] * te[t];
        aeo[i][q] += eo[i][t] * to[t];
      }
    }
  }
  BF_UNROLL for (int i = 0; i < R; ++i) {
    const int r = row0 + lane + 32 * i;
    BF_UNROLL for (int q = 0; q < 8; ++q) D[sidx<DW>(2 * (k0 + q) + 1, r)] = ao[i][q];
    BF_UNROLL for (int q = 0; q < 4; ++q) {
      D[sidx<DW>(4 * (k1 + q), r)] = aee[i][q];
      D[sidx<DW>(4 * (k1 + q) + 2, r)] = aeo[i][q];
    }
  }
}

// Inverse: u[n] = sum_k C[2k][n] X[2k] = uu[n] + uv[n] and u[L/2-1-n] = uu[n] - uv[n]
// (n < L/4), with uu[n] = sum_k C[4k][n] X[4k], uv[n] = sum_k C[4k+2][n] X[4k+2];
// v[n] = sum_k C[2k+1][n] X[2k+1]; x[n] = u[n] + v[n], x[L-1-n] = u[n] - v[n] (n < L/2).
// Warp j owns n in [4j, 4j+4) and their mirrors L/2-1-n (and the outputs L-1-n of both).
template <int L, int R, int DW>
BF_HD void inverse_pass(const float* S, float* D, const Tables& T, int j, int row0, int lane) {
  constexpr int H = L / 2, Q = L / 4;
  const int n0 = 4 * j, n1 = H - 4 - 4 * j;   // v columns: [n0, n0+4) and [n1, n1+4)
  float v[R][8], uu[R][4], uv[R][4];
  BF_UNROLL for (int i = 0; i < R; ++i) {
    BF_UNROLL for (int q = 0; q < 8; ++q) v[i][q] = 0.f;
    BF_UNROLL for (int q = 0; q < 4; ++q) uu[i][q] = uv[i][q] = 0.f;
  }
  for (int c = 0; c < L / 8; ++c) {           // X[8c .. 8c+7]
    float od[R][4], e0[R][2], e2[R][2];
    BF_UNROLL for (int i = 0; i < R; ++i) {
      const int r = row0 + lane + 32 * i;
      float s0[4], s1[4];
      ld4(S + sidx<L>(r, 8 * c), s0);
      ld4(S + sidx<L>(r, 8 * c + 4), s1);
      od[i][0] = s0[1]; od[i][1] = s0[3]; od[i][2] = s1[1]; od[i][3] = s1[3];  // X[2(4c+t)+1]
      e0[i][0] = s0[0]; e0[i][1] = s1[0];     // X[4(2c+t)]
      e2[i][0] = s0[2]; e2[i][1] = s1[2];     // X[4(2c+t)+2]
    }
    BF_UNROLL for (int t = 0; t < 4; ++t) {
      float tl[4], th[4];
      ld4(T.odd + (4 * c + t) * H + n0, tl);
      ld4(T.odd + (4 * c + t) * H + n1, th);
      BF_UNROLL for (int i = 0; i < R; ++i) BF_UNROLL for (int q = 0; q < 4; ++q) {
        v[i][q] += od[i][t] * tl[q];
        v[i][4 + q] += od[i][t] * th[q];
      }
    }
    BF_UNROLL for (int t = 0; t < 2; ++t) {
      float te[4], to[4];
      ld4(T.ee + (2 * c + t) * Q + n0, te);
      ld4(T.eo + (2 * c + t) * Q + n0, to);
      BF_UNROLL for (int i = 0; i < R; ++i) BF_UNROLL for (int q = 0; q < 4; ++q) {
        uu[i][q] += e0[i][t] * te[q];
        uv[i][q] += e2[i][t] * to[q];
      }
    }
  }
  BF_UNROLL for (int i = 0; i < R; ++i) BF_UNROLL for (int q = 0; q < 4; ++q) {
    const int r = row0 + lane + 32 * i;
    const int n = n0 + q, nm = H - 1 - n;     // nm = n1 + 3 - q
    const float un = uu[i][q] + uv[i][q], um = uu[i][q] - uv[i][q];
    const float vn = v[i][q], vm = v[i][4 + 3 - q];
    D[sidx<DW>(n, r)] = un + vn;
    D[sidx<DW>(L - 1 - n, r)] = un - vn;
    D[sidx<DW>(nm, r)] = um + vm;
    D[sidx<DW>(L - 1 - nm, r)] = um - vm;
  }
}

// Fast passes: two threads per row. Thread Role of row r of S (rows of L floats) makes
// half of the transform of that row in registers (fast_dct.h for the split):
// Forward, with e[n] = x[n] + x[L-1-n], o[n] = x[n] - x[L-1-n], both scaled to the
// orthonormal DCT: Role 0: h[k] = X[2k] = DCT-II_{L/2}(e)[k]; Role 1: h[k] = X[2k+1] =
// DCT-IV_{L/2}(o)[k].
template <int L, int Role>
BF_HD void fast_forward_row(const float* S, int r, float* h) {
  constexpr int H = L / 2, E = 1 - fastdct::log2i(L), E0 = -fastdct::log2i(L);
  fastdct::static_for<H / 4>([&](auto c_) {
    constexpr int c = 4 * decltype(c_)::value;
    float a[4], b[4];
    ld4(S + sidx<L>(r, c), a);              // x[c+t]; its partner x[L-1-c-t] is b[3-t]
    ld4(S + sidx<L>(r, L - 4 - c), b);
    BF_UNROLL for (int t = 0; t < 4; ++t) h[c + t] = Role == 0 ? a[t] + b[3 - t] : a[t] - b[3 - t];
  });
  if constexpr (Role == 0)
    fastdct::dct2<H, E, E0>(h);
  else
    fastdct::dct4<H, E>(h);
}

// Inverse: Role 0: h = u = DCT-III_{L/2}(X[0], X[2], ..); Role 1: h = w =
// DCT-IV_{L/2}(X[1], X[3], ..). The pixels are x[n] = u[n] + w[n], x[L-1-n] = u[n] - w[n]
// (n < L/2): a butterfly across the two threads, left to the caller.
// The half-length transform of a role, in place on h (its coefficients, gathered).
template <int L, int Role>
BF_HD void fast_inverse_half(float* h) {
  constexpr int H = L / 2, E = 1 - fastdct::log2i(L), E0 = -fastdct::log2i(L);
  if constexpr (Role == 0)
    fastdct::dct3<H, E, E0>(h);
  else
    fastdct::dct4<H, E>(h);
}

// kWhole: each chunk by one 16-byte load (lds4_whole), else by ld4 (which ptxas narrows
// to two 4-byte loads, using fewer registers: plane_program.h, Geom::whole_loads).
template <int L, int Role, bool kWhole = true>
BF_HD void fast_inverse_row(const float* S, int r, float* h) {
  fastdct::static_for<L / 4>([&](auto c_) {
    constexpr int c = decltype(c_)::value;
    float a[4];
    if constexpr (kWhole)
      lds4_whole(S + sidx<L>(r, 4 * c), a);
    else
      ld4(S + sidx<L>(r, 4 * c), a);
    h[2 * c] = a[Role];
    h[2 * c + 1] = a[Role + 2];
  });
  fast_inverse_half<L, Role>(h);
}

// fast_inverse_row of a line held as column q of S (rows of DW floats: element k of the
// line at row k). Scalar loads; lanes on consecutive q meet 32 different banks (sidx).
template <int L, int Role, int DW>
BF_HD void fast_inverse_col(const float* S, int q, float* h) {
  BF_UNROLL for (int c = 0; c < L / 4; ++c) {
    h[2 * c] = S[sidx<DW>(4 * c + Role, q)];
    h[2 * c + 1] = S[sidx<DW>(4 * c + 2 + Role, q)];
  }
  fast_inverse_half<L, Role>(h);
}

// f(std::integral_constant<int, role>{}) for role 0 or 1: each role's code is compiled
// on its own (with the role a runtime value across shared code, ptxas spilled).
template <typename F>
BF_HD void with_role(int role, F&& f) {
  if (role == 0)
    f(std::integral_constant<int, 0>{});
  else
    f(std::integral_constant<int, 1>{});
}

// The fast passes of the plane program: the row's half transform, written transposed
// into D (rows of DW floats).
template <int L, int DW>
BF_HD void fast_forward_pass(const float* S, float* D, int role, int r) {
  with_role(role, [&](auto role_) {
    constexpr int kRole = decltype(role_)::value;
    float h[L / 2];
    fast_forward_row<L, kRole>(S, r, h);
    BF_UNROLL for (int k = 0; k < L / 2; ++k) D[sidx<DW>(2 * k + kRole, r)] = h[k];
  });
}

// Inverse, output in mirrored form: u at rows n < L/2 of D, w at rows L-1-n. The
// butterfly commutes with the pass along the other axis, so after two passes
// store_mirrored_group (plane_program.h) applies both axes' butterflies at once.
template <int L, int DW, bool kWhole = true>
BF_HD void fast_inverse_pass(const float* S, float* D, int role, int r) {
  with_role(role, [&](auto role_) {
    constexpr int kRole = decltype(role_)::value;
    float h[L / 2];
    fast_inverse_row<L, kRole, kWhole>(S, r, h);
    BF_UNROLL for (int n = 0; n < L / 2; ++n) D[sidx<DW>(kRole == 0 ? n : L - 1 - n, r)] = h[n];
  });
}

}  // namespace plane
}  // namespace blurfast
