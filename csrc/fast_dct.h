// Fast 1-D DCTs on one thread's registers, O(M log M): DCT-II, its transpose DCT-III,
// and DCT-IV, of power-of-two lengths M <= 256. Host and device code alike (BF_HD): the
// fast passes of line_passes.h use them, and the CPU emulator runs them too. The element
// type V is float, or on the CPU a vector of floats or doubles (cpu_vector_passes.h: one
// line per lane); the twiddles are constants of V's lane type.
//
// Unnormalised kernels, with a scale g = 2^(E/2):
//   DCT-II   X[k] = g_k sum_n x[n] cos(pi (2n+1) k / 2M),  g_0 = 2^(E0/2), g_k = g (k > 0)
//   DCT-III  the transpose: x[n] = sum_k g_k X[k] cos(pi (2n+1) k / 2M)
//   DCT-IV   Y[k] = g sum_n v[n] cos(pi (2n+1)(2k+1) / 4M)   (symmetric)
// The orthonormal DCT-II of length L is E = 1 - log2 L, E0 = -log2 L.
//
// Algorithms:
// - DCT-II by the even/odd split: e[n] = x[n] + x[M-1-n], o[n] = x[n] - x[M-1-n] give
//   X[2k] = DCT-II_{M/2}(e)[k] and X[2k+1] = DCT-IV_{M/2}(o)[k]; DCT-III the same steps
//   transposed, in reverse order.
// - DCT-IV through a complex FFT of length M/2: z[n] = (v[2n] + i v[M-1-2n]) e^(-i pi n/M),
//   Z = FFT(z), S[k] = g e^(-i pi (4k+1)/4M) Z[k]; then Y[2k] = Re S[k] and
//   Y[M-1-2k] = -Im S[k]. Only rotations, so the rounding error grows as log M.
// - The FFT: radix 2, decimation in frequency, output in bit-reversed order.
//
// Every loop runs over template constants (static_for), so each twiddle is a constant
// computed at compile time, and each array index is fixed, so the arrays stay in registers.
#pragma once
#include <type_traits>
#include <utility>

#include "common.h"

namespace blurfast {
namespace fastdct {

template <typename F, int... I>
BF_HD void static_for_seq(F& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}

// f(std::integral_constant<int, i>{}) for i = 0 .. N-1.
template <int N, typename F>
BF_HD void static_for(F&& f) {
  static_for_seq(f, std::make_integer_sequence<int, N>{});
}

constexpr int log2i(int n) { return n <= 1 ? 0 : 1 + log2i(n / 2); }

constexpr int bit_reverse(int k, int bits) {
  int r = 0;
  for (int b = 0; b < bits; ++b) r |= ((k >> b) & 1) << (bits - 1 - b);
  return r;
}

// cos(pi p / q), q > 0, in double at compile time: exact integer reduction to an angle in
// [0, pi/4], then the Taylor series of cos or sin there (truncation below 1e-19).
constexpr double cospi_ratio(long long p, long long q) {
  p %= 2 * q;
  if (p < 0) p += 2 * q;
  if (p > q) p = 2 * q - p;                          // cos(2 pi - x) = cos x
  double sign = 1.0;
  if (2 * p > q) {                                   // cos(pi - x) = -cos x
    p = q - p;
    sign = -1.0;
  }
  const bool use_sin = 4 * p > q;                    // cos x = sin(pi/2 - x)
  const double x = 3.14159265358979323846 * (double)(use_sin ? q - 2 * p : 2 * p) /
                   (double)(2 * q);
  double term = use_sin ? x : 1.0, sum = term;
  for (int n = use_sin ? 1 : 0; n < 26; n += 2) {
    term *= -x * x / (double)((n + 1) * (n + 2));
    sum += term;
  }
  return sign * sum;
}

constexpr double sinpi_ratio(long long p, long long q) { return cospi_ratio(2 * p - q, 2 * q); }

// The lane type of V: V itself for a scalar, its element type for a GCC vector.
template <typename V>
struct Lane {
  using type = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<V&>()[0])>>;
};
template <>
struct Lane<float> {
  using type = float;
};
template <>
struct Lane<double> {
  using type = double;
};

// 2^(e/2).
constexpr double pow_sqrt2(int e) {
  double r = (e % 2 != 0) ? 1.41421356237309504880 : 1.0;
  for (int i = 0; i < (e < 0 ? -e : e) / 2; ++i) r = e < 0 ? r / 2.0 : r * 2.0;
  return (e < 0 && e % 2 != 0) ? r / 2.0 : r;
}

// (re, im) = 2^(E/2) e^(-i pi P/Q) (a + i b). Unscaled rotations by 0 and pi/2 cost nothing.
template <int P, int Q, int E, typename V>
BF_HD void rotate(V a, V b, V& re, V& im) {
  if constexpr (E == 0 && P % (2 * Q) == 0) {
    re = a;
    im = b;
  } else if constexpr (E == 0 && (2 * P) % (4 * Q) == Q) {   // angle pi/2
    re = b;
    im = -a;
  } else {
    using S = typename Lane<V>::type;
    constexpr S c = (S)(pow_sqrt2(E) * cospi_ratio(P, Q));
    constexpr S s = (S)(pow_sqrt2(E) * sinpi_ratio(P, Q));
    re = a * c + b * s;
    im = b * c - a * s;
  }
}

// In-place forward FFT Z[k] = sum_n z[n] e^(-2 pi i n k / P); Z[k] lands at bit_reverse(k).
template <int P, typename V>
BF_HD void fft(V* re, V* im) {
  static_for<log2i(P)>([&](auto stage) {
    constexpr int s = P >> (decltype(stage)::value + 1);         // butterfly span
    static_for<P / 2>([&](auto u) {
      constexpr int j = decltype(u)::value % s;
      constexpr int i0 = (decltype(u)::value / s) * 2 * s + j, i1 = i0 + s;
      const V ar = re[i0], ai = im[i0], br = re[i1], bi = im[i1];
      re[i0] = ar + br;
      im[i0] = ai + bi;
      rotate<j, s, 0>(ar - br, ai - bi, re[i1], im[i1]);        // times e^(-i pi j / s)
    });
  });
}

// DCT-IV of v[0 .. M-1], in place.
template <int M, int E, typename V>
BF_HD void dct4(V* v) {
  if constexpr (M == 1) {
    using S = typename Lane<V>::type;
    constexpr S c = (S)(pow_sqrt2(E) * cospi_ratio(1, 4));
    v[0] *= c;
  } else {
    constexpr int P = M / 2;
    V re[P], im[P];
    static_for<P>([&](auto n_) {
      constexpr int n = decltype(n_)::value;
      rotate<n, M, 0>(v[2 * n], v[M - 1 - 2 * n], re[n], im[n]);
    });
    fft<P>(re, im);
    static_for<P>([&](auto k_) {
      constexpr int k = decltype(k_)::value, at = bit_reverse(k, log2i(P));
      V sr, si;
      rotate<4 * k + 1, 4 * M, E>(re[at], im[at], sr, si);
      v[2 * k] = sr;
      v[M - 1 - 2 * k] = -si;
    });
  }
}

// DCT-II of x[0 .. M-1], in place.
template <int M, int E, int E0, typename V>
BF_HD void dct2(V* x) {
  if constexpr (M == 1) {
    if constexpr (E0 != 0) x[0] *= (typename Lane<V>::type)pow_sqrt2(E0);
  } else {
    constexpr int H = M / 2;
    V e[H], o[H];
    static_for<H>([&](auto n_) {
      constexpr int n = decltype(n_)::value;
      e[n] = x[n] + x[M - 1 - n];
      o[n] = x[n] - x[M - 1 - n];
    });
    dct2<H, E, E0>(e);
    dct4<H, E>(o);
    static_for<H>([&](auto k_) {
      constexpr int k = decltype(k_)::value;
      x[2 * k] = e[k];
      x[2 * k + 1] = o[k];
    });
  }
}

// DCT-III (the transpose of dct2<M, E, E0>) of X[0 .. M-1], in place.
template <int M, int E, int E0, typename V>
BF_HD void dct3(V* x) {
  if constexpr (M == 1) {
    if constexpr (E0 != 0) x[0] *= (typename Lane<V>::type)pow_sqrt2(E0);
  } else {
    constexpr int H = M / 2;
    V e[H], o[H];
    static_for<H>([&](auto k_) {
      constexpr int k = decltype(k_)::value;
      e[k] = x[2 * k];
      o[k] = x[2 * k + 1];
    });
    dct3<H, E, E0>(e);
    dct4<H, E>(o);
    static_for<H>([&](auto n_) {
      constexpr int n = decltype(n_)::value;
      x[n] = e[n] + o[n];
      x[M - 1 - n] = e[n] - o[n];
    });
  }
}

}  // namespace fastdct
}  // namespace blurfast
