// Formulas shared by the CPU and CUDA kernels: DCT matrix entries and Philox normals.
// Both backends call these same functions, so they agree bit for bit up to libm.
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define BF_HD __host__ __device__ __forceinline__
#else
#define BF_HD inline
#endif

namespace blurfast {

// Orthonormal DCT-II matrix entry C[k][i] = s_k cos(pi (2i+1) k / (2n)), in double.
// The angle is reduced exactly in integers first.
BF_HD double dct_coef(int64_t k, int64_t i, int64_t n) {
  const double pi = 3.141592653589793238462643383279502884;
  int64_t m = ((2 * i + 1) * k) % (4 * n);
  double s = (k == 0) ? sqrt(1.0 / (double)n) : sqrt(2.0 / (double)n);
  return s * cos(pi * (double)m / (double)(2 * n));
}

// Philox4x32-10 (Salmon et al. 2011): counter c[4], key k0, k1.
BF_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    uint64_t p0 = (uint64_t)0xD2511F53u * c[0];
    uint64_t p1 = (uint64_t)0xCD9E8D57u * c[2];
    uint32_t n0 = (uint32_t)(p1 >> 32) ^ c[1] ^ k0;
    uint32_t n2 = (uint32_t)(p0 >> 32) ^ c[3] ^ k1;
    c[1] = (uint32_t)p1;
    c[3] = (uint32_t)p0;
    c[0] = n0;
    c[2] = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// The four 32-bit words of Philox block b of stream `seed`: counter (b lo, b hi, 0, 0),
// key (seed lo, seed hi).
BF_HD void philox_block(uint64_t seed, uint64_t b, uint32_t c[4]) {
  c[0] = (uint32_t)b;
  c[1] = (uint32_t)(b >> 32);
  c[2] = 0u;
  c[3] = 0u;
  philox4x32_10(c, (uint32_t)seed, (uint32_t)(seed >> 32));
}

// Box-Muller in double on two words: r cos(2 pi u2) and/or r sin(2 pi u2), r = sqrt(-2 ln u1).
BF_HD void box_muller(uint32_t w1, uint32_t w2, double* cos_part, double* sin_part) {
  const double u1 = ((double)w1 + 0.5) * 2.3283064365386963e-10;  // 2^-32: u in (0, 1)
  const double u2 = ((double)w2 + 0.5) * 2.3283064365386963e-10;
  const double r = sqrt(-2.0 * log(u1));
#ifdef __CUDA_ARCH__
  // sincospi needs no argument reduction (no local-memory slow path); it and libm's
  // cos(2 pi u2) agree to within a few double ulps.
  double s, c;
  sincospi(2.0 * u2, &s, &c);
  if (cos_part) *cos_part = r * c;
  if (sin_part) *sin_part = r * s;
#else
  const double two_pi = 6.283185307179586476925286766559;
  if (cos_part) *cos_part = r * cos(two_pi * u2);
  if (sin_part) *sin_part = r * sin(two_pi * u2);
#endif
}

// Standard normal number e of the stream `seed`: lane e % 4 of Box-Muller applied to
// Philox block e / 4 (lanes 0, 1 from words 0, 1; lanes 2, 3 from words 2, 3).
BF_HD double philox_normal(uint64_t seed, uint64_t e) {
  uint32_t c[4];
  philox_block(seed, e >> 2, c);
  const int lane = (int)(e & 3);
  const uint32_t w1 = lane < 2 ? c[0] : c[2], w2 = lane < 2 ? c[1] : c[3];  // no dynamic index
  double z;
  if (lane & 1)
    box_muller(w1, w2, nullptr, &z);
  else
    box_muller(w1, w2, &z, nullptr);
  return z;
}

// out[i] = philox_normal(seed, e0 + i) for i < n, one Philox block per four numbers.
template <typename T>
inline void philox_normal_fill(uint64_t seed, uint64_t e0, int64_t n, T* out) {
  int64_t i = 0;
  while (i < n) {
    const uint64_t e = e0 + (uint64_t)i;
    uint32_t c[4];
    philox_block(seed, e >> 2, c);
    double z[4];
    box_muller(c[0], c[1], &z[0], &z[1]);
    box_muller(c[2], c[3], &z[2], &z[3]);
    for (int lane = (int)(e & 3); lane < 4 && i < n; ++lane, ++i) out[i] = (T)z[lane];
  }
}

// Index of the map plane that data plane p uses.
BF_HD int64_t map_plane(int64_t p, int64_t div, int64_t mod) { return (p / div) % mod; }

}  // namespace blurfast
