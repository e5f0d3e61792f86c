// Formulas shared by the CPU and CUDA kernels: DCT matrix entries and Philox normals.
// Both backends call these same functions: in double they agree bit for bit up to libm,
// in float (box_muller_f) bit for bit.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

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

// Box-Muller in float, for kernels that compute in float: the same two numbers as
// box_muller to float accuracy (tests/test_ops.py bounds the difference), several times
// cheaper than double on GPUs. Every multiply-add is an explicit fma and every other
// product is exact or feeds no addition, so no compiler contraction can change a result:
// CPU and CUDA give the same bits.
//   -2 ln u1: u1 = m 2^e with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s), s = (m-1)/(m+1);
//   cos, sin of 2 pi u2: the nearest quarter turn from the integer, then the Taylor series
//   on [-pi/4, pi/4] (truncation below 2e-9).
BF_HD float fma_f(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// a b, rounded: never merged with an addition into an fma (on the host a product that
// feeds only fma_f's arguments or a store is not contracted either).
BF_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// a b in double, rounded: never merged with an addition into an fma (the TwoSum of
// DotSum<double> needs the rounded product; the host's volatile store keeps GCC's
// contraction out, for the tests' binding).
BF_HD double mul_rn_d(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  volatile double p = a * b;
  return p;
#endif
}

// Sum of products x_i m_i (m_i DCT matrix entries in double), rounded to C once at the end:
// the simple CUDA kernels' sums (csrc/cuda_kernels.cu), which keep to the twice-torch
// error rule at any length. C = float: a double sum, one fma per term. C = double: Ogita,
// Rump and Oishi's Dot2, the exact error of each product (an fma) and of each addition
// (TwoSum) gathered in a second double, about as accurate as summing in twice double's
// precision.
template <typename C>
struct DotSum;
template <>
struct DotSum<float> {
  double s = 0.0;
  BF_HD void add(float x, double m) { s = fma((double)x, m, s); }
  BF_HD float value() const { return (float)s; }
};
// Dot2's step: s + c gathers p + e, the rounded product p and its exact error e
// (TwoProduct); TwoSum's exact error of s + p joins e in c. p must reach the addition
// rounded (not merged into an fma with it). Also the CPU's float64 dense passes
// (cpu_kernels.cpp).
BF_HD void dot2_step(double& s, double& c, double p, double e) {
  const double t = s + p, z = t - s;
  c += ((s - (t - z)) + (p - z)) + e;
  s = t;
}
template <>
struct DotSum<double> {
  double s = 0.0, c = 0.0;
  BF_HD void add(double x, double m) {
    const double p = mul_rn_d(x, m);
    dot2_step(s, c, p, fma(x, m, -p));
  }
  BF_HD double value() const { return s + c; }
};

// f / d for d in [1.70, 2.42] (the 2 + f of neg2_log_u), within an ulp, by fmas alone: a
// linear first guess of 1/d (relative error under 0.015), two Newton steps, one correction
// of the quotient. Unlike '/' it has no slow path to branch to, so on a GPU the compiler
// can interleave several of these.
BF_HD float div_near(float f, float d) {
  float y = fma_f(-0.239016f, d, 0.9850615f);
  y = fma_f(y, fma_f(-d, y, 1.0f), y);
  y = fma_f(y, fma_f(-d, y, 1.0f), y);
  const float q = f * y;
  return fma_f(fma_f(-q, d, f), y, q);
}

BF_HD float neg2_log_u(uint32_t w) {      // -2 ln u, u = (w + 1/2) 2^-32
  // u > sqrt(1/2): ln u = ln(1 + f) with f = -(1 - u), 1 - u made from ~w (so small
  // -ln u keep their relative accuracy); else u = m 2^e, f = m - 1, m in [sqrt(1/2), sqrt(2)).
  const float u = fma_f((float)w, 0x1p-32f, 0x1p-33f);   // exact product, one rounding
  uint32_t bits;
  memcpy(&bits, &u, sizeof bits);
  int e = (int)(bits >> 23) - 127;         // u >= 2^-33 is a normal float
  bits = (bits & 0x7FFFFFu) | 0x3F800000u;
  float m;
  memcpy(&m, &bits, sizeof m);             // [1, 2)
  if (m > 1.41421356f) {
    m *= 0.5f;
    e += 1;
  }
  const bool near_one = w >= 0xB504F334u;  // u > sqrt(1/2)
  const float f = near_one ? -fma_f((float)~w, 0x1p-32f, 0x1p-33f) : m - 1.0f;   // exact
  if (near_one) e = 0;
  const float s = div_near(f, 2.0f + f), s2 = s * s;          // |s| <= 0.1716
  float p = fma_f(s2, 2.0f / 11.0f, 2.0f / 9.0f);
  p = fma_f(s2, p, 2.0f / 7.0f);
  p = fma_f(s2, p, 2.0f / 5.0f);
  p = fma_f(s2, p, 2.0f / 3.0f);
  const float ln_m = fma_f(s * s2, p, s + s);
  const float ln2_hi = 0.693145751953125f, ln2_lo = 1.42860682030941723212e-6f;
  return -2.0f * fma_f((float)e, ln2_hi, fma_f((float)e, ln2_lo, ln_m));
}

BF_HD void box_muller_f(uint32_t w1, uint32_t w2, float* cos_part, float* sin_part) {
  const float r = sqrtf(neg2_log_u(w1));
  // 2 pi u2 = (pi/2) (q + (d + 1/2) / 2^30): quarter turn q (mod 4), d in [-2^29, 2^29).
  const uint32_t q = (w2 + (1u << 29)) >> 30;
  const int32_t d = (int32_t)(w2 - (q << 30));
  const float k = 1.57079632679489662f * 0x1p-30f;
  const float x = fma_f((float)d, k, 0.5f * k), x2 = x * x;
  float ps = fma_f(x2, 1.0f / 362880.0f, -1.0f / 5040.0f);
  ps = fma_f(x2, ps, 1.0f / 120.0f);
  ps = fma_f(x2, ps, -1.0f / 6.0f);
  const float sn = fma_f(x * x2, ps, x);
  float pc = fma_f(x2, -1.0f / 3628800.0f, 1.0f / 40320.0f);
  pc = fma_f(x2, pc, -1.0f / 720.0f);
  pc = fma_f(x2, pc, 1.0f / 24.0f);
  pc = fma_f(x2, pc, -0.5f);
  const float cs = fma_f(x2, pc, 1.0f);
  const int quarter = (int)(q & 3);        // (cos, sin) of q pi/2 + x
  const float c = quarter == 0 ? cs : quarter == 1 ? -sn : quarter == 2 ? -cs : sn;
  const float sv = quarter == 0 ? sn : quarter == 1 ? cs : quarter == 2 ? -sn : -cs;
  if (cos_part) *cos_part = r * c;
  if (sin_part) *sin_part = r * sv;
}

// Standard normal number e of the stream `seed`: lane e % 4 of Box-Muller applied to
// Philox block e / 4 (lanes 0, 1 from words 0, 1; lanes 2, 3 from words 2, 3), evaluated
// in T (double: box_muller; float: box_muller_f).
template <typename T = double>
BF_HD T philox_normal(uint64_t seed, uint64_t e) {
  uint32_t c[4];
  philox_block(seed, e >> 2, c);
  const int lane = (int)(e & 3);
  const uint32_t w1 = lane < 2 ? c[0] : c[2], w2 = lane < 2 ? c[1] : c[3];  // no dynamic index
  T z;
  if constexpr (sizeof(T) == sizeof(float)) {
    if (lane & 1)
      box_muller_f(w1, w2, nullptr, &z);
    else
      box_muller_f(w1, w2, &z, nullptr);
  } else {
    if (lane & 1)
      box_muller(w1, w2, nullptr, &z);
    else
      box_muller(w1, w2, &z, nullptr);
  }
  return z;
}

// The four normals of Philox block b, evaluated in T.
template <typename T>
BF_HD void philox_normal_block(uint64_t seed, uint64_t b, T z[4]) {
  uint32_t c[4];
  philox_block(seed, b, c);
  if constexpr (sizeof(T) == sizeof(float)) {
    box_muller_f(c[0], c[1], &z[0], &z[1]);
    box_muller_f(c[2], c[3], &z[2], &z[3]);
  } else {
    box_muller(c[0], c[1], &z[0], &z[1]);
    box_muller(c[2], c[3], &z[2], &z[3]);
  }
}

// z[q] = philox_normal<T>(seed, e + q) for q < 4: one Philox block when e is a multiple
// of 4, else four, one per loop turn. The loop is kept (shifting z through registers, no
// dynamic index): unrolled at every noise site of a fused kernel, the fallback's four
// Philox blocks made up most of the kernel's code, for offsets that are rarely used.
template <typename T>
BF_HD void philox_normal4(uint64_t seed, uint64_t e, T z[4]) {
  if ((e & 3) == 0) {
    philox_normal_block<T>(seed, e >> 2, z);
    return;
  }
#ifdef __CUDA_ARCH__
#pragma unroll 1
#endif
  for (int q = 0; q < 4; ++q) {
    const T v = philox_normal<T>(seed, e + (uint64_t)q);
    z[0] = z[1];
    z[1] = z[2];
    z[2] = z[3];
    z[3] = v;
  }
}

// out[i] = philox_normal<T>(seed, e0 + i) for i < n, one Philox block per four numbers.
// The whole blocks in the middle are a loop without branches, which compilers vectorise
// (with -fno-math-errno -fno-trapping-math, as CMakeLists.txt builds the CPU code).
template <typename T>
inline void philox_normal_fill(uint64_t seed, uint64_t e0, int64_t n, T* out) {
  int64_t i = 0;
  for (; i < n && ((e0 + (uint64_t)i) & 3) != 0; ++i) out[i] = philox_normal<T>(seed, e0 + i);
  const uint64_t b0 = (e0 + (uint64_t)i) >> 2;
  const int64_t blocks = (n - i) / 4;
  T* o = out + i;
  for (int64_t k = 0; k < blocks; ++k) {
    T z[4];
    philox_normal_block<T>(seed, b0 + (uint64_t)k, z);
    for (int q = 0; q < 4; ++q) o[4 * k + q] = z[q];
  }
  for (i += 4 * blocks; i < n; ++i) out[i] = philox_normal<T>(seed, e0 + i);
}

// Index of the map plane that data plane p uses.
BF_HD int64_t map_plane(int64_t p, int64_t div, int64_t mod) { return (p / div) % mod; }

}  // namespace blurfast
