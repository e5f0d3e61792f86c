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

// Standard normal number e of the stream `seed`: lane e % 4 of Box-Muller applied to
// Philox(counter = (b lo, b hi, 0, 0), key = seed), b = e / 4. Computed in double.
BF_HD double philox_normal(uint64_t seed, uint64_t e) {
  const double two_pi = 6.283185307179586476925286766559;
  uint64_t b = e >> 2;
  uint32_t c[4] = {(uint32_t)b, (uint32_t)(b >> 32), 0u, 0u};
  philox4x32_10(c, (uint32_t)seed, (uint32_t)(seed >> 32));
  int lane = (int)(e & 3);
  int pair = lane & 2;                              // lanes 0,1 use c[0],c[1]; 2,3 use c[2],c[3]
  double u1 = ((double)c[pair] + 0.5) * 2.3283064365386963e-10;      // 2^-32
  double u2 = ((double)c[pair + 1] + 0.5) * 2.3283064365386963e-10;
  double r = sqrt(-2.0 * log(u1));
  return (lane & 1) ? r * sin(two_pi * u2) : r * cos(two_pi * u2);
}

// Index of the map plane that data plane p uses.
BF_HD int64_t map_plane(int64_t p, int64_t div, int64_t mod) { return (p / div) % mod; }

}  // namespace blurfast
